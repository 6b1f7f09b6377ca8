"""The ``backward`` part of ``hpcattn bench``: training-step figures.

* ``serial_backward_part`` (one process, ``threads`` BLAS threads): hpcattn's forward and
  forward+backward beside torch SDPA's forward (autograd recording) and forward+backward, the four
  interleaved within each repeat so every one sees the same load; the backward alone is the
  difference of the medians.
* ``ring_backward_case`` (under mpiexec, in the ring child): the ring forward then the ring
  backward, wall time of the slowest rank and each rank's compute time (``stats`` of both).

FLOPs: ``measure.attention_flops`` for the forward, ``measure.attention_backward_flops`` (2.5x,
FlashAttention's convention) for the backward.
"""
from __future__ import annotations

import gc
import time

from ..measure import attention_backward_flops, summarize
from .config import BenchConfig

DOUT_SEED = 1  # dout's rows: the q stream of another seed (deterministic per global position)


def _flops(cfg: BenchConfig, n: int | None = None) -> tuple[float, float]:
    """(forward, backward) FLOPs of one pass at ``n`` (default the bench's N)."""
    n = cfg.seq_len if n is None else n
    return cfg.flops(n), attention_backward_flops(cfg.batch, n, cfg.heads, cfg.head_dim, causal=cfg.causal)


def _rows(cfg: BenchConfig, pos):
    """q, k, v and dout at global positions ``pos`` (rows independent of the rank count)."""
    from ..inputs import random_qkv, random_rows

    h = cfg.heads
    q, k, v = random_qkv(0, pos, cfg.batch, h, h, cfg.head_dim, cfg.dtype)
    return q, k, v, random_rows(DOUT_SEED, "q", pos, cfg.batch, h, cfg.head_dim, cfg.dtype)


def interleaved(runs: dict, repeats: int) -> dict:
    """Wall seconds of each callable in ``runs``, one call of each in turn per repeat, after one
    untimed round (even for one repeat: torch's first backward call sets up autograd and costs
    far more than a step). Python's cyclic garbage collector is off while a call is timed and runs
    between calls (as ``timeit`` does): with torch imported one full collection took 79 ms, the
    size of a whole decode-like call; memory is still freed by reference counting."""
    for fn in runs.values():
        fn()
    walls = {name: [] for name in runs}
    was_enabled = gc.isenabled()
    for _ in range(repeats):
        for name, fn in runs.items():
            gc.collect()
            gc.disable()
            try:
                t0 = time.perf_counter()
                fn()
                walls[name].append(time.perf_counter() - t0)
            finally:
                if was_enabled:
                    gc.enable()
    return walls


def _torch_runs(cfg: BenchConfig, q, k, v, dout) -> dict:
    """torch SDPA forward (inputs requiring grad: what training runs) and forward+backward on
    the same inputs, or {} without PyTorch."""
    try:
        import torch
    except ImportError:
        return {}
    torch.set_num_threads(cfg.threads)
    tq, tk, tv = (torch.from_numpy(x.transpose(0, 2, 1, 3).copy()).requires_grad_() for x in (q, k, v))
    tdo = torch.from_numpy(dout.transpose(0, 2, 1, 3).copy())
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def forward():
        return sdpa(tq, tk, tv, is_causal=cfg.causal)

    def forward_backward():
        torch.autograd.grad(forward(), (tq, tk, tv), tdo)
    return {"torch_fwd": forward, "torch_fwd_bwd": forward_backward}


def serial_backward_part(cfg: BenchConfig) -> dict:
    """hpcattn fwd, hpcattn fwd+bwd, torch fwd, torch fwd+bwd (interleaved), same threads."""
    import numpy as np

    from ..backend import attention, attention_backward

    q, k, v, dout = _rows(cfg, np.arange(cfg.seq_len))

    def forward():
        return attention(q, k, v, causal=cfg.causal)

    def forward_backward():
        out, lse = forward()
        attention_backward(q, k, v, out, lse, dout, causal=cfg.causal)
    runs = {"hpcattn_fwd": forward, "hpcattn_fwd_bwd": forward_backward}
    if cfg.torch:
        runs.update(_torch_runs(cfg, q, k, v, dout))
    walls = interleaved(runs, cfg.repeats)
    fwd, bwd = _flops(cfg)
    res = {}
    for tool in ("hpcattn", "torch"):
        if f"{tool}_fwd" not in walls:
            continue
        res[f"{tool}_fwd"] = summarize(walls[f"{tool}_fwd"], fwd)
        res[f"{tool}_fwd_bwd"] = summarize(walls[f"{tool}_fwd_bwd"], fwd + bwd)
        alone = res[f"{tool}_fwd_bwd"]["median_s"] - res[f"{tool}_fwd"]["median_s"]
        res[f"{tool}_bwd"] = {"median_s": alone, "gflops": bwd / alone / 1e9 if alone > 0 else None}
    if "torch_fwd" in res:
        import torch

        res["torch_version"] = torch.__version__
    res["flops_fwd"], res["flops_bwd"] = fwd, bwd
    return res


def ring_backward_case(cfg: BenchConfig, comm, n: int, repeats: int) -> dict:
    """The ring forward and backward at ``n`` on ``comm``'s ranks, ``repeats`` times (after a
    warm-up when ``repeats`` > 1). Rank 0's dict: slowest-rank walls per repeat and each rank's
    compute/wait seconds of the last repeat."""
    from .. import exchange
    from ..layouts import Distribution
    from ..ring import ring_attention
    from ..ring_backward import ring_attention_backward

    dist = Distribution(n, comm.size, cfg.layout)
    q, k, v, dout = _rows(cfg, dist.positions(comm.rank))
    kw = dict(causal=cfg.causal, layout=cfg.layout, kv_pieces=cfg.kv_pieces or 1)

    def once():
        fwd_stats, bwd_stats = {}, {}
        exchange.barrier(comm, "the bench's ring backward")
        t0 = time.perf_counter()
        out, lse = ring_attention(q, k, v, comm, stats=fwd_stats, **kw)
        t1 = time.perf_counter()
        ring_attention_backward(q, k, v, out, lse, dout, comm, stats=bwd_stats, **kw)
        t2 = time.perf_counter()
        return {"fwd_wall_s": t1 - t0, "bwd_wall_s": t2 - t1, "fwd_compute_s": fwd_stats["compute_s"],
                "bwd_compute_s": bwd_stats["compute_s"], "bwd_wait_s": bwd_stats["wait_s"]}
    if repeats > 1:
        once()
    mine = [once() for _ in range(repeats)]
    every = exchange.gather(comm, mine, "the bench's ring backward figures")
    if comm.rank != 0:
        return {}
    fwd, bwd = _flops(cfg, n)
    slowest = {key: [max(rank[i][key] for rank in every) for i in range(repeats)]
               for key in ("fwd_wall_s", "bwd_wall_s")}
    slowest["fwd_bwd_wall_s"] = [max(r[i]["fwd_wall_s"] + r[i]["bwd_wall_s"] for r in every)
                                 for i in range(repeats)]
    last = {key: [rank[-1][key] for rank in every]
            for key in ("fwd_compute_s", "bwd_compute_s", "bwd_wait_s")}
    return {"seq_len": n, "ranks": comm.size, "flops_fwd": fwd, "flops_bwd": bwd, **slowest, **last}
