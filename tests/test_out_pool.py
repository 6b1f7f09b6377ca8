"""Reuse of large out arrays between fused-kernel calls (hpcattn.out_pool): a kept block is used
only once no view of its last out is alive, every element of an out placed in it is written (a
block full of NaN gives the float64 reference's result), another size frees the kept block
first, and HPCATTN_REUSE_OUT=0 or a small out keeps nothing."""
import gc
import os
import shutil

import numpy as np
import pytest

from hpcattn import cpu_fused, out_pool
from hpcattn.reference import naive_attention

HAVE_CXX = shutil.which(os.environ.get("CXX", "g++")) is not None
needs_fused = pytest.mark.skipif(not HAVE_CXX, reason="no C++ compiler (g++ or $CXX)")


@pytest.fixture(autouse=True)
def _fresh_pool(monkeypatch):
    monkeypatch.delenv(out_pool.ENV, raising=False)
    out_pool.release()
    yield
    out_pool.release()


def _qkv(seed, nq, nk, h, d):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((1, nq, h, d)).astype(np.float32),
            rng.standard_normal((1, nk, h, d)).astype(np.float32),
            rng.standard_normal((1, nk, h, d)).astype(np.float32))


def _ptr(a):
    return a.__array_interface__["data"][0]


def test_small_arrays_are_not_kept():
    a = out_pool.empty_f32((1, 100, 2, 8))
    assert a.dtype == np.float32 and a.shape == (1, 100, 2, 8) and _ptr(a) % 64 == 0
    del a
    gc.collect()
    assert out_pool.kept_bytes() == 0


def test_kept_only_after_every_view_is_gone(monkeypatch):
    monkeypatch.setattr(out_pool, "MIN_BYTES", 0)
    a = out_pool.empty_f32((3, 50, 4))
    a[:] = 1.0
    view = a[1:, ::2]
    del a
    gc.collect()
    assert out_pool.kept_bytes() == 0          # the view still holds the block
    b = out_pool.empty_f32((3, 50, 4))         # so this one is elsewhere
    b[:] = 2.0
    assert (view == 1.0).all()
    del view
    gc.collect()
    assert out_pool.kept_bytes() == 3 * 50 * 4 * 4 + out_pool.ALIGN
    c = out_pool.empty_f32((3, 50, 4))
    assert _ptr(c) % 64 == 0 and out_pool.kept_bytes() == 0
    assert not np.shares_memory(b, c)


def test_an_out_in_a_reference_cycle_comes_back_when_the_cycle_is_collected(monkeypatch):
    monkeypatch.setattr(out_pool, "MIN_BYTES", 0)
    holder = {"out": out_pool.empty_f32((4, 8))}
    holder["self"] = holder
    del holder
    gc.collect()
    assert out_pool.kept_bytes() == 4 * 8 * 4 + out_pool.ALIGN


def test_other_size_frees_the_kept_block(monkeypatch):
    monkeypatch.setattr(out_pool, "MIN_BYTES", 0)
    a = out_pool.empty_f32((10, 10))
    del a
    assert out_pool.kept_bytes() > 0
    b = out_pool.empty_f32((10, 11))
    assert out_pool.kept_bytes() == 0
    del b
    assert out_pool.kept_bytes() == 10 * 11 * 4 + out_pool.ALIGN


def test_switched_off(monkeypatch):
    monkeypatch.setattr(out_pool, "MIN_BYTES", 0)
    monkeypatch.setenv(out_pool.ENV, "0")
    a = out_pool.empty_f32((10, 10))
    del a
    assert out_pool.kept_bytes() == 0
    monkeypatch.delenv(out_pool.ENV)
    assert out_pool.release() == 0


@needs_fused
@pytest.mark.parametrize("shape", [(20000, 16, 8, 64), (300, 40, 3, 24), (9, 700, 4, 64)])
def test_a_reused_block_of_nan_is_overwritten(monkeypatch, shape):
    """The second call's out lies in the first one's memory, filled with NaN in between; it must
    still equal float64 attention everywhere (20000 x 16 x 8 heads: out 41 MB, streaming stores)."""
    nq, nk, h, d = shape
    if nq * h * d * 4 < out_pool.MIN_BYTES:
        monkeypatch.setattr(out_pool, "MIN_BYTES", 0)
    q, k, v = _qkv(sum(shape), nq, nk, h, d)
    out, _ = cpu_fused.attention(q, k, v)
    first = _ptr(out)
    del out
    gc.collect()
    assert len(out_pool._kept) == 1
    out_pool._kept[0].view(np.uint8)[:] = 0xFF     # NaN in every float of the block
    out, lse = cpu_fused.attention(q, k, v)
    assert _ptr(out) == first                      # placed in the NaN block
    ref_out, ref_lse = naive_attention(q, k, v)
    assert np.isfinite(out).all()
    assert np.abs(out - ref_out).max() <= 2e-5
    assert np.abs(lse - ref_lse).max() <= 2e-5


@pytest.mark.parametrize("value, word", [(None, "on"), ("0", "off"), ("1", "on")])
def test_info_says_whether_outs_are_reused(monkeypatch, value, word):
    from click.testing import CliRunner

    from hpcattn.cli.info import info

    if value is not None:
        monkeypatch.setenv(out_pool.ENV, value)
    res = CliRunner().invoke(info, [])
    assert res.exit_code == 0, res.output
    line = next(x for x in res.output.splitlines() if "HPCATTN_REUSE_OUT" in x)
    assert line.rstrip().endswith(f": {word} (HPCATTN_REUSE_OUT=1|0)"), line
