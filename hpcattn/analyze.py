"""Reading results files back: one flat row per case, tables, CSV/JSON, and the standard figures.

A row holds the case's parameters (``seq_len``, ``layout``, ``mixer``...) and its metrics reduced
to one number each: ``wall_s`` (median over repeats of the slowest rank), ``gflops``,
``mem_mib`` (peak array memory of the busiest rank), ``rss_mib`` (peak resident set size of the
busiest rank), ``max_abs_err``; any other scalar result (e.g. a mixer's error or recall) is kept
under its own name, 1-D results by their maximum.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os

import numpy as np

from . import store
from .errors import HpcattnError

MIB = 2.0 ** 20
# result name -> (row column, reduction)
REDUCE = {"wall_s": ("wall_s", np.median), "peak_alloc_bytes": ("mem_mib", lambda a: np.max(a) / MIB),
          "peak_rss_bytes": ("rss_mib", lambda a: np.max(a) / MIB)}
HIDDEN = {"compute_s", "wait_s", "counts", "skipped_blocks", "elapsed_s", "rows", "tolerance",
          "max_lse_err", "max_rel_err", "ranks"}
PLOTS = (("wall_s", "time per case (s)", True), ("mem_mib", "peak memory per rank (MiB)", True),
         ("gflops", "throughput (GFLOP/s)", True), ("error", "max abs error", True))
BOOKKEEPING = {"index", "kind", "run", "completed_at", "params_json"}
# in CSV/JSON but too wide or too internal for the terminal table
TABLE_HIDDEN = {"budget_bytes", "input_bytes", "predicted_bytes", "reason", "mixer_params",
                "time_complexity", "memory_complexity"}
ERROR_KEYS = ("max_abs_err", "rel_err", "error", "max_err")


def load_rows(paths) -> list[dict]:
    """Rows of every completed case in ``paths`` (ResultsError for an unusable file)."""
    rows = []
    labels = _labels(paths)
    for path, label in zip(paths, labels):
        with store.open_results(path) as f:
            for g in f["cases"].values():
                rows.append(_row(g, label))
    return rows


def _labels(paths) -> list[str]:
    stems = [os.path.splitext(os.path.basename(p))[0] for p in paths]
    return stems if len(set(stems)) == len(stems) else [os.fspath(p) for p in paths]


def _row(group, label: str) -> dict:
    attrs = group.attrs
    row = {"file": label, "case": int(attrs["index"]), "kind": str(attrs.get("kind", ""))}
    params = json.loads(attrs["params_json"])
    row.update(params)
    row["_params"] = tuple(params)
    row["ranks"] = int(group["ranks"][()]) if "ranks" in group else 1
    for key, obj in group.items():
        if key == "activations" or not hasattr(obj, "shape"):
            continue
        val = obj[()]
        if key in REDUCE:
            col, fn = REDUCE[key]
            row[col] = float(fn(np.asarray(val)))
        elif key in HIDDEN:
            continue
        elif isinstance(val, (bytes, str)):
            row[key] = val.decode() if isinstance(val, bytes) else val
        else:
            arr = np.asarray(val)
            if arr.dtype.kind == "b":
                row[key] = bool(arr.all())
            elif arr.dtype.kind in "iuf" and arr.size:
                row[key] = _num(arr.max() if arr.ndim else arr)
    for key, val in attrs.items():   # string results (a mixer's status, reason, complexity)
        if key not in BOOKKEEPING and not key.startswith("param_") and isinstance(val, str):
            row[key] = val
    return row


def _num(x):
    x = x.item() if hasattr(x, "item") else x
    return int(x) if isinstance(x, (int, np.integer)) else float(x)


def error_of(row: dict):
    for key in ERROR_KEYS:
        if row.get(key) is not None:
            return row[key]
    return None


# --- tables ---------------------------------------------------------------------------------

def varying(rows, keys) -> list[str]:
    return [k for k in keys if len({json.dumps(r.get(k), default=str) for r in rows}) > 1]


def param_names(rows) -> list[str]:
    """Parameter names (from the cases' parameter sets), in first-seen order."""
    return list(dict.fromkeys(k for r in rows for k in r["_params"]))


def columns(rows) -> list[str]:
    """Table columns: identity, seq_len/layout/mixer and the parameters that vary, then metrics."""
    if not rows:
        return []
    params = param_names(rows)
    metric_first = ["wall_s", "gflops", "mem_mib", "rss_mib", "max_abs_err", "check_passed"]
    metrics = [k for k in metric_first if any(k in r for r in rows)]
    ident = (["file"] if len({r["file"] for r in rows}) > 1 else []) + ["case"]
    shown = [k for k in ("mixer", "layout", "seq_len") if k in params] + varying(rows, params + ["ranks"])
    taken = set(ident) | set(shown) | set(metrics) | set(params) | {"kind", "file", "ranks"}
    extra = [k for k in all_columns(rows) if k not in taken and k not in TABLE_HIDDEN]
    return ident + list(dict.fromkeys(shown)) + metrics + extra


def sort_rows(rows, keys) -> list[dict]:
    def key(r):
        return tuple(_sort_key(r.get(k)) for k in keys) + (r["file"], r["case"])
    return sorted(rows, key=key)


def _sort_key(v):
    if v is None:
        return (2, "")
    if isinstance(v, (int, float, bool)):
        return (0, v)
    return (1, str(v))


def fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "NO"
    if isinstance(v, float):
        if v == 0 or math.isnan(v):
            return f"{v:g}"
        return f"{v:.3e}" if abs(v) < 1e-3 or abs(v) >= 1e6 else f"{v:.4g}"
    return str(v)


HEADERS = {"wall_s": "time_s", "mem_mib": "mem_MiB", "rss_mib": "rss_MiB", "check_passed": "check"}


def table(rows, cols, group_by=()) -> str:
    """Aligned text table; with ``group_by`` one block per group value, with a header line."""
    groups: dict = {}
    for r in rows:
        groups.setdefault(tuple(r.get(k) for k in group_by), []).append(r)
    cols = [c for c in cols if c not in group_by]
    heads = [HEADERS.get(c, c) for c in cols]
    cells = [[fmt(r.get(c)) for c in cols] for r in rows]
    width = [max([len(h)] + [len(row[i]) for row in cells]) for i, h in enumerate(heads)]
    right = [all(isinstance(r.get(c), (int, float)) or r.get(c) is None for r in rows) for c in cols]

    def line(vals):
        return "  ".join(v.rjust(w) if rj else v.ljust(w) for v, w, rj in zip(vals, width, right)).rstrip()

    out = []
    for gkey, grows in groups.items():
        if group_by:
            if out:
                out.append("")
            out.append(" ".join(f"{k}={fmt(v)}" for k, v in zip(group_by, gkey)))
        out.append(line(heads))
        out.extend(line([fmt(r.get(c)) for c in cols]) for r in grows)
    return "\n".join(out)


def to_csv(rows, cols) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({c: r.get(c) for c in cols})
    return buf.getvalue()


def all_columns(rows) -> list[str]:
    """Every public column (keys starting with '_' are bookkeeping)."""
    return list(dict.fromkeys(k for r in rows for k in r if not k.startswith("_")))


def public(rows) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows]


