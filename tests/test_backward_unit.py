"""The per-rank backward equals the float64 naive reference (itself checked against central finite
differences of the forward), over uneven lengths, head dims, causal, GQA/MQA, Nq != Nk, batch."""
import tracemalloc

import numpy as np
import pytest

from hpcattn import attention
from hpcattn.blockwise_backward import BackwardState, attention_backward
from hpcattn.errors import HpcattnError
from hpcattn.reference import naive_attention
from hpcattn.reference import naive_attention_backward

# max error relative to the largest entry of dq, dk and dv together (one scale for the problem:
# with one key, dq and dk are exactly 0 and only their rounding is left)
TOLERANCE = {"float32": 1e-5, "float64": 1e-12}


def make(seed, b, nq, nk, h, hkv, d, dtype):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((b, nq, h, d)).astype(dtype),
            rng.standard_normal((b, nk, hkv, d)).astype(dtype),
            rng.standard_normal((b, nk, hkv, d)).astype(dtype),
            rng.standard_normal((b, nq, h, d)).astype(dtype))


def relative_errors(got, want):
    scale = max(float(np.abs(w).max(initial=0)) for w in want) or 1.0
    return [float(np.abs(g - w).max(initial=0)) / scale for g, w in zip(got, want)]


def check_against_reference(q, k, v, dout, tol, **kw):
    blocks = {key: kw.pop(key) for key in ("block_q", "block_k") if key in kw}
    out, lse = attention(q, k, v, **kw)
    grads = attention_backward(q, k, v, out, lse, dout, **kw, **blocks)
    ref = naive_attention_backward(q, k, v, dout, **kw)
    for name, g, x in zip(("dq", "dk", "dv"), grads, (q, k, v)):
        assert g.shape == x.shape and g.dtype == x.dtype, name
    errors = relative_errors(grads, ref)
    assert max(errors) <= tol, dict(zip(("dq", "dk", "dv"), errors))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("h, hkv", [(8, 2), (6, 1)])  # GQA 8/2, MQA 6/1
@pytest.mark.parametrize("n, d", [(n, d) for n in (1, 3, 113) for d in (16, 40, 64, 111, 128)]
                         + [(1023, 16), (1023, 111)])
def test_matches_naive_reference(dtype, causal, h, hkv, n, d):
    b = 1 if n > 500 else 2   # batch > 1 where the full score matrix stays small
    q, k, v, dout = make(n * d + h, b, n, n, h, hkv, d, dtype)
    check_against_reference(q, k, v, dout, TOLERANCE[dtype], causal=causal)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("nq, nk", [(113, 1023), (1023, 113), (1, 3), (3, 1), (40, 41)])
def test_seqlen_q_differs_from_seqlen_k(dtype, causal, nq, nk):
    q, k, v, dout = make(nq + 7 * nk, 2, nq, nk, 4, 2, 40, dtype)
    check_against_reference(q, k, v, dout, TOLERANCE[dtype], causal=causal)


@pytest.mark.parametrize("block_q, block_k", [(1, 1), (5, 7), (16, 64), (64, 16)])
def test_any_tiling_gives_the_same_gradients(block_q, block_k):
    q, k, v, dout = make(4, 2, 67, 59, 6, 3, 12, "float64")
    check_against_reference(q, k, v, dout, 1e-12, causal=True, block_q=block_q, block_k=block_k)


