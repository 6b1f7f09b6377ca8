"""The measuring parts of ``hpcattn bench``, each run in its own child process: ``serial``
(GEMM, hpcattn's kernels, vanilla MHA, torch SDPA in one process, interleaved; ``bench.kernels``), ``ring`` (under mpiexec; with the
ring forward+backward of ``bench.backward`` when that section is on) and ``maxn`` (the longest N
vanilla MHA and the ring fit in the per-rank budget)."""
from __future__ import annotations

import time

from ..measure import summarize, timed, traced_peak
from .baseline import vanilla_mha
from .config import BenchConfig


def _inputs(cfg: BenchConfig, n: int, heads: int | None = None):
    import numpy as np

    from ..inputs import random_qkv

    h = heads or cfg.heads
    return random_qkv(0, np.arange(n), cfg.batch, h, h, cfg.head_dim, cfg.dtype)


def gemm_rates(cfg: BenchConfig) -> dict:
    """GFLOP/s of a square GEMM and of the attention-shaped GEMM, this process's threads."""
    import numpy as np

    from .kernels import square_gemm

    rng = np.random.default_rng(0)
    rep = max(3, cfg.repeats)
    square = summarize(timed(square_gemm(cfg), rep), 2.0 * cfg.gemm_n ** 3)
    d, t, inner = cfg.head_dim, 512, 16
    qa = rng.standard_normal((t, d)).astype(cfg.dtype)
    ka = rng.standard_normal((t, d)).astype(cfg.dtype)
    s = np.empty((t, t), dtype=cfg.dtype)

    def shaped():
        for _ in range(inner):
            np.matmul(qa, ka.T, out=s)
    attn = summarize(timed(shaped, rep), 2.0 * t * t * d * inner)
    return {"square": square, "attention_shaped": attn}


def serial_part(cfg: BenchConfig) -> dict:
    """GEMM, hpcattn (its chosen kernel and both kernels), vanilla MHA, torch SDPA interleaved in
    one process with the same threads; then 1 core against C cores, bfloat16 and the decode-like
    shapes (``bench.kernels``)."""
    import numpy as np

    from .kernels import cores_rates, decode_rates, half_rates, kernel_rates

    res = {"gemm": gemm_rates(cfg)}
    q, k, v = _inputs(cfg, cfg.seq_len)
    # vanilla: one head at a time keeps the N x N matrix affordable at the bench's N (same FLOPs,
    # same passes); the all-heads form is what the max-N comparison sizes
    rates = kernel_rates(cfg, q, k, v, {"vanilla": lambda: vanilla_mha(
        q, k, v, causal=cfg.causal, heads_at_once=False)})
    res["gemm"]["square"] = rates.pop("gemm")      # interleaved with the rest: the reference
    res["vanilla"] = rates.pop("vanilla")
    res["vanilla"]["bytes_per_n2"] = 4.0 * cfg.batch * np.dtype(cfg.dtype).itemsize
    res["torch"] = rates.pop("torch", None)
    res["kernels"] = rates
    res["blockwise"] = rates["numpy_blockwise"]
    res["cores"] = cores_rates(cfg, q, k, v)
    res["half"] = half_rates(cfg, q, k, v)
    res["decode"] = decode_rates(cfg)
    return res


def shard_footprint(cfg: BenchConfig, n_local: int, heads: int | None = None) -> int:
    """Bytes a rank cannot do without: its q, k, v, out, lse and the two K/V ring buffers."""
    from ..footprint import rank_memory

    h = heads or cfg.heads
    return rank_memory(n_local, batch=cfg.batch, heads=h, kv_heads=h, head_dim=cfg.head_dim,
                       dtype=cfg.dtype)[0].held


def _ring_case(cfg: BenchConfig, comm, n: int, repeats: int, check_rows: int = 0,
               heads: int | None = None, kv_pieces: int | None = None) -> dict:
    from ..cases import AttentionCase, run_attention_case

    case = AttentionCase(seq_len=n, batch=cfg.batch, heads=heads or cfg.heads,
                         head_dim=cfg.head_dim, dtype=cfg.dtype, causal=cfg.causal,
                         layout=cfg.layout, repeats=repeats, check_rows=check_rows,
                         kv_pieces=kv_pieces or cfg.kv_pieces or 1)
    res = run_attention_case(case, comm)
    item = {"float32": 4, "float64": 8}[cfg.dtype]
    inputs = [3 * c * cfg.batch * case.heads * cfg.head_dim * item for c in res["counts"]]
    res["peak_array_bytes"] = [i + p for i, p in zip(inputs, res["peak_alloc_bytes"])]
    res["shard_bytes"] = [shard_footprint(cfg, c, case.heads) for c in res["counts"]]
    res["flops"] = case.flops
    res["seq_len"] = n
    return res


