"""Which figure a set of rows gets: blocks of panels, their facets, series and reference marks.

plot() builds a list of blocks, each a grid of panels sharing one x axis and one set of lines
(series). Which blocks: by content (recall, mixer error, mixer scaling, attention cases), or the
metrics asked for. Lines are told apart by every parameter that varies (the panels take some:
causal, and seq_len or distance for recall), so two kinds of case are never drawn as one line;
only the AGGREGATED keys are reduced (median, with the spread as a band) and the title says so.
Drawing them is ``draw.py``'s job.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Callable

from ..errors import HpcattnError
from .rows import check_metrics, error_of, is_number, metric_value, param_names, printable, varying
from .tables import fmt, sort_key

AGGREGATED = ("seed", "repeats", "check_rows", "tolerance")
AXIS_LABELS = {"seq_len": "sequence length N (tokens)", "distance": "distance back to the key (tokens)",
               "context": "context window C (tokens the model sees)", "width": "model width",
               "step": "training step"}
SHORT_NAMES = {"seq_len": "context length N", "distance": "distance back to the key"}
PLOTS = (("wall_s", "time per case (s)", True), ("mem_mib", "peak memory per rank (MiB)", True),
         ("gflops", "throughput (GFLOP/s)", True), ("error", "max abs error", True))


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



def facets_of(block: Block) -> list[str]:
    return list(dict.fromkeys(k for p in block.panels for k in p.facets))



def standard_blocks(rows, x) -> list[Block]:
    kinds: dict = {}
    for r in rows:
        kinds.setdefault(_figure_kind(r), []).append(r)
    makers = {"recall": _recall_block, "error": _error_block, "scaling": _scaling_block,
              "attention": _attention_block}
    blocks = [makers[k](kinds[k], x) for k in makers if k in kinds]   # (train: training.py)
    blocks = [b for b in blocks if b.panels]
    if not blocks:
        raise HpcattnError(f"no case has a numeric {x or 'seq_len'!r} to plot against; "
                           "expected e.g. seq_len")
    return blocks


def _figure_kind(row) -> str:
    if row.get("kind") == "train":
        return "train"
    task = row.get("task")
    if task == "recall" or "recall_accuracy" in row:
        return "recall"
    if row.get("kind") != "mixer":
        return "attention"
    if task == "error" or (task is None and "rel_err" in row and "wall_s" not in row):
        return "error"
    return "scaling"


def _numeric_x(rows, x: str) -> list:
    return [r for r in rows if is_number(r.get(x))]


def _facet_groups(rows, facets):
    """[(title, facet values, rows)] sorted by the facet values (False before True)."""
    groups: dict = {}
    for r in rows:
        groups.setdefault(tuple(r.get(k) for k in facets), []).append(r)
    out = []
    for key in sorted(groups, key=lambda t: tuple(map(sort_key, t))):
        out.append((", ".join(facet_title(k, v) for k, v in zip(facets, key)), dict(zip(facets, key)),
                    groups[key]))
    return out


def facet_title(key, val) -> str:
    if key == "causal":
        return "causal" if val else "non-causal"
    if key == "seq_len":
        return f"N = {fmt(val)}"
    return f"{printable(key)} = {fmt(val)}"


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
    chances = {r.get("chance") for r in rows if is_number(r.get("chance"))}
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
    if len(budgets) == 1 and is_number(b := budgets.pop()) and b > 0:
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


def metric_block(rows, x, metrics) -> Block:
    rows = _numeric_x(rows, x)
    if not rows:
        raise HpcattnError(f"no case has a numeric {x!r} to plot against; expected e.g. seq_len")
    check_metrics(rows, metrics)
    panels = [Panel(key=m, rows=rows, value=lambda r, m=m: metric_value(r, m), ylabel=m,
                    logy=None) for m in metrics]
    return Block(x, panels, min(2, len(panels)), ", ".join(metrics) + f" vs {x}")

