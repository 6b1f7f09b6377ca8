"""Running ``hpcattn bench`` from the parent process: each part in a fresh child (under mpiexec
for the ring), the tables printed as the figures arrive, the figures saved as a results file."""
from __future__ import annotations

import dataclasses
import json
import os
import platform
import subprocess
import sys

from ..machine import THREAD_SETTINGS
from .config import SECTIONS, BenchConfig
from .report import backward_table, header, maxn_table, ring_backward_table, ring_table, serial_table


def child_env(threads: int) -> dict:
    """This environment with every thread variable (HPCATTN_NUM_THREADS too, the override each
    child's own thread set-up obeys) set to ``threads``."""
    env = dict(os.environ)
    env.update({var: str(threads) for var in THREAD_SETTINGS})
    return env


def run_child(part: str, cfg: BenchConfig, ranks: int | None = None, maxn: bool = False,
              timeout: float | None = None) -> dict:
    """Run one part in a fresh process (under mpiexec when ``ranks``) and return its JSON."""
    cmd = [sys.executable, "-m", "hpcattn.bench", part,
           json.dumps({"cfg": dataclasses.asdict(cfg), "maxn": maxn})]
    if ranks is not None:
        from ..launch import find_mpiexec

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
    """Machine, library versions and thread settings printed with every table (from
    ``hpcattn.machine``, the one description of this machine)."""
    import numpy as np

    from .. import machine

    mpi = machine.mpi_library()
    return {"host": machine.hosts()[0], "cpu": machine.cpu_model(), "cores": os.cpu_count(),
            "load_avg_1m_5m_15m": list(os.getloadavg()),
            "python": platform.python_version(), "numpy": np.__version__, "blas": machine.blas(),
            "threads_per_process": cfg.threads, "thread_vars": machine.thread_settings(),
            "mpi": mpi["library"] if mpi["mpi4py"] is not None else "unavailable",
            "torch": machine.package_version("torch") or "not installed"}


def run_bench(cfg: BenchConfig, echo=print) -> dict:
    """Run the selected parts; print each table as soon as it is measured; return all figures."""
    info = machine_info(cfg)
    echo(header(cfg, info))
    results: dict = {"machine": info, "config": dataclasses.asdict(cfg)}
    if "serial" in cfg.sections:
        results["serial"] = run_child("serial", cfg)
        echo(serial_table(cfg, results["serial"]))
    rings = {}
    scaling = "ring" in cfg.sections or "backward" in cfg.sections  # every --ranks count
    if scaling or "maxn" in cfg.sections:
        top = max(cfg.ranks)
        for p in (cfg.ranks if scaling else (top,)):
            rings[p] = run_child("ring", cfg, ranks=p, maxn="maxn" in cfg.sections and p == top)
        if "ring" in cfg.sections:
            results["ring"] = {str(p): r["ring"] for p, r in rings.items()}
            gemm = results.get("serial", {}).get("gemm", {}).get("square", {}).get("gflops")
            echo(ring_table(cfg, results["ring"], gemm))
    if "maxn" in cfg.sections:
        results["maxn"] = {"vanilla": run_child("maxn", cfg), "ring": rings[max(cfg.ranks)]["maxn_ring"]}
        echo(maxn_table(cfg, results["maxn"]))
    if "backward" in cfg.sections:
        results["backward"] = {"serial": run_child("backward", cfg),
                               "ring": {str(p): r["ring_backward"] for p, r in rings.items()}}
        echo(backward_table(cfg, results["backward"]["serial"]))
        echo(ring_backward_table(cfg, results["backward"]["ring"]))
    if "strategies" in cfg.sections:
        top = max(cfg.ranks)
        if top < 2:
            echo(f"\ncontext-parallel strategies: skipped (the largest --ranks is {top}; they "
                 "need at least 2 ranks)")
        else:
            from .strategies import strategies_table

            results["strategies"] = run_child("strategies", cfg, ranks=top)
            echo(strategies_table(cfg, results["strategies"]))
    results["machine"]["load_avg_after"] = list(os.getloadavg())
    return results


def save(results: dict, path: str) -> None:
    """Figures to an hpcattn results file (``hpcattn.results``): one case per part."""
    from ..results import Master, provenance

    master = Master(path)
    master.lock()
    try:
        master.prepare({"job_name": "bench", "job_kind": "bench",
                        "job_description": "hpcattn bench: side-by-side performance figures"},
                       provenance(), force=True)
        records = []
        for index, part in enumerate(SECTIONS):
            if part in results:
                records.append({"index": index, "kind": f"bench_{part}",
                                "params": results["config"],
                                "results": _storable({"machine": results["machine"],
                                                      part: results[part]})})
        master.add_cases(records)
    finally:
        master.unlock()


def _storable(x):
    """JSON-like results in the shapes ``results.write_tree`` takes (no None, no ragged lists)."""
    if isinstance(x, dict):
        return {str(k): _storable(v) for k, v in x.items() if v is not None}
    if isinstance(x, (list, tuple)) and any(isinstance(v, (dict, list, str)) for v in x):
        return json.dumps(x)
    if isinstance(x, bool):
        return int(x)
    return x
