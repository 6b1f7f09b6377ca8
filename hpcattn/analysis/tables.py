"""Rows as text: the aligned terminal table, CSV, and how values are formatted and sorted."""
from __future__ import annotations

import csv
import io
import math

from .rows import all_columns, param_names, printable, varying

# in CSV/JSON but too wide or too internal for the terminal table
TABLE_HIDDEN = {"budget_bytes", "input_bytes", "predicted_bytes", "mixer_params",
                "time_complexity", "memory_complexity"}
STATUS_COLUMNS = ("status", "reason", "damaged")   # damaged: data not intact (verify)


def columns(rows) -> list[str]:
    """Table columns: identity, seq_len/layout/mixer and the parameters that vary, then metrics."""
    if not rows:
        return []
    params = param_names(rows)
    metric_first = ["recall_accuracy", "rel_err", "wall_s", "gflops", "mem_mib", "rss_mib",
                    "max_abs_err", "check_passed"]
    metrics = [k for k in metric_first if any(k in r for r in rows)]
    ident = (["file"] if len({r["file"] for r in rows}) > 1 else []) + ["case"]
    shown = [k for k in ("mixer", "layout", "seq_len") if k in params] + varying(rows, params + ["ranks"])
    taken = set(ident) | set(shown) | set(metrics) | set(params) | {"kind", "file", "ranks"}
    extra = [k for k in all_columns(rows) if k not in taken and k not in TABLE_HIDDEN
             and k not in STATUS_COLUMNS]
    # last, so a long reason does not push the numbers apart; shown where a case has one
    status = [k for k in STATUS_COLUMNS if any(r.get(k) for r in rows)]
    return ident + list(dict.fromkeys(shown)) + metrics + extra + status


def sort_rows(rows, keys) -> list[dict]:
    def key(r):
        return tuple(sort_key(r.get(k)) for k in keys) + (r["file"], r["case"])
    return sorted(rows, key=key)


def sort_key(v):
    if v is None:
        return (2, "")
    if isinstance(v, (int, float, bool)):
        return (0, v)
    return (1, str(v))


def fmt(v) -> str:
    """A value as the terminal table shows it (control characters escaped: see ``printable``)."""
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "NO"
    if isinstance(v, float):
        if v == 0 or math.isnan(v):
            return f"{v:g}"
        return f"{v:.3e}" if abs(v) < 1e-3 or abs(v) >= 1e6 else f"{v:.4g}"
    return printable(v)



HEADERS = {"wall_s": "time_s", "mem_mib": "mem_MiB", "rss_mib": "rss_MiB", "check_passed": "check",
           "recall_accuracy": "recall", "result_queries": "n_scored"}


def table(rows, cols, group_by=()) -> str:
    """Aligned text table; with ``group_by`` one block per group value, with a header line."""
    groups: dict = {}
    for r in rows:
        groups.setdefault(tuple(r.get(k) for k in group_by), []).append(r)
    cols = [c for c in cols if c not in group_by]
    heads = [printable(HEADERS.get(c, c)) for c in cols]
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
            out.append(" ".join(f"{printable(k)}={fmt(v)}" for k, v in zip(group_by, gkey)))
        out.append(line(heads))
        out.extend(line([fmt(r.get(c)) for c in cols]) for r in grows)
    return "\n".join(out)


def to_csv(rows, cols) -> str:
    """Every column as CSV. The data is kept as it is, control characters included (a CSV file
    is data, not terminal output; escaping them is for whoever shows it on a terminal); a field
    holding a carriage return is quoted, so the file reads back the same."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore", lineterminator="\n")
    # the csv module quotes only the line terminator's characters; "\r" would split a record
    quoted = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore", lineterminator="\n",
                            quoting=csv.QUOTE_ALL)
    (quoted if any("\r" in str(c) for c in cols) else writer).writeheader()
    for r in rows:
        record = {c: r.get(c) for c in cols}
        cr = any(isinstance(v, str) and "\r" in v for v in record.values())
        (quoted if cr else writer).writerow(record)
    return buf.getvalue()

