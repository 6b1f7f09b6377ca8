"""Side-by-side performance figures for ``hpcattn bench``.

Every figure that is compared with another is measured in the same run, under the same load and
thread settings:

* ``serial`` (one process, ``threads`` BLAS threads): this machine's GEMM rate (square, and the
  (512 x d) @ (d x 512) shape attention uses), blockwise attention, vanilla NumPy multi-head
  attention (full N x N scores) and, when PyTorch is importable, its
  ``scaled_dot_product_attention``;
* ``ring`` (under ``mpiexec -n P``, ``threads`` BLAS threads per rank): wall time over the rank's
  own compute time (1.0 = communication hidden), peak array memory over the theoretical shard
  footprint, throughput against 1 rank;
* ``maxn``: the longest N vanilla MHA fits in a per-rank memory budget against the longest N the
  ring runs on P ranks in the same budget per rank; both from memory measured in small real runs
  (bytes per N^2, bytes per token), then confirmed by real runs at the predicted maxima.

Each part runs in its own child process (``python -m hpcattn.bench PART JSON``, printing one JSON
line), so thread variables take effect before NumPy loads and peak memory is the run's own.
Memory is NumPy's traced allocations (``tracemalloc``: every array, nothing of the interpreter);
peak RSS is reported beside it.
"""
from __future__ import annotations

import dataclasses
import json
import os
import platform
import subprocess
import sys
import time

FLOP_NOTE = "FLOP = 4*B*N^2*H*d (halved when causal)"
THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "BLIS_NUM_THREADS",
               "HPCATTN_NUM_THREADS")


@dataclasses.dataclass
class BenchConfig:
    seq_len: int = 16384
    batch: int = 1
    heads: int = 8
    head_dim: int = 64
    dtype: str = "float32"
    causal: bool = False
    threads: int = 1                 # BLAS threads per process / per rank
    ranks: tuple = (1, 2)
    repeats: int = 3
    budget_mb: float = 256.0         # per-rank memory budget of the max-N comparison
    gemm_n: int = 2048
    torch: bool = True
    sections: tuple = ("serial", "ring", "maxn")

    @property
    def layout(self) -> str:
        return "zigzag" if self.causal else "contiguous"

    def flops(self, n: int | None = None, heads: int | None = None) -> float:
        n = self.seq_len if n is None else n
        f = 4.0 * self.batch * n * n * (heads or self.heads) * self.head_dim
        return f / 2 if self.causal else f


QUICK = dict(seq_len=1024, heads=2, head_dim=32, repeats=1, budget_mb=8.0, gemm_n=512)


# --- measuring ---------------------------------------------------------------------------------

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


