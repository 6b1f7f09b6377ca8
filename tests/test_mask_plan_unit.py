"""The mask planner (hpcattn.mask_plan) turns windows, packed sequences and bottom-right causal
into calls of a kernel that only masks by positions, and equals dense float64 attention (built
here from the definition, not from hpcattn.masks) forward and backward: with the NumPy blockwise
kernel, and with the CUDA kernels run unmodified on the CPU (hpcattn.emulation)."""
import numpy as np
import pytest

from hpcattn import blockwise, blockwise_backward, mask_plan
from hpcattn.masks import make_mask

pytestmark = pytest.mark.timeout(300)


def dense_visible(nq, nk, q_pos, k_pos, *, causal, window, cu, align):
    """visible[i, j] from the definition: FlashAttention's window_size around the diagonal."""
    shift = nk - nq if align == "bottom-right" else 0
    left, right = window
    if causal:
        right = 0
    vis = np.ones((nq, nk), bool)
    for a, i in enumerate(q_pos):
        for b, j in enumerate(k_pos):
            diag = j - (i + shift)
            if left >= 0 and diag < -left:
                vis[a, b] = False
            if right >= 0 and diag > right:
                vis[a, b] = False
            if cu is not None:
                seg_i = max(s for s in range(len(cu) - 1) if cu[s] <= i)
                seg_j = max(s for s in range(len(cu) - 1) if cu[s] <= j)
                vis[a, b] &= seg_i == seg_j
    return vis


