"""Drawing the figure with matplotlib: one grid of panels per block, shared styles and legend."""
from __future__ import annotations

import numpy as np

from ..errors import HpcattnError
from .figures import (AXIS_LABELS, Block, Panel, facet_title, facets_of, metric_block, series_keys,
                      standard_blocks)
from .rows import MIB, is_number, param_names, varying
from .tables import fmt, sort_key
from .training import CEILING, is_train, train_blocks

NAMED_BY_VALUE = ("file", "mixer", "layout")     # legend shows the value alone
MARKERS = "osD^vP*X<>ph"
NO_DATA_STATUS = ("ok", "not_applicable", "over_budget")   # other statuses are listed in the panel


def plot(rows, path: str, *, x: str | None = None, series=None, metrics=(),
         title: str | None = None) -> list[str]:
    """Write the figure for ``rows`` to ``path`` and return the keys of the panels with data.

    With ``metrics``: one panel per metric versus ``x`` (default seq_len). Otherwise the standard
    figures by content: recall accuracy vs distance per (seq_len, causal) with chance level;
    mixer error vs N per causal mode; mixer time and peak memory vs N per causal mode (over-budget
    cases marked, the budget drawn); attention time, memory, GFLOP/s and error vs N."""
    plt = _pyplot()
    if metrics:
        blocks = [metric_block(rows, x or "seq_len", metrics)]
    else:
        others = [r for r in rows if not is_train(r)]
        blocks = (standard_blocks(others, x) if others else []) + train_blocks(
            [r for r in rows if is_train(r)], x)
    for b in blocks:
        b.series = list(series) if series else series_keys(
            [r for p in b.panels for r in p.rows], b.x, facets_of(b))
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
        elif lab == CEILING:   # a training task's best achievable accuracy: a reference, not a mixer
            out[lab] = ("0.75", "_")
        else:
            out[lab] = (colours[(i - n_exact) % len(colours)], MARKERS[i % len(MARKERS)])
    return out


def _series_of(rows, series) -> dict:
    lines: dict = {}
    for r in rows:
        lines.setdefault(tuple(r.get(k) for k in series), []).append(r)
    return dict(sorted(lines.items(), key=lambda kv: tuple(map(sort_key, kv[0]))))


def _series_label(series, key) -> str:
    parts = [fmt(v) if k in NAMED_BY_VALUE else facet_title(k, v) for k, v in zip(series, key)]
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
                if r.get("status") == "over_budget" and is_number(r.get("predicted_bytes"))}
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

    xs = [v for v in xs if is_number(v)]
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
    used = {k for b in blocks for k in b.series + [b.x] + facets_of(b)}
    merged = [k for k in varying(rows, param_names(rows)) if k not in used]
    if not merged:
        return ""
    return "lines: median over " + ", ".join(merged) + " (band: their min to max)"
