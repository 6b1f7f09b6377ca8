"""The tables ``hpcattn bench`` prints: machine header, per-rank rates, ring scaling, max N,
and forward+backward (serial beside torch SDPA, and on the ring)."""
from __future__ import annotations

from .. import out_pool
from ..machine import THREAD_SETTINGS
from ..measure import BACKWARD_FLOP_NOTE, FLOP_NOTE
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


def _row(name, s, ref=None, extra="", torch=None):
    ratio = f"{s['gflops'] / ref:8.2f}" if ref else " " * 8
    vs_torch = f"{s['gflops'] / torch:9.2f}" if torch else " " * 9
    return (f"  {name:<44s}{s['median_s']:10.3f}  {s['gflops_min']:7.1f}-{s['gflops_max']:<7.1f}"
            f"{s['gflops']:9.1f}{ratio}{vs_torch}{extra}")


def serial_table(cfg: BenchConfig, res: dict) -> str:
    gemm = res["gemm"]["square"]["gflops"]
    ker = res.get("kernels", {})
    sdpa = res["torch"]["gflops"] if res.get("torch") else None
    lines = [f"\nper-rank attention ({_shape(cfg)}; {cfg.threads} thread(s); one process, "
             "interleaved per repeat)",
             f"  {'':<44s}{'median s':>10s}  {'GFLOP/s min-max':<15s}{'GFLOP/s':>9s}{'vs GEMM':>8s}"
             f"{'vs torch':>9s}",
             _row(f"GEMM {cfg.gemm_n}^3 (square)", res["gemm"]["square"], gemm),
             _row(f"GEMM 512x{cfg.head_dim}x512 (attention shape)", res["gemm"]["attention_shaped"],
                  gemm, "  (x16 per timing; timed before the others)")]
    if "hpcattn" in ker:
        lines.append(_row(f"hpcattn attention [{ker['kernel']}]", ker["hpcattn"], gemm, torch=sdpa))
    lines.append(_row("hpcattn blockwise (numpy-blockwise kernel)", res["blockwise"], gemm, torch=sdpa))
    if "fused" in ker:
        lines.append(_row("hpcattn on cpp-fused kernel", ker["fused"], gemm, torch=sdpa))
    if "torch_flash" in ker:
        lines.append(_row("hpcattn on torch-flash kernel", ker["torch_flash"], gemm, torch=sdpa))
    lines.append(_row("vanilla NumPy MHA (N x N scores)", res["vanilla"], gemm, "  (one head at a time)",
                      torch=sdpa))
    if res.get("torch"):
        lines.append(_row(f"torch SDPA {res['torch']['version']}", res["torch"], gemm, torch=sdpa))
    elif cfg.torch:
        lines.append("  torch SDPA                                  not installed (optional comparison)")
    for table in (_cores_lines, _half_lines, _decode_lines):
        lines += table(cfg, res, gemm)
    return "\n".join(lines)


def _cores_lines(cfg: BenchConfig, res: dict, gemm) -> list:
    cores = res.get("cores")
    if not cores:
        return []
    c = cores["cores"]
    head = f"\none process on 1 core vs {c} cores ({_shape(cfg)}; worker threads, 1 BLAS thread each)"
    if "reason" in cores:
        return [head, f"  not measured: {cores['reason']}"]
    lines = [head, f"  {'kernel':<28s}{'1 core GFLOP/s':>15s}{f'{c} cores GFLOP/s':>17s}{'speed-up':>10s}"]
    for name, key in (("numpy-blockwise (cpu_pool)", "numpy"), ("cpp-fused (cpu_pool)", "fused"),
                      ("torch-flash (set_num_threads)", "torch")):
        if f"{key}_1" in cores:
            one, many = cores[f"{key}_1"]["gflops"], cores[f"{key}_{c}"]["gflops"]
            lines.append(f"  {name:<28s}{one:15.1f}{many:17.1f}{many / one:9.2f}x")
    return lines


