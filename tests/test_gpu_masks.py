"""Masks on a real GPU (skipped without one, with the reason): windows, packed sequences and
bottom-right causal through hpcattn.attention / attention_backward on CuPy arrays (the CUDA
backend's mask plan) equal the dense float64 definition of tests/test_mask_plan_unit.py."""
import numpy as np
import pytest

import hpcattn
from hpcattn.devices import np_dtype
from hpcattn.gpu.environment import no_gpu_reason
from test_mask_plan_unit import MASKS, case, dense_attention

cupy = pytest.importorskip("cupy", reason="CuPy not installed; GPU tests need pip install '.[gpu]'")

NO_GPU = no_gpu_reason()
pytestmark = [pytest.mark.gpu, pytest.mark.timeout(300),
              pytest.mark.skipif(NO_GPU is not None, reason=f"no usable GPU: {NO_GPU}")]


@pytest.mark.parametrize("dtype, tol", [("float32", 2e-5), ("bfloat16", 3e-2)])
@pytest.mark.parametrize("spec", [m for m in MASKS if not m[6]], ids=str)
def test_masked_attention_on_the_gpu_equals_the_definition(spec, dtype, tol):
    nq, nk, causal, window, cu, align, _ = spec
    rng = np.random.default_rng(3)
    mask, q_pos, k_pos, vis = case(spec, rng)
    q, k, v = (rng.standard_normal(s).astype(np.float32)
               for s in ((2, nq, 4, 64), (2, nk, 2, 64), (2, nk, 2, 64)))
    dt = cupy.dtype(np_dtype(dtype))
    dq_, dk_, dv_ = (cupy.asarray(x).astype(dt) for x in (q, k, v))
    kw = dict(causal=causal, window=window, cu_seqlens=cu, align=align)
    out, lse = hpcattn.attention(dq_, dk_, dv_, **kw)
    low = [cupy.asnumpy(x).astype(np.float64) for x in (dq_, dk_, dv_)]
    ref, _ = dense_attention(*low, vis)
    assert np.abs(cupy.asnumpy(out).astype(np.float64) - ref).max() < tol
    dout = cupy.asarray(rng.standard_normal(q.shape).astype(np.float32)).astype(dt)
    grads = hpcattn.attention_backward(dq_, dk_, dv_, out, lse, dout, **kw)
    want = dense_attention(*low, vis, cupy.asnumpy(dout).astype(np.float64))
    for got, w in zip(grads, want):
        assert np.abs(cupy.asnumpy(got).astype(np.float64) - w).max() < 10 * tol
