"""Blockwise attention on one rank against the float64 textbook reference."""
import tracemalloc
import zlib

import numpy as np
import pytest

from hpcattn import HpcattnError, attention, machine, merge_partials
from hpcattn.reference import naive_attention

TOL = {"float32": 2e-6, "float64": 1e-12}


def make(rng, b, nq, nk, h, hkv, d, dtype):
    return (rng.standard_normal((b, nq, h, d)).astype(dtype),
            rng.standard_normal((b, nk, hkv, d)).astype(dtype),
            rng.standard_normal((b, nk, hkv, d)).astype(dtype))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", [
    (1, 1, 1, 1, 1, 1),        # single token
    (2, 37, 37, 4, 2, 8),      # GQA, ragged against every tile size
    (1, 200, 200, 6, 1, 16),   # MQA
    (1, 130, 130, 3, 3, 5),    # odd head dim
    (3, 64, 64, 2, 2, 64),     # exactly one tile row
])
@pytest.mark.parametrize("blocks", [(16, 16), (7, 33), (None, None)])
def test_matches_reference(dtype, causal, shape, blocks):
    # a fixed seed per case (hash() is salted per process: a different seed every run)
    rng = np.random.default_rng(zlib.crc32(repr((dtype, causal, shape, blocks)).encode()))
    b, nq, nk, h, hkv, d = shape
    q, k, v = make(rng, b, nq, nk, h, hkv, d, dtype)
    copies = [x.copy() for x in (q, k, v)]
    out, lse = attention(q, k, v, causal=causal, block_q=blocks[0], block_k=blocks[1])
    ref, ref_lse = naive_attention(q, k, v, causal=causal)
    assert out.dtype == np.dtype(dtype) and out.shape == q.shape
    assert lse.dtype == np.dtype(dtype) and lse.shape == (b, h, nq)
    assert np.abs(out - ref).max() <= TOL[dtype]
    assert np.abs(lse - ref_lse).max() <= TOL[dtype] * 10
    for x, c in zip((q, k, v), copies):
        assert np.array_equal(x, c), "attention must not modify its inputs"


def test_non_square_and_scale():
    rng = np.random.default_rng(3)
    q, k, v = make(rng, 2, 50, 170, 4, 2, 8, "float64")
    out, lse = attention(q, k, v, scale=0.37, block_q=16, block_k=40)
    ref, ref_lse = naive_attention(q, k, v, scale=0.37)
    assert np.abs(out - ref).max() < 1e-12 and np.abs(lse - ref_lse).max() < 1e-12


def test_causal_with_global_positions_and_empty_rows():
    """Positions decide the mask; a query that sees no key gets out 0 and lse -inf."""
    rng = np.random.default_rng(4)
    q, k, v = make(rng, 1, 40, 60, 2, 2, 8, "float64")
    q_pos = np.arange(100, 140) - 30          # 70..109
    k_pos = np.arange(60) * 2 + 50            # 50..168, strided
    out, lse = attention(q, k, v, causal=True, q_pos=q_pos, k_pos=k_pos, block_q=8, block_k=8)
    ref, ref_lse = naive_attention(q, k, v, causal=True, q_pos=q_pos, k_pos=k_pos)
    assert np.abs(out - ref).max() < 1e-12
    assert np.array_equal(np.isneginf(lse), np.isneginf(ref_lse))
    fin = np.isfinite(ref_lse)
    assert np.abs(lse[fin] - ref_lse[fin]).max() < 1e-12
    # every key in the future of every query: all rows empty
    out, lse = attention(q, k, v, causal=True, q_pos=np.arange(40), k_pos=np.arange(60) + 40)
    assert np.all(out == 0) and np.all(np.isneginf(lse))


def test_fully_masked_tiles_are_skipped():
    """With a causal mask over contiguous positions, roughly half the tiles are never computed."""
    rng = np.random.default_rng(5)
    q, k, v = make(rng, 1, 256, 256, 1, 1, 4, "float64")
    calls = []
    attention(q, k, v, causal=True, block_q=32, block_k=32, progress=lambda: calls.append(1))
    assert len(calls) == 8 * 9 // 2          # lower triangle of an 8x8 tile grid, diagonal included
    calls.clear()
    attention(q, k, v, causal=False, block_q=32, block_k=32, progress=lambda: calls.append(1))
    assert len(calls) == 64


