"""A second, independent reference for the gradients: PyTorch autograd through
``scaled_dot_product_attention`` in float64. Optional: skips where PyTorch is not installed."""
import numpy as np
import pytest

from hpcattn import attention
from hpcattn.blockwise_backward import attention_backward

torch = pytest.importorskip("torch", reason="PyTorch not installed (optional second reference)")

TOLERANCE = {"float32": 1e-5, "float64": 1e-12}  # relative to the largest gradient entry


def torch_gradients(q, k, v, dout, causal):
    """dq, dk, dv by autograd in float64; k/v heads repeated for GQA (the sum over each group
    then comes from autograd itself)."""
    tq, tk, tv = (torch.from_numpy(x.astype(np.float64)).transpose(1, 2).requires_grad_() for x in (q, k, v))
    group = q.shape[2] // k.shape[2]
    out = torch.nn.functional.scaled_dot_product_attention(
        tq, tk.repeat_interleave(group, dim=1), tv.repeat_interleave(group, dim=1), is_causal=causal)
    out.backward(torch.from_numpy(dout.astype(np.float64)).transpose(1, 2))
    return [t.grad.transpose(1, 2).numpy() for t in (tq, tk, tv)]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("h, hkv", [(4, 4), (8, 2), (6, 1)])
@pytest.mark.parametrize("nq, nk, d", [(1, 1, 16), (3, 3, 40), (113, 113, 64), (157, 90, 111), (90, 157, 128),
                                       (1023, 1023, 16)])
def test_matches_torch_autograd(dtype, causal, h, hkv, nq, nk, d):
    rng = np.random.default_rng([nq, nk, d, h])
    b = 1 if nq > 500 else 2
    q = rng.standard_normal((b, nq, h, d)).astype(dtype)
    k = rng.standard_normal((b, nk, hkv, d)).astype(dtype)
    v = rng.standard_normal((b, nk, hkv, d)).astype(dtype)
    dout = rng.standard_normal((b, nq, h, d)).astype(dtype)
    out, lse = attention(q, k, v, causal=causal)
    grads = attention_backward(q, k, v, out, lse, dout, causal=causal, block_q=32, block_k=48)
    ref = torch_gradients(q, k, v, dout, causal)
    scale = max(float(np.abs(r).max()) for r in ref)
    errors = {name: float(np.abs(g - r).max()) / scale for name, g, r in zip(("dq", "dk", "dv"), grads, ref)}
    assert max(errors.values()) <= TOLERANCE[dtype], errors
