"""The fused CPU forward (hpcattn.cpu_fused, kernels/cpu/attention_fwd.cpp): the float64
reference's results for every mask, layout and GQA shape, FlashAttention's accuracy rule, the
same bits on any number of worker threads, and a clear reason (never wrong numbers) where it
cannot be built or its library is not what was built."""
import os
import shutil

import numpy as np
import pytest

import hpcattn
from hpcattn import cpu_fused, cpu_kernels
from hpcattn.errors import HpcattnError
from hpcattn.layouts import positions
from hpcattn.masks import make_mask
from hpcattn.reference import naive_attention

# Only a missing compiler skips: a failed build or self-check must fail these tests, not skip them.
HAVE_CXX = shutil.which(os.environ.get("CXX", "g++")) is not None
needs_fused = pytest.mark.skipif(not HAVE_CXX, reason="no C++ compiler (g++ or $CXX)")
TOL = 2e-5


def _qkv(seed, b, nq, nk, h, hkv, d):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((b, nq, h, d)).astype(np.float32),
            rng.standard_normal((b, nk, hkv, d)).astype(np.float32),
            rng.standard_normal((b, nk, hkv, d)).astype(np.float32))


def _check(got, want):
    out, lse = got
    ref_out, ref_lse = want
    assert out.dtype == np.float32 and lse.dtype == np.float32
    assert np.abs(out - ref_out).max() <= TOL
    assert np.array_equal(np.isneginf(lse), np.isneginf(ref_lse))
    seen = np.isfinite(ref_lse)
    if seen.any():
        assert np.abs(lse[seen] - ref_lse[seen]).max() <= TOL
    assert (out.transpose(0, 2, 1, 3)[~seen] == 0).all()   # rows that see no key: out 0


@needs_fused
def test_available_where_a_compiler_is():
    """With g++ and NumPy on OpenBLAS (CI), the kernel builds and passes its self-check."""
    assert cpu_fused.reason() is None
    assert cpu_fused.blas()


SHAPES = [(2, 70, 70, 4, 4, 32), (1, 300, 257, 6, 2, 64), (2, 130, 90, 4, 1, 24), (1, 5, 700, 2, 1, 128),
          (1, 700, 5, 2, 2, 16), (1, 1, 1, 1, 1, 8)]


@needs_fused
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("tiles", [None, (16, 32), (7, 5)])
def test_matches_float64_reference(causal, shape, tiles):
    q, k, v = _qkv(sum(shape), *shape)
    kw = {} if tiles is None else dict(block_rows=tiles[0], block_k=tiles[1])
    got = cpu_fused.attention(q, k, v, causal=causal, scale=0.3, **kw)
    _check(got, naive_attention(q, k, v, causal=causal, scale=0.3))


MASKS = [dict(window=(20, 0), causal=True), dict(window=(5, 9)), dict(window=(-1, 3)),
         dict(cu_seqlens=[0, 100, 101, 260, 400]), dict(cu_seqlens=[0, 150, 400], window=(30, 0), causal=True),
         dict(causal=True, align="bottom-right"), dict(window=(7, 7), align="bottom-right")]


@needs_fused
@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("layout", ["contiguous", "zigzag", "striped"])
@pytest.mark.parametrize("keys", ["all", "shard"])
def test_masks_on_global_positions(mask, layout, keys):
    """A rank's share of a layout (positions not 0..N-1) against all keys or another rank's
    share (key positions not consecutive: the per-element mask; consecutive: the per-row runs),
    every mask, partial and hidden tiles (small tiles, so all three tile classes occur), against
    the reference built from the definition."""
    n, ranks, rank = 400, 4, 1
    nk = 400 if "cu_seqlens" in mask else 430
    pos = positions(n, ranks, rank, layout)
    q, k, v = _qkv(7, 1, n, nk, 4, 2, 32)
    q = q[:, : len(pos)]
    k_pos = None
    if keys == "shard":
        k_pos = positions(nk, ranks, 2, layout)
        k, v = k[:, : len(k_pos)], v[:, : len(k_pos)]
    kw = dict(mask)
    m = make_mask(**{key: (np.array(val) if key == "cu_seqlens" else val) for key, val in kw.items()})
    m = m.bind(n, nk)
    got = cpu_fused.attention(q, k, v, q_pos=pos, k_pos=k_pos, mask=m, block_rows=16, block_k=24)
    want = naive_attention(q, k, v, q_pos=pos, k_pos=k_pos, n_q=n, n_k=nk,
                           **{key: (np.array(val) if key == "cu_seqlens" else val) for key, val in kw.items()})
    _check(got, want)