def ring_part(cfg: BenchConfig, comm, maxn: bool) -> dict:
    """The timed ring case (section ``ring``), the ring forward+backward (section ``backward``)
    and (``maxn``) the ring end of the max-N comparison."""
    out = {}
    if "ring" in cfg.sections:
        out["ring"] = _ring_case(cfg, comm, cfg.seq_len, cfg.repeats)
    if "backward" in cfg.sections:
        from .backward import ring_backward_case

        out["ring_backward"] = ring_backward_case(cfg, comm, cfg.seq_len, cfg.repeats)
    if maxn:
        out["maxn_ring"] = ring_max_n(cfg, comm)
    return out


def _fit(xs, ys, powers):
    """Least-squares coefficients of ``y = sum c_p x^p`` (p in powers)."""
    import numpy as np

    a = np.array([[float(x) ** p for p in powers] for x in xs])
    return [float(c) for c in np.linalg.lstsq(a, np.array(ys, float), rcond=None)[0]]


#: the K/V piece counts the max-N part measures when --kv-pieces is not given
PIECES_TRIED = (1, 2, 4, 8, 16)


def ring_max_n(cfg: BenchConfig, comm) -> dict:
    """Per-rank array bytes per local token from two small runs, the N that fills the budget on
    this many ranks, and a real run at that N (with a sampled float64 check)."""
    size = comm.size
    budget = cfg.budget_mb * 2 ** 20
    unit = size * 64
    probes = [unit * 16, unit * 64]   # n_local >= one 512-row tile: tile buffers at full size

    def peak(n, pieces):
        return max(_ring_case(cfg, comm, n, 1, kv_pieces=pieces)["peak_array_bytes"])

    # K/V in pieces (the ring buffers hold one): unless --kv-pieces says, the fewest of
    # PIECES_TRIED whose measured peak at the larger probe is within 2% of the least of them
    # (past it, finishing, the outputs beside the state, sets the peak: more pieces only add
    # messages)
    tried = {p: peak(probes[-1], p) for p in ((cfg.kv_pieces,) if cfg.kv_pieces else PIECES_TRIED)}
    least = min(tried.values())
    pieces = min(p for p, b in tried.items() if b <= 1.02 * least)
    peaks = [peak(probes[0], pieces), tried[pieces]]
    slope, const = _fit([n / size for n in probes], peaks, (1, 0))
    # the line through the probes, or where it predicts more, the larger probe's bytes per local
    # token (fixed costs included): the cost per token still grows a little past the probes (the
    # line alone put 261,632 tokens on 4 ranks of 1 GiB, whose real run peaked at 1,037 MiB)
    per_token = peaks[-1] / (probes[-1] / size)
    n_max = int(min((budget - const) / slope, budget / per_token) * size) // unit * unit
    res = {"probe_n": probes, "probe_peak_bytes": peaks, "bytes_per_token": slope,
           "fixed_bytes": const, "predicted_n": n_max, "ranks": size, "budget_bytes": budget,
           "kv_pieces": pieces, "pieces_tried": {str(p): b for p, b in tried.items()}}
    if n_max >= unit:
        run = _ring_case(cfg, comm, n_max, 1, check_rows=16, kv_pieces=pieces)
        res.update(n=n_max, peak_array_bytes=max(run["peak_array_bytes"]),
                   peak_rss_bytes=max(run["peak_rss_bytes"]), wall_s=run["wall_s"][0],
                   gflops=run["gflops"], max_abs_err=run.get("max_abs_err"))
    return res


def vanilla_max_n(cfg: BenchConfig) -> dict:
    """Bytes per N^2 of vanilla MHA (all heads at once, and one head at a time) from small real
    runs, the N that fills the budget, and a real run there."""
    budget = cfg.budget_mb * 2 ** 20
    res = {"budget_bytes": budget}
    for name, at_once in (("all_heads", True), ("per_head", False)):
        probes = [256, 512, 1024]

        def peak(n):
            q, k, v = _inputs(cfg, n)
            return q.nbytes + k.nbytes + v.nbytes + traced_peak(
                lambda: vanilla_mha(q, k, v, causal=cfg.causal, heads_at_once=at_once))[1]
        peaks = [peak(n) for n in probes]
        a, b, c = _fit(probes, peaks, (2, 1, 0))
        n_max = int((-b + (b * b - 4 * a * (c - budget)) ** 0.5) / (2 * a)) // 64 * 64
        entry = {"probe_n": probes, "probe_peak_bytes": peaks, "bytes_per_n2": a,
                 "bytes_per_token": b, "predicted_n": n_max}
        if n_max >= 64:
            t0 = time.perf_counter()
            entry["peak_array_bytes"] = peak(n_max)
            entry["wall_s"] = time.perf_counter() - t0
            entry["n"] = n_max
        res[name] = entry
    return res
