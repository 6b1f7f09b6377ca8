"""Compile the kernels exactly as CuPy does, without a GPU (NVRTC needs no driver).

``cupy.RawModule(...).compile()`` asks the device for its architecture; everything below that
(CuPy's option list, NVRTC, ptxas) does not. ``compile_for_arch`` therefore calls CuPy's own
``compile_using_nvrtc`` with CuPy's own option list (``assemble_cupy_compiler_options`` plus the
``-ftz=true`` that ``_compile_with_cache_cuda`` appends), with the per-device memoisation of
``_get_arch_for_options_for_nvrtc`` bypassed for the duration of the call. ``-Xptxas=-v`` makes
ptxas report registers, spills and static shared memory in the log. This leans on CuPy
internals; tests/test_kernels_nvrtc.py guards that CuPy's real ``RawModule`` pipeline hands NVRTC
the same options as ``cupy_options``.
"""
from __future__ import annotations

import contextlib
import io
import re
from dataclasses import dataclass

from . import kernels

ARCHS = ("80", "89", "90")


def cupy_options(extra=()) -> tuple[str, ...]:
    """The option list CuPy's RawModule compiles our kernels with (before the arch options)."""
    from cupy._core.core import assemble_cupy_compiler_options

    return tuple(assemble_cupy_compiler_options(kernels.compile_options() + tuple(extra))) + ("-ftz=true",)


def nvrtc_version() -> tuple[int, int]:
    from cupy.cuda import nvrtc

    return tuple(nvrtc.getVersion())


@contextlib.contextmanager
def _no_device_arch_lookup():
    from cupy.cuda import compiler

    memoised = compiler._get_arch_for_options_for_nvrtc
    compiler._get_arch_for_options_for_nvrtc = getattr(memoised, "__wrapped__", memoised)
    try:
        yield compiler
    finally:
        compiler._get_arch_for_options_for_nvrtc = memoised


@dataclass
class Resources:
    """What ptxas reported for one entry point."""

    registers: int
    spill_stores: int
    spill_loads: int
    stack_bytes: int
    static_smem: int


def compile_for_arch(arch: str, source: str | None = None, extra=()) -> tuple[bytes, str]:
    """(cubin, compiler log) for ``source`` (default: the attention kernels) on sm_<arch>.

    Raises ``cupy.cuda.compiler.CompileException`` (whose text holds NVRTC's message) on error.
    """
    src = kernels.kernel_source() if source is None else source
    log = io.StringIO()
    with _no_device_arch_lookup() as compiler:
        cubin, _ = compiler.compile_using_nvrtc(src, options=cupy_options(("-Xptxas=-v",) + tuple(extra)),
                                                arch=arch, log_stream=log)
    return cubin, log.getvalue()


_FUNC = re.compile(r"Compiling entry function '(\w+)'")
_REGS = re.compile(r"Used (\d+) registers")
_STACK = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_SMEM = re.compile(r"(\d+) bytes smem")


def parse_ptxas(log: str) -> dict[str, Resources]:
    """Entry point name -> Resources, from a ``-Xptxas=-v`` log."""
    result, name, stack = {}, None, (0, 0, 0)
    for line in log.splitlines():
        if m := _FUNC.search(line):
            name, stack = m.group(1), (0, 0, 0)
        elif name and (m := _STACK.search(line)):
            stack = tuple(int(x) for x in m.groups())
        elif name and (m := _REGS.search(line)):
            smem = _SMEM.search(line)
            result[name] = Resources(int(m.group(1)), stack[1], stack[2], stack[0],
                                     int(smem.group(1)) if smem else 0)
            name = None
    return result
