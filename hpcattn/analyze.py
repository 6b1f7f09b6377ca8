"""Reading results files back: one flat row per case, tables, CSV/JSON, and the standard figures.

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

import csv
import io
import json
import math
import os
from dataclasses import dataclass, field
from typing import Callable

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
TABLE_HIDDEN = {"budget_bytes", "input_bytes", "predicted_bytes", "mixer_params",
                "time_complexity", "memory_complexity"}
STATUS_COLUMNS = ("status", "reason")
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


HEADERS = {"wall_s": "time_s", "mem_mib": "mem_MiB", "rss_mib": "rss_MiB", "check_passed": "check",
           "recall_accuracy": "recall", "result_queries": "n_scored"}


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
#
# plot() builds a list of blocks, each a grid of panels sharing one x axis and one set of lines
# (series). Which blocks: by content (recall, mixer error, mixer scaling, attention cases), or the
# metrics asked for. Lines are told apart by every parameter that varies (the panels take some:
# causal, and seq_len or distance for recall), so two kinds of case are never drawn as one line;
# only the AGGREGATED keys are reduced (median, with the spread as a band) and the title says so.

AGGREGATED = ("seed", "repeats", "check_rows", "tolerance")
AXIS_LABELS = {"seq_len": "sequence length N (tokens)", "distance": "distance back to the key (tokens)"}
SHORT_NAMES = {"seq_len": "context length N", "distance": "distance back to the key"}
NAMED_BY_VALUE = ("file", "mixer", "layout")     # legend shows the value alone
MARKERS = "osD^vP*X<>ph"
NO_DATA_STATUS = ("ok", "not_applicable", "over_budget")   # other statuses are listed in the panel


@dataclass
class Panel:
    """One axes: ``value(row)`` (a number or an array of samples) versus the block's x."""
    key: str
    rows: list
    value: Callable
    ylabel: str
    title: str = ""
    logy: bool | None = True     # True: log unless the range is narrow; None: log over decades
    ylim: tuple | None = None
    hline: tuple | None = None   # (y, text)
    shade: tuple | None = None   # (x0, x1, text); None = the axis edge
    over: str | None = None      # over-budget cases not run: "predicted" memory, or "edge" marks
    share: str = ""              # panels with the same share key get the same axis ranges
    facets: tuple = ()           # the parameters that split the rows over panels


@dataclass
class Block:
    x: str
    panels: list
    ncols: int
    heading: str
    series: list = field(default_factory=list)


def series_keys(rows, x: str, facets=()) -> list[str]:
    """What tells the lines apart: the file when comparing files, the mixer when there is one,
    then every other parameter that varies except the x axis, the panel keys and AGGREGATED."""
    base = ["mixer"] if any("mixer" in r for r in rows) else []
    skip = {x, *facets, *AGGREGATED, *base}
    base += [k for k in varying(rows, param_names(rows)) if k not in skip]
    if len({r["file"] for r in rows}) > 1:
        base = ["file"] + base
    return base


def metric_names(rows) -> list[str]:
    """Results ``plot(metrics=...)`` draws: numeric columns and recorded datasets, not parameters."""
    skip = set(param_names(rows)) | {"case", "ranks"}
    cols = [k for k in all_columns(rows) if any(_is_number(r.get(k)) for r in rows)]
    return [k for k in dict.fromkeys(cols + [k for r in rows for k in r["_data"]]) if k not in skip]