def test_merge_partials_equals_attention_over_the_union():
    rng = np.random.default_rng(6)
    q, k, v = make(rng, 2, 30, 90, 4, 2, 8, "float64")
    o1, l1 = attention(q, k[:, :35], v[:, :35])
    o2, l2 = attention(q, k[:, 35:], v[:, 35:])
    merge_partials(o1, l1, o2, l2)
    ref, ref_lse = naive_attention(q, k, v)
    assert np.abs(o1 - ref).max() < 1e-12 and np.abs(l1 - ref_lse).max() < 1e-12
    # merging an empty partial (lse -inf) changes nothing
    o3, l3 = np.zeros_like(o1), np.full_like(l1, -np.inf)
    merge_partials(o1, l1, o3, l3)
    assert np.abs(o1 - ref).max() < 1e-12


def test_never_materialises_the_score_matrix():
    """N=8192: an N x N float32 score matrix is 256 MiB; blockwise stays at O(N d) + one tile."""
    rng = np.random.default_rng(7)
    n, d = 8192, 16
    q, k, v = make(rng, 1, n, n, 1, 1, d, "float32")
    tracemalloc.start()
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    attention(q, k, v, causal=True, block_q=256, block_k=512)
    peak = tracemalloc.get_traced_memory()[1] - base
    tracemalloc.stop()
    assert peak < 16 * 2**20, f"peak {peak / 2**20:.1f} MiB"


@pytest.mark.parametrize("bad, message", [
    (lambda q, k, v: (q.astype(np.int64), k, v), r"q has dtype int64; expected one of float32, float64"),
    (lambda q, k, v: (q.astype(np.float16), k.astype(np.float16), v.astype(np.float16)),
     r"q has dtype float16; expected one of float32, float64"),
    (lambda q, k, v: (q, k.astype(np.float64), v), r"q, k, v have dtypes float32, float64, float32"),
    (lambda q, k, v: (q[0], k, v), r"q has shape \(8, 4, 8\); expected 4 dimensions"),
    (lambda q, k, v: (q, k[:, :5], v), r"k has shape \(1, 5, 2, 8\) but v has \(1, 8, 2, 8\)"),
    (lambda q, k, v: (q[..., :3, :], k, v), r"q has 3 heads and k/v 2; expected q heads to be a multiple"),
    (lambda q, k, v: (q[..., :4], k, v), r"k/v head_dim 8 differs from q head_dim 4"),
])
def test_bad_input_is_a_one_line_error(bad, message, monkeypatch):
    # a CPU without half-precision instructions, so float16 is refused wherever this runs (a CPU
    # with AVX512_FP16 or AMX-FP16 runs it: tests/test_cpu_kernels_unit.py covers both)
    monkeypatch.setattr(machine, "cpu_flags", lambda: frozenset({"avx2"}))
    rng = np.random.default_rng(8)
    q, k, v = bad(*make(rng, 1, 8, 8, 4, 2, 8, "float32"))
    with pytest.raises(HpcattnError, match=message) as info:
        attention(q, k, v)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("which", ["q", "k", "v"])
@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_non_finite_inputs_are_reported(which, value):
    rng = np.random.default_rng(9)
    arrs = dict(zip("qkv", make(rng, 1, 8, 8, 2, 2, 4, "float32")))
    arrs[which][0, 5, 1, 2] = value
    with pytest.raises(HpcattnError, match=rf"{which} contains NaN or Inf \(first at index \(0, 5, 1, 2\)\)"):
        attention(arrs["q"], arrs["k"], arrs["v"])


@pytest.mark.parametrize("magnitude", [1, 30, 300, 3000])
@pytest.mark.parametrize("causal", [False, True])
def test_extreme_scores_stay_finite_and_accurate(magnitude, causal):
    """Large, trending scores (sharp softmax, running max moving every tile): the float32 result
    stays finite and within a small factor of the error of a textbook float32 computation. (At
    these magnitudes the rounding of the scores themselves dominates and depends on the order of
    operations, e.g. where the scale is applied, so the factor is 4 rather than FlashAttention's 2.)"""
    rng = np.random.default_rng(magnitude)
    q = (rng.standard_normal((1, 700, 2, 16)) * magnitude).astype(np.float32)
    k = rng.standard_normal((1, 700, 2, 16)).astype(np.float32)
    v = rng.standard_normal((1, 700, 2, 16)).astype(np.float32)
    k[:, :, :, 0] += np.linspace(0, 50, 700, dtype=np.float32)[None, :, None]
    out, lse = attention(q, k, v, causal=causal, block_q=64, block_k=64)
    assert np.isfinite(out).all() and np.isfinite(lse).all()
    ref, _ = naive_attention(q, k, v, causal=causal)
    textbook_float32 = naive_attention(q, k, v, causal=causal, dtype=np.float32)[0]
    budget = np.abs(textbook_float32 - ref).max()
    assert np.abs(out - ref).max() <= 4 * budget + 1e-6