def test_reference_matches_central_finite_differences():
    """The reference's analytic gradient against the forward's numerical derivative, float64."""
    q, k, v, weights = make(5, 2, 7, 9, 4, 2, 5, "float64")
    kw = dict(causal=True, q_pos=np.arange(7) + 2, k_pos=np.arange(9))

    def loss(q, k, v):
        return float((naive_attention(q, k, v, **kw)[0] * weights).sum())

    grads = naive_attention_backward(q, k, v, weights, **kw)
    rng = np.random.default_rng(55)
    eps = 1e-6
    for which, (x, g) in enumerate(zip((q, k, v), grads)):
        for _ in range(6):
            idx = tuple(int(rng.integers(s)) for s in x.shape)
            args = [q, k, v]
            plus, minus = x.copy(), x.copy()
            plus[idx] += eps
            minus[idx] -= eps
            numeric = (loss(*args[:which], plus, *args[which + 1:])
                       - loss(*args[:which], minus, *args[which + 1:])) / (2 * eps)
            assert abs(numeric - g[idx]) <= 1e-7 * max(1.0, abs(numeric)), (which, idx)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_rows_that_see_no_key_contribute_nothing(dtype):
    """Queries 0..4 lie before every key: their lse is -inf, their dq is 0, and they add nothing
    to dk/dv (which the reference, computed without them, confirms)."""
    q, k, v, dout = make(6, 2, 30, 25, 4, 1, 8, dtype)
    kw = dict(causal=True, q_pos=np.arange(30), k_pos=np.arange(25) + 5)
    out, lse = attention(q, k, v, **kw)
    assert np.isneginf(lse[:, :, :5]).all()
    dq, dk, dv = attention_backward(q, k, v, out, lse, dout, **kw, block_q=4, block_k=8)
    assert np.isfinite(dq).all() and np.isfinite(dk).all() and np.isfinite(dv).all()
    assert np.all(dq[:, :5] == 0)
    ref = naive_attention_backward(q[:, 5:], k, v, dout[:, 5:], causal=True, q_pos=np.arange(5, 30),
                                   k_pos=np.arange(25) + 5)
    assert max(relative_errors((dq[:, 5:], dk, dv), ref)) <= TOLERANCE[dtype]
    # every key in every query's future: all gradients are zero
    kw["k_pos"] = np.arange(25) + 30
    out, lse = attention(q, k, v, **kw)
    assert all(np.all(g == 0) for g in attention_backward(q, k, v, out, lse, dout, **kw))


def test_key_blocks_one_at_a_time_equal_the_whole():
    """What a ring rank does: one BackwardState, key blocks at their global positions."""
    q, k, v, dout = make(7, 2, 50, 50, 4, 2, 8, "float64")
    pos = np.arange(50)
    out, lse = attention(q, k, v, causal=True)
    ref = attention_backward(q, k, v, out, lse, dout, causal=True)
    state = BackwardState(q, out, lse, dout, 2, causal=True, q_pos=pos, block_q=8, block_k=8)
    pieces = [state.block(k[:, s], v[:, s], k_pos=pos[s]) for s in (slice(30, 50), slice(0, 13), slice(13, 30))]
    dk = np.concatenate([pieces[1][0], pieces[2][0], pieces[0][0]], axis=1)
    dv = np.concatenate([pieces[1][1], pieces[2][1], pieces[0][1]], axis=1)
    assert max(relative_errors((state.dq(), dk, dv), ref)) <= 1e-12


def test_fully_masked_tiles_are_skipped():
    q, k, v, dout = make(8, 1, 256, 256, 1, 1, 4, "float64")
    out, lse = attention(q, k, v, causal=True)
    calls = []
    attention_backward(q, k, v, out, lse, dout, causal=True, block_q=32, block_k=32,
                       progress=lambda: calls.append(1))
    assert len(calls) == 8 * 9 // 2          # lower triangle of the 8x8 tile grid


def test_never_materialises_the_score_matrix():
    """N=4096: an N x N float32 matrix is 64 MiB; the backward keeps O(N d) plus a few tiles."""
    n, d = 4096, 16
    q, k, v, dout = make(9, 1, n, n, 1, 1, d, "float32")
    out, lse = attention(q, k, v, causal=True)
    tracemalloc.start()
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    attention_backward(q, k, v, out, lse, dout, causal=True)
    peak = tracemalloc.get_traced_memory()[1] - base
    tracemalloc.stop()
    assert peak < 8 * 2**20, f"peak {peak / 2**20:.1f} MiB"


def _inputs():
    q, k, v, dout = make(10, 1, 8, 8, 4, 2, 8, "float32")
    out, lse = attention(q, k, v)
    return dict(q=q, k=k, v=v, out=out, lse=lse, dout=dout)


