"""The backward kernels on a real GPU (skipped without one, with the reason): every entry point
against the float64 reference (hpcattn.gpu.backward_accuracy), the same numbers as the CPU
emulation, bitwise deterministic, and the TFLOP/s they reach (backward FLOPs = 2.5 x forward,
FlashAttention's convention)."""
import numpy as np
import pytest

from hpcattn.devices import np_dtype
from hpcattn.gpu import kernels
from hpcattn.gpu.backward_accuracy import judge_backward
from hpcattn.gpu.environment import no_gpu_reason
from hpcattn.measure import attention_flops
from hpcattn.reference import naive_attention

cupy = pytest.importorskip("cupy", reason="no GPU: CuPy not installed (pip install '.[gpu]')")

NO_GPU = no_gpu_reason()
SKIP_REASON = NO_GPU if str(NO_GPU).startswith("no GPU") else f"no GPU: {NO_GPU}"
pytestmark = [pytest.mark.gpu, pytest.mark.timeout(300), pytest.mark.skipif(NO_GPU is not None, reason=SKIP_REASON)]

KERNEL_CASES = [*((dt, "simt") for dt in kernels.DTYPES), *((dt, "mma") for dt in kernels.MMA_DTYPES)]
# (batch, n_q, n_k, heads, kv_heads, causal): ragged, GQA and MQA, zigzag positions, n_q != n_k
SHAPES = [
    (1, 1000, 1000, 4, 2, True),
    (2, 777, 300, 4, 1, False),
    (1, 640, 640, 8, 8, True),
]


def zigzag(n):
    return np.concatenate([np.arange(n // 2, n), np.arange(n // 2)]).astype(np.int64)


def problem(rng, b, nq, nk, h, hkv, d, dtype, causal):
    dt = np_dtype(dtype)
    q, k, v, dout = (rng.standard_normal(s, dtype=np.float32).astype(dt)
                     for s in ((b, nq, h, d), (b, nk, hkv, d), (b, nk, hkv, d), (b, nq, h, d)))
    q_pos, k_pos = (zigzag(nq), zigzag(nk)) if causal else (None, None)
    out, lse = naive_attention(q, k, v, causal=causal, q_pos=q_pos, k_pos=k_pos)
    return (q, k, v, out.astype(dt), lse.astype(np.float32), dout), dict(causal=causal, q_pos=q_pos, k_pos=k_pos)


def on_gpu(args, **kw):
    from hpcattn.gpu.backward import attention_backward_gpu

    grads = attention_backward_gpu(*(cupy.asarray(x) for x in args), **kw)
    return [g.get() for g in grads]


@pytest.mark.parametrize("dtype, variant", KERNEL_CASES)
@pytest.mark.parametrize("head_dim", kernels.HEAD_DIMS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "b{}q{}k{}h{}kv{}{}".format(*s[:5], "c" * s[5]))
def test_gpu_backward_matches_float64_reference(shape, head_dim, dtype, variant):
    b, nq, nk, h, hkv, causal = shape
    args, kw = problem(np.random.default_rng(7), b, nq, nk, h, hkv, head_dim, dtype, causal)
    grads = on_gpu(args, variant=variant, **kw)
    assert [g.dtype for g in grads] == [args[0].dtype] * 3
    verdict = judge_backward(*args, grads, **kw)
    print(f"{shape} d{head_dim} {dtype} {variant}: {verdict}")
    assert verdict.ok, verdict


@pytest.mark.parametrize("dtype, variant", KERNEL_CASES)
def test_gpu_and_cpu_emulation_agree_and_the_gpu_is_deterministic(dtype, variant):
    from hpcattn.emulation.backward import attention_backward_emulated

    args, kw = problem(np.random.default_rng(3), 1, 150, 130, 4, 2, 64, dtype, True)
    kw.update(grad_dtype="float32", variant=variant)
    first = on_gpu(args, **kw)
    again = on_gpu(args, **kw)
    assert all(np.array_equal(a, b) for a, b in zip(first, again)), "two runs differ (no atomics: they must not)"
    emulated = attention_backward_emulated(*args, **kw)
    # SIMT: FMA contraction, exp2 and -ftz on the GPU, float32 rounding only; tensor cores: also
    # P and dS rounded to the input dtype, where a last-bit difference can flip one rounding step
    step = 1e-5 if variant == "simt" else {"float16": 2e-3, "bfloat16": 1.6e-2}[dtype]
    for g, e in zip(first, emulated):
        assert np.abs(g - e).max() <= step * max(1.0, float(np.abs(e).max())), "GPU vs emulation differ"


@pytest.mark.parametrize("head_dim", kernels.HEAD_DIMS)
@pytest.mark.parametrize("dtype, variant", KERNEL_CASES)
def test_report_backward_tflops(dtype, variant, head_dim):
    """Not a threshold: prints what the kernels reach (run with -s)."""
    from hpcattn.gpu.backward import attention_backward_gpu

    b, n, h = 1, 4096, 16
    rng = cupy.random.default_rng(0)
    q, k, v, out, dout = (rng.standard_normal((b, n, h, head_dim), dtype=cupy.float32).astype(np_dtype(dtype))
                          for _ in range(5))
    lse = cupy.full((b, h, n), float(np.log(n)), dtype=cupy.float32)  # timing only: any finite lse
    for causal in (False, True):
        attention_backward_gpu(q, k, v, out, lse, dout, causal=causal, variant=variant)  # compile, warm up
        start, stop = cupy.cuda.Event(), cupy.cuda.Event()
        repeats = 5
        start.record()
        for _ in range(repeats):
            attention_backward_gpu(q, k, v, out, lse, dout, causal=causal, variant=variant)
        stop.record()
        stop.synchronize()
        seconds = cupy.cuda.get_elapsed_time(start, stop) / 1e3 / repeats
        flops = 2.5 * attention_flops(b, n, h, head_dim, causal=causal)
        print(f"backward {dtype} {variant} d{head_dim} N={n} H={h} causal={causal}: {seconds * 1e3:.2f} ms, "
              f"{flops / seconds / 1e12:.2f} TFLOP/s")
        assert seconds > 0