@needs_fused
@pytest.mark.parametrize("causal", [False, True])
def test_worker_threads_give_the_one_thread_result(causal):
    q, k, v = _qkv(3, 2, 1100, 900, 4, 2, 16)
    one = cpu_fused.attention(q, k, v, causal=causal, workers=1)
    for workers in (2, 3):
        many = cpu_fused.attention(q, k, v, causal=causal, workers=workers)
        for a, b in zip(one, many):
            assert np.array_equal(a, b)


@needs_fused
def test_strided_inputs_are_read_in_place_or_copied():
    """Views (a slice of heads, a transposed array) give the contiguous arrays' result."""
    q, k, v = _qkv(5, 1, 90, 80, 8, 4, 16)
    qv, kv, vv = q[:, :, 2:6], k[:, :, 1:3], np.asfortranarray(v)[:, :, 1:3]
    want = naive_attention(np.ascontiguousarray(qv), np.ascontiguousarray(kv), np.ascontiguousarray(vv))
    _check(cpu_fused.attention(qv, kv, vv), want)


@needs_fused
@pytest.mark.parametrize("nk, d", [(16, 64), (5, 40), (11, 128)])
def test_many_queries_against_a_few_keys_from_head_slices(nk, d):
    """The decode-like path reads q's rows in place where it can (AMD CPUs: the scale folded into
    the packed keys): a slice of heads (rows 12 heads apart), partial last blocks (1,003 rows),
    and FlashAttention's accuracy rule (error <= 2x a float32 reference's)."""
    q, k, v = _qkv(nk + d, 1, 1003, nk, 12, 12, d)
    qv, kv, vv = q[:, :, 2:10], k[:, :, 3:11], v[:, :, 1:9]
    args = [np.ascontiguousarray(x) for x in (qv, kv, vv)]
    exact = naive_attention(*args, scale=0.3)
    same = naive_attention(*args, scale=0.3, dtype=np.float32)[0]
    got = cpu_fused.attention(qv, kv, vv, scale=0.3)
    _check(got, exact)
    assert np.abs(got[0] - exact[0]).max() <= 2 * np.abs(same - exact[0]).max()


@needs_fused
def test_flashattention_accuracy_rule():
    """float32 error <= 2x that of a float32 reference (FlashAttention's failing case)."""
    for seed in range(3):
        q, k, v = _qkv(seed, 4, 113, 211, 6, 6, 96)
        exact = naive_attention(q, k, v, causal=True)[0]
        same = naive_attention(q, k, v, causal=True, dtype=np.float32)[0]
        got = cpu_fused.attention(q, k, v, causal=True)[0]
        assert np.abs(got - exact).max() <= 2 * np.abs(same - exact).max()


@needs_fused
@pytest.mark.parametrize("shape, kw", [((2, 40, 3000, 6, 2, 96), dict(causal=True, align="bottom-right")),
                                       ((1, 100, 2500, 4, 2, 64), {}), ((3, 16, 4000, 8, 8, 128), {})])
def test_flashattention_accuracy_rule_with_rows_in_groups(shape, kw):
    """The same rule where 17 to 256 query rows run in groups of 16 against keys past one tile
    (keys and values read in place, never packed)."""
    b, nq, nk, h, hkv, d = shape
    q, k, v = _qkv(nq + nk, b, nq, nk, h, hkv, d)
    k *= np.linspace(0.3, 3.0, nk, dtype=np.float32)[None, :, None, None]  # maxima that grow
    m = make_mask(**kw).bind(nq, nk) if kw else None
    exact = naive_attention(q, k, v, **kw)
    same = naive_attention(q, k, v, dtype=np.float32, **kw)[0]
    got = cpu_fused.attention(q, k, v, mask=m)
    _check(got, exact)
    assert np.abs(got[0] - exact[0]).max() <= 2 * np.abs(same - exact[0]).max()


