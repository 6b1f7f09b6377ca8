"""The CPU kernels (hpcattn.cpu_kernels, cpu_pool, cpu_short): torch's flash kernel and the NumPy
kernels on worker threads give the float64 reference's results; the choice is recorded and
overridable; half types are refused with the reason where the CPU lacks the instructions."""
import numpy as np
import pytest

import hpcattn
from hpcattn import _threads, cpu_kernels, cpu_pool, cpu_short, machine
from hpcattn.errors import HpcattnError
from hpcattn.reference import naive_attention, naive_attention_backward

TOL = {np.float32: 2e-5, np.float64: 1e-12}
needs_torch = pytest.mark.skipif(cpu_kernels.torch_reason() is not None, reason="torch not installed")


def _qkv(seed, b, nq, nk, h, hkv, d, dtype):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((b, nq, h, d)).astype(dtype),
            rng.standard_normal((b, nk, hkv, d)).astype(dtype),
            rng.standard_normal((b, nk, hkv, d)).astype(dtype))


def _close(got, want, dtype):
    assert np.abs(np.asarray(got, np.float64) - want).max() <= TOL[dtype]


SHAPES = [(2, 70, 70, 4, 4, 32), (1, 100, 130, 6, 2, 16), (2, 130, 90, 4, 1, 24)]


@needs_torch
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
def test_torch_kernel_matches_reference(monkeypatch, dtype, causal, shape):
    monkeypatch.setenv(cpu_kernels.KERNEL_ENV, "torch")
    q, k, v = _qkv(0, *shape, dtype)
    out, lse = hpcattn.attention(q, k, v, causal=causal)
    assert cpu_kernels.LAST["forward"] == cpu_kernels.TORCH_KERNEL
    assert out.dtype == dtype and lse.dtype == dtype and lse.shape == (shape[0], shape[3], shape[1])
    ref_out, ref_lse = naive_attention(q, k, v, causal=causal)
    _close(out, ref_out, dtype)
    _close(lse, ref_lse, dtype)
    rng = np.random.default_rng(1)
    dout = rng.standard_normal(q.shape).astype(dtype)
    grads = hpcattn.attention_backward(q, k, v, out, lse, dout, causal=causal)
    assert cpu_kernels.LAST["backward"] == cpu_kernels.TORCH_KERNEL
    for got, want in zip(grads, naive_attention_backward(q, k, v, dout, causal=causal)):
        assert got.shape == want.shape and got.dtype == dtype
        _close(got, want, dtype)


@needs_torch
def test_torch_is_not_used_where_it_cannot_express_the_mask(monkeypatch):
    """Shifted positions (a ring block straddling the diagonal) and tile sizes go to NumPy; the
    rows that see no key get out 0 and lse -inf."""
    monkeypatch.setenv(cpu_kernels.KERNEL_ENV, "torch")
    q, k, v = _qkv(2, 1, 40, 40, 2, 2, 16, np.float64)
    q_pos, k_pos = np.arange(40), np.arange(40) + 10
    out, lse = hpcattn.attention(q, k, v, causal=True, q_pos=q_pos, k_pos=k_pos)
    assert cpu_kernels.LAST["forward"] == cpu_kernels.NUMPY_KERNEL
    ref_out, ref_lse = naive_attention(q, k, v, causal=True, q_pos=q_pos, k_pos=k_pos)
    assert np.isneginf(lse[:, :, :10]).all() and (out[:, :10] == 0).all()
    _close(out, ref_out, np.float64)
    assert np.array_equal(np.isneginf(lse), np.isneginf(ref_lse))
    hpcattn.attention(q, k, v, causal=True, block_q=16)
    assert cpu_kernels.LAST["forward"] == cpu_kernels.NUMPY_KERNEL
    hpcattn.attention(q, k, v, causal=True)
    assert cpu_kernels.LAST["forward"] == cpu_kernels.TORCH_KERNEL


def test_auto_and_numpy_choices(monkeypatch):
    q, k, v = _qkv(3, 1, 32, 32, 2, 2, 16, np.float32)
    monkeypatch.setenv(cpu_kernels.KERNEL_ENV, "numpy")
    hpcattn.attention(q, k, v)
    assert cpu_kernels.LAST["forward"] == cpu_kernels.NUMPY_KERNEL
    monkeypatch.delenv(cpu_kernels.KERNEL_ENV)
    hpcattn.attention(q, k, v)   # float32 never goes to torch under auto (accuracy rule, see AUTO_TORCH_DTYPES)
    want = cpu_kernels.FUSED_KERNEL if cpu_kernels.fused_reason() is None else cpu_kernels.NUMPY_KERNEL
    assert cpu_kernels.LAST["forward"] == want
    hpcattn.attention(*(x.astype(np.float64) for x in (q, k, v)))   # nor float64 (see AUTO_TORCH_DTYPES)
    assert cpu_kernels.LAST["forward"] == cpu_kernels.NUMPY_KERNEL
    assert cpu_kernels.describe()["requested"] == "auto"