def check_metrics(rows, metrics) -> None:
    """HpcattnError naming the first metric no case records as a number."""
    known = metric_names(rows)
    for m in metrics:
        if m in known or (m in param_names(rows) and any(_is_number(r.get(m)) for r in rows)):
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
    return val if _is_number(val) else None


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def plot(rows, path: str, *, x: str | None = None, series=None, metrics=(),
         title: str | None = None) -> list[str]:
    """Write the figure for ``rows`` to ``path`` and return the keys of the panels with data.

    With ``metrics``: one panel per metric versus ``x`` (default seq_len). Otherwise the standard
    figures by content: recall accuracy vs distance per (seq_len, causal) with chance level;
    mixer error vs N per causal mode; mixer time and peak memory vs N per causal mode (over-budget
    cases marked, the budget drawn); attention time, memory, GFLOP/s and error vs N."""
    plt = _pyplot()
    if metrics:
        blocks = [_metric_block(rows, x or "seq_len", metrics)]
    else:
        blocks = _standard_blocks(rows, x)
    for b in blocks:
        b.series = list(series) if series else series_keys(
            [r for p in b.panels for r in p.rows], b.x, _facets_of(b))
    ncols = max(b.ncols for b in blocks)
    nrows = sum(-(-len(b.panels) // b.ncols) for b in blocks)
    fig = plt.figure(figsize=(max(4.4 * ncols, 10), 3.5 * nrows + 0.6), layout="constrained")
    grid = fig.add_gridspec(nrows, ncols)
    style = _styles([r for b in blocks for p in b.panels for r in p.rows], blocks)
    drawn, handles, marks, row0, shared, placed = [], {}, {}, 0, {}, []
    for b in blocks:
        for i, panel in enumerate(b.panels):
            ax = fig.add_subplot(grid[row0 + i // b.ncols, i % b.ncols])
            if _draw_panel(ax, panel, b, style, handles, marks, ylabel=i % b.ncols == 0):
                drawn.append(panel.key)
                placed.append((ax, panel))
            shared.setdefault(panel.share or id(panel), []).append(ax)
        row0 += -(-len(b.panels) // b.ncols)
    for axes in shared.values():
        _same_range(axes)
    for ax, panel in placed:      # after the ranges are final: spans reach the axis edges
        _references(ax, panel, marks)
    if handles:
        legend_title = " / ".join(sorted({", ".join(b.series) for b in blocks if b.series}))
        fig.legend(list(handles.values()) + list(marks.values()), list(handles) + list(marks),
                   loc="outside right center", title=legend_title or None, fontsize=8,
                   title_fontsize=8)
    head = "; ".join(dict.fromkeys(b.heading for b in blocks))
    notes = _aggregated_note(rows, blocks)
    fig.suptitle(f"{title or 'hpcattn results'}: {head}" + (f"\n{notes}" if notes else ""),
                 fontsize=11)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return drawn


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise HpcattnError("--plot needs matplotlib, which is not installed; expected "
                           "pip install 'hpcattn[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _facets_of(block: Block) -> list[str]:
    return list(dict.fromkeys(k for p in block.panels for k in p.facets))


# --- which panels ---

def _standard_blocks(rows, x) -> list[Block]:
    kinds: dict = {}
    for r in rows:
        kinds.setdefault(_figure_kind(r), []).append(r)
    makers = {"recall": _recall_block, "error": _error_block, "scaling": _scaling_block,
              "attention": _attention_block}
    blocks = [makers[k](kinds[k], x) for k in makers if k in kinds]
    blocks = [b for b in blocks if b.panels]
    if not blocks:
        raise HpcattnError(f"no case has a numeric {x or 'seq_len'!r} to plot against; "
                           "expected e.g. seq_len")
    return blocks


def _figure_kind(row) -> str:
    task = row.get("task")
    if task == "recall" or "recall_accuracy" in row:
        return "recall"
    if row.get("kind") != "mixer":
        return "attention"
    if task == "error" or (task is None and "rel_err" in row and "wall_s" not in row):
        return "error"
    return "scaling"


def _numeric_x(rows, x: str) -> list:
    return [r for r in rows if _is_number(r.get(x))]


def _facet_groups(rows, facets):
    """[(title, facet values, rows)] sorted by the facet values (False before True)."""
    groups: dict = {}
    for r in rows:
        groups.setdefault(tuple(r.get(k) for k in facets), []).append(r)
    out = []
    for key in sorted(groups, key=lambda t: tuple(map(_sort_key, t))):
        out.append((", ".join(_facet_title(k, v) for k, v in zip(facets, key)), dict(zip(facets, key)),
                    groups[key]))
    return out


def _facet_title(key, val) -> str:
    if key == "causal":
        return "causal" if val else "non-causal"
    if key == "seq_len":
        return f"N = {fmt(val)}"
    return f"{key} = {fmt(val)}"


def _ncols(rows, facets) -> int:
    """Grid columns: the values of the last facet (the first facets make the grid's rows)."""
    n = len({json.dumps(r.get(facets[-1]), default=str) for r in rows}) if facets else 1
    return -(-n // -(-n // 4))       # at most 4 columns, rows evenly filled (6 -> 3)


def _faceted(rows, facets, specs) -> list[Panel]:
    """One panel per spec (Panel fields; ``per_facet(values, rows)`` adds fields per panel) and
    facet value; the specs make the grid's rows."""
    panels = []
    for spec in specs:
        fields = {k: v for k, v in spec.items() if k != "per_facet"}
        for ftitle, fvals, frows in _facet_groups(rows, facets):
            extra = spec["per_facet"](fvals, frows) if "per_facet" in spec else {}
            key = f"{spec['key']} ({ftitle})" if ftitle else spec["key"]
            panels.append(Panel(**{**fields, **extra, "key": key}, rows=frows, title=ftitle,
                                share=spec["key"], facets=tuple(facets)))
    return panels


def _recall_block(rows, x) -> Block:
    x = x or "distance"
    rows = _numeric_x(rows, x)
    other = "seq_len" if x == "distance" else "distance"
    facets = [k for k in ("causal", other) if k in varying(rows, ["causal", other])]
    chances = {r.get("chance") for r in rows if _is_number(r.get("chance"))}
    chance = (min(chances), f"chance = {min(chances):.3g}") if len(chances) == 1 else None

    def shade(fvals, frows):
        lim = fvals.get(other)
        if lim is None:
            return {}
        if x == "distance":      # distances >= N do not fit in the sequence
            return {"shade": (lim, None, "distance ≥ N: no case")}
        return {"shade": (None, lim, "N ≤ distance: no case")}
    panels = _faceted(rows, facets, [dict(
        key="recall_accuracy", value=lambda r: r.get("recall_accuracy"), logy=False,
        ylabel="recall accuracy (fraction correct)", ylim=(-0.03, 1.05), hline=chance,
        per_facet=shade)])
    return Block(x, panels, _ncols(rows, facets) if other in facets else min(2, len(panels)),
                 f"associative recall vs {SHORT_NAMES.get(x, x)}")


def _error_block(rows, x) -> Block:
    x = x or "seq_len"
    rows = _numeric_x(rows, x)
    facets = ["causal"] if "causal" in varying(rows, ["causal"]) else []
    rel = any("rel_err" in r for r in rows)
    label = "relative error ‖y − y_exact‖ / ‖y_exact‖" if rel else "max abs error vs exact"
    panels = _faceted(rows, facets, [dict(key="error", value=error_of, ylabel=label)])
    return Block(x, panels, max(1, len(panels)), "output error vs exact softmax attention")


def _scaling_block(rows, x) -> Block:
    x = x or "seq_len"
    rows = _numeric_x(rows, x)
    facets = ["causal"] if "causal" in varying(rows, ["causal"]) else []
    budgets = {r.get("memory_budget_mb") for r in rows}
    budget = None
    if len(budgets) == 1 and _is_number(b := budgets.pop()) and b > 0:
        budget = (b, f"budget {b:g} MiB (peak + inputs)")
    panels = _faceted(rows, facets, [
        dict(key="wall_s", value=lambda r: r.get("wall_s"), over="edge",
             ylabel="time per call (s, median of repeats)"),
        dict(key="mem_mib", value=lambda r: r.get("mem_mib"), over="predicted", hline=budget,
             ylabel="peak traced memory (MiB, inputs excluded)")])
    return Block(x, panels, max(1, len(panels) // 2), "mixer time and memory")


def _attention_block(rows, x) -> Block:
    x = x or "seq_len"
    rows = _numeric_x(rows, x)
    values = {"error": error_of}
    panels = [Panel(key=metric, rows=rows, ylabel=ylabel, logy=logy,
                    value=values.get(metric, lambda r, m=metric: r.get(m)))
              for metric, ylabel, logy in PLOTS] if rows else []
    return Block(x, panels, 2, "attention cases")


def _metric_block(rows, x, metrics) -> Block:
    rows = _numeric_x(rows, x)
    if not rows:
        raise HpcattnError(f"no case has a numeric {x!r} to plot against; expected e.g. seq_len")
    check_metrics(rows, metrics)
    panels = [Panel(key=m, rows=rows, value=lambda r, m=m: metric_value(r, m), ylabel=m,
                    logy=None) for m in metrics]
    return Block(x, panels, min(2, len(panels)), ", ".join(metrics) + f" vs {x}")


# --- drawing ---

def _styles(rows, blocks) -> dict:
    """Series label -> (colour, marker), the same in every panel; exact attention (the
    reference the others approximate) in black and grey."""
    import matplotlib

    tab10, tab20 = matplotlib.colormaps["tab10"].colors, matplotlib.colormaps["tab20"].colors
    colours = [c for c in tab10 + tab20[1::2] if len(set(c)) > 1]   # greys are for exact
    labels = []
    for b in blocks:
        for p in b.panels:
            labels += [_series_label(b.series, k) for k in _series_of(p.rows, b.series)]
    out, n_exact = {}, 0
    for i, lab in enumerate(dict.fromkeys(labels)):
        if lab.startswith("exact"):
            out[lab] = (("black", "0.5")[n_exact % 2], MARKERS[i % len(MARKERS)])
            n_exact += 1
        else:
            out[lab] = (colours[(i - n_exact) % len(colours)], MARKERS[i % len(MARKERS)])
    return out


def _series_of(rows, series) -> dict:
    lines: dict = {}
    for r in rows:
        lines.setdefault(tuple(r.get(k) for k in series), []).append(r)
    return dict(sorted(lines.items(), key=lambda kv: tuple(map(_sort_key, kv[0]))))


def _series_label(series, key) -> str:
    parts = [fmt(v) if k in NAMED_BY_VALUE else _facet_title(k, v) for k, v in zip(series, key)]
    return ", ".join(parts) or "all cases"


def _draw_panel(ax, panel: Panel, block: Block, style, handles, marks, *, ylabel=True) -> bool:
    import matplotlib.transforms as mtransforms

    x = block.x
    edge = mtransforms.blended_transform_factory(ax.transData, ax.transAxes)
    lines = _series_of(panel.rows, block.series)
    samples_all = [np.ravel(v) for r in panel.rows if (v := panel.value(r)) is not None]
    values = np.concatenate(samples_all) if samples_all else np.array([])
    # asked-for log axes still go linear over a narrow range (no wall of minor-tick labels)
    logy = panel.logy is not False and _wide(values, 3 if panel.logy else 30)
    xs_all, missing, zeros = set(), [], []
    for skey, srows in lines.items():
        label = _series_label(block.series, skey)
        colour, marker = style[label]
        pts: dict = {}
        for r in srows:
            v = panel.value(r)
            if v is not None and np.size(v):
                pts.setdefault(r[x], []).extend(np.ravel(v).tolist())
        xs = sorted(pts)
        if logy and (zero := [v for v in xs if np.median(pts[v]) <= 0]):
            # a log axis has no 0 (an exact mixer's error): a hollow mark on the bottom edge
            zeros.append(label)
            (h,) = ax.plot(zero, [0.03] * len(zero), ls="none", marker="v", mfc="none",
                           color=colour, transform=edge, clip_on=False)
            handles.setdefault(label, h)
            xs = [v for v in xs if v not in zero]
        med = [float(np.median(pts[v])) for v in xs]
        if xs:
            # the exact reference is drawn wide and underneath, so lines lying on it stay visible
            wide = label.startswith("exact")
            (h,) = ax.plot(xs, med, marker=marker, ms=5 if wide else 4.5, lw=2.6 if wide else 1.4,
                           color=colour, label=label, zorder=1.8 if wide else 2)
            handles.setdefault(label, h)
            xs_all.update(xs)
            lo, hi = [min(pts[v]) for v in xs], [max(pts[v]) for v in xs]
            if lo != hi:
                ax.fill_between(xs, lo, hi, color=colour, alpha=0.15, lw=0)
        _draw_over_budget(ax, panel, srows, x, xs, med, colour, marker, edge, marks)
        status = sorted({str(r.get("status")) for r in srows} - set(NO_DATA_STATUS))
        if not pts and status:
            missing.append((label, ", ".join(status)))
    any_data = bool(xs_all) or bool(zeros)
    ax.set_title(panel.title, fontsize=10)
    ax.set_xlabel(AXIS_LABELS.get(x, x))
    if ylabel or not panel.share:
        ax.set_ylabel(panel.ylabel, fontsize=9)
    if not any_data:
        ax.text(0.5, 0.5, f"no {panel.ylabel.split(' (')[0]} recorded", ha="center", va="center",
                transform=ax.transAxes, color="gray")
        return False
    _x_axis(ax, sorted({r[x] for r in panel.rows}))
    if logy:
        ax.set_yscale("log")
    if panel.ylim:
        ax.set_ylim(*panel.ylim)
    ax.grid(True, which="major", alpha=0.3)
    ax.set_title(_panel_title(panel.title, zeros, missing), fontsize=9)
    return True


def _panel_title(title, zeros, missing) -> str:
    """The facet, then in small print what the panel cannot show as a line."""
    notes = []
    if zeros:
        notes.append(f"▽ on the bottom edge = exactly 0: {', '.join(zeros)}")
    by_status: dict = {}
    for label, status in missing:
        by_status.setdefault(status, []).append(label)
    notes += [f"not run ({status}): {', '.join(labels)}" for status, labels in by_status.items()]
    return "\n".join([title] + notes) if title or notes else ""


def _references(ax, panel: Panel, marks) -> None:
    """The reference line (chance, budget) and the shaded range with no cases, in the legend."""
    if panel.hline:
        y, text = panel.hline
        ax.axhline(y, color="0.3", ls="--", lw=1, zorder=1)
        marks.setdefault(text, _proxy(ls="--", lw=1))
    if panel.shade:
        x0, x1, text = panel.shade
        lo, hi = ax.get_xlim()
        x0, x1 = lo if x0 is None else max(lo, x0), hi if x1 is None else min(hi, x1)
        if x0 < x1:
            ax.axvspan(x0, x1, color="0.88", lw=0, zorder=0)
            ax.set_xlim(lo, hi)
            from matplotlib.patches import Patch

            marks.setdefault(text, Patch(color="0.88"))


def _draw_over_budget(ax, panel, srows, x, xs, med, colour, marker, edge, marks) -> None:
    """Cases over the memory budget (not run): predicted memory as hollow marks on a dotted line
    from the last measured point, or a cross at the top edge of a time panel."""
    over = sorted({r[x] for r in srows if r.get("status") == "over_budget"} - set(xs))
    if not panel.over or not over:
        return
    if panel.over == "predicted":
        pred = {r[x]: r["predicted_bytes"] / MIB for r in srows
                if r.get("status") == "over_budget" and _is_number(r.get("predicted_bytes"))}
        px = [v for v in over if v in pred]
        if px:
            lead_x, lead_y = ([xs[-1]], [med[-1]]) if len(xs) else ([], [])
            (h,) = ax.plot(lead_x + px, lead_y + [pred[v] for v in px], ls=":", color=colour, lw=1.2)
            ax.plot(px, [pred[v] for v in px], ls="none", marker=marker, mfc="none", color=colour)
            marks.setdefault("over budget, not run: predicted memory",
                             _proxy(ls=":", marker="o", mfc="none"))
            return
    ax.plot(over, [0.97] * len(over), ls="none", marker="x", ms=7, mew=2, color=colour,
            transform=edge, clip_on=False)
    marks.setdefault("over budget, not run", _proxy(ls="none", marker="x", ms=7, mew=2))


def _proxy(**kw):
    from matplotlib.lines import Line2D

    return Line2D([], [], color="0.3", **kw)


def _wide(values, factor: float) -> bool:
    """Log scale: no negative values, and the positive ones span more than ``factor``."""
    v = values[np.isfinite(values)]
    pos = v[v > 0]
    return bool(pos.size) and (v >= 0).all() and pos.max() / pos.min() > factor


def _x_axis(ax, xs) -> None:
    import matplotlib.ticker as mticker

    xs = [v for v in xs if _is_number(v)]
    if xs and min(xs) > 0 and max(xs) / min(xs) >= 8:
        ax.set_xscale("log", base=2)
        ax.xaxis.set_minor_locator(mticker.NullLocator())
    if 1 < len(xs) <= 8:
        ax.xaxis.set_major_locator(mticker.FixedLocator(xs))
        ax.xaxis.set_major_formatter(mticker.FuncFormatter(lambda v, _: f"{v:g}"))
        if max(len(f"{v:g}") for v in xs) * len(xs) > 30:
            ax.tick_params(axis="x", labelrotation=35, labelsize=8)


def _same_range(axes) -> None:
    if len(axes) < 2:
        return
    for get, set_ in (("get_ylim", "set_ylim"), ("get_xlim", "set_xlim")):
        lims = [getattr(a, get)() for a in axes if a.has_data()]
        if lims:
            for a in axes:
                getattr(a, set_)(min(lo for lo, _ in lims), max(hi for _, hi in lims))


def _aggregated_note(rows, blocks) -> str:
    used = {k for b in blocks for k in b.series + [b.x] + _facets_of(b)}
    merged = [k for k in varying(rows, param_names(rows)) if k not in used]
    if not merged:
        return ""
    return "lines: median over " + ", ".join(merged) + " (band: their min to max)"
