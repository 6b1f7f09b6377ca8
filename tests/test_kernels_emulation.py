"""The CUDA attention kernels, run unmodified on the CPU (hpcattn.emulation), match the float64
reference: float32 within 1e-5; float16/bfloat16 within twice the error of a NumPy reference
computed in that precision. Small shapes only: every CUDA thread is a fiber."""
import numpy as np
import pytest

from hpcattn.emulation import attention_emulated
from hpcattn.errors import HpcattnError
from hpcattn.gpu import kernels
from hpcattn.gpu.accuracy import judge

from kernel_dtypes import np_dtype

pytestmark = pytest.mark.timeout(120)

LOW = ("float16", "bfloat16")
# (batch, n_q, n_k, heads, kv_heads, head_dim, causal): ragged tiles, GQA/MQA, both head dims
SHAPES = [
    (1, 70, 90, 2, 1, 64, False),
    (2, 33, 130, 4, 2, 64, True),
    (1, 64, 64, 2, 2, 128, True),
    (1, 100, 45, 3, 1, 128, False),
    (1, 1, 7, 1, 1, 64, True),
]


def make_inputs(rng, b, nq, nk, h, hkv, d, dtype):
    q = rng.standard_normal((b, nq, h, d), dtype=np.float32)
    k = rng.standard_normal((b, nk, hkv, d), dtype=np.float32)
    v = rng.standard_normal((b, nk, hkv, d), dtype=np.float32)
    return [x.astype(dtype) for x in (q, k, v)]


def positions(rng, nq, nk, causal):
    """Shuffled-chunk positions (like a zig-zag shard), so tiles are not simply sorted."""
    if not causal:
        return None, None
    k_pos = np.concatenate([np.arange(nk // 2, nk), np.arange(nk // 2)]).astype(np.int64)
    q_pos = np.sort(rng.choice(nk + 8, size=nq, replace=nq > nk + 8)).astype(np.int64)
    return q_pos, k_pos


KERNEL_CASES = [("float32", "simt"), *((dt, var) for var in kernels.VARIANTS for dt in LOW)]


@pytest.mark.parametrize("dtype, variant", KERNEL_CASES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "b{}q{}k{}h{}kv{}d{}{}".format(*s[:6], "c" * s[6]))
def test_emulated_kernel_matches_float64_reference(shape, dtype, variant):
    b, nq, nk, h, hkv, d, causal = shape
    rng = np.random.default_rng(hash(shape) % 2**32)
    dt = np_dtype(dtype)
    q, k, v = make_inputs(rng, b, nq, nk, h, hkv, d, dt)
    q_pos, k_pos = positions(rng, nq, nk, causal)
    out, lse = attention_emulated(q, k, v, causal=causal, q_pos=q_pos, k_pos=k_pos, variant=variant)
    assert out.dtype == dt and lse.dtype == np.float32
    verdict = judge(q, k, v, out, lse, causal=causal, q_pos=q_pos, k_pos=k_pos)
    print(f"{shape} {dtype} {variant}: {verdict}")
    assert verdict.ok, verdict


@pytest.mark.parametrize("dtype, variant", KERNEL_CASES)
def test_rows_that_see_no_key_get_zero_and_minus_inf(dtype, variant):
    rng = np.random.default_rng(1)
    q, k, v = make_inputs(rng, 1, 20, 30, 2, 1, 64, np_dtype(dtype))
    q_pos = np.arange(20, dtype=np.int64)          # rows 0..9 come before every key
    k_pos = np.arange(10, 40, dtype=np.int64)
    out, lse = attention_emulated(q, k, v, causal=True, q_pos=q_pos, k_pos=k_pos, variant=variant)
    assert np.all(out[:, :10].astype(np.float32) == 0) and np.all(np.isneginf(lse[:, :, :10]))
    verdict = judge(q, k, v, out, lse, causal=True, q_pos=q_pos, k_pos=k_pos)
    assert verdict.ok, verdict


@pytest.mark.parametrize("dtype, variant", KERNEL_CASES)
def test_tiles_in_the_future_are_skipped_not_masked(dtype, variant):
    """K/V rows of a tile fully in every query's future hold NaN: a masked (not skipped) tile
    would still multiply them by p = 0 and poison the output."""
    bk = kernels.MMA_BLOCK_K if variant == "mma" else kernels.BLOCK_K[64]
    rng = np.random.default_rng(2)
    q, k, v = make_inputs(rng, 1, 50, 2 * bk, 2, 1, 64, np_dtype(dtype))
    q_pos = np.arange(50, dtype=np.int64)
    k_pos = np.concatenate([np.arange(bk), np.arange(1000, 1000 + bk)]).astype(np.int64)
    k[:, bk:] = np.nan
    v[:, bk:] = np.nan
    out, lse = attention_emulated(q, k, v, causal=True, q_pos=q_pos, k_pos=k_pos, variant=variant)
    assert np.isfinite(out.astype(np.float32)).all()
    verdict = judge(q, k[:, :bk], v[:, :bk], out, lse, causal=True, q_pos=q_pos, k_pos=k_pos[:bk])
    assert verdict.ok, verdict


@pytest.mark.parametrize("dtype, variant", KERNEL_CASES)
def test_no_keys_gives_zero_and_minus_inf(dtype, variant):
    q = np.ones((1, 5, 1, 64), np_dtype(dtype))
    kv = np.ones((1, 0, 1, 64), np_dtype(dtype))
    out, lse = attention_emulated(q, kv, kv, causal=True, variant=variant)
    assert np.all(out.astype(np.float32) == 0) and np.all(np.isneginf(lse))


def test_tensor_core_variant_needs_16_bit_inputs():
    x = np.ones((1, 4, 1, 64), np.float32)
    with pytest.raises(HpcattnError, match="kernel variant 'mma' for float32"):
        attention_emulated(x, x, x, variant="mma")


def test_unsupported_head_dim_and_dtype_are_rejected():
    x = np.ones((1, 4, 1, 96), np.float32)
    with pytest.raises(HpcattnError, match="head_dim 96 .* expected one of 64, 128"):
        attention_emulated(x, x, x)
    y = np.ones((1, 4, 1, 64), np.float64)
    with pytest.raises(HpcattnError, match="dtype float64 .* expected one of"):
        attention_emulated(y, y, y)
