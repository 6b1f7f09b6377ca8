"""Run the unmodified CUDA kernels of ``kernels/`` on the CPU, for tests without a GPU.

The kernel sources are compiled with the host C++ compiler (``$CXX``, default ``g++``) against
the small CUDA shim in ``include/`` (see ``include/cuda_emu.h`` for what is emulated), together
with a generated wrapper that exports one C function per entry point of
``hpcattn.gpu.kernels.KERNELS``. Each wrapper takes a CUDA-style ``void**`` argument array built
here from the same ``Arg`` list the CuPy launch uses, and checks at compile time that the kernel's
C parameter kinds match that list. The shared library is cached under
``$HPCATTN_EMULATION_CACHE`` (default ``~/.cache/hpcattn/emulation``), keyed by a hash of
everything that goes into it.

>>> from hpcattn.emulation import attention_emulated
>>> out, lse = attention_emulated(q, k, v, causal=True)     # NumPy arrays, float32/16/bf16

This is slow (one fiber per CUDA thread): keep shapes small.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from ..errors import HpcattnError
from ..gpu import kernels
from ..validate import attention_scale, causal_positions

INCLUDE_DIR = Path(__file__).resolve().parent / "include"
SHARED_CAPACITY = 256 * 1024  # bytes; above every arch's dynamic shared-memory limit
CXXFLAGS = ("-std=c++17", "-O2", "-fPIC", "-shared", "-fno-strict-aliasing", "-Wall",
            "-Wno-unknown-pragmas", "-Wno-unused-function")

_EXTERN_SHARED = re.compile(r"extern\s+__shared__\s+(?:__align__\(\d+\)\s+)?(\w+)\s+(\w+)\s*\[\s*\]")
_ANY_SHARED = re.compile(r"__shared__")
_KIND_LETTER = {"ptr": "p", "int32": "i", "float32": "f"}
_CTYPE = {"int32": ctypes.c_int32, "float32": ctypes.c_float}


def _strip_comments(src: str) -> str:
    return re.sub(r"//[^\n]*|/\*.*?\*/", "", src, flags=re.S)


def _sources(kernel_dir: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted(Path(kernel_dir).glob("*.cu*"))}


def shared_arrays(sources: dict[str, str]) -> dict[str, str]:
    """name -> element type of every ``extern __shared__`` array; refuses static __shared__."""
    found = {}
    for fname, src in sources.items():
        code = _strip_comments(src)
        ext = _EXTERN_SHARED.findall(code)
        if len(_ANY_SHARED.findall(code)) != len(ext):
            raise HpcattnError(f"{fname} declares a static __shared__ variable; the CPU emulation "
                               "supports only `extern __shared__ T name[];` (dynamic shared memory)")
        for typ, name in ext:
            if found.setdefault(name, typ) != typ:
                raise HpcattnError(f"extern __shared__ {name} is declared with types {found[name]} and {typ}")
    return found


def wrapper_source(sources: dict[str, str], main: str, spec: dict) -> str:
    """The translation unit: kernel sources, shared-memory buffers, one export per entry point."""
    lines = [f'#include "{main}"', ""]
    arrays = shared_arrays(sources)
    for name, typ in arrays.items():
        lines.append(f'extern "C" {{ alignas(4096) {typ} {name}[{SHARED_CAPACITY} / sizeof({typ})]; }}')
    # every launch protects the pages of all buffers past its size; one buffer keeps that simple
    if len(arrays) > 1:
        raise HpcattnError(f"the emulation supports one extern __shared__ name; found {sorted(arrays)}")
    buf = next(iter(arrays), None)
    for name, args in spec.items():
        sig = "".join(_KIND_LETTER[a.kind] for a in args)
        shared = f"reinterpret_cast<unsigned char*>({buf}), sizeof({buf})" if buf else "nullptr, 0"
        lines += [
            f'static_assert(emu::signature_is({name}, "{sig}"), '
            f'"{name}: C parameters differ from hpcattn.gpu.kernels.KERNELS");',
            f'extern "C" const char* emu_{name}(const unsigned* grid, const unsigned* block, '
            f"size_t emu_smem_bytes, void** emu_args) {{",
            f"    return emu::launch({name}, grid, block, emu_smem_bytes, emu_args, {shared});",
            "}",
        ]
    return "\n".join(lines) + "\n"


def _cache_dir() -> Path:
    root = os.environ.get("HPCATTN_EMULATION_CACHE") or Path.home() / ".cache" / "hpcattn" / "emulation"
    return Path(root)


_LIBS: dict = {}


def library() -> ctypes.CDLL:
    """The emulation library of hpcattn's own kernels (built once per source hash)."""
    return build(kernels.KERNEL_DIR, kernels.ATTENTION_SOURCE, kernels.KERNELS, kernels.compile_defines())