@needs_fused
def test_auto_takes_it_for_float32_and_records_it(monkeypatch):
    monkeypatch.delenv(cpu_kernels.KERNEL_ENV, raising=False)
    q, k, v = _qkv(4, 1, 64, 64, 2, 1, 16)
    out = hpcattn.attention(q, k, v, causal=True, window=(8, 0))
    assert cpu_kernels.LAST["forward"] == cpu_kernels.FUSED_KERNEL
    _check(out, naive_attention(q, k, v, causal=True, window=(8, 0)))
    hpcattn.attention(q, k, v, block_q=16)                      # tile sizes: the NumPy kernel's
    assert cpu_kernels.LAST["forward"] == cpu_kernels.NUMPY_KERNEL
    monkeypatch.setenv(cpu_kernels.KERNEL_ENV, "numpy")
    hpcattn.attention(q, k, v)
    assert cpu_kernels.LAST["forward"] == cpu_kernels.NUMPY_KERNEL
    monkeypatch.setenv(cpu_kernels.KERNEL_ENV, "fused")
    hpcattn.attention(q, k, v)
    assert cpu_kernels.LAST["forward"] == cpu_kernels.FUSED_KERNEL
    assert cpu_kernels.describe()["fused"] == "available"


def test_no_compiler_is_a_reason_and_auto_uses_numpy(monkeypatch, tmp_path):
    monkeypatch.setenv("CXX", "no-such-compiler-hpcattn")
    monkeypatch.setenv(cpu_fused.CACHE_ENV, str(tmp_path))
    monkeypatch.setattr(cpu_fused, "_state", {})
    why = cpu_fused.reason()
    assert why and "C++ compiler 'no-such-compiler-hpcattn' not found" in why and "\n" not in why
    monkeypatch.delenv(cpu_kernels.KERNEL_ENV, raising=False)
    q, k, v = _qkv(4, 1, 32, 32, 2, 2, 16)
    out = hpcattn.attention(q, k, v, causal=True)
    assert cpu_kernels.LAST["forward"] == cpu_kernels.NUMPY_KERNEL
    _check(out, naive_attention(q, k, v, causal=True))
    monkeypatch.setenv(cpu_kernels.KERNEL_ENV, "fused")
    with pytest.raises(HpcattnError, match="HPCATTN_CPU_KERNEL=fused but the fused CPU kernel is "
                                           "unavailable .C.. compiler"):
        hpcattn.attention(q, k, v)
    with pytest.raises(HpcattnError, match="fused CPU kernel is unavailable"):
        cpu_fused.attention(q, k, v)


def test_no_sgemm_is_a_reason(monkeypatch, tmp_path):
    monkeypatch.setattr(cpu_fused, "SGEMM_SYMBOLS", (("no_such_sgemm_symbol", True),))
    monkeypatch.setattr(cpu_fused, "_state", {})
    assert "no CBLAS sgemm found" in cpu_fused.reason()


@needs_fused
def test_a_planted_symlink_in_the_cache_is_refused(monkeypatch, tmp_path):
    """The cache holds the library this user built; a symlink there is never loaded through."""
    monkeypatch.setenv(cpu_fused.CACHE_ENV, str(tmp_path))
    cpu_fused.build()
    (built,) = tmp_path.glob("fused-*.so")
    target = tmp_path / "elsewhere.so"
    os.replace(built, target)
    os.symlink(target, built)
    with pytest.raises(HpcattnError, match="is not a regular file of this user"):
        cpu_fused.build()


@needs_fused
def test_build_is_cached_and_written_whole(monkeypatch, tmp_path):
    monkeypatch.setenv(cpu_fused.CACHE_ENV, str(tmp_path))
    cpu_fused.build()
    first = sorted(p.name for p in tmp_path.iterdir())
    cpu_fused.build()
    assert sorted(p.name for p in tmp_path.iterdir()) == first
    assert len(first) == 1 and first[0].startswith("fused-")   # no temporary left behind


@needs_fused
def test_wrong_dtype_is_one_line_error():
    q, k, v = _qkv(4, 1, 8, 8, 1, 1, 8)
    with pytest.raises(HpcattnError, match="the fused CPU kernel expects float32"):
        cpu_fused.attention(q.astype(np.float64), k, v)