def _half_lines(cfg: BenchConfig, res: dict, gemm) -> list:
    half = res.get("half")
    if not half:
        return []
    if "reason" in half:
        return [f"\nbfloat16: not run: {half['reason']}"]
    lines = [f"\nbfloat16 ({_shape(cfg).replace(cfg.dtype, 'bfloat16')}; float32 accumulation)"]
    torch = half["torch"]["gflops"] if "torch" in half else None
    lines.append(_row("hpcattn attention [torch-flash]", half["hpcattn"], gemm, torch=torch))
    if torch:
        lines.append(_row("torch SDPA bfloat16", half["torch"], gemm, torch=torch))
    return lines


def _decode_lines(cfg: BenchConfig, res: dict, gemm) -> list:
    rows = res.get("decode")
    if not rows:
        return []
    square = res.get("kernels", {}).get("hpcattn", res["blockwise"])["gflops"]
    lines = [f"\ndecode-like shapes (B={cfg.batch}, H={cfg.heads}, d={cfg.head_dim}, {cfg.dtype}, "
             "non-causal); vs square: the GFLOP/s over hpcattn's at the square shape above",
             f"  {'queries x keys':<18s}{'hpcattn GFLOP/s':>16s}{'vs square':>10s}"
             f"{'default tiles':>14s}{'vs square':>10s}{'torch SDPA':>12s}{'vs square':>10s}"]
    for r in rows:
        cells = ""
        for key in ("hpcattn", "blockwise_default_tiles", "torch"):
            if key in r:
                ref = square if key != "torch" else (res["torch"] or {}).get("gflops", square)
                width = 16 if key == "hpcattn" else 12
                cells += f"{r[key]['gflops']:{width}.1f}{r[key]['gflops'] / ref:10.2f}"
        lines.append(f"  {r['nq']:>8,d} x {r['nk']:<7,d}{cells}")
    lines.append("  torch SDPA's ratio is to torch SDPA's own square-shape rate")
    timed = [r["gemm"]["gflops"] for r in rows if "gemm" in r]
    if timed:
        lines.append(f"  GEMM {cfg.gemm_n}^3 timed with these rows: "
                     f"{' and '.join(f'{g:.1f}' for g in timed)} GFLOP/s ({gemm:.1f} in the first table)")
    reuse = rows[0].get("reuse_out")
    if reuse is not None:
        lines.append(f"  hpcattn's outs of >= {out_pool.MIN_BYTES >> 20} MiB reuse the last one freed: "
                     f"{'on' if reuse else 'off'} (HPCATTN_REUSE_OUT={'1' if reuse else '0'})")
    return lines


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
    pieces = ring.get("kv_pieces", 1)
    name = (f"ring attention, {ring['ranks']} ranks" if pieces == 1
            else f"ring, {ring['ranks']} ranks, K/V in {pieces} pcs")
    err = f"   check max abs err {ring['max_abs_err']:.1e}" if ring.get("max_abs_err") is not None else ""
    lines.append(f"  {name:<31s}{ring['bytes_per_token']:8.0f} B per token{ring['predicted_n']:12,d}"
                 f"{ring.get('n', 0):13,d}{_mib(ring.get('peak_array_bytes', 0)):>14s}"
                 f"{ring.get('wall_s', 0):9.2f}{err}")
    if len(ring.get("pieces_tried", {})) > 1:
        tried = ", ".join(f"{p} {_mib(b)}" for p, b in ring["pieces_tried"].items())
        lines.append(f"  ring K/V pieces: peak arrays per rank at N={ring['probe_n'][-1]:,d} with {tried}; "
                     f"ran {pieces} (the fewest within 2% of the least)")
    if ring.get("n"):
        over = [f"{name} {_mib(e['peak_array_bytes'])}" for name, e in
                (("vanilla", van["all_heads"]), ("vanilla one head", van["per_head"]), ("ring", ring))
                if e.get("peak_array_bytes", 0) > budget]
        if over:
            lines.append(f"  OVER BUDGET ({_mib(budget)}): {', '.join(over)}: its N does not fit")
        lines.append(f"  ring / vanilla: {ring['n'] / max(van['all_heads'].get('n', 1), 1):.1f}x "
                     f"(all heads), {ring['n'] / max(van['per_head'].get('n', 1), 1):.1f}x (one head "
                     f"at a time); ring peak RSS/rank {_mib(ring['peak_rss_bytes'])}")
    return "\n".join(lines)