# --- figures --------------------------------------------------------------------------------

def series_keys(rows, x: str) -> list[str]:
    """What tells the lines apart: the mixer when there is one, else every varying parameter
    except the x axis and the seed (plus the file when comparing files)."""
    if any("mixer" in r for r in rows):
        base = ["mixer"]
    else:
        base = [k for k in varying(rows, param_names(rows))
                if k not in (x, "seed", "repeats", "check_rows", "tolerance")]
    if len({r["file"] for r in rows}) > 1:
        base = ["file"] + base
    return base


def plot(rows, path: str, *, x: str = "seq_len", series=None, title: str | None = None) -> list[str]:
    """The standard 2x2 figure: time, memory, GFLOP/s and error versus ``x`` (log-log), one line
    per series. Returns the panels that had data."""
    try:
        import matplotlib
    except ImportError:
        raise HpcattnError("--plot needs matplotlib, which is not installed; expected "
                           "pip install 'hpcattn[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if isinstance(r.get(x), (int, float))]
    if not rows:
        raise HpcattnError(f"no case has a numeric {x!r} to plot against; expected e.g. seq_len")
    series = series_keys(rows, x) if series is None else list(series)
    lines: dict = {}
    for r in rows:
        lines.setdefault(tuple(r.get(k) for k in series), []).append(r)
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    drawn = []
    for ax, (metric, ylabel, logy) in zip(axes.ravel(), PLOTS):
        any_data = False
        for skey, srows in sorted(lines.items(), key=lambda kv: tuple(map(_sort_key, kv[0]))):
            pts: dict = {}
            for r in srows:
                y = error_of(r) if metric == "error" else r.get(metric)
                if isinstance(y, (int, float)) and not isinstance(y, bool) and y > 0:
                    pts.setdefault(r[x], []).append(y)
            if not pts:
                continue
            xs = sorted(pts)
            ys = [float(np.median(pts[v])) for v in xs]
            name = ", ".join(f"{k}={fmt(v)}" for k, v in zip(series, skey)) or "all cases"
            ax.plot(xs, ys, marker="o", label=name)
            any_data = True
        ax.set_xlabel(x)
        ax.set_ylabel(ylabel)
        if any_data:
            ax.set_xscale("log", base=2)
            if logy:
                ax.set_yscale("log")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
            drawn.append(metric)
        else:
            ax.text(0.5, 0.5, f"no {ylabel.split(' (')[0]} recorded", ha="center", va="center",
                    transform=ax.transAxes, color="gray")
    fig.suptitle(title or "hpcattn results")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return drawn