def traced_peak(fn) -> int:
    """Peak bytes of the arrays ``fn`` allocates (NumPy reports its allocations to tracemalloc;
    arrays that existed before are not counted)."""
    import tracemalloc

    tracemalloc.start()
    tracemalloc.reset_peak()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def vanilla_mha(q, k, v, *, causal=False, scale=None, heads_at_once=True):
    """Textbook multi-head attention with the full (N x N) score matrix, in place where NumPy
    allows (the strongest plain-NumPy baseline: one score matrix of B*H*N^2 elements, or B*N^2
    with ``heads_at_once=False``)."""
    import numpy as np

    b, n, h, d = q.shape
    g = h // k.shape[2]
    scale = 1.0 / np.sqrt(d) if scale is None else scale
    qh = q.transpose(0, 2, 1, 3) * q.dtype.type(scale)
    kh = k.transpose(0, 2, 1, 3)
    vh = v.transpose(0, 2, 1, 3)
    out = np.empty((b, h, n, d), dtype=q.dtype)
    groups = [slice(0, h)] if heads_at_once else [slice(i, i + 1) for i in range(h)]
    mask = np.triu(np.ones((n, n), dtype=bool), 1) if causal else None
    for hs in groups:
        kv = [i // g for i in range(hs.start, hs.stop)]
        s = np.matmul(qh[:, hs], kh[:, kv].swapaxes(-1, -2))
        if causal:
            np.copyto(s, -np.inf, where=mask)
        s -= s.max(axis=-1, keepdims=True)
        np.exp(s, out=s)
        s /= s.sum(axis=-1, keepdims=True)
        np.matmul(s, vh[:, kv], out=out[:, hs])
        del s
    return out.transpose(0, 2, 1, 3)


def _inputs(cfg: BenchConfig, n: int, heads: int | None = None):
    import numpy as np

    from .inputs import random_qkv

    h = heads or cfg.heads
    return random_qkv(0, np.arange(n), cfg.batch, h, h, cfg.head_dim, cfg.dtype)


def _summary(walls, flops) -> dict:
    import numpy as np

    med = float(np.median(walls))
    return {"wall_s": [float(w) for w in walls], "median_s": med, "gflops": flops / med / 1e9,
            "gflops_min": flops / max(walls) / 1e9, "gflops_max": flops / min(walls) / 1e9}


def gemm_rates(cfg: BenchConfig) -> dict:
    """GFLOP/s of a square GEMM and of the attention-shaped GEMM, this process's threads."""
    import numpy as np

    rng = np.random.default_rng(0)
    n = cfg.gemm_n
    a = rng.standard_normal((n, n)).astype(cfg.dtype)
    c = np.empty_like(a)
    rep = max(3, cfg.repeats)
    square = _summary(timed(lambda: np.matmul(a, a, out=c), rep), 2.0 * n ** 3)
    d, t, inner = cfg.head_dim, 512, 16
    qa = rng.standard_normal((t, d)).astype(cfg.dtype)
    ka = rng.standard_normal((t, d)).astype(cfg.dtype)
    s = np.empty((t, t), dtype=cfg.dtype)

    def shaped():
        for _ in range(inner):
            np.matmul(qa, ka.T, out=s)
    attn = _summary(timed(shaped, rep), 2.0 * t * t * d * inner)
    return {"square": square, "attention_shaped": attn}


def serial_part(cfg: BenchConfig) -> dict:
    """GEMM, blockwise attention, vanilla MHA, torch SDPA: one process, same threads."""
    import numpy as np

    from .blockwise import attention

    res = {"gemm": gemm_rates(cfg)}
    q, k, v = _inputs(cfg, cfg.seq_len)
    flops = cfg.flops()
    res["blockwise"] = _summary(timed(lambda: attention(q, k, v, causal=cfg.causal), cfg.repeats),
                                flops)
    # vanilla: one head at a time keeps the N x N matrix affordable at the bench's N (same FLOPs,
    # same passes); the all-heads form is what the max-N comparison sizes
    res["vanilla"] = _summary(timed(lambda: vanilla_mha(q, k, v, causal=cfg.causal,
                                                        heads_at_once=False), cfg.repeats), flops)
    res["vanilla"]["bytes_per_n2"] = 4.0 * cfg.batch * np.dtype(cfg.dtype).itemsize
    if cfg.torch:
        res["torch"] = torch_sdpa(cfg, q, k, v, flops)
    return res


def torch_sdpa(cfg: BenchConfig, q, k, v, flops) -> dict | None:
    """``torch.nn.functional.scaled_dot_product_attention`` on the same inputs, or None."""
    try:
        import torch
    except ImportError:
        return None
    torch.set_num_threads(cfg.threads)
    tq, tk, tv = (torch.from_numpy(x.transpose(0, 2, 1, 3).copy()) for x in (q, k, v))

    def run():
        with torch.inference_mode():
            torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, is_causal=cfg.causal)
    out = _summary(timed(run, cfg.repeats), flops)
    out["version"] = torch.__version__
    return out


# --- ring (runs under mpiexec) -----------------------------------------------------------------

def shard_footprint(cfg: BenchConfig, n_local: int, heads: int | None = None) -> int:
    """Bytes a rank cannot do without: its q, k, v, out, lse and the two K/V ring buffers."""
    import numpy as np

    item = np.dtype(cfg.dtype).itemsize
    row = cfg.batch * (heads or cfg.heads) * cfg.head_dim * item
    return n_local * (4 * row + 4 * row + cfg.batch * (heads or cfg.heads) * item)