def test_bad_kernel_value_is_one_line_error(monkeypatch):
    monkeypatch.setenv(cpu_kernels.KERNEL_ENV, "fast")
    q, k, v = _qkv(4, 1, 8, 8, 1, 1, 8, np.float32)
    with pytest.raises(HpcattnError, match=r"HPCATTN_CPU_KERNEL='fast' is unknown; expected one of "
                                           r"auto, numpy, torch, fused$"):
        hpcattn.attention(q, k, v)


def test_torch_requested_but_missing_is_an_error(monkeypatch):
    monkeypatch.setenv(cpu_kernels.KERNEL_ENV, "torch")
    monkeypatch.setattr(cpu_kernels, "_torch", False)
    monkeypatch.setattr(cpu_kernels.torch_reason, "why", "PyTorch's CPU flash kernel is unavailable (x)")
    q, k, v = _qkv(4, 1, 8, 8, 1, 1, 8, np.float32)
    with pytest.raises(HpcattnError, match="HPCATTN_CPU_KERNEL=torch but PyTorch"):
        hpcattn.attention(q, k, v)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", SHAPES + [(1, 1100, 1100, 2, 1, 8)])
def test_worker_threads_give_the_one_thread_result(monkeypatch, causal, shape):
    monkeypatch.setenv(cpu_kernels.KERNEL_ENV, "numpy")
    q, k, v = _qkv(5, *shape, np.float64)
    one = cpu_kernels.attention(q, k, v, causal=causal, workers=1)
    four = cpu_kernels.attention(q, k, v, causal=causal, workers=4)
    for a, b in zip(one, four):
        assert np.array_equal(a, b)
    _close(four[0], naive_attention(q, k, v, causal=causal)[0], np.float64)
    dout = np.random.default_rng(6).standard_normal(q.shape)
    g1 = cpu_kernels.attention_backward(q, k, v, *one, dout, causal=causal, workers=1)
    g4 = cpu_kernels.attention_backward(q, k, v, *one, dout, causal=causal, workers=4)
    for a, b, want in zip(g1, g4, naive_attention_backward(q, k, v, dout, causal=causal)):
        assert np.array_equal(a, b)
        _close(b, want, np.float64)


def test_worker_threads_with_positions(monkeypatch):
    monkeypatch.setenv(cpu_kernels.KERNEL_ENV, "numpy")
    q, k, v = _qkv(7, 1, 1100, 300, 2, 2, 8, np.float64)
    q_pos, k_pos = np.arange(1100) * 2, np.arange(300) * 3
    out, lse = cpu_kernels.attention(q, k, v, causal=True, q_pos=q_pos, k_pos=k_pos, workers=3)
    ref = naive_attention(q, k, v, causal=True, q_pos=q_pos, k_pos=k_pos)
    _close(out, ref[0], np.float64)
    assert np.array_equal(np.isneginf(lse), np.isneginf(ref[1]))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("workers", [1, 3])
def test_short_keys_kernel(monkeypatch, dtype, causal, workers):
    """Many queries against a few keys (decode-like) take cpu_short; same results."""
    monkeypatch.setenv(cpu_kernels.KERNEL_ENV, "numpy")
    q, k, v = _qkv(8, 2, 700, 16, 4, 2, 32, dtype)
    assert cpu_short.applies(700, 16)
    out, lse = cpu_kernels.attention(q, k, v, causal=causal, workers=workers)
    ref = naive_attention(q, k, v, causal=causal)
    _close(out, ref[0], dtype)
    _close(lse, ref[1], dtype)


def test_wide_key_tile_for_few_queries(monkeypatch):
    assert cpu_pool.wide_key_tile(16) == 512 * 512 // 16
    assert cpu_pool.wide_key_tile(4096) is None
    monkeypatch.setenv(cpu_kernels.KERNEL_ENV, "numpy")
    q, k, v = _qkv(9, 1, 8, 3000, 2, 2, 16, np.float32)
    out, lse = cpu_kernels.attention(q, k, v, workers=2)
    ref = naive_attention(q, k, v)
    _close(out, ref[0], np.float32)
    _close(lse, ref[1], np.float32)


