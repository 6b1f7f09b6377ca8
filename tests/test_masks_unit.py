"""Masks (causal top-left/bottom-right, sliding windows, packed sequences): the tile classifier is
sound, and the blockwise kernels (forward and backward) equal the float64 reference, whose mask
is built from the definitions independently of ``hpcattn.masks``."""
import numpy as np
import pytest

import hpcattn
from hpcattn import HpcattnError, blockwise
from hpcattn.backend import NO_GPU_MASKS, mask_kwargs
from hpcattn.blockwise_backward import attention_backward as blockwise_backward
from hpcattn.masks import FULL, NONE, make_mask, tile_bounds
from hpcattn.reference import naive_attention, naive_attention_backward, visible_matrix

# (causal, window, cu_seqlens or a function of N, align): every kind of mask and their mixtures
MASKS = {
    "causal": (True, None, None, "top-left"),
    "causal-bottom-right": (True, None, None, "bottom-right"),
    "window": (False, (7, 3), None, "top-left"),
    "window-left-only": (False, (5, -1), None, "top-left"),
    "causal-window": (True, (9, 0), None, "top-left"),
    "varlen": (False, None, "varlen", "top-left"),
    "varlen-causal": (True, None, "varlen", "top-left"),
    "varlen-causal-window": (True, (6, -1), "varlen", "top-left"),
    "varlen-window": (False, (4, 4), "varlen", "top-left"),
}


def cu_for(n):
    """Uneven packed sequences of a length-n sequence (one of length 1)."""
    cuts = sorted({0, 1, n // 3, n // 3 + 5, (2 * n) // 3, n})
    return np.array([c for c in cuts if 0 <= c <= n], dtype=np.int64)


def mask_args(name, n):
    causal, window, cu, align = MASKS[name]
    return dict(causal=causal, window=window, cu_seqlens=cu_for(n) if cu == "varlen" else None,
                align=align)


def cross_args(name, nq, nk):
    """``mask_args`` for Nq queries and Nk keys; skips packed sequences when Nq != Nk."""
    args = mask_args(name, nk)
    if args["cu_seqlens"] is not None and nq != nk:
        pytest.skip("packed sequences are self-attention")
    return args


def inputs(nq, nk, h=4, hkv=2, d=8, dtype="float64", seed=0):
    rng = np.random.default_rng([seed, nq, nk])
    return (rng.standard_normal((2, nq, h, d)).astype(dtype),
            rng.standard_normal((2, nk, hkv, d)).astype(dtype),
            rng.standard_normal((2, nk, hkv, d)).astype(dtype))


# --- the description -----------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, words", [
    (dict(window=(-2, 0)), "window left=-2 is below -1"),
    (dict(window=(3, -5)), "window right=-5 is below -1"),
    (dict(window=(3,)), "is not a pair"),
    (dict(window=(1.5, 2)), "is not an integer"),
    (dict(causal=True, window=(4, 2)), "window right=2 with causal"),
    (dict(cu_seqlens=[0, 5, 5, 9]), "not strictly increasing"),
    (dict(cu_seqlens=[0, 7, 3, 9]), "not strictly increasing"),
    (dict(cu_seqlens=[1, 5, 9]), "starts at 1; expected 0"),
    (dict(cu_seqlens=[0]), "at least 2 entries"),
    (dict(cu_seqlens=[[0, 4]]), "expected a 1-D array"),
    (dict(cu_seqlens=[0.0, 4.0]), "expected integers"),
    (dict(align="middle"), "align='middle' is unknown"),
])
def test_bad_masks_are_refused_in_one_line(kwargs, words):
    with pytest.raises(HpcattnError, match=words) as exc:
        make_mask(**kwargs)
    assert "\n" not in str(exc.value)


def test_cu_seqlens_must_end_at_n_and_be_self_attention():
    with pytest.raises(HpcattnError, match="ends at 9; expected it to end at the sequence length N=10"):
        make_mask(cu_seqlens=[0, 4, 9]).bind(10, 10)
    with pytest.raises(HpcattnError, match="seqlen_q=6 != seqlen_k=10"):
        make_mask(cu_seqlens=[0, 4, 10]).bind(6, 10)
    q, k, v = inputs(10, 10)
    with pytest.raises(HpcattnError, match="ends at 9"):
        hpcattn.attention(q, k, v, cu_seqlens=[0, 4, 9])


@pytest.mark.parametrize("name", MASKS)
@pytest.mark.parametrize("nq, nk", [(40, 40), (23, 40), (40, 23)])
def test_visible_matches_the_independent_definition(name, nq, nk):
    args = cross_args(name, nq, nk)
    mask = make_mask(**args).bind(nq, nk)
    rng = np.random.default_rng(1)
    qp, kp = np.sort(rng.choice(nq, 17, replace=False)), rng.permutation(nk)
    ref = visible_matrix(qp, kp, n_q=nq, n_k=nk, **args)
    assert (mask.visible(qp, kp) == ref).all()
    assert ((mask.bias(qp, kp, np.float32) == 0) == ref).all()


