"""The CUDA kernels compile exactly as CuPy compiles them (NVRTC), for sm_80/89/90, no GPU needed.

Needs ``pip install '.[nvrtc]'`` (cupy-cuda12x + the NVRTC 12.9 / CUDA headers wheels); skipped
with the reason otherwise.
"""
import io

import pytest

from hpcattn.gpu import kernels

cupy = pytest.importorskip("cupy", reason="CuPy not installed (pip install '.[nvrtc]' for the NVRTC tests)")
from hpcattn.gpu import nvrtc  # noqa: E402

try:
    NVRTC_VERSION = nvrtc.nvrtc_version()
except Exception as exc:  # CuPy without a loadable libnvrtc
    pytest.skip(f"NVRTC not loadable ({exc}); pip install '.[nvrtc]'", allow_module_level=True)

#: the NVRTC the register table in the docs was measured with (the `nvrtc` extra pins it)
PINNED_NVRTC = (12, 9)
STATIC_SMEM_LIMIT = 48 * 1024
MAX_REGISTERS_PER_SM = 65536

_reports = {}


def report(arch):
    if arch not in _reports:
        _, log = nvrtc.compile_for_arch(arch)
        _reports[arch] = nvrtc.parse_ptxas(log)
    return _reports[arch]


def test_nvrtc_version_is_the_pinned_one():
    if NVRTC_VERSION[0] != PINNED_NVRTC[0]:
        pytest.skip(f"NVRTC {NVRTC_VERSION} belongs to another CUDA major; the pin {PINNED_NVRTC} is "
                    "for cupy-cuda12x + cuda-toolkit[nvrtc]==12.9.*")
    assert NVRTC_VERSION == PINNED_NVRTC


@pytest.mark.parametrize("arch", nvrtc.ARCHS)
def test_every_entry_point_compiles_without_spills_within_limits(arch):
    rep = report(arch)
    assert set(rep) == set(kernels.KERNELS), "ptxas reported other entry points than KERNELS declares"
    for name, res in rep.items():
        head_dim = int(name.rsplit("_d", 1)[1])
        variant = "mma" if "_mma_" in name else "simt"
        assert res.spill_stores == 0 and res.spill_loads == 0, f"{name} sm_{arch} spills: {res}"
        assert res.stack_bytes == 0, f"{name} sm_{arch} uses a stack frame (local memory): {res}"
        assert res.registers * kernels.THREADS <= MAX_REGISTERS_PER_SM, f"{name} cannot launch: {res}"
        assert res.static_smem <= STATIC_SMEM_LIMIT
        dynamic = kernels.attention_smem_bytes(head_dim, variant)
        assert res.static_smem + dynamic <= kernels.MAX_DYNAMIC_SMEM[arch], \
            f"{name} needs {res.static_smem + dynamic} B shared memory; sm_{arch} allows {kernels.MAX_DYNAMIC_SMEM[arch]}"


@pytest.mark.parametrize("arch", nvrtc.ARCHS)
def test_cubin_is_for_the_requested_arch(arch):
    cubin, _ = nvrtc.compile_for_arch(arch, source=_tiny_kernel())
    assert cubin[:4] == b"\x7fELF"
    # ELF e_flags of a CUDA cubin carry the SM number: low byte up to CUDA 12, next byte from 13
    e_flags = int.from_bytes(cubin[48:52], "little")
    sm = e_flags & 0xFF if NVRTC_VERSION[0] < 13 else (e_flags >> 8) & 0xFF
    assert sm == int(arch), f"cubin e_flags {e_flags:#x} not for sm_{arch}"


def _tiny_kernel():
    return 'extern "C" __global__ void tiny(float* x) { x[threadIdx.x] *= 2.0f; }\n'


@pytest.mark.parametrize("breakage, message", [
    (("CUDART_INF_F", "INFINITY"), "INFINITY"),         # nvcc accepts INFINITY, NVRTC does not
    (("m[r] = m_new;", "m[r] = m_new"), "expected a \";\""),
    (("#include \"hpcattn_common.cuh\"", "#include \"missing.cuh\""), "missing.cuh"),
])
def test_broken_source_fails_with_the_compiler_message(breakage, message):
    from cupy.cuda.compiler import CompileException

    src = kernels.kernel_source()
    assert breakage[0] in src
    with pytest.raises(CompileException) as err:
        nvrtc.compile_for_arch("80", source=src.replace(breakage[0], breakage[1], 1))
    assert message in str(err.value)


def test_source_without_configuration_refuses_to_compile():
    from cupy._core.core import assemble_cupy_compiler_options
    from cupy.cuda import compiler

    options = tuple(assemble_cupy_compiler_options(("-I" + str(kernels.KERNEL_DIR),)))
    with nvrtc._no_device_arch_lookup(), pytest.raises(compiler.CompileException) as err:
        compiler.compile_using_nvrtc(kernels.kernel_source(), options=options, arch="80",
                                     log_stream=io.StringIO())
    assert "hpcattn.gpu.kernels.compile_options" in str(err.value)


def test_cupy_rawmodule_hands_nvrtc_the_same_options(monkeypatch):
    """Guard for the CuPy internals nvrtc.py relies on: drive the real RawModule pipeline up to
    the NVRTC call (faking only the device's arch and the disk cache) and compare options."""
    import cupy._core.raw as raw
    from cupy.cuda import compiler

    seen = []

    class Captured(Exception):
        pass

    class Program(compiler._NVRTCProgram):
        def compile(self, options=(), log_stream=None):
            if self.src:  # CuPy also compiles an empty file to fingerprint the compiler
                seen.append(tuple(options))
                raise Captured
            return super().compile(options, log_stream)

    monkeypatch.setattr(raw, "_get_raw_module", raw._get_raw_module.__wrapped__)  # per-device memo
    monkeypatch.setattr(compiler, "_NVRTCProgram", Program)
    monkeypatch.setattr(compiler, "_get_arch", lambda: "90")
    monkeypatch.setattr(compiler, "_get_arch_for_options_for_nvrtc",
                        compiler._get_arch_for_options_for_nvrtc.__wrapped__)
    monkeypatch.setenv("CUPY_CACHE_IN_MEMORY", "1")
    src = kernels.kernel_source()
    with pytest.raises(Captured):
        cupy.RawModule(code=src, options=kernels.compile_options()).compile()
    with pytest.raises(Captured):
        compiler.compile_using_nvrtc(src, options=nvrtc.cupy_options(), arch="90")
    assert len(seen) == 2
    assert seen[0] == seen[1], f"RawModule: {seen[0]}\nhpcattn.gpu.nvrtc: {seen[1]}"
    assert "-ftz=true" in seen[0] and "-arch=sm_90" in seen[0]