def build(kernel_dir, main: str, spec: dict, defines=()) -> ctypes.CDLL:
    """Compile ``kernel_dir/main`` (which may include other files there) for the CPU and load it.

    ``spec`` maps each entry point to its ``Arg`` list; each gets an export ``emu_<name>``.
    """
    kernel_dir = Path(kernel_dir)
    cxx = os.environ.get("CXX", "g++")
    if shutil.which(cxx) is None:
        raise HpcattnError(f"C++ compiler {cxx!r} not found; expected g++ (or set CXX) for the CPU emulation")
    sources = _sources(kernel_dir)
    wrapper = wrapper_source(sources, main, spec)
    cmd = [cxx, *CXXFLAGS, *defines, "-I", str(INCLUDE_DIR), "-I", str(kernel_dir), "-include", "cuda_emu.h"]
    h = hashlib.sha256("\0".join(cmd).encode() + wrapper.encode())
    for p in sorted(INCLUDE_DIR.iterdir()):
        h.update(p.read_bytes())
    for text in sources.values():
        h.update(text.encode())
    target = _cache_dir() / f"emu-{h.hexdigest()[:16]}.so"
    if target in _LIBS:
        return _LIBS[target]
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            cpp = Path(tmp) / "emulation.cpp"
            cpp.write_text(wrapper)
            so = Path(tmp) / "emu.so"
            res = subprocess.run([*cmd, "-o", str(so), str(cpp)], capture_output=True, text=True)
            if res.returncode:
                raise HpcattnError(f"emulation build failed: {' '.join(cmd)}\n{res.stderr}")
            os.replace(so, target)  # atomic: concurrent builders write the same bytes
    lib = ctypes.CDLL(str(target))
    for name in spec:
        fn = getattr(lib, f"emu_{name}")
        fn.restype = ctypes.c_char_p
        fn.argtypes = [ctypes.POINTER(ctypes.c_uint), ctypes.POINTER(ctypes.c_uint), ctypes.c_size_t,
                       ctypes.POINTER(ctypes.c_void_p)]
    _LIBS[target] = lib
    return lib


def launch(plan: kernels.Launch, lib: ctypes.CDLL | None = None, spec: dict | None = None) -> None:
    """Run ``plan`` (see ``hpcattn.gpu.kernels.Launch``) on the CPU, blocks one after another."""
    if 0 in plan.grid:
        return
    lib = library() if lib is None else lib
    spec = (kernels.KERNELS if spec is None else spec)[plan.kernel]
    keep, ptrs = [], []
    for arg in spec:
        value = plan.values[arg.name]
        if arg.kind == "ptr":
            if value is not None and not (isinstance(value, np.ndarray) and value.flags.c_contiguous):
                raise HpcattnError(f"argument {arg.name} of {plan.kernel} is not a C-contiguous NumPy array")
            obj = ctypes.c_void_p(None if value is None else value.ctypes.data)
        else:
            obj = _CTYPE[arg.kind](value)
        keep.append(obj)
        ptrs.append(ctypes.cast(ctypes.pointer(obj), ctypes.c_void_p))
    argv = (ctypes.c_void_p * len(ptrs))(*ptrs)
    err = getattr(lib, f"emu_{plan.kernel}")((ctypes.c_uint * 3)(*plan.grid),
                                                  (ctypes.c_uint * 3)(*plan.block), plan.smem, argv)
    if err:
        raise HpcattnError(f"emulated {plan.kernel} failed: {err.decode()}")


def attention_emulated(q, k, v, *, causal=False, scale=None, q_pos=None, k_pos=None, variant=None):
    """``hpcattn.attention`` semantics for NumPy inputs, computed by the CUDA kernel on the CPU
    (``variant`` "simt" or "mma" as in ``hpcattn.gpu.kernels.plan_attention``).

    Outputs are poisoned (NaN) before the launch, so an element the kernel forgets stays NaN.
    """
    q, k, v = (np.ascontiguousarray(x) for x in (q, k, v))
    scale = attention_scale(scale, q.shape[3])
    if causal:
        q_pos, k_pos = causal_positions(q_pos, k_pos, q.shape[1], k.shape[1])
    plan = kernels.plan_attention(q, k, v, causal=causal, scale=scale, q_pos=q_pos, k_pos=k_pos, xp=np,
                                  variant=variant)
    plan.out[...] = np.nan
    plan.lse[...] = np.nan
    launch(plan)
    return plan.out, plan.lse
