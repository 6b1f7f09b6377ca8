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

from ..results import ResultsError, case_name, open_results
from ..results import verify as verify_results
from ..results.format import MAX_FILE_RESULT_BYTES, check_result_dataset
from ..errors import HpcattnError

MIB = 2.0 ** 20
# result name -> (row column, reduction)
REDUCE = {"wall_s": ("wall_s", np.median), "peak_alloc_bytes": ("mem_mib", lambda a: np.max(a) / MIB),
          "peak_rss_bytes": ("rss_mib", lambda a: np.max(a) / MIB)}
HIDDEN = {"compute_s", "wait_s", "counts", "skipped_blocks", "elapsed_s", "rows", "tolerance",
          "max_lse_err", "max_rel_err", "ranks", "backward_compute_s", "backward_wait_s",
          "max_dq_rel_err", "max_dk_rel_err", "max_dv_rel_err", "loss_curve", "accuracy_curve"}
BOOKKEEPING = {"index", "kind", "run", "completed_at", "params_json", "record"}
ERROR_KEYS = ("max_abs_err", "rel_err", "error", "max_err")
# columns a row sets itself: a parameter of that name would overwrite them
RESERVED = ("file", "case", "kind", "ranks")
# Bounded reads: a result is per repeat or per rank (kilobytes). A dataset's size is its shape
# times its item size, known before reading; an 8 GiB fill-value dataset stores nothing on disk.


def load_rows(paths, *, verify: bool = True) -> list[dict]:
    """Rows of every completed case in ``paths`` (ResultsError, one line naming the file and
    what is wrong, for an unusable file; results are read only up to the bounds above).

    With ``verify`` (``hpcattn.results.verify``: activation files present and matching their
    recorded checksums) a case whose data is not intact gets a ``damaged`` column saying why;
    :func:`damage_report` lists them one line per case."""
    rows = []
    labels = _labels(paths)
    for path, label in zip(paths, labels):
        mine = []
        with open_results(path) as f:
            budget = [MAX_FILE_RESULT_BYTES]
            for name, g in f["cases"].items():
                mine.append(_row(g, label, f"{printable(path)}: /cases/{printable(name)}", budget))
        problems = dict(verify_results(path)) if verify else {}
        for row in mine:
            why = problems.get(row["case"]) or problems.get(None)
            if why:
                row["damaged"] = why
        rows += mine
    return rows


def damage_report(rows) -> list[str]:
    """'FILE: case_0003: activation file ... is missing', one line per damaged case."""
    return [printable(f"{r['file']}: {case_name(r['case'])}: {r['damaged']}") for r in rows
            if r.get("damaged")]


def _labels(paths) -> list[str]:
    stems = [os.path.splitext(os.path.basename(p))[0] for p in paths]
    return stems if len(set(stems)) == len(stems) else [os.fspath(p) for p in paths]


def printable(text) -> str:
    """``text`` with control characters (ESC, CR, BEL, C1 controls...) written as Python escapes,
    so what reaches a terminal cannot move its cursor, retitle or clear it."""
    text = str(text)
    return text if text.isprintable() else "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _text(val) -> str | None:
    if isinstance(val, bytes):
        return val.decode("utf-8", "replace")
    return val if isinstance(val, str) else None


def _params(attrs, where: str) -> dict:
    try:
        params = json.loads(_text(attrs.get("params_json")) or "")
    except (ValueError, RecursionError):
        params = None
    if not isinstance(params, dict):
        raise ResultsError(f"{where}: attribute params_json is not a JSON object; expected the "
                           "case's parameters as written by 'hpcattn run'")
    for key, val in params.items():
        if key in RESERVED or key.startswith("_"):
            raise ResultsError(f"{where}: parameter {printable(repr(key))} clashes with a column "
                               f"analyze sets itself ({', '.join(RESERVED)}, or a leading '_')")
        if isinstance(val, (list, dict)):    # hpcattn writes plain values; keep others as text
            params[key] = json.dumps(val, sort_keys=True)
    return params


def _dataset(obj, key: str, where: str, budget: list):
    """``obj[()]`` once :func:`hpcattn.results.format.check_result_dataset` accepts it."""
    check_result_dataset(obj, printable(key), where, budget)
    return obj[()]


def _row(group, label: str, where: str, budget: list) -> dict:
    attrs = group.attrs
    index = attrs.get("index")
    if isinstance(index, (bool, np.bool_)) or not isinstance(index, (int, np.integer)):
        raise ResultsError(f"{where}: attribute index is not an integer")
    row = {"file": label, "case": int(index), "kind": _text(attrs.get("kind")) or ""}
    params = _params(attrs, where)
    row.update(params)
    row["_params"] = tuple(params)
    row["_data"] = {}
    row["ranks"] = 1
    for key in group:
        link = group.get(key, getlink=True)
        if type(link).__name__ != "HardLink":
            raise ResultsError(f"{where}/{printable(key)} is a {type(link).__name__}; an hpcattn "
                               "results file has no links")
        obj = group[key]
        if key == "activations" or not hasattr(obj, "shape"):
            continue
        val = _dataset(obj, key, where, budget)
        name = _result_name(row, key)
        if isinstance(val, (bytes, str)):
            row[name] = _text(val)
            continue
        arr = np.asarray(val)
        if key == "ranks" and arr.dtype.kind in "iu" and arr.size == 1:
            row["ranks"] = int(arr.reshape(-1)[0])
            continue
        if arr.dtype.kind in "iuf" and arr.size:
            row["_data"][name] = arr
        if key in REDUCE and arr.dtype.kind in "iuf" and arr.size:
            col, fn = REDUCE[key]
            row[col] = float(fn(arr))
        elif key in HIDDEN:
            continue
        elif arr.dtype.kind == "b":
            row[name] = bool(arr.all())
        elif arr.dtype.kind in "iuf" and arr.size:
            row[name] = _num(arr.max() if arr.ndim else arr)
    for key, val in attrs.items():   # string results (a mixer's status, reason, complexity)
        text = _text(val)
        if key not in BOOKKEEPING and not key.startswith("param_") and text is not None:
            row[_result_name(row, key)] = text
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
        raise HpcattnError(printable(f"--metric {m!r} {what}; expected one of {', '.join(known)}"))


def metric_value(row: dict, key: str):
    """The samples of ``key`` in one case (a whole per-repeat/per-rank array where recorded)."""
    arr = row["_data"].get(key)
    if arr is not None:
        return arr
    val = row.get(key)
    return val if is_number(val) else None


def is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)

