"""A second, independent reference: PyTorch's CPU scaled_dot_product_attention.

Optional: runs only where PyTorch is installed (``pip install torch``); nobody here wrote it.
"""
import numpy as np
import pytest

from hpcattn import attention

torch = pytest.importorskip("torch", reason="PyTorch not installed (optional second reference)")


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("h, hkv", [(4, 4), (6, 2), (3, 1)])
@pytest.mark.parametrize("dtype, tol", [("float64", 1e-12), ("float32", 3e-6)])
def test_matches_torch_sdpa(causal, h, hkv, dtype, tol):
    rng = np.random.default_rng(11)
    b, n, d = 2, 157, 16
    q = rng.standard_normal((b, n, h, d)).astype(dtype)
    k = rng.standard_normal((b, n, hkv, d)).astype(dtype)
    v = rng.standard_normal((b, n, hkv, d)).astype(dtype)
    out, _ = attention(q, k, v, causal=causal, block_q=32, block_k=48)
    tq, tk, tv = (torch.from_numpy(x).transpose(1, 2) for x in (q, k, v))   # (b, h, n, d)
    tk, tv = (t.repeat_interleave(h // hkv, dim=1) for t in (tk, tv))
    ref = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, is_causal=causal)
    assert np.abs(out - ref.transpose(1, 2).numpy()).max() <= tol