def test_flashattention_accuracy_rule_on_the_default_kernel():
    """FlashAttention's rule: float32 error <= 2x that of a float32 reference (their failing case:
    b=4, sq=113, sk=211, 6 heads, d=96, causal), on the kernel auto chooses for float32."""
    for seed in range(3):
        q, k, v = _qkv(seed, 4, 113, 211, 6, 6, 96, np.float32)
        exact = naive_attention(q, k, v, causal=True)[0]
        same = naive_attention(q, k, v, causal=True, dtype=np.float32)[0]
        got = hpcattn.attention(q, k, v, causal=True)[0]
        assert np.abs(got - exact).max() <= 2 * np.abs(same - exact).max()


def test_kernel_workers_setting(monkeypatch):
    monkeypatch.setenv(_threads.KERNEL_THREADS_VAR, "3")
    assert _threads.kernel_workers() == 3
    monkeypatch.setenv(_threads.KERNEL_THREADS_VAR, "many")
    with pytest.raises(ValueError, match="HPCATTN_KERNEL_THREADS='many' is not a positive integer"):
        _threads.kernel_workers()
    monkeypatch.delenv(_threads.KERNEL_THREADS_VAR)
    for var in ("HPCATTN_NUM_THREADS", *_threads.THREAD_VARS):
        monkeypatch.delenv(var, raising=False)
    assert _threads.kernel_workers() == 1           # BLAS decides its threads: no workers on top
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "1")
    monkeypatch.setattr(_threads, "local_ranks", lambda: None)
    assert _threads.kernel_workers() == _threads.cores_available()


def test_half_types_refused_without_the_instructions(monkeypatch):
    monkeypatch.setattr(machine, "cpu_flags", lambda: frozenset({"avx2"}))
    assert "float16 on CPU needs" in machine.cpu_half_reason("float16", frozenset())
    assert machine.cpu_half_reason("bfloat16", frozenset({"avx512_bf16"})) is None
    q, k, v = (x.astype(np.float16) for x in _qkv(10, 1, 16, 16, 2, 2, 16, np.float32))
    with pytest.raises(HpcattnError, match=r"^q has dtype float16; expected one of float32, float64 "
                                           r"\(float16 on CPU needs "):
        hpcattn.attention(q, k, v)
    ml_dtypes = pytest.importorskip("ml_dtypes", reason="bfloat16 arrays need ml_dtypes (pip install '.[nvrtc]')")
    q, k, v = (x.astype(ml_dtypes.bfloat16) for x in (q, k, v))
    with pytest.raises(HpcattnError, match=r"^q has dtype bfloat16; expected one of float32, float64 "
                                           r"\(bfloat16 on CPU needs "
                                           r"AMX_BF16 or AVX512_BF16 and this CPU \(.*\) has neither\)$"):
        hpcattn.attention(q, k, v)


def test_bfloat16_without_ml_dtypes_is_a_reason_not_a_crash(monkeypatch):
    """On a CPU with the instructions but without ml_dtypes (NumPy's bfloat16 type), the reason
    names the package (``hpcattn info``, the bench's bf16 line), and asking for the type is a
    one-line error, not a ModuleNotFoundError."""
    import importlib.util
    import sys

    from hpcattn.devices import np_dtype

    monkeypatch.setattr(cpu_kernels, "cpu_half_reason", lambda dtype: None)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ml_dtypes" else real(name, *a))
    monkeypatch.delenv(cpu_kernels.KERNEL_ENV, raising=False)
    why = cpu_kernels.half_reason("bfloat16")
    assert why.startswith("bfloat16 on CPU needs NumPy's bfloat16 type from the ml_dtypes package")
    assert "pip install ml_dtypes" in why
    monkeypatch.setitem(sys.modules, "ml_dtypes", None)   # import ml_dtypes -> ImportError
    with pytest.raises(HpcattnError, match=r"^bfloat16 arrays need the ml_dtypes package .*pip install ml_dtypes$"):
        np_dtype("bfloat16")


@needs_torch
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_types_on_the_torch_kernel(monkeypatch, dtype):
    """Where the CPU has the instructions (faked here: torch emulates them on this CPU), half
    inputs run on torch-flash: output in the input type, lse float32, errors of the type."""
    from hpcattn.devices import TOLERANCES, np_dtype

    if dtype == "bfloat16":
        pytest.importorskip("ml_dtypes", reason="bfloat16 arrays need ml_dtypes (pip install '.[nvrtc]')")
    monkeypatch.setattr(machine, "cpu_flags", lambda: frozenset(machine.HALF_FLAGS[dtype]))
    q, k, v = _qkv(11, 1, 40, 50, 4, 2, 16, np.float32)
    qh, kh, vh = (x.astype(np_dtype(dtype)) for x in (q, k, v))
    out, lse = hpcattn.attention(qh, kh, vh, causal=True)
    assert cpu_kernels.LAST["forward"] == cpu_kernels.TORCH_KERNEL
    assert str(out.dtype) == dtype and lse.dtype == np.float32
    ref_out, ref_lse = naive_attention(qh.astype(np.float64), kh.astype(np.float64),
                                       vh.astype(np.float64), causal=True)
    assert np.abs(out.astype(np.float64) - ref_out).max() <= TOLERANCES[dtype]
    assert np.abs(lse - ref_lse).max() <= TOLERANCES[dtype]


