"""The tables ``hpcattn bench`` prints: machine header, per-rank rates, ring scaling, max N."""
from __future__ import annotations

from ..machine import THREAD_SETTINGS
from ..measure import FLOP_NOTE
from .config import BenchConfig


def _mib(b: float) -> str:
    return f"{b / 2**20:,.1f} MiB"


def _shape(cfg: BenchConfig, n: int | None = None) -> str:
    return (f"N={n or cfg.seq_len:,}, B={cfg.batch}, H={cfg.heads}, d={cfg.head_dim}, {cfg.dtype}, "
            f"{'causal' if cfg.causal else 'non-causal'}")


def header(cfg: BenchConfig, info: dict) -> str:
    load = ", ".join(f"{x:.2f}" for x in info["load_avg_1m_5m_15m"])
    return "\n".join([
        "hpcattn bench",
        f"  machine   {info['host']}: {info['cpu']}, {info['cores']} cores, load {load}",
        f"  libraries python {info['python']}, numpy {info['numpy']} ({info['blas']}), "
        f"torch {info['torch']}",
        f"  mpi       {info['mpi']}",
        f"  threads   {cfg.threads} BLAS thread(s) per process and per rank "
        f"({', '.join(THREAD_SETTINGS)} = {cfg.threads} in every measuring process)",
        f"  flops     {FLOP_NOTE}; times: median of {cfg.repeats} (min-max)",
    ])


def _row(name, s, ref=None, extra=""):
    ratio = f"{s['gflops'] / ref:8.2f}" if ref else " " * 8
    return (f"  {name:<34s}{s['median_s']:10.3f}  {s['gflops_min']:7.1f}-{s['gflops_max']:<7.1f}"
            f"{s['gflops']:9.1f}{ratio}{extra}")


def serial_table(cfg: BenchConfig, res: dict) -> str:
    gemm = res["gemm"]["square"]["gflops"]
    lines = [f"\nper-rank attention ({_shape(cfg)}; {cfg.threads} thread(s))",
             f"  {'':<34s}{'median s':>10s}  {'GFLOP/s min-max':<15s}{'GFLOP/s':>9s}{'vs GEMM':>8s}",
             _row(f"GEMM {cfg.gemm_n}^3 (square)", res["gemm"]["square"], gemm),
             _row(f"GEMM 512x{cfg.head_dim}x512 (attention shape)", res["gemm"]["attention_shaped"],
                  gemm, "  (x16 per timing)"),
             _row("hpcattn blockwise", res["blockwise"], gemm),
             _row("vanilla NumPy MHA (N x N scores)", res["vanilla"], gemm, "  (one head at a time)")]
    if res.get("torch"):
        lines.append(_row(f"torch SDPA {res['torch']['version']}", res["torch"], gemm))
    elif cfg.torch:
        lines.append("  torch SDPA                        not installed (optional comparison)")
    return "\n".join(lines)


def ring_table(cfg: BenchConfig, rings: dict, gemm: float | None) -> str:
    import numpy as np

    base = rings.get("1", {}).get("gflops")
    lines = [f"\nring attention ({_shape(cfg)}; layout {cfg.layout}; {cfg.threads} thread(s) per rank)",
             "  ranks  wall s (min-max)         GFLOP/s  vs 1 rank  wall/compute  compute GFLOP/s/rank"
             "  peak arrays/rank (x shard)  peak RSS/rank"]
    for p, r in rings.items():
        walls = r["wall_s"]
        comp = max(r["compute_s"])
        per_rank = r["flops"] / int(p) / comp / 1e9 if comp else float("nan")
        vs_gemm = f" ({per_rank / gemm:.2f} GEMM)" if gemm else ""
        scale = f"{r['gflops'] / base:9.2f}x" if base else " " * 10
        peak, shard = max(r["peak_array_bytes"]), max(r["shard_bytes"])
        lines.append(f"  {p:>5s}  {np.median(walls):7.3f} ({min(walls):.3f}-{max(walls):.3f})"
                     f"{r['gflops']:10.1f} {scale} {walls[-1] / comp:12.3f}  "
                     f"{per_rank:8.1f}{vs_gemm:<13s}{_mib(peak):>14s} (x{peak / shard:.2f})"
                     f"{_mib(max(r['peak_rss_bytes'])):>16s}")
    lines.append("  wall/compute: slowest rank's wall time of the last repeat over the slowest rank's "
                 "compute time (1.00 = exchange hidden); shard = q, k, v, out, lse + 2 K/V buffers")
    return "\n".join(lines)


def maxn_table(cfg: BenchConfig, res: dict) -> str:
    van, ring = res["vanilla"], res["ring"]
    budget = ring["budget_bytes"]
    lines = [f"\nlongest sequence in {_mib(budget)} of arrays per rank (B={cfg.batch}, H={cfg.heads}, "
             f"d={cfg.head_dim}, {cfg.dtype}, {'causal' if cfg.causal else 'non-causal'})",
             "  method                         measured cost        predicted N   real run N"
             "   peak arrays   wall s"]
    for name, key in (("vanilla MHA, all heads at once", "all_heads"),
                      ("vanilla MHA, one head at a time", "per_head")):
        e = van[key]
        lines.append(f"  {name:<31s}{e['bytes_per_n2']:8.1f} B per N^2  {e['predicted_n']:12,d}"
                     f"{e.get('n', 0):13,d}{_mib(e.get('peak_array_bytes', 0)):>14s}"
                     f"{e.get('wall_s', 0):9.2f}")
    name = f"ring attention, {ring['ranks']} ranks"
    err = f"   check max abs err {ring['max_abs_err']:.1e}" if ring.get("max_abs_err") is not None else ""
    lines.append(f"  {name:<31s}{ring['bytes_per_token']:8.0f} B per token{ring['predicted_n']:12,d}"
                 f"{ring.get('n', 0):13,d}{_mib(ring.get('peak_array_bytes', 0)):>14s}"
                 f"{ring.get('wall_s', 0):9.2f}{err}")
    if ring.get("n"):
        lines.append(f"  ring / vanilla: {ring['n'] / max(van['all_heads'].get('n', 1), 1):.1f}x "
                     f"(all heads), {ring['n'] / max(van['per_head'].get('n', 1), 1):.1f}x (one head "
                     f"at a time); ring peak RSS/rank {_mib(ring['peak_rss_bytes'])}")
    return "\n".join(lines)