@pytest.mark.parametrize("name", MASKS)
@pytest.mark.parametrize("layout", ["contiguous", "zigzag", "striped"])
def test_tile_classes_are_sound(name, layout):
    """NONE only when no pair is visible, FULL only when every pair is, on tiles of any layout."""
    n = 97
    args = mask_args(name, n)
    mask = make_mask(**args).bind(n, n)
    seen_none = seen_full = False
    for size, rank in ((3, 0), (3, 2), (4, 1)):
        pos = hpcattn.Distribution(n, size, layout).positions(rank)
        for other in range(size):
            kp = hpcattn.Distribution(n, size, layout).positions(other)
            qt, kt = tile_bounds(len(pos), 5, pos), tile_bounds(len(kp), 7, kp)
            classes = mask.tile_classes(qt, kt)
            for i, (qs, qe, _, _) in enumerate(qt):
                for j, (ks, ke, _, _) in enumerate(kt):
                    vis = visible_matrix(pos[qs:qe], kp[ks:ke], n_q=n, n_k=n, **args)
                    if classes[i, j] == NONE:
                        seen_none = True
                        assert not vis.any()
                    elif classes[i, j] == FULL:
                        seen_full = True
                        assert vis.all()
    assert seen_full or seen_none   # the classifier decided something (it may not always)


# --- the kernels against the reference -------------------------------------------------------

@pytest.mark.parametrize("name", MASKS)
@pytest.mark.parametrize("nq, nk", [(53, 53), (29, 53), (53, 29)])
@pytest.mark.parametrize("dtype, tol", [("float64", 1e-12), ("float32", 2e-5)])
def test_blockwise_masks_equal_reference(name, nq, nk, dtype, tol):
    args = cross_args(name, nq, nk)
    q, k, v = inputs(nq, nk, dtype=dtype)
    ref, ref_lse = naive_attention(q, k, v, **args)
    out, lse = hpcattn.attention(q, k, v, block_q=4, block_k=8, **args)
    seen = np.isfinite(ref_lse)
    assert out.dtype == np.dtype(dtype)
    assert np.abs(out - ref).max() < tol
    assert (np.isfinite(lse) == seen).all() and np.abs(lse[seen] - ref_lse[seen]).max() < tol
    # gradients: rows that see no key have lse -inf and contribute nothing
    dout = np.random.default_rng(5).standard_normal(q.shape).astype(dtype)
    grads = hpcattn.attention_backward(q, k, v, out, lse, dout, block_q=4, block_k=8, **args)
    for got, want in zip(grads, naive_attention_backward(q, k, v, dout, **args)):
        assert got.dtype == np.dtype(dtype)
        assert np.abs(got - want).max() < tol * 10


def test_default_tiles_and_positions_given():
    """Default tiles, positions in the ring's form (a zigzag shard against the whole sequence)."""
    n = 1500
    q, k, v = inputs(n, n, h=2, hkv=1, d=16)
    args = mask_args("varlen-causal-window", n)
    mask = make_mask(**args).bind(n, n)
    pos = hpcattn.Distribution(n, 2, "zigzag").positions(1)
    out, lse = blockwise.attention(q[:, pos], k, v, mask=mask, q_pos=pos)
    ref, ref_lse = naive_attention(q[:, pos], k, v, q_pos=pos, n_q=n, n_k=n, **args)
    assert np.abs(out - ref).max() < 1e-12 and np.abs(lse - ref_lse).max() < 1e-12
    dout = np.ones_like(q[:, pos])
    dq, dk, dv = blockwise_backward(q[:, pos], k, v, out, lse, dout, mask=mask, q_pos=pos)
    rdq, rdk, rdv = naive_attention_backward(q[:, pos], k, v, dout, q_pos=pos, n_q=n, n_k=n, **args)
    assert max(np.abs(a - b).max() for a, b in ((dq, rdq), (dk, rdk), (dv, rdv))) < 1e-11


