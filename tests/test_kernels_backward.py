"""The CUDA backward kernels (kernels/attention_bwd.cu): run unmodified on the CPU
(hpcattn.emulation.backward) they match the float64 reference — scaled error
max|g - ref| / max(1, max|ref|) of dq, dk, dv within 1e-5 for float32 and within twice that of a
NumPy backward computed in the same precision for float16/bfloat16 (hpcattn.gpu.backward_accuracy)
— and every entry point compiles as CuPy compiles it (NVRTC) for sm_80/89/90 without spills or
stack. Small shapes only: every CUDA thread is a fiber."""
import numpy as np
import pytest

from hpcattn.emulation.backward import attention_backward_emulated
from hpcattn.errors import HpcattnError
from hpcattn.gpu import backward, kernels
from hpcattn.gpu.backward_accuracy import judge_backward, lowprec_attention_backward, scaled_error
from hpcattn.reference import naive_attention, naive_attention_backward

from kernel_dtypes import np_dtype

pytestmark = pytest.mark.timeout(180)

DTYPES = tuple(kernels.DTYPES)
#: (dtype, kernel variant): SIMT for every dtype, tensor cores for fp16/bf16
KERNEL_CASES = [*((dt, "simt") for dt in DTYPES), *((dt, "mma") for dt in kernels.MMA_DTYPES)]
# (batch, n_q, n_k, heads, kv_heads, head_dim, causal): ragged tiles, GQA 4/2, MQA 4/1,
# n_q != n_k both ways, single rows and keys, both head dims
SHAPES = [
    (1, 37, 130, 4, 2, 64, True),
    (1, 130, 37, 4, 1, 64, False),
    (2, 70, 70, 2, 2, 64, True),
    (2, 1, 7, 1, 1, 64, True),
    (1, 70, 45, 2, 2, 128, True),
    (1, 37, 130, 4, 1, 128, False),
    (1, 130, 100, 4, 2, 128, True),
    (1, 1, 1, 2, 1, 128, False),
]