def _ring_case(cfg: BenchConfig, comm, n: int, repeats: int, check_rows: int = 0,
               heads: int | None = None) -> dict:
    from .cases import AttentionCase, run_attention_case

    case = AttentionCase(seq_len=n, batch=cfg.batch, heads=heads or cfg.heads,
                         head_dim=cfg.head_dim, dtype=cfg.dtype, causal=cfg.causal,
                         layout=cfg.layout, repeats=repeats, check_rows=check_rows)
    res = run_attention_case(case, comm)
    item = {"float32": 4, "float64": 8}[cfg.dtype]
    inputs = [3 * c * cfg.batch * case.heads * cfg.head_dim * item for c in res["counts"]]
    res["peak_array_bytes"] = [i + p for i, p in zip(inputs, res["peak_alloc_bytes"])]
    res["shard_bytes"] = [shard_footprint(cfg, c, case.heads) for c in res["counts"]]
    res["flops"] = case.flops
    res["seq_len"] = n
    return res


def ring_part(cfg: BenchConfig, comm, maxn: bool) -> dict:
    """The timed ring case and (``maxn``) the ring end of the max-N comparison."""
    out = {"ring": _ring_case(cfg, comm, cfg.seq_len, cfg.repeats)}
    if maxn:
        out["maxn_ring"] = ring_max_n(cfg, comm)
    return out


def _fit(xs, ys, powers):
    """Least-squares coefficients of ``y = sum c_p x^p`` (p in powers)."""
    import numpy as np

    a = np.array([[float(x) ** p for p in powers] for x in xs])
    return [float(c) for c in np.linalg.lstsq(a, np.array(ys, float), rcond=None)[0]]


def ring_max_n(cfg: BenchConfig, comm) -> dict:
    """Per-rank array bytes per local token from two small runs, the N that fills the budget on
    this many ranks, and a real run at that N (with a sampled float64 check)."""
    size = comm.size
    budget = cfg.budget_mb * 2 ** 20
    unit = size * 64
    probes = [unit * 16, unit * 64]   # n_local >= one 512-row tile: tile buffers at full size
    peaks = [max(_ring_case(cfg, comm, n, 1)["peak_array_bytes"]) for n in probes]
    slope, const = _fit([n / size for n in probes], peaks, (1, 0))
    n_max = int((budget - const) / slope * size) // unit * unit
    res = {"probe_n": probes, "probe_peak_bytes": peaks, "bytes_per_token": slope,
           "fixed_bytes": const, "predicted_n": n_max, "ranks": size, "budget_bytes": budget}
    if n_max >= unit:
        run = _ring_case(cfg, comm, n_max, 1, check_rows=16)
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
                lambda: vanilla_mha(q, k, v, causal=cfg.causal, heads_at_once=at_once))
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


# --- tables ------------------------------------------------------------------------------------

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
        f"({', '.join(v for v in THREAD_VARS)} = {cfg.threads} in every measuring process)",
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


# --- orchestration (the parent process) --------------------------------------------------------

def child_env(threads: int) -> dict:
    env = dict(os.environ)
    env.update({var: str(threads) for var in THREAD_VARS})
    return env


def run_child(part: str, cfg: BenchConfig, ranks: int | None = None, maxn: bool = False,
              timeout: float | None = None) -> dict:
    """Run one part in a fresh process (under mpiexec when ``ranks``) and return its JSON."""
    cmd = [sys.executable, "-m", "hpcattn.bench", part,
           json.dumps({"cfg": dataclasses.asdict(cfg), "maxn": maxn})]
    if ranks is not None:
        from .launch import find_mpiexec

        mpiexec = find_mpiexec()
        if mpiexec is None:
            raise RuntimeError("the ring part needs mpiexec (pip install 'hpcattn[mpi]')")
        cmd = [mpiexec, "-n", str(ranks), *cmd]
    proc = subprocess.run(cmd, env=child_env(cfg.threads), capture_output=True, text=True,
                          timeout=timeout)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"bench part {part!r} (ranks {ranks}) failed with exit code "
                           f"{proc.returncode}: {tail}")
    return json.loads(lines[-1])