@needs_fused
@pytest.mark.parametrize("mask", [None, dict(causal=True), dict(window=(9, 4)), dict(cu_seqlens=[0, 40, 41, 150])])
def test_portable_build_matches_reference(monkeypatch, tmp_path, mask):
    """The build without -march=native (its products through NumPy's sgemm) computes the same:
    GQA, partial tiles, rows that see nothing, packed sequences."""
    monkeypatch.setenv(cpu_fused.CACHE_ENV, str(tmp_path))
    state = dict(cpu_fused._load())
    monkeypatch.setattr(cpu_fused, "_state", {**state, "lib": cpu_fused.build(native=False)})
    q, k, v = _qkv(21, 2, 150, 150, 6, 2, 40)
    kw = {} if mask is None else {key: (np.array(val) if key == "cu_seqlens" else val) for key, val in mask.items()}
    m = make_mask(**kw).bind(150, 150) if kw else None
    got = cpu_fused.attention(q, k, v, mask=m, block_rows=24, block_k=32, workers=2)
    _check(got, naive_attention(q, k, v, **kw))


def test_key_tile_keeps_the_packed_tile_in_l2():
    assert cpu_fused.key_tile(64) == 512 and cpu_fused.key_tile(128) == 256
    assert cpu_fused.key_tile(8) == 512 and cpu_fused.key_tile(1024) == 32
    for d in (1, 24, 96, 200):
        assert cpu_fused.key_tile(d) % 16 == 0


@needs_fused
@pytest.mark.parametrize("mask", [None, dict(causal=True), dict(causal=True, window=(50, 0)),
                                  dict(cu_seqlens=[0, 100, 333, 600])])
@pytest.mark.parametrize("workers", [1, 3])
def test_ring_state_folds_blocks_to_the_reference(mask, workers):
    """A ring rank's state (FusedPartial) fed three key blocks at zigzag-like positions, in the
    NumPy state's packed layout, equals float64 attention over all keys; progress is called."""
    from hpcattn.blockwise import PartialAttention

    n = 600
    q, k, v = _qkv(31, 2, n, n, 4, 2, 16)
    q_pos = np.concatenate([np.arange(0, 150), np.arange(450, 600)])
    kw = {} if mask is None else {key: (np.array(val) if key == "cu_seqlens" else val) for key, val in mask.items()}
    m = make_mask(**kw).bind(n, n) if kw else None
    state = cpu_fused.FusedPartial(q[:, q_pos], 2, causal=False, scale=None, q_pos=q_pos, mask=m,
                                   workers=workers)
    assert state.packed_size(200) == PartialAttention(q[:, :4], 2, causal=False, scale=None,
                                                      q_pos=None).packed_size(200)
    calls = []
    for keys in (np.arange(400, 600), np.arange(0, 200), np.arange(200, 400)):
        buf = np.empty(state.packed_size(len(keys)), np.float32)
        state.pack(k[:, keys], v[:, keys], buf)
        state.add_packed(buf, len(keys), keys, progress=lambda: calls.append(1))
    got = state.result()
    _check(got, naive_attention(q[:, q_pos], k, v, q_pos=q_pos, **kw))
    assert calls


@needs_fused
def test_ring_state_of_one_block_is_the_forward_bit_for_bit():
    q, k, v = _qkv(32, 1, 700, 650, 6, 3, 32)
    state = cpu_fused.FusedPartial(q, 3, causal=True, scale=0.2, q_pos=None, workers=2)
    buf = np.empty(state.packed_size(650), np.float32)
    state.pack(k, v, buf)
    state.add_packed(buf, 650, np.arange(650))
    for a, b in zip(state.result(), cpu_fused.attention(q, k, v, causal=True, scale=0.2, workers=2)):
        assert np.array_equal(a, b)