def test_window_costs_n_times_w(monkeypatch):
    """Tiles outside the window are never computed: about N/bq * (w/bk + 2) tiles, not N²."""
    calls = []
    real = blockwise._tile
    monkeypatch.setattr(blockwise, "_tile", lambda *a: calls.append(1) or real(*a))
    n, w, bq, bk = 2048, 64, 32, 32
    q, k, v = inputs(n, n, h=1, hkv=1, d=4)
    hpcattn.attention(q, k, v, causal=True, window=(w, 0), block_q=bq, block_k=bk)
    slabs = 2   # batch 2 x 1 kv head
    assert len(calls) <= slabs * (n // bq) * (w // bk + 2)
    calls.clear()
    hpcattn.attention(q, k, v, causal=True, block_q=bq, block_k=bk)
    assert len(calls) > 4 * slabs * (n // bq) * (w // bk + 2)


def test_no_window_is_no_mask():
    q, k, v = inputs(30, 30)
    a = hpcattn.attention(q, k, v, window=(-1, -1))
    b = hpcattn.attention(q, k, v)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert make_mask(window=(-1, -1)).trivial and make_mask(causal=True).plain_causal


def test_a_backend_without_masks_refuses_them_in_one_line():
    class Gpu:
        name = "gpu"

    assert mask_kwargs(Gpu(), make_mask(causal=True).bind(8, 8)) == {"causal": True}
    for mask in (make_mask(window=(2, 2)), make_mask(cu_seqlens=[0, 3, 8]),
                 make_mask(causal=True, align="bottom-right")):
        with pytest.raises(HpcattnError, match=NO_GPU_MASKS):
            mask_kwargs(Gpu(), mask.bind(8, 8) if mask.cu_seqlens is not None else mask.bind(4, 8))


@pytest.mark.parametrize("name", MASKS)
@pytest.mark.parametrize("nq, nk", [(40, 40), (23, 40), (40, 23)])
def test_visible_pairs_counts_the_dense_mask(name, nq, nk):
    args = cross_args(name, nq, nk)
    pairs = make_mask(**args).bind(nq, nk).visible_pairs()
    assert pairs == visible_matrix(np.arange(nq), np.arange(nk), n_q=nq, n_k=nk, **args).sum()


@pytest.mark.parametrize("text, words", [
    ("4096", "has 1 numbers; expected LEFT,RIGHT"), ("a,0", "not a comma-separated list"),
    ("-3,0", "window left=-3 is below -1")])
def test_window_text_is_checked(text, words):
    from hpcattn.masks import parse_window

    with pytest.raises(HpcattnError, match=words):
        parse_window(text)
    assert parse_window("4096,0") == (4096, 0)


def test_cu_seqlens_text_is_checked():
    from hpcattn.masks import parse_cu_seqlens

    assert parse_cu_seqlens("0,1000,41000,65536").tolist() == [0, 1000, 41000, 65536]
    with pytest.raises(HpcattnError, match="not strictly increasing"):
        parse_cu_seqlens("0,1000,900,65536")
    with pytest.raises(HpcattnError, match="not a comma-separated list"):
        parse_cu_seqlens("0,1000;65536")


# --- cases, job files and the command line ----------------------------------------------------

def test_a_case_with_a_bad_mask_is_refused_in_one_line():
    from hpcattn.cases import AttentionCase
    from hpcattn.errors import CollectiveError

    with pytest.raises(CollectiveError, match="cu_seqlens ends at 200; expected it to end at the "
                                              "sequence length N=256"):
        AttentionCase(seq_len=256, cu_seqlens="0,100,200").validate(1)
    with pytest.raises(CollectiveError, match="window right=3 with causal"):
        AttentionCase(seq_len=256, causal=True, window="16,3").validate(1)
    AttentionCase(seq_len=256, causal=True, window="16,0", cu_seqlens="0,100,256").validate(1)


def test_job_files_take_window_and_cu_seqlens(tmp_path):
    from hpcattn.jobs import JobFileError, load_job

    path = tmp_path / "masks.toml"
    path.write_text('[job]\nname = "masks"\n[sweep]\nseq_len = 512\ncausal = true\n'
                    'window = ["64,0", "-1,-1"]\ncu_seqlens = "0,100,512"\n')
    job = load_job(path)
    assert job.sweep["window"] == ["64,0", "-1,-1"]
    path.write_text('[job]\nname = "masks"\n[sweep]\nseq_len = 512\ncu_seqlens = "0,300,200,512"\n')
    with pytest.raises(JobFileError, match=r"masks.toml:5: sweep.cu_seqlens = '0,300,200,512' is "
                                           r"invalid: cu_seqlens is not strictly increasing"):
        load_job(path)


@pytest.mark.parametrize("extra", [[], ["--backward", "--layout", "zigzag"]])
def test_run_with_a_window_and_packed_sequences_passes_its_check(hpcattn_cmd, mpiexec, extra):
    import subprocess

    from conftest import ROOT

    cmd = hpcattn_cmd + ["run", "--np", "2", "-N", "700", "-H", "2", "-d", "16", "--causal",
                         "--cu-seqlens", "0,10,400,700", "--window", "50,0", "--check",
                         "--check-rows", "32", *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert "mask               causal top-left, window 50,0, 3 packed sequences" in proc.stdout
    assert "PASSED" in proc.stdout
    bad = subprocess.run(hpcattn_cmd + ["run", "-N", "700", "--window", "50"], capture_output=True,
                         text=True, timeout=120, cwd=ROOT)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1
    assert "window='50' has 1 numbers; expected LEFT,RIGHT" in bad.stderr
