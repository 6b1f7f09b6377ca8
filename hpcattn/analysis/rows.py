"""Reading results files back: one flat row per case.

A row holds the case's parameters (``seq_len``, ``layout``, ``mixer``...) and its metrics reduced
to one number each: ``wall_s`` (median over repeats of the slowest rank), ``gflops``,
``mem_mib`` (peak array memory of the busiest rank), ``rss_mib`` (peak resident set size of the
busiest rank), ``max_abs_err``; any other scalar result (e.g. a mixer's error or recall) is kept
under its own name, 1-D results by their maximum (the whole arrays stay in ``row["_data"]`` for
``plot(metrics=...)``), string results (a mixer case's ``status`` and ``reason``) as they are. A
result named like a parameter (a recall case's ``queries``: how many were scored) is kept as
``result_<name>`` so it never hides the parameter.
"""
from __future__ import annotations

import json
import os

import numpy as np

from ..results import open_results
from ..errors import HpcattnError

MIB = 2.0 ** 20
# result name -> (row column, reduction)
REDUCE = {"wall_s": ("wall_s", np.median), "peak_alloc_bytes": ("mem_mib", lambda a: np.max(a) / MIB),
          "peak_rss_bytes": ("rss_mib", lambda a: np.max(a) / MIB)}
HIDDEN = {"compute_s", "wait_s", "counts", "skipped_blocks", "elapsed_s", "rows", "tolerance",
          "max_lse_err", "max_rel_err", "ranks"}
BOOKKEEPING = {"index", "kind", "run", "completed_at", "params_json"}
ERROR_KEYS = ("max_abs_err", "rel_err", "error", "max_err")


def load_rows(paths) -> list[dict]:
    """Rows of every completed case in ``paths`` (ResultsError for an unusable file)."""
    rows = []
    labels = _labels(paths)
    for path, label in zip(paths, labels):
        with open_results(path) as f:
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
    row["_data"] = {}
    row["ranks"] = int(group["ranks"][()]) if "ranks" in group else 1
    for key, obj in group.items():
        if key == "activations" or not hasattr(obj, "shape"):
            continue
        val = obj[()]
        name = _result_name(row, key)
        if isinstance(val, (bytes, str)):
            row[name] = val.decode() if isinstance(val, bytes) else val
            continue
        arr = np.asarray(val)
        if arr.dtype.kind in "iuf" and arr.size:
            row["_data"][name] = arr
        if key in REDUCE:
            col, fn = REDUCE[key]
            row[col] = float(fn(arr))
        elif key in HIDDEN:
            continue
        elif arr.dtype.kind == "b":
            row[name] = bool(arr.all())
        elif arr.dtype.kind in "iuf" and arr.size:
            row[name] = _num(arr.max() if arr.ndim else arr)
    for key, val in attrs.items():   # string results (a mixer's status, reason, complexity)
        if key not in BOOKKEEPING and not key.startswith("param_") and isinstance(val, str):
            row[_result_name(row, key)] = val
    return row


def _result_name(row: dict, key: str) -> str:
    return f"result_{key}" if key in row["_params"] else key


def _num(x):
    x = x.item() if hasattr(x, "item") else x
    return int(x) if isinstance(x, (int, np.integer)) else float(x)


def error_of(row: dict):
    for key in ERROR_KEYS:
        if row.get(key) is not None:
            return row[key]
    return None



def varying(rows, keys) -> list[str]:
    return [k for k in keys if len({json.dumps(r.get(k), default=str) for r in rows}) > 1]


def param_names(rows) -> list[str]:
    """Parameter names (from the cases' parameter sets), in first-seen order."""
    return list(dict.fromkeys(k for r in rows for k in r["_params"]))



def all_columns(rows) -> list[str]:
    """Every public column (keys starting with '_' are bookkeeping)."""
    return list(dict.fromkeys(k for r in rows for k in r if not k.startswith("_")))


def public(rows) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows]



def metric_names(rows) -> list[str]:
    """Results ``plot(metrics=...)`` draws: numeric columns and recorded datasets, not parameters."""
    skip = set(param_names(rows)) | {"case", "ranks"}
    cols = [k for k in all_columns(rows) if any(is_number(r.get(k)) for r in rows)]
    return [k for k in dict.fromkeys(cols + [k for r in rows for k in r["_data"]]) if k not in skip]


def check_metrics(rows, metrics) -> None:
    """HpcattnError naming the first metric no case records as a number."""
    known = metric_names(rows)
    for m in metrics:
        if m in known or (m in param_names(rows) and any(is_number(r.get(m)) for r in rows)):
            continue
        seen = next((r[m] for r in rows if m in r), None)
        what = "is not recorded in these cases" if seen is None else f"is not numeric (e.g. {seen!r})"
        raise HpcattnError(f"--metric {m!r} {what}; expected one of {', '.join(known)}")


def metric_value(row: dict, key: str):
    """The samples of ``key`` in one case (a whole per-repeat/per-rank array where recorded)."""
    arr = row["_data"].get(key)
    if arr is not None:
        return arr
    val = row.get(key)
    return val if is_number(val) else None


def is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)