def machine_info(cfg: BenchConfig) -> dict:
    """Machine, library versions and thread settings printed with every table."""
    import numpy as np

    info = {"host": platform.node(), "cpu": _cpu_model(), "cores": os.cpu_count(),
            "load_avg_1m_5m_15m": list(os.getloadavg()),
            "python": platform.python_version(), "numpy": np.__version__, "blas": _blas(),
            "threads_per_process": cfg.threads,
            "thread_vars": {v: os.environ.get(v, "") for v in THREAD_VARS}}
    try:
        from mpi4py import MPI

        info["mpi"] = MPI.Get_library_version().strip().splitlines()[0]
    except Exception:  # noqa: BLE001 - informational only
        info["mpi"] = "unavailable"
    try:
        import importlib.metadata as md

        info["torch"] = md.version("torch")
    except Exception:  # noqa: BLE001
        info["torch"] = "not installed"
    return info


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _blas() -> str:
    try:
        import numpy as np

        blas = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
        return f"{blas.get('name')} {blas.get('version')}"
    except Exception:  # noqa: BLE001
        return "unknown"


def run_bench(cfg: BenchConfig, echo=print) -> dict:
    """Run the selected parts; print each table as soon as it is measured; return all figures."""
    info = machine_info(cfg)
    echo(header(cfg, info))
    results: dict = {"machine": info, "config": dataclasses.asdict(cfg)}
    if "serial" in cfg.sections:
        results["serial"] = run_child("serial", cfg)
        echo(serial_table(cfg, results["serial"]))
    rings = {}
    if "ring" in cfg.sections or "maxn" in cfg.sections:
        top = max(cfg.ranks)
        for p in (cfg.ranks if "ring" in cfg.sections else (top,)):
            rings[p] = run_child("ring", cfg, ranks=p, maxn="maxn" in cfg.sections and p == top)
        if "ring" in cfg.sections:
            results["ring"] = {str(p): r["ring"] for p, r in rings.items()}
            gemm = results.get("serial", {}).get("gemm", {}).get("square", {}).get("gflops")
            echo(ring_table(cfg, results["ring"], gemm))
    if "maxn" in cfg.sections:
        results["maxn"] = {"vanilla": run_child("maxn", cfg), "ring": rings[max(cfg.ranks)]["maxn_ring"]}
        echo(maxn_table(cfg, results["maxn"]))
    results["machine"]["load_avg_after"] = list(os.getloadavg())
    return results


def save(results: dict, path: str) -> None:
    """Figures to an hpcattn results file (``hpcattn.store``): one case per part."""
    from . import store

    master = store.Master(path)
    master.lock()
    try:
        master.prepare({"job_name": "bench", "job_kind": "bench",
                        "job_description": "hpcattn bench: side-by-side performance figures"},
                       store.provenance(), force=True)
        records = []
        for index, part in enumerate(("serial", "ring", "maxn")):
            if part in results:
                records.append({"index": index, "kind": f"bench_{part}",
                                "params": results["config"],
                                "results": _storable({"machine": results["machine"],
                                                      part: results[part]})})
        master.add_cases(records)
    finally:
        master.unlock()


def _storable(x):
    """JSON-like results in the shapes ``store.write_tree`` takes (no None, no ragged lists)."""
    if isinstance(x, dict):
        return {str(k): _storable(v) for k, v in x.items() if v is not None}
    if isinstance(x, (list, tuple)) and any(isinstance(v, (dict, list, str)) for v in x):
        return json.dumps(x)
    if isinstance(x, bool):
        return int(x)
    return x


def _worker(part: str, payload: str) -> None:
    args = json.loads(payload)
    cfg = BenchConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in args["cfg"].items()})
    if part == "ring":
        from mpi4py import MPI

        res = ring_part(cfg, MPI.COMM_WORLD, args["maxn"])
        if MPI.COMM_WORLD.rank != 0:
            return
    elif part == "serial":
        res = serial_part(cfg)
    elif part == "maxn":
        res = vanilla_max_n(cfg)
    else:
        raise SystemExit(f"unknown bench part {part!r}")
    print(json.dumps(res, default=float), flush=True)


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2])