@pytest.mark.parametrize("change, message", [
    (lambda a: a.update(out=a["out"][:, :5]), r"out has shape \(1, 5, 4, 8\); expected \(1, 8, 4, 8\) to match q"),
    (lambda a: a.update(dout=a["dout"][..., :4]), r"dout has shape \(1, 8, 4, 4\); expected \(1, 8, 4, 8\)"),
    (lambda a: a.update(lse=a["lse"][:, :2]), r"lse has shape \(1, 2, 8\); expected \(1, 4, 8\)"),
    (lambda a: a.update(lse=None), r"lse has shape \(\); expected \(1, 4, 8\)"),
    (lambda a: a.update(dout=a["dout"].astype(np.float64)), r"dout has dtype float64; expected q's dtype float32"),
    (lambda a: a.update(lse=a["lse"].astype(np.float16)), r"lse has dtype float16; expected float32 or float64"),
    (lambda a: a["dout"].__setitem__((0, 3, 1, 2), np.nan),
     r"dout contains NaN or Inf \(first at index \(0, 3, 1, 2\)\)"),
    (lambda a: a["out"].__setitem__((0, 1, 0, 0), np.inf), r"out contains NaN or Inf"),
    (lambda a: a["lse"].__setitem__((0, 1, 0), np.nan), r"lse contains NaN or \+Inf"),
    (lambda a: a.update(k=a["k"][:, :, :1].copy(), v=a["v"][:, :, :3]), r"k has shape .* but v has"),
])
def test_bad_input_is_a_one_line_error(change, message):
    args = _inputs()
    change(args)
    with pytest.raises(HpcattnError, match=message) as info:
        attention_backward(**args)
    assert "\n" not in str(info.value)


def test_public_attention_backward_is_the_backends(monkeypatch):
    """``hpcattn.attention_backward`` (dispatch on q's backend) gives the blockwise gradients and
    checks its inputs with the same one-line errors."""
    import hpcattn
    from hpcattn import machine

    # a CPU without half-precision instructions, so float16 is refused wherever this runs
    monkeypatch.setattr(machine, "cpu_flags", lambda: frozenset({"avx2"}))

    q, k, v, dout = make(11, 2, 37, 29, 4, 2, 8, "float64")
    out, lse = attention(q, k, v, causal=True)
    got = hpcattn.attention_backward(q, k, v, out, lse, dout, causal=True)
    ref = naive_attention_backward(q, k, v, dout, causal=True)
    assert max(relative_errors(got, ref)) <= 1e-12
    with pytest.raises(HpcattnError, match=r"lse has shape \(2, 4, 36\); expected \(2, 4, 37\)"):
        hpcattn.attention_backward(q, k, v, out, lse[..., 1:], dout)
    with pytest.raises(HpcattnError, match=r"q has dtype float16; expected one of float32, float64"):
        hpcattn.attention_backward(*(x.astype(np.float16) for x in (q, k, v, out)), lse, dout)


def _numpy_block_backward(*args, grad_dtype=None, **kw):
    """The NumPy backward standing in for the CUDA kernels' ``attention_backward_gpu``."""
    return tuple(g.astype(grad_dtype or g.dtype) for g in attention_backward(*args, **kw))


def _emulated_block_backward(*args, **kw):
    from hpcattn.emulation.backward import attention_backward_emulated

    return attention_backward_emulated(*args, **kw)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kernel, dtype, d, tol", [
    (_numpy_block_backward, "float64", 8, 1e-12),
    (_numpy_block_backward, "float32", 8, TOLERANCE["float32"]),
    (_emulated_block_backward, "float32", 64, TOLERANCE["float32"]),  # the CUDA kernels themselves
])
def test_gpu_backward_state_key_blocks_one_at_a_time_equal_the_whole(kernel, dtype, d, tol):
    """The CUDA backend's ring state (``PerBlockBackward``: the backward per key block with the
    GLOBAL lse, dq summed, each block's dk/dv in float32) on the host, blocks out of order at
    zig-zag positions, equals the float64 reference over all keys."""
    from hpcattn.gpu.partial_backward import PerBlockBackward

    q, k, v, dout = make(12, 1, 40, 40, 4, 2, d, dtype)
    pos = np.concatenate([np.arange(20, 40), np.arange(20)])   # a zig-zag shard order
    out, lse = attention(q, k, v, causal=True, q_pos=pos, k_pos=pos)
    state = PerBlockBackward(q, out, lse, dout, 2, causal=True, scale=None, q_pos=pos,
                             backward=kernel, xp=np)
    assert state.acc_dtype == (np.float64 if dtype == "float64" else np.float32)
    order = ((25, 40), (0, 9), (9, 25))
    pieces = {a: state.block(k[:, a:b], v[:, a:b], k_pos=pos[a:b]) for a, b in order}
    dk, dv = (np.concatenate([pieces[a][i] for a in sorted(pieces)], axis=1) for i in (0, 1))
    grads = (state.dq(), dk, dv)
    for g, x in zip(grads, (q, k, v)):
        assert g.shape == x.shape and g.dtype == x.dtype
    ref = naive_attention_backward(q, k, v, dout, causal=True, q_pos=pos, k_pos=pos)
    assert max(relative_errors(grads, ref)) <= tol