def zigzag(n):
    """Positions of a zig-zag shard: the second half of 0..n-1 first (tiles are not sorted)."""
    return np.concatenate([np.arange(n // 2, n), np.arange(n // 2)]).astype(np.int64)


def positions(rng, nq, nk, causal):
    if not causal:
        return None, None
    if nq == nk:
        return zigzag(nq), zigzag(nk)
    return np.sort(rng.choice(nk + 8, size=nq, replace=nq > nk + 8)).astype(np.int64), zigzag(nk)


def inputs(rng, b, nq, nk, h, hkv, d, dtype):
    """q, k, v and a random output gradient in ``dtype``."""
    dt = np_dtype(dtype)
    return [rng.standard_normal(s, dtype=np.float32).astype(dt)
            for s in ((b, nq, h, d), (b, nk, hkv, d), (b, nk, hkv, d), (b, nq, h, d))]


def problem(rng, b, nq, nk, h, hkv, d, dtype, causal=False, q_pos=None, k_pos=None, scale=None):
    """The backward's operands: inputs, the forward's out (rounded to dtype) and lse (float32)
    from the float64 reference, the output gradient."""
    q, k, v, dout = inputs(rng, b, nq, nk, h, hkv, d, dtype)
    out, lse = naive_attention(q, k, v, causal=causal, scale=scale, q_pos=q_pos, k_pos=k_pos)
    return q, k, v, out.astype(q.dtype), lse.astype(np.float32), dout


def shape_id(s):
    return "b{}q{}k{}h{}kv{}d{}{}".format(*s[:6], "c" * s[6])


@pytest.mark.parametrize("dtype, variant", KERNEL_CASES)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_emulated_backward_matches_float64_reference(shape, dtype, variant):
    b, nq, nk, h, hkv, d, causal = shape
    rng = np.random.default_rng(hash(shape) % 2**32)
    q_pos, k_pos = positions(rng, nq, nk, causal)
    args = problem(rng, b, nq, nk, h, hkv, d, dtype, causal, q_pos, k_pos)
    grads = attention_backward_emulated(*args, causal=causal, q_pos=q_pos, k_pos=k_pos, variant=variant)
    assert [g.dtype for g in grads] == [np_dtype(dtype)] * 3
    assert grads[1].shape == grads[2].shape == (b, nk, hkv, d)
    verdict = judge_backward(*args, grads, causal=causal, q_pos=q_pos, k_pos=k_pos)
    print(f"{shape} {dtype} {variant}: {verdict}")
    assert verdict.ok, verdict


@pytest.mark.parametrize("dtype, variant", KERNEL_CASES)
def test_backward_of_the_forward_kernels_own_out_and_lse(dtype, variant):
    """What training does: the forward kernel's out and lse (float32, natural log) feed the
    backward kernels directly."""
    from hpcattn.emulation import attention_emulated

    rng = np.random.default_rng(10)
    q_pos, k_pos = zigzag(100), zigzag(100)
    q, k, v, dout = inputs(rng, 1, 100, 100, 4, 2, 64, dtype)
    out, lse = attention_emulated(q, k, v, causal=True, q_pos=q_pos, k_pos=k_pos, variant=variant)
    grads = attention_backward_emulated(q, k, v, out, lse, dout, causal=True, q_pos=q_pos, k_pos=k_pos,
                                        variant=variant)
    verdict = judge_backward(q, k, v, out, lse, dout, grads, causal=True, q_pos=q_pos, k_pos=k_pos)
    print(verdict)
    assert verdict.ok, verdict


@pytest.mark.parametrize("dtype, variant", KERNEL_CASES)
def test_float32_gradients_and_a_scale_that_is_not_the_default(dtype, variant):
    """grad_dtype="float32" hands back the kernels' accumulators (what a ring sums over steps);
    the default is exactly them rounded to the input dtype."""
    rng = np.random.default_rng(5)
    q_pos, k_pos = zigzag(90), zigzag(90)
    kw = dict(causal=True, scale=0.3, q_pos=q_pos, k_pos=k_pos)
    q, k, v, out, lse, dout = problem(rng, 1, 90, 90, 4, 2, 64, dtype, **kw)
    wide = attention_backward_emulated(q, k, v, out, lse, dout, grad_dtype="float32", variant=variant, **kw)
    assert all(g.dtype == np.float32 for g in wide)
    rounded = attention_backward_emulated(q, k, v, out, lse, dout, variant=variant, **kw)
    assert all(np.array_equal(r, w.astype(q.dtype)) for r, w in zip(rounded, wide))
    for grads in (rounded, wide):
        verdict = judge_backward(q, k, v, out, lse, dout, grads, **kw)
        assert verdict.ok, verdict


@pytest.mark.parametrize("dtype, variant", KERNEL_CASES)
def test_rows_that_see_no_key_get_zero_gradient(dtype, variant):
    rng = np.random.default_rng(1)
    q_pos = np.arange(20, dtype=np.int64)           # rows 0..9 come before every key
    k_pos = np.arange(10, 40, dtype=np.int64)
    args = problem(rng, 1, 20, 30, 2, 1, 64, dtype, True, q_pos, k_pos)
    assert np.all(np.isneginf(args[4][:, :, :10]))
    grads = attention_backward_emulated(*args, causal=True, q_pos=q_pos, k_pos=k_pos, variant=variant)
    assert np.all(grads[0][:, :10].astype(np.float32) == 0)
    verdict = judge_backward(*args, grads, causal=True, q_pos=q_pos, k_pos=k_pos)
    assert verdict.ok, verdict


@pytest.mark.parametrize("dtype, variant", KERNEL_CASES)
def test_tiles_in_the_future_are_skipped_not_masked(dtype, variant):
    """K/V rows of a key tile in every query's future hold NaN (a masked tile would still form
    dP = dO V^T from them and poison dQ); their dK/dV are exactly 0 (no query reaches them)."""
    bk = max(backward.TILES["dkdv", variant][64][0], backward.TILES["dq", variant][64][1])  # a whole tile of both
    rng = np.random.default_rng(2)
    q_pos = np.arange(50, dtype=np.int64)
    k_pos = np.concatenate([np.arange(bk), np.arange(1000, 1000 + bk)]).astype(np.int64)
    q, k, v, dout = inputs(rng, 1, 50, 2 * bk, 2, 1, 64, dtype)
    out, lse = naive_attention(q, k[:, :bk], v[:, :bk], causal=True, q_pos=q_pos, k_pos=k_pos[:bk])
    out = out.astype(q.dtype)
    k[:, bk:] = np.nan
    v[:, bk:] = np.nan
    dq, dk, dv = attention_backward_emulated(q, k, v, out, lse, dout, causal=True, q_pos=q_pos, k_pos=k_pos,
                                             variant=variant)
    assert np.all(dk[:, bk:].astype(np.float32) == 0) and np.all(dv[:, bk:].astype(np.float32) == 0)
    verdict = judge_backward(q, k[:, :bk], v[:, :bk], out, lse, dout, (dq, dk[:, :bk], dv[:, :bk]),
                             causal=True, q_pos=q_pos, k_pos=k_pos[:bk])
    assert verdict.ok, verdict


@pytest.mark.parametrize("dtype, variant", [("float32", "simt"), ("float16", "mma")])
@pytest.mark.parametrize("head_dim", kernels.HEAD_DIMS)
def test_a_tile_starting_at_the_last_querys_position_is_not_skipped(head_dim, dtype, variant):
    """Key positions 31, 32, ...: the first key of some key tile sits at exactly the last
    position of a query tile (q_max == k_min, visible), for the tile sizes of both kernels."""
    rng = np.random.default_rng(6)
    q_pos, k_pos = np.arange(96, dtype=np.int64), np.arange(96, dtype=np.int64) + 31
    args = problem(rng, 1, 96, 96, 2, 1, head_dim, dtype, True, q_pos, k_pos)
    grads = attention_backward_emulated(*args, causal=True, q_pos=q_pos, k_pos=k_pos, variant=variant)
    verdict = judge_backward(*args, grads, causal=True, q_pos=q_pos, k_pos=k_pos)
    assert verdict.ok, verdict


@pytest.mark.parametrize("dtype, variant", KERNEL_CASES)
def test_padding_keys_of_a_ragged_tile_are_masked_even_when_every_score_is_very_negative(dtype, variant):
    """lse around -570: an unmasked padding key (score 0) would get P = exp(570) = inf, and
    inf * K = inf * 0 = NaN in dQ. (Scores this large cost any float32 exp about 5 digits, so
    beyond finiteness the bound here is the usual one or a loose 1e-2, whichever is larger.)"""
    rng = np.random.default_rng(8)
    q, k, v, dout = inputs(rng, 1, 40, 45, 2, 1, 64, dtype)
    q = (-3 + 0.1 * q.astype(np.float32)).astype(q.dtype)
    k = (3 + 0.1 * k.astype(np.float32)).astype(k.dtype)
    out, lse = naive_attention(q, k, v, scale=1.0)
    assert lse.max() < -300
    args = (q, k, v, out.astype(q.dtype), lse.astype(np.float32), dout)
    grads = attention_backward_emulated(*args, scale=1.0, variant=variant)
    verdict = judge_backward(*args, grads, scale=1.0)
    print(verdict)
    assert not verdict.detail, verdict  # finite
    assert all(verdict.errors[n] <= max(1e-2, verdict.budgets[n]) for n in verdict.errors), verdict


@pytest.mark.parametrize("dtype, variant", KERNEL_CASES)
@pytest.mark.parametrize("n_q, n_k", [(5, 0), (0, 5)])
def test_no_keys_or_no_queries_give_zero_gradients(n_q, n_k, dtype, variant):
    rng = np.random.default_rng(3)
    q, k, v, dout = inputs(rng, 1, n_q, n_k, 2, 1, 64, dtype)
    out, lse = np.zeros_like(q), np.full((1, 2, n_q), -np.inf, np.float32)
    dq, dk, dv = attention_backward_emulated(q, k, v, out, lse, dout, causal=True, variant=variant)
    assert dq.shape == q.shape and dk.shape == dv.shape == k.shape
    assert not any(g.astype(np.float32).any() for g in (dq, dk, dv))


def test_lowprec_reference_is_the_float64_one_for_float32_inputs():
    """The budget's reference computes the same gradients (only rounded): a wrong budget would
    let a wrong kernel pass."""
    rng = np.random.default_rng(4)
    q_pos, k_pos = zigzag(40), zigzag(40)
    args = problem(rng, 1, 40, 40, 4, 2, 64, "float32", True, q_pos, k_pos)
    low = lowprec_attention_backward(*args, causal=True, q_pos=q_pos, k_pos=k_pos)
    ref = naive_attention_backward(args[0], args[1], args[2], args[5], causal=True, q_pos=q_pos, k_pos=k_pos)
    assert all(scaled_error(g, r) < 1e-5 for g, r in zip(low, ref))


@pytest.mark.parametrize("dtype, variant", [("float32", "simt"), ("bfloat16", "mma")])
def test_every_split_of_a_gqa_group_gives_the_same_gradients(dtype, variant):
    """The dK/dV kernel may split a group's 6 query heads over 1, 2, 3 or 6 blocks per kv head
    (float32 slabs added in order): the same gradients up to float32 summation order."""
    rng = np.random.default_rng(9)
    q_pos, k_pos = zigzag(70), zigzag(70)
    args = problem(rng, 1, 70, 70, 6, 1, 64, dtype, True, q_pos, k_pos)
    kw = dict(causal=True, q_pos=q_pos, k_pos=k_pos, variant=variant, grad_dtype="float32")
    whole = attention_backward_emulated(*args, splits=1, **kw)
    for splits in (2, 3, 6):
        split = attention_backward_emulated(*args, splits=splits, **kw)
        assert np.array_equal(split[0], whole[0])  # dq does not depend on the split
        for g, w in zip(split[1:], whole[1:]):
            assert np.abs(g - w).max() <= 1e-6 * np.abs(w).max()
    verdict = judge_backward(*args, whole, causal=True, q_pos=q_pos, k_pos=k_pos)
    assert verdict.ok, verdict
    with pytest.raises(HpcattnError, match="splits 7; expected 1 to 6"):
        attention_backward_emulated(*args, splits=7, **kw)


def test_tensor_core_variant_needs_16_bit_inputs():
    x = np.zeros((1, 4, 1, 64), np.float32)
    with pytest.raises(HpcattnError, match="kernel variant 'mma' for float32"):
        attention_backward_emulated(x, x, x, x, np.zeros((1, 1, 4), np.float32), x, variant="mma")


@pytest.mark.parametrize("change, message", [
    (dict(lse=np.zeros((1, 2, 7), np.float32)), r"lse \(1, 2, 7\); expected \(batch, heads, n_q\)"),
    (dict(dout=np.zeros((1, 8, 2, 64), np.float32)), r"dout \(1, 8, 2, 64\) float32; expected q's shape"),
    (dict(out=np.zeros((1, 9, 2, 64), np.float16)), r"out \(1, 9, 2, 64\) float16; expected q's shape .* float32"),
    (dict(v=np.zeros((1, 5, 1, 64), np.float32)), r"do not match q"),
    (dict(q=np.zeros((1, 9, 2, 96), np.float32)), r"head_dim 96 .* expected one of 64, 128"),
])
def test_bad_operands_are_rejected_with_one_line(change, message):
    x = np.zeros((1, 9, 2, 64), np.float32)
    kv = np.zeros((1, 6, 1, 64), np.float32)
    args = dict(q=x, k=kv, v=kv, out=x, lse=np.zeros((1, 2, 9), np.float32), dout=x)
    args.update(change)
    with pytest.raises(HpcattnError, match=message):
        attention_backward_emulated(**args)


# ---- NVRTC: compiled exactly as CuPy compiles them, for every architecture we support ----

STATIC_SMEM_LIMIT = 48 * 1024
MAX_REGISTERS_PER_SM = 65536
_reports = {}


@pytest.fixture(scope="module")
def nvrtc():
    pytest.importorskip("cupy", reason="CuPy not installed (pip install '.[nvrtc]' for the NVRTC tests)")
    from hpcattn.gpu import nvrtc

    try:
        nvrtc.nvrtc_version()
    except Exception as exc:  # CuPy without a loadable libnvrtc
        pytest.skip(f"NVRTC not loadable ({exc}); pip install '.[nvrtc]'")
    return nvrtc


def report(nvrtc, arch):
    if arch not in _reports:
        _, log = nvrtc.compile_for_arch(arch, source=backward.kernel_source(), extra=backward.compile_defines())
        _reports[arch] = nvrtc.parse_ptxas(log)
    return _reports[arch]


@pytest.mark.parametrize("arch", ("80", "89", "90"))
def test_every_backward_entry_point_compiles_without_spills_within_limits(nvrtc, arch):
    rep = report(nvrtc, arch)
    assert set(rep) == set(backward.KERNELS), "ptxas reported other entry points than backward.KERNELS"
    for name, res in sorted(rep.items()):
        stage, head_dim = name.split("_")[2], int(name.rsplit("_d", 1)[1])
        dynamic = backward.smem_bytes(stage, head_dim, "mma" if "_mma_" in name else "simt")
        print(f"sm_{arch} {name}: {res.registers} registers, {res.static_smem + dynamic} B shared")
        assert res.spill_stores == 0 and res.spill_loads == 0, f"{name} sm_{arch} spills: {res}"
        assert res.stack_bytes == 0, f"{name} sm_{arch} uses a stack frame (local memory): {res}"
        assert res.registers * backward.THREADS <= MAX_REGISTERS_PER_SM, f"{name} cannot launch: {res}"
        assert res.static_smem <= STATIC_SMEM_LIMIT
        assert res.static_smem + dynamic <= kernels.MAX_DYNAMIC_SMEM[arch], \
            f"{name} needs {res.static_smem + dynamic} B shared memory; sm_{arch} allows {kernels.MAX_DYNAMIC_SMEM[arch]}"


def test_backward_source_without_configuration_refuses_to_compile(nvrtc):
    from cupy.cuda.compiler import CompileException

    with pytest.raises(CompileException) as err:
        nvrtc.compile_for_arch("80", source="#undef HPCATTN_BWD_THREADS\n" + backward.kernel_source(),
                               extra=backward.compile_defines())
    assert "hpcattn.gpu.backward.compile_options" in str(err.value)