@pytest.mark.parametrize("cls", ["PartialAttention", "MergedAttention"])
@pytest.mark.parametrize("causal", [False, True])
def test_running_state_fed_blocks_in_ring_order(cls, causal):
    """What a ring rank does: its queries (zig-zag positions of rank 1 of 3) fold in the key blocks
    of ranks 1, 0, 2 in turn, packed as they travel, including a block whose keys all lie in the
    future of every query (it must change nothing)."""
    from hpcattn import blockwise
    from hpcattn.gpu.partial import MergedAttention
    from hpcattn.layouts import positions

    rng = np.random.default_rng(12)
    n, size, rank = 101, 3, 1
    q, k, v = make(rng, 2, n, n, 4, 2, 8, "float64")
    q_pos = positions(n, size, rank, "zigzag")
    if cls == "PartialAttention":
        part = blockwise.PartialAttention(q[:, q_pos], 2, causal=causal, scale=None, q_pos=q_pos,
                                          block_q=8, block_k=8)
    else:  # the GPU's running state, with the NumPy kernel standing in for the CUDA one
        part = MergedAttention(q[:, q_pos], 2, causal=causal, scale=None, q_pos=q_pos,
                               attend=blockwise.attention, xp=np, block_q=8, block_k=8)
    for src in (1, 0, 2):
        k_pos = positions(n, size, src, "zigzag")
        buf = np.full(part.packed_size(len(k_pos)), np.nan)
        part.pack(k[:, k_pos], v[:, k_pos], buf)
        part.add_packed(buf, len(k_pos), k_pos)
    future = np.arange(n, n + 17)  # hidden from every query when causal
    if causal:
        buf = np.empty(part.packed_size(17))
        part.pack(*make(rng, 2, 17, 17, 2, 2, 8, "float64")[1:], buf)
        part.add_packed(buf, 17, future)
    out, lse = part.result()
    ref, ref_lse = naive_attention(q, k, v, causal=causal)
    assert np.abs(out - ref[:, q_pos]).max() < 1e-12
    assert np.abs(lse - ref_lse[:, :, q_pos]).max() < 1e-12


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_score_ramp_forces_the_exact_fallback_and_stays_exact(dtype):
    """Scores that grow by hundreds from one key tile to the next overflow the lazy running max's
    fast path (sums > FAST_MAX or inf): the tile must be redone exactly, never produce inf/NaN."""
    from hpcattn import blockwise

    n, d = 256, 4
    q = np.zeros((1, n, 1, d), dtype=dtype)
    q[..., 0] = 1.0
    k = np.zeros((1, n, 1, d), dtype=dtype)
    k[0, :, 0, 0] = np.repeat(np.arange(n // 32) * 400.0, 32)  # +200 nats per tile after scaling
    v = np.random.default_rng(13).standard_normal((1, n, 1, d)).astype(dtype)
    # a tile's scores exceed the previous running max by 200 nats: exp(200) overflows float32
    assert np.exp(400.0 / np.sqrt(d)) > blockwise.FAST_MAX
    for causal in (False, True):
        out, lse = attention(q, k, v, causal=causal, block_q=32, block_k=32)
        ref, ref_lse = naive_attention(q, k, v, causal=causal)
        assert np.isfinite(out).all() and np.isfinite(lse).all()
        tol = 1e-5 if dtype == "float32" else 1e-12
        assert np.abs(out - ref).max() < tol
        assert np.abs(lse - ref_lse).max() / np.abs(ref_lse).max() < tol


def test_the_backend_is_chosen_once_by_array_or_device_name():
    """NumPy arrays and "cpu" give the NumPy backend (its kernel is this file's subject); "gpu"
    names the CUDA one without importing CuPy; an unknown device is a one-line error."""
    from hpcattn import backend

    rng = np.random.default_rng(14)
    q, k, v = make(rng, 1, 20, 20, 2, 1, 8, "float32")
    cpu = backend.select(q)
    assert cpu is backend.by_name("cpu") and cpu.xp is np and cpu.dtypes == ("float32", "float64")
    out, lse = cpu.attention(q, k, v, causal=True, scale=None)
    ref, ref_lse = naive_attention(q, k, v, causal=True)
    assert np.abs(out - ref).max() <= TOL["float32"] and np.abs(lse - ref_lse).max() <= 10 * TOL["float32"]
    gpu = backend.by_name("gpu")
    assert gpu.name == "gpu" and gpu.dtypes == ("float16", "bfloat16", "float32")
    assert gpu.head_dims == (64, 128)
    with pytest.raises(ValueError, match=r"device 'tpu' is unknown; expected one of cpu, gpu"):
        backend.by_name("tpu")