@needs_fused
@pytest.mark.parametrize("ring", [False, True])
def test_the_kernels_memory_is_numpys_so_it_is_counted(ring):
    """The tiles and the packed key/value block live in a NumPy scratch array: tracemalloc (so
    the memory model's measurements and hpcattn bench's max-N) sees them. On the AVX2 path the
    slab's 2048 keys and values are packed once: 2 x 2048 x 64 floats at least."""
    import tracemalloc

    q, k, v = _qkv(33, 1, 512, 2048, 1, 1, 64)
    packed = 2 * 2048 * 64 * 4
    tracemalloc.start()
    try:
        if ring:
            state = cpu_fused.FusedPartial(q, 1, causal=False, scale=None, q_pos=None)
            buf = np.empty(state.packed_size(2048), np.float32)
            state.pack(k, v, buf)
            tracemalloc.reset_peak()
            before = tracemalloc.get_traced_memory()[0]
            state.add_packed(buf, 2048, np.arange(2048))
        else:
            tracemalloc.reset_peak()
            before = tracemalloc.get_traced_memory()[0]
            cpu_fused.attention(q, k, v)
        grew = tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()
    scores = 512 * 512 * 4                       # one score tile at least, on either path
    assert grew >= (packed if _micro() else scores)


def _micro():
    """Whether this build has the AVX2 path (its accumulator rows are padded to 16 floats)."""
    return cpu_fused._load()["lib"].hpcattn_cpu_acc_stride(24) == 32


@needs_fused
def test_the_callers_scratch_is_used_and_a_small_one_refused():
    import ctypes

    lib = cpu_fused._load()["lib"]
    q, k, v = _qkv(34, 1, 64, 64, 1, 1, 16)
    out, lse = np.empty_like(q), np.empty((1, 1, 64), np.float32)
    c = cpu_fused._Call(q=q.ctypes.data, k=k.ctypes.data, v=v.ctypes.data, out=out.ctypes.data,
                        lse=lse.ctypes.data, nq=64, nk=64, g=1, d=16, q_stride=16, k_stride=16,
                        v_stride=16, o_stride=16, lse_head_stride=64, block_q=64, block_k=64,
                        scale=0.25, gemm=cpu_fused._load()["gemm"][0], ilp64=cpu_fused._load()["gemm"][1])
    need = lib.hpcattn_cpu_scratch_floats(ctypes.byref(c), 0)
    small = np.zeros(need - 1, np.float32)
    c.scratch, c.scratch_floats = small.ctypes.data, need - 1
    assert lib.hpcattn_cpu_forward_f32(ctypes.byref(c)) == 2
    assert not small.any()                        # refused before anything was written
    exact = np.full(need, np.nan, np.float32)
    c.scratch, c.scratch_floats = exact.ctypes.data, need
    assert lib.hpcattn_cpu_forward_f32(ctypes.byref(c)) == 0
    _check((out, lse), naive_attention(q, k, v, scale=0.25))
    assert not np.isnan(exact).all()                # the tiles were the caller's array
    out[:], lse[:] = np.nan, np.nan
    c.scratch, c.scratch_floats = None, 0           # none given: the kernel allocates its own
    assert lib.hpcattn_cpu_forward_f32(ctypes.byref(c)) == 0
    _check((out, lse), naive_attention(q, k, v, scale=0.25))


