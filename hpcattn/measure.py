"""How hpcattn counts work and memory: the one FLOP formula and the memory probes used by
cases, mixers and the benchmark."""
from __future__ import annotations

import resource
import time
import tracemalloc

FLOP_NOTE = "FLOP = 4*B*N^2*H*d (halved when causal)"
#: FlashAttention's convention: the backward's five GEMMs against the forward's two, 2.5x
BACKWARD_FLOP_FACTOR = 2.5
BACKWARD_FLOP_NOTE = "backward FLOP = 2.5 x forward, forward+backward = 3.5 x (FlashAttention's convention)"


def attention_flops(batch: int, n_q: int, heads: int, head_dim: int, *, causal: bool = False,
                    n_k: int | None = None) -> float:
    """FlashAttention's convention for a forward pass: 4·B·Nq·Nk·H·d, half of it when causal."""
    n_k = n_q if n_k is None else n_k
    f = 4.0 * batch * n_q * n_k * heads * head_dim
    return f / 2 if causal else f


def attention_backward_flops(batch: int, n_q: int, heads: int, head_dim: int, *, causal: bool = False,
                             n_k: int | None = None) -> float:
    """FlashAttention's convention for the backward pass: 2.5 x the forward's
    (``attention_flops``); forward+backward is the sum of the two."""
    return BACKWARD_FLOP_FACTOR * attention_flops(batch, n_q, heads, head_dim, causal=causal, n_k=n_k)


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def traced_peak(fn):
    """``(fn(), peak bytes of the arrays fn allocated)``: NumPy reports its buffers to
    tracemalloc; arrays that existed before are not counted. Leaves tracing as it found it."""
    was = tracemalloc.is_tracing()
    if not was:
        tracemalloc.start()
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    try:
        out = fn()
        return out, tracemalloc.get_traced_memory()[1] - base
    finally:
        if not was:
            tracemalloc.stop()


def timed(fn, repeats: int) -> list[float]:
    """Wall seconds of ``repeats`` calls of ``fn`` (after one untimed warm-up call when
    ``repeats`` > 1)."""
    if repeats > 1:
        fn()
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def summarize(walls, flops) -> dict:
    """Wall seconds of repeats and the FLOPs each computed -> median and GFLOP/s (median, range)."""
    import numpy as np

    med = float(np.median(walls))
    return {"wall_s": [float(w) for w in walls], "median_s": med, "gflops": flops / med / 1e9,
            "gflops_min": flops / max(walls) / 1e9, "gflops_max": flops / min(walls) / 1e9}