def test_info_reports_the_cpu_kernel():
    desc = machine.describe()
    assert set(desc["cpu_kernel"]) >= {"requested", "torch", "bfloat16", "float16"}
    assert set(cpu_kernels.describe()) >= {"requested", "torch_dtypes", "torch", "workers"}


@pytest.mark.parametrize("mask", [dict(window=(20, 0), causal=True), dict(cu_seqlens=[0, 300, 700, 1100]),
                                  dict(causal=True, align="bottom-right")])
def test_masks_stay_on_numpy_and_split_over_workers(monkeypatch, mask):
    """Windows, packed sequences and bottom-right causal: NumPy (torch cannot express them), and
    on worker threads the one-thread result."""
    monkeypatch.setenv(cpu_kernels.KERNEL_ENV, "torch" if cpu_kernels.torch_reason() is None else "auto")
    nk = 1100 if "cu_seqlens" in mask else 900
    q, k, v = _qkv(12, 1, 1100, nk, 4, 2, 16, np.float64)
    kw = {key: (np.array(val) if key == "cu_seqlens" else val) for key, val in mask.items()}
    monkeypatch.setenv(_threads.KERNEL_THREADS_VAR, "1")
    one = hpcattn.attention(q, k, v, **kw)
    assert cpu_kernels.LAST["forward"] == cpu_kernels.NUMPY_KERNEL
    monkeypatch.setenv(_threads.KERNEL_THREADS_VAR, "3")
    three = hpcattn.attention(q, k, v, **kw)
    for a, b in zip(one, three):
        assert np.array_equal(a, b)
    _close(three[0], naive_attention(q, k, v, **kw)[0], np.float64)


@pytest.mark.parametrize("causal", [False, True])
def test_threaded_ring_state_equals_one_state(causal):
    """A ring rank's state on worker threads (rows dealt out tile by tile) folds the same blocks
    to the same result as one state: zigzag-like positions, blocks straddling the diagonal, GQA."""
    from hpcattn import blockwise

    q, k, v = _qkv(13, 2, 700, 600, 4, 2, 16, np.float64)
    q_pos = np.concatenate([np.arange(0, 350), np.arange(1050, 1400)])
    blocks = [(slice(0, 300), np.arange(300, 600)), (slice(300, 600), np.arange(700, 1000))]
    kw = dict(causal=causal, scale=0.25, q_pos=q_pos, block_q=64, block_k=64)
    one = blockwise.PartialAttention(q, 2, **kw)
    many = cpu_pool.ThreadedPartial(q, 2, workers=3, **kw)
    calls = []
    for rows, pos in blocks:
        for state in (one, many):
            buf = np.empty(state.packed_size(300))
            state.pack(k[:, rows], v[:, rows], buf)
            state.add_packed(buf, 300, pos, progress=lambda: calls.append(1))
    for a, b in zip(one.result(), many.result()):
        assert np.array_equal(a, b)
    assert calls


@pytest.mark.parametrize("workers", [1, 2, 3])
@pytest.mark.parametrize("n", [1, 2, 7])
def test_run_tasks_runs_every_task_once_on_this_thread_among_others(workers, n):
    import threading

    seen = []
    lock = threading.Lock()

    def task(i):
        def run():
            with lock:
                seen.append((i, threading.get_ident()))
        return run

    cpu_pool.run_tasks([task(i) for i in range(n)], workers)
    assert sorted(i for i, _ in seen) == list(range(n))
    threads = {t for _, t in seen}
    if workers == 1 or n == 1:
        assert threads == {threading.get_ident()}
    assert len(threads) <= workers


def test_run_tasks_reraises_and_starts_nothing_after_a_failure():
    import threading

    started = []
    gate = threading.Event()

    def bad():
        started.append("bad")
        raise ValueError("task 0 failed")

    def later(i):
        def run():
            started.append(i)
            gate.wait(1.0)  # long past the failure being recorded
        return run

    with pytest.raises(ValueError, match="task 0 failed"):
        cpu_pool.run_tasks([bad] + [later(i) for i in range(20)], 2)
    # at most the one task the other thread had already taken when the first one failed
    assert "bad" in started and len(started) <= 3