def dense_attention(q, k, v, vis, dout=None):
    """float64 forward (out, lse) and, with dout, the gradients, every probability explicit."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    g = q.shape[2] // k.shape[2]
    ke, ve = np.repeat(k, g, axis=2), np.repeat(v, g, axis=2)
    scale = 1 / np.sqrt(q.shape[3])
    s = np.einsum("bihd,bjhd->bhij", q, ke) * scale
    s = np.where(vis, s, -np.inf)
    m = np.max(s, axis=-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0)
    p = np.exp(s - m)
    tot = p.sum(-1, keepdims=True)
    p = np.where(tot > 0, p / np.where(tot > 0, tot, 1), 0)
    out = np.einsum("bhij,bjhd->bihd", p, ve)
    lse = np.where(tot[..., 0] > 0, np.log(np.where(tot[..., 0] > 0, tot[..., 0], 1)) + m[..., 0], -np.inf)
    if dout is None:
        return out, lse
    do = np.asarray(dout, np.float64)
    dp = np.einsum("bihd,bjhd->bhij", do, ve)
    delta = np.einsum("bihd,bihd->bhi", do, out)[..., None]
    ds = p * (dp - delta)
    dq = np.einsum("bhij,bjhd->bihd", ds, ke) * scale
    dk = np.einsum("bhij,bihd->bjhd", ds, q) * scale
    dv = np.einsum("bhij,bihd->bjhd", p, do)
    b, nk, hkv, d = k.shape
    dk = dk.reshape(b, nk, hkv, g, d).sum(3)
    dv = dv.reshape(b, nk, hkv, g, d).sum(3)
    return dq, dk, dv


# (nq, nk, causal, window, cu_seqlens, align, shuffled positions)
MASKS = [
    (48, 48, True, (7, 0), None, "top-left", False),
    (48, 48, False, (5, 3), None, "top-left", True),
    (48, 48, False, (0, 0), None, "top-left", False),
    (48, 48, True, (-1, -1), [0, 5, 20, 48], "top-left", True),
    (48, 48, True, (6, -1), [0, 17, 18, 48], "top-left", False),
    (48, 48, False, (-1, 4), [0, 30, 48], "top-left", True),
    (20, 48, True, (-1, -1), None, "bottom-right", False),
    (48, 20, True, (3, 0), None, "bottom-right", False),
    (20, 48, False, (2, 9), None, "bottom-right", False),
    (48, 48, False, (-1, -1), None, "top-left", True),
]


def case(spec, rng):
    nq, nk, causal, window, cu, align, shuffled = spec
    mask = make_mask(causal=causal, window=window, cu_seqlens=cu, align=align).bind(nq, nk)
    q_pos, k_pos = np.arange(nq), np.arange(nk)
    if shuffled:  # a zig-zag-like order: the planner sorts, runs and scatters back
        q_pos, k_pos = rng.permutation(nq), rng.permutation(nk)
    vis = dense_visible(nq, nk, q_pos, k_pos, causal=causal, window=window, cu=cu, align=align)
    return mask, q_pos, k_pos, vis


def inputs(rng, nq, nk, h=4, hkv=2, d=8, dtype=np.float64):
    return [rng.standard_normal(s).astype(dtype) for s in ((2, nq, h, d), (2, nk, hkv, d), (2, nk, hkv, d))]


@pytest.mark.parametrize("spec", MASKS, ids=lambda s: f"q{s[0]}k{s[1]}{'c' * s[2]}w{s[3]}cu{s[4] and len(s[4])}{s[5][0]}")
@pytest.mark.parametrize("span", [1024, 5])
def test_plan_with_numpy_kernel_equals_dense_reference(spec, span):
    rng = np.random.default_rng([len(MASKS), span, *spec[:2]])
    mask, q_pos, k_pos, vis = case(spec, rng)
    q, k, v = inputs(rng, spec[0], spec[1])
    out, lse = mask_plan.attention(blockwise.attention, q, k, v, mask, q_pos=q_pos, k_pos=k_pos, span=span)
    ref, ref_lse = dense_attention(q, k, v, vis)
    assert np.abs(out - ref).max() < 1e-12
    assert np.array_equal(np.isneginf(lse), np.isneginf(ref_lse))
    seen = np.isfinite(ref_lse)
    assert np.abs(lse[seen] - ref_lse[seen]).max() < 1e-12
    dout = rng.standard_normal(q.shape)
    grads = mask_plan.attention_backward(
        lambda *a, **kw: blockwise_backward.attention_backward(*a, check_finite=False, **kw),
        q, k, v, out, lse, dout, mask, q_pos=q_pos, k_pos=k_pos, span=span)
    for name, got, want in zip(("dq", "dk", "dv"), grads, dense_attention(q, k, v, vis, dout)):
        assert got.shape == want.shape and np.abs(got - want).max() < 1e-11, name


def test_a_window_is_never_given_the_hidden_pairs():
    """Work is O(N * (w + span)), not O(N^2): the plan hands the kernel only nearby keys."""
    n, w = 4096, 64
    mask = make_mask(causal=True, window=(w, 0)).bind(n, n)
    plan = mask_plan.make_plan(mask, np.arange(n), np.arange(n), span=32)
    assert plan.pairs() <= n * (w + 1 + 32)
    assert plan.pairs() >= mask.visible_pairs()


def test_chunks_never_straddle_a_packed_sequence():
    cu = np.array([0, 3, 10, 64])
    mask = make_mask(cu_seqlens=cu).bind(64, 64)
    plan = mask_plan.make_plan(mask, np.arange(64), np.arange(64))
    assert [(c.start, c.stop) for c in plan.chunks] == [(0, 3), (3, 10), (10, 64)]
    assert all(len(c.runs) == 1 and c.runs[0].kind == mask_plan.PLAIN for c in plan.chunks)


EMULATED = [MASKS[0], MASKS[1], MASKS[4], MASKS[7]]


@pytest.mark.parametrize("spec", EMULATED, ids=lambda s: f"q{s[0]}k{s[1]}{'c' * s[2]}w{s[3]}{s[5][0]}")
def test_plan_with_the_cuda_kernels_under_emulation(spec):
    """The CUDA kernels' causal test on the planner's (shifted and negated) positions."""
    emulation = pytest.importorskip("hpcattn.emulation")
    from hpcattn.emulation.backward import attention_backward_emulated

    try:
        emulation.library()
    except Exception as exc:  # no C++ compiler: the emulation tests say the same
        pytest.skip(f"the CUDA emulation cannot be built here: {exc}")
    rng = np.random.default_rng(11)
    mask, q_pos, k_pos, vis = case(spec, rng)
    q, k, v = inputs(rng, spec[0], spec[1], h=2, hkv=1, d=64, dtype=np.float32)
    out, lse = mask_plan.attention(
        lambda *a, **kw: emulation.attention_emulated(*a, variant="simt", **kw),
        q, k, v, mask, q_pos=q_pos, k_pos=k_pos, span=16)
    ref, ref_lse = dense_attention(q, k, v, vis)
    assert out.dtype == np.float32 and np.abs(out - ref).max() < 2e-5
    seen = np.isfinite(ref_lse)
    assert np.array_equal(np.isfinite(lse), seen) and np.abs(lse[seen] - ref_lse[seen]).max() < 2e-5
    dout = rng.standard_normal(q.shape).astype(np.float32)
    grads = mask_plan.attention_backward(attention_backward_emulated, q, k, v, out, lse, dout, mask,
                                         q_pos=q_pos, k_pos=k_pos, span=16)
    for name, got, want in zip(("dq", "dk", "dv"), grads, dense_attention(q, k, v, vis, dout)):
        assert got.dtype == np.float32 and np.abs(got - want).max() < 1e-4, name


def test_the_cuda_backend_plans_masks_for_calls_and_ring_states():
    """hpcattn.backend.cuda with the CUDA kernels under emulation (xp NumPy): a masked call, a
    ring rank's running state fed two key blocks, and the backward state, all equal the dense
    definition. On a GPU the same code runs the real kernels (tests/test_gpu_*.py)."""
    emulation = pytest.importorskip("hpcattn.emulation")
    from hpcattn.backend.cuda import CudaBackend
    from hpcattn.emulation.backward import attention_backward_emulated

    try:
        emulation.library()
    except Exception as exc:
        pytest.skip(f"the CUDA emulation cannot be built here: {exc}")
    be = CudaBackend(attend=lambda *a, **kw: emulation.attention_emulated(*a, variant="simt", **kw),
                     backward=attention_backward_emulated, xp=np)
    spec = (40, 40, True, (6, -1), [0, 13, 40], "top-left", True)
    rng = np.random.default_rng(5)
    mask, q_pos, k_pos, vis = case(spec, rng)
    q, k, v = inputs(rng, 40, 40, h=2, hkv=1, d=64, dtype=np.float32)
    ref, ref_lse = dense_attention(q, k, v, vis)
    out, lse = be.attention(q, k, v, causal=True, scale=None, q_pos=q_pos, k_pos=k_pos, mask=mask)
    assert np.abs(out - ref).max() < 2e-5
    part = be.partial(q, 1, causal=True, scale=None, q_pos=q_pos, mask=mask)
    buf = np.empty(part.packed_size(40), np.float32)
    for keys in (slice(0, 25), slice(25, 40)):   # two ring blocks
        n = keys.stop - keys.start
        part.pack(k[:, keys], v[:, keys], buf[: part.packed_size(n)])
        part.add_packed(buf[: part.packed_size(n)], n, k_pos[keys])
    got, got_lse = part.result()
    assert np.abs(got - ref).max() < 2e-5 and np.abs(got_lse - lse).max() < 2e-5
    dout = rng.standard_normal(q.shape).astype(np.float32)
    want = dense_attention(q, k, v, vis, dout)
    grads = be.attention_backward(q, k, v, out, lse, dout, causal=True, scale=None, q_pos=q_pos,
                                  k_pos=k_pos, mask=mask)
    state = be.backward_state(q, out, lse, dout, 1, causal=True, scale=None, q_pos=q_pos, mask=mask)
    dk, dv = zip(*(state.block(k[:, s], v[:, s], k_pos=k_pos[s]) for s in (slice(0, 25), slice(25, 40))))
    ring = (state.dq(), np.concatenate(dk, axis=1), np.concatenate(dv, axis=1))
    for name, one, per_block, w in zip(("dq", "dk", "dv"), grads, ring, want):
        assert one.dtype == np.float32 and np.abs(one - w).max() < 1e-4, name
        assert np.abs(per_block - w).max() < 1e-4, name
