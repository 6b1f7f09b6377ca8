"""hpcattn.torch on one process: gradients equal torch autograd through its own SDPA (a second
implementation nobody here wrote), gradcheck passes, and a tiny model trains identically.
Skipped without PyTorch (``pip install 'hpcattn[torch]'``)."""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
MPI = pytest.importorskip("mpi4py.MPI")

import hpcattn.torch as ht  # noqa: E402
from hpcattn.errors import HpcattnError  # noqa: E402


def sdpa(q, k, v, causal):
    """torch's attention in hpcattn's (batch, seq, heads, d) layout, GQA by repeating K/V."""
    g = q.shape[2] // k.shape[2]
    k, v = (x.repeat_interleave(g, dim=2) for x in (k, v))
    o = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal)
    return o.transpose(1, 2)


def leaves(seed, b, n, h, hkv, d, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(b, n, hh, d, generator=gen, dtype=dtype).requires_grad_()
            for hh in (h, hkv, hkv)]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", [(1, 37, 4, 4, 16), (2, 130, 6, 2, 40), (1, 64, 6, 1, 64)])
@pytest.mark.parametrize("ring", [False, True])
def test_gradients_equal_torch_sdpa(shape, causal, ring):
    ours = leaves(7, *shape)
    theirs = [t.detach().clone().requires_grad_() for t in ours]
    gen = torch.Generator().manual_seed(8)
    dout = torch.randn(shape[0], shape[1], shape[2], shape[4], generator=gen, dtype=torch.float64)
    out = (ht.ring_attention(*ours, MPI.COMM_SELF, causal=causal) if ring
           else ht.attention(*ours, causal=causal))
    ref = sdpa(*theirs, causal)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    out.backward(dout)
    ref.backward(dout)
    for name, a, b in zip("qkv", ours, theirs):
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=1e-11, msg=f"d{name}")


def test_gradcheck_against_finite_differences():
    q, k, v = leaves(3, 1, 9, 2, 1, 8)
    assert torch.autograd.gradcheck(lambda a, b, c: ht.attention(a, b, c, causal=True), (q, k, v))


def test_float32_gradients_close_to_float64():
    q, k, v = leaves(5, 1, 200, 4, 2, 32)
    dout = torch.randn(1, 200, 4, 32, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    ht.attention(q32, k32, v32, causal=True).backward(dout.float())
    sdpa(q, k, v, True).backward(dout)
    for a, b in zip((q32, k32, v32), (q, k, v)):
        assert a.grad.dtype == torch.float32
        assert (a.grad.double() - b.grad).abs().max() < 1e-5 * max(1.0, b.grad.abs().max().item())


class TinyModel(torch.nn.Module):
    """Embedding -> q/k/v projections -> attention -> readout: enough to train."""

    def __init__(self, attend, vocab=11, width=16, heads=2):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.emb = torch.nn.Parameter(torch.randn(vocab, width, generator=gen, dtype=torch.float64) * 0.5)
        self.qkv = torch.nn.Parameter(torch.randn(width, 3 * width, generator=gen, dtype=torch.float64) * 0.3)
        self.out = torch.nn.Parameter(torch.randn(width, vocab, generator=gen, dtype=torch.float64) * 0.3)
        self.attend, self.heads = attend, heads

    def forward(self, tokens):
        x = self.emb[tokens]                                   # (b, n, width)
        b, n, w = x.shape
        q, k, v = (x @ self.qkv).split(w, dim=-1)
        q, k, v = (t.reshape(b, n, self.heads, w // self.heads) for t in (q, k, v))
        y = self.attend(q, k, v).reshape(b, n, w)
        return (x + y) @ self.out


def _train(model, tokens, targets, steps=4):
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(tokens).flatten(0, 1), targets.flatten())
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_tiny_model_trains_like_sdpa():
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 11, (2, 48), generator=gen)
    targets = torch.roll(tokens, 1, dims=1)
    ours = _train(TinyModel(lambda q, k, v: ht.attention(q, k, v, causal=True)), tokens, targets)
    ref = _train(TinyModel(lambda q, k, v: sdpa(q, k, v, True)), tokens, targets)
    assert ours == pytest.approx(ref, rel=0, abs=1e-11)
    assert ours[-1] < ours[0]  # it learns


def test_refuses_unsupported_dtype_in_one_line():
    q, k, v = (t.detach().half() for t in leaves(2, 1, 8, 2, 2, 8))
    with pytest.raises(HpcattnError, match=r"dtype torch.float16; expected torch.float32 or torch.float64"):
        ht.attention(q, k, v)
