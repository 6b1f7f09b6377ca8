"""The kernels on a real GPU (skipped without one, with the reason): every entry point against the
float64 reference, the same numbers as the CPU emulation, the public API dispatch, the check command."""
import numpy as np
import pytest

import hpcattn
from hpcattn.devices import np_dtype
from hpcattn.errors import HpcattnError
from hpcattn.gpu import kernels
from hpcattn.gpu.environment import no_gpu_reason
from hpcattn.gpu.accuracy import judge
from hpcattn.gpu.check import CHECK_SHAPES, variants, zigzag_positions

cupy = pytest.importorskip("cupy", reason="CuPy not installed; GPU tests need pip install '.[gpu]'")

NO_GPU = no_gpu_reason()
pytestmark = [pytest.mark.gpu, pytest.mark.timeout(300),
              pytest.mark.skipif(NO_GPU is not None, reason=f"no usable GPU: {NO_GPU}")]


def inputs(rng, b, nq, nk, h, hkv, d, dtype):
    dt = np_dtype(dtype)
    return [rng.standard_normal(s, dtype=np.float32).astype(dt)
            for s in ((b, nq, h, d), (b, nk, hkv, d), (b, nk, hkv, d))]


KERNEL_CASES = [(dt, var) for dt in kernels.DTYPES for var in variants(dt)]


@pytest.mark.parametrize("dtype, variant", KERNEL_CASES)
@pytest.mark.parametrize("head_dim", kernels.HEAD_DIMS)
@pytest.mark.parametrize("shape", CHECK_SHAPES, ids=lambda s: "b{}q{}k{}h{}kv{}{}{}".format(
    *s[:5], "c" * s[5], "z" * s[6]))
def test_public_attention_on_gpu_matches_float64_reference(shape, head_dim, dtype, variant, monkeypatch):
    b, nq, nk, h, hkv, causal, zigzag = shape
    rng = np.random.default_rng(7)
    q, k, v = inputs(rng, b, nq, nk, h, hkv, head_dim, dtype)
    q_pos = zigzag_positions(nq) if zigzag else np.arange(nq)
    k_pos = zigzag_positions(nk) if zigzag else np.arange(nk)
    monkeypatch.setenv("HPCATTN_GPU_KERNEL", variant)  # the public API has no kernel argument
    out, lse = hpcattn.attention(*(cupy.asarray(x) for x in (q, k, v)), causal=causal,
                                 q_pos=q_pos if causal else None, k_pos=k_pos if causal else None)
    assert isinstance(out, cupy.ndarray) and out.dtype == q.dtype and lse.dtype == np.float32
    verdict = judge(q, k, v, out.get(), lse.get(), causal=causal, q_pos=q_pos, k_pos=k_pos)
    print(verdict)
    assert verdict.ok, verdict


@pytest.mark.parametrize("dtype, variant", KERNEL_CASES)
def test_gpu_and_cpu_emulation_agree(dtype, variant):
    """The same .cu source on the GPU and under hpcattn.emulation: equal up to rounding
    (FMA contraction, the tensor core's summation order, one output rounding)."""
    from hpcattn.emulation import attention_emulated
    from hpcattn.gpu import attention_gpu

    rng = np.random.default_rng(3)
    q, k, v = inputs(rng, 1, 150, 130, 4, 2, 64, dtype)
    pos = zigzag_positions(150)
    emu_out, emu_lse = attention_emulated(q, k, v, causal=True, q_pos=pos, k_pos=pos[:130], variant=variant)
    gpu_out, gpu_lse = attention_gpu(*(cupy.asarray(x) for x in (q, k, v)), causal=True,
                                     q_pos=pos, k_pos=pos[:130], variant=variant)
    diff = np.abs(gpu_out.get().astype(np.float32) - emu_out.astype(np.float32)).max()
    ulp = {"float32": 1e-6, "float16": 2e-3, "bfloat16": 1.6e-2}[dtype]  # one output rounding step
    assert diff <= ulp, f"GPU vs emulation differ by {diff}"
    assert np.allclose(gpu_lse.get(), emu_lse, atol=1e-6, rtol=0)


def test_unsupported_head_dim_is_a_clear_error():
    x = cupy.ones((1, 8, 2, 96), dtype=cupy.float16)
    with pytest.raises(HpcattnError, match="head_dim 96 is not supported by the GPU kernels"):
        hpcattn.attention(x, x, x)


def test_check_command_gives_a_pass_verdict(capsys):
    from hpcattn.gpu.check import main

    assert main(["--no-bench", "--dtypes", "float32,bfloat16", "--head-dims", "64"]) == 0
    assert "VERDICT: PASS" in capsys.readouterr().out