def backward_table(cfg: BenchConfig, res: dict) -> str:
    """hpcattn and torch SDPA: forward, forward+backward and the backward alone (difference)."""
    lines = [f"\nforward + backward ({_shape(cfg)}; {cfg.threads} thread(s); one process, "
             "interleaved per repeat)",
             f"  {'':<34s}{'median s':>10s}  {'GFLOP/s min-max':<15s}{'GFLOP/s':>9s}{'vs torch':>9s}"]
    torch = res.get("torch_fwd") is not None
    names = {"hpcattn": "hpcattn", "torch": "torch SDPA"}
    for tool in ("hpcattn", "torch") if torch else ("hpcattn",):
        for stage, what in (("fwd", "forward"), ("fwd_bwd", "forward+backward"),
                            ("bwd", "backward (difference)")):
            s = res[f"{tool}_{stage}"]
            ref = res.get(f"torch_{stage}") if tool == "hpcattn" else None
            ratio = (f"{s['gflops'] / ref['gflops']:9.2f}"
                     if ref and s.get("gflops") and ref.get("gflops") else " " * 9)
            rate = "-" if s.get("gflops") is None else f"{s['gflops']:.1f}"
            span = (f"{s['gflops_min']:7.1f}-{s['gflops_max']:<7.1f}" if "gflops_min" in s
                    else f"{'':15s}")
            lines.append(f"  {names[tool] + ' ' + what:<34s}{s['median_s']:10.3f}  {span}{rate:>9s}{ratio}")
    if not torch:
        lines.append("  torch SDPA                        "
                     + ("not installed (optional comparison)" if cfg.torch else "skipped (--no-torch)"))
    if torch:
        lines.append(f"  torch {res.get('torch_version', '?')}: its forward records autograd (inputs "
                     "require grad), its backward is torch.autograd.grad")
    lines.append(f"  {BACKWARD_FLOP_NOTE}; one untimed round first")
    return "\n".join(lines)


def ring_backward_table(cfg: BenchConfig, rings: dict) -> str:
    """The ring forward then backward on each --ranks count: walls, rates, wall over compute."""
    import numpy as np

    base = None
    lines = [f"\nring forward + backward ({_shape(cfg)}; layout {cfg.layout}; {cfg.threads} thread(s) "
             "per rank)",
             "  ranks  fwd+bwd wall s (min-max)   GFLOP/s  vs 1 rank  bwd wall s  bwd GFLOP/s"
             "  wall/compute fwd+bwd  bwd  bwd compute GFLOP/s/rank"]
    for p, r in rings.items():
        walls = r["fwd_bwd_wall_s"]
        flops = r["flops_fwd"] + r["flops_bwd"]
        rate = flops / float(np.median(walls)) / 1e9
        base = rate if p == "1" else base
        scale = f"{rate / base:9.2f}x" if base else " " * 10
        bwd_wall = float(np.median(r["bwd_wall_s"]))
        comp = max(f + b for f, b in zip(r["fwd_compute_s"], r["bwd_compute_s"]))
        bwd_comp = max(r["bwd_compute_s"])
        per_rank = r["flops_bwd"] / int(p) / bwd_comp / 1e9 if bwd_comp else float("nan")
        lines.append(f"  P={p:<4s} {np.median(walls):7.3f} ({min(walls):.3f}-{max(walls):.3f})"
                     f"{rate:13.1f} {scale} {bwd_wall:10.3f}{r['flops_bwd'] / bwd_wall / 1e9:13.1f}"
                     f"{walls[-1] / comp:14.3f}{r['bwd_wall_s'][-1] / bwd_comp:12.3f}{per_rank:14.1f}")
    lines.append("  wall/compute: slowest rank's wall time of the last repeat over the slowest rank's "
                 "compute time (1.00 = exchange hidden); " + BACKWARD_FLOP_NOTE)
    return "\n".join(lines)