@needs_fused
@pytest.mark.parametrize("rows", [1, 5, 6, 7, 16, 17, 40, 47])
@pytest.mark.parametrize("d", [64, 128, 80, 72, 8])
def test_few_query_rows_against_many_keys(rows, d):
    """Fewer than 48 query rows per fold (a decode step against a long cache: up to 16 rows the
    rows-in-lanes kernels, above that the sgemm path) over three key tiles, the last of 76 keys,
    with scores that grow from tile to tile so each row's max and accumulator are rescaled; GQA
    where the row count is even; head dims with a partial last 16 columns (72, 8)."""
    g = 2 if rows % 2 == 0 else 1
    q, k, v = _qkv(rows * d, 1, rows // g, 1100, 4, 4 // g, d)
    k *= np.linspace(0.5, 3.0, 1100, dtype=np.float32)[None, :, None, None]
    _check(cpu_fused.attention(q, k, v, scale=0.2), naive_attention(q, k, v, scale=0.2))


FEW_HEADS = [(2, 3, 1000, 8, 4, 64), (1, 16, 777, 4, 4, 72), (1, 1, 500, 6, 6, 8), (1, 8, 1300, 4, 2, 128),
             (3, 5, 97, 3, 3, 24),
             # 17 to 64 rows against keys past one tile: groups of 16 rows (a partial last one; a
             # group boundary inside a position's GQA rows; one kv head, a call per head)
             (1, 24, 1300, 4, 4, 64), (2, 16, 900, 8, 2, 72), (1, 11, 700, 6, 2, 40), (1, 40, 800, 1, 1, 128),
             # up to 128 rows against any keys past a tile, up to 256 against 2,048 keys or more
             (1, 50, 700, 4, 2, 64), (1, 120, 2100, 4, 2, 48)]
FEW_MASKS = [None, dict(causal=True, align="bottom-right"), dict(window=(300, 0), align="bottom-right"),
             dict(window=(-1, 40)), dict(cu_seqlens="three sequences")]


@needs_fused
@pytest.mark.parametrize("shape", FEW_HEADS)
@pytest.mark.parametrize("mask", FEW_MASKS)
@pytest.mark.parametrize("workers", [1, 3])
@pytest.mark.parametrize("kv_layout", ["bnhd", "bhnd"])
def test_few_rows_every_kv_head_in_one_call(shape, mask, workers, kv_layout):
    """At most 16 query rows (or 64 against keys past one tile): one kernel call per group of
    kv heads, heads innermost over key tiles. Batches, GQA, head dims with a partial last 16 columns and below 16, key counts that
    are no multiple of the tile, every mask class (a window that hides whole tiles, a sequence
    boundary), worker groups of heads, keys and values in either layout (rows holding every
    head, or each head's rows contiguous); keys grow along the cache so maxima rise tile to
    tile and accumulators are rescaled."""
    b, nq, nk, h, hkv, d = shape
    q, k, v = _qkv(nq * nk + d, b, nq, nk, h, hkv, d)
    k *= np.linspace(0.3, 2.5, nk, dtype=np.float32)[None, :, None, None]
    if kv_layout == "bhnd":
        k, v = (np.ascontiguousarray(x.transpose(0, 2, 1, 3)).transpose(0, 2, 1, 3) for x in (k, v))
    kw = {} if mask is None else dict(mask)
    if "cu_seqlens" in kw:   # three packed sequences over the cache, the queries across a boundary
        kw = dict(cu_seqlens=np.array([0, nk // 3, nk // 3 + 1, nk]))
        q_pos = np.arange(nk // 3 - nq // 2 - 1, nk // 3 - nq // 2 - 1 + nq)   # across the boundary
        m = make_mask(**kw).bind(nk, nk)
        got = cpu_fused.attention(q, k, v, q_pos=q_pos, mask=m, workers=workers)
        want = naive_attention(q, k, v, q_pos=q_pos, n_q=nk, n_k=nk, **kw)
    else:
        m = make_mask(**kw).bind(nq, nk) if kw else None
        got = cpu_fused.attention(q, k, v, mask=m, workers=workers)
        want = naive_attention(q, k, v, **kw)
    _check(got, want)


TINY = [(1, 1, 1000, 8, 8, 64), (2, 1, 2003, 8, 2, 32), (1, 2, 17, 4, 4, 96), (1, 4, 1500, 2, 2, 48),
        (3, 1, 777, 12, 3, 16), (1, 1, 5000, 4, 4, 128), (1, 3, 1, 2, 2, 64), (2, 2, 600, 4, 2, 80)]
TINY_MASKS = [None, dict(causal=True, align="bottom-right"), dict(window=(100, 0), align="bottom-right"),
              dict(window=(-1, 40)), dict(cu_seqlens="three sequences")]


@needs_fused
@pytest.mark.parametrize("shape", TINY)
@pytest.mark.parametrize("mask", TINY_MASKS)
@pytest.mark.parametrize("kv_layout", ["bnhd", "bhnd"])
def test_a_decode_step_of_at_most_four_rows_per_kv_head(shape, mask, kv_layout):
    """At most four query rows per kv head (one query of a GQA group, or a few queries), head
    dims that are multiples of 16 (on AMD CPUs: the streamed decode path, key and value rows in
    memory order, blocks of sixteen keys, spans of 64): key counts off the block and span (17,
    600, 2,003), one key (three causal queries of which two see nothing: out 0, lse -inf),
    every mask class (windows that hide whole blocks, a sequence boundary), keys and values in
    either layout, keys that grow along the cache so maxima rise span to span. The float64
    reference's results, and FlashAttention's rule (error <= 2x a float32 reference's)."""
    b, nq, nk, h, hkv, d = shape
    q, k, v = _qkv(nq * 7 + nk + d, b, nq, nk, h, hkv, d)
    k *= np.linspace(0.3, 3.0, nk, dtype=np.float32)[None, :, None, None]
    if kv_layout == "bhnd":
        k, v = (np.ascontiguousarray(x.transpose(0, 2, 1, 3)).transpose(0, 2, 1, 3) for x in (k, v))
    kw = {} if mask is None else dict(mask)
    if "cu_seqlens" in kw:   # three packed sequences over the cache, the queries across a boundary
        if nk < 3:
            pytest.skip("three sequences need three keys")
        kw = dict(cu_seqlens=np.array([0, nk // 3, nk // 3 + 1, nk]))
        q_pos = np.arange(nk // 3 - nq // 2 - 1, nk // 3 - nq // 2 - 1 + nq) % nk
        m = make_mask(**kw).bind(nk, nk)
        got = cpu_fused.attention(q, k, v, q_pos=q_pos, mask=m)
        want = naive_attention(q, k, v, q_pos=q_pos, n_q=nk, n_k=nk, **kw)
        same = naive_attention(q, k, v, q_pos=q_pos, n_q=nk, n_k=nk, dtype=np.float32, **kw)[0]
    else:
        m = make_mask(**kw).bind(nq, nk) if kw else None
        got = cpu_fused.attention(q, k, v, mask=m)
        want = naive_attention(q, k, v, **kw)
        same = naive_attention(q, k, v, dtype=np.float32, **kw)[0]
    _check(got, want)
    assert np.abs(got[0] - want[0]).max() <= 2 * np.abs(same - want[0]).max()


@needs_fused
@pytest.mark.parametrize("spike", [0, 5, 19, 39, 63, 81, 299])
def test_a_decode_step_with_one_score_far_above_the_rest(spike):
    """One key whose score is ~100 above every other (past exp's float32 range), in any block
    of a span and the last key: a row's max must cover every key it exponentiates, or exp
    overflows."""
    q, k, v = _qkv(spike, 1, 2, 300, 4, 2, 64)
    qh = q[0, 0, ::2]                                  # query 0's rows of kv heads 0 and 1
    k[0, spike] = 100.0 * 8.0 * qh / (qh * qh).sum(axis=-1, keepdims=True)   # score 100 (scale 1/8)
    got = cpu_fused.attention(q, k, v)
    want = naive_attention(q, k, v)
    assert np.isfinite(got[0]).all() and np.isfinite(got[1]).all()
    _check(got, want)


@needs_fused
@pytest.mark.parametrize("shape", [(2, 301, 16, 8, 4, 72), (1, 500, 3, 2, 2, 8), (1, 97, 40, 3, 3, 128),
                                   (2, 1030, 512, 2, 1, 24), (1, 260, 17, 4, 2, 64), (1, 20000, 16, 8, 8, 64)])
@pytest.mark.parametrize("workers", [1, 3])
def test_many_queries_against_a_few_keys_every_head_in_one_call(shape, workers):
    """Keys that fit one tile, no mask: one call for all kv heads (per row chunk on several
    workers), query tiles head after head, out stored straight from the products (no
    accumulator): head dims with a partial last 16 columns (72, 24, 8), GQA, batches, a query
    tile boundary inside the rows (1030); an out of 41 MB (past 4 MiB: streaming stores into the
    64-byte aligned out). Several workers give the one-worker bits."""
    b, nq, nk, h, hkv, d = shape
    q, k, v = _qkv(nq + nk + d, b, nq, nk, h, hkv, d)
    got = cpu_fused.attention(q, k, v, scale=0.3, workers=workers)
    _check(got, naive_attention(q, k, v, scale=0.3))
    if workers > 1:
        for a, b in zip(got, cpu_fused.attention(q, k, v, scale=0.3, workers=1)):
            assert np.array_equal(a, b)


@needs_fused
@pytest.mark.parametrize("kw", [dict(causal=True, align="bottom-right"), dict(window=(600, 0), align="bottom-right")])
def test_a_decode_step_with_a_mask(kw):
    """Three new rows against 1000 cached keys, causal or windowed: full key tiles and the
    masked edge tile."""
    q, k, v = _qkv(36, 2, 3, 1000, 8, 2, 64)
    m = make_mask(**kw).bind(3, 1000)
    _check(cpu_fused.attention(q, k, v, mask=m), naive_attention(q, k, v, **kw))


@needs_fused
@pytest.mark.parametrize("workers", [1, 3])
def test_ring_state_of_few_rows_per_tile(workers):
    """A ring state of 8-row tiles (GQA 2 x 4 positions): every fold has a few rows, and a
    fold's rows must leave the next tile's accumulator rows alone."""
    q, k, v = _qkv(37, 1, 90, 700, 4, 2, 64)
    state = cpu_fused.FusedPartial(q, 2, causal=False, scale=None, q_pos=None, block_q=4,
                                   workers=workers)
    for keys in (np.arange(0, 350), np.arange(350, 700)):
        buf = np.empty(state.packed_size(len(keys)), np.float32)
        state.pack(k[:, keys], v[:, keys], buf)
        state.add_packed(buf, len(keys), keys)
    _check(state.result(), naive_attention(q, k, v))


@needs_fused
@pytest.mark.parametrize("mask", [None, dict(causal=True), dict(window=(3, 2))])
def test_decode_like_shapes_run_in_row_chunks_all_heads_each(monkeypatch, mask):
    """Keys that fit one tile: rows in chunks (here 300, the last one partial), every head of a
    chunk before the next; positions, out and lse offsets per chunk give the reference."""
    monkeypatch.setattr(cpu_fused, "DECODE_ROWS", 300)
    q, k, v = _qkv(35, 2, 1000, 20, 6, 3, 32)
    kw = mask or {}
    m = make_mask(**kw).bind(1000, 20) if kw else None
    _check(cpu_fused.attention(q, k, v, mask=m), naive_attention(q, k, v, **kw))


@needs_fused
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf, "nan-payload"])
@pytest.mark.parametrize("where", [0, 4095, 4096, 70_001, -1])   # block edges, the last value
def test_compiled_nonfinite_search_finds_the_first_one(dtype, bad, where):
    x = np.random.default_rng(1).standard_normal(70_002).astype(dtype)
    x[[1, -2]] = [np.finfo(dtype).max, np.finfo(dtype).smallest_subnormal]   # finite extremes
    x[2] = -0.0
    assert cpu_kernels.first_nonfinite(x) == -1
    bits = x.view(np.uint32 if dtype == np.float32 else np.uint64)
    if bad == "nan-payload":   # a NaN whose mantissa is not the default one
        bits[where] = (0x7f800001 if dtype == np.float32 else 0x7ff0000000000001)
    else:
        x[where] = bad
    want = where % x.size
    if want + 7 < x.size:
        x[want + 7] = np.nan   # a later one

    assert cpu_kernels.first_nonfinite(x) == want
    assert np.flatnonzero(~np.isfinite(x))[0] == want   # NumPy agrees


@needs_fused
def test_compiled_nonfinite_search_applies_only_where_it_can(monkeypatch):
    big = np.zeros((2, 40_000), np.float32)
    assert cpu_kernels.first_nonfinite(big) == -1
    assert cpu_kernels.first_nonfinite(big[:, ::2]) is None           # not contiguous
    assert cpu_kernels.first_nonfinite(big[:1, :100]) is None         # small: NumPy's is as fast
    assert cpu_kernels.first_nonfinite(big.astype(np.float16)) is None
    monkeypatch.setenv("HPCATTN_CPU_KERNEL", "numpy")                 # no compiled code asked for
    assert cpu_kernels.first_nonfinite(big) is None


@needs_fused
@pytest.mark.parametrize("layout", ["contiguous", "strided"])
def test_nan_in_a_large_cache_is_named_the_same_either_way(layout):
    """The public check names the same first bad index with the compiled search (contiguous k)
    as with NumPy's (a strided view of k)."""
    q, k, v = _qkv(3, 1, 2, 9000, 8, 2, 64)
    if layout == "strided":
        k = np.concatenate([k, k], axis=3)[..., :64]
    k[0, 8000, 1, 5] = np.inf
    k[0, 8500, 0, 0] = np.nan
    with pytest.raises(HpcattnError, match=r"^k contains NaN or Inf \(first at index \(0, 8000, 1, 5\)\)"):
        hpcattn.attention(q, k, v)
