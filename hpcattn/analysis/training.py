"""Training cases (``kind = "train"``): their figures and their summary tables.

Figures (blocks of ``figures.Panel``): held-out accuracy vs the context window C per mixer, one
panel per task, with the achievable ceiling drawn as its own line and chance dashed; MQAR
accuracy vs model width per sequence length (Zoology's figure); training loss vs step per mixer
(at the largest width and window of each task). Tables: the same numbers as mixer x C and
mixer x width grids, printed after the case table by ``hpcattn analyze``.
"""
from __future__ import annotations

import numpy as np

from . import tables
from .figures import Block, Panel
from .rows import is_number
from .tables import fmt

CEILING = "ceiling (best achievable)"
WINDOW_TASKS = ("context", "local")


def is_train(row) -> bool:
    return row.get("kind") == "train"


def _with_window(rows):
    """Copies whose ``context`` is the window the model saw (0 in a job means all N tokens)."""
    return [{**r, "context": r.get("context_len", r.get("context"))} for r in rows
            if is_number(r.get("accuracy"))]


def _ceiling_rows(rows, x):
    """One pseudo-case per (task, seq_len, x) carrying the task's ceiling as its accuracy."""
    out = {}
    for r in rows:
        key = (r.get("task"), r.get("seq_len"), r.get(x))
        out.setdefault(key, {**r, "mixer": CEILING, "accuracy": r.get("ceiling"), "status": "ok"})
    return list(out.values())


def train_blocks(rows, x) -> list:
    blocks = []
    windowed = _with_window([r for r in rows if r.get("task") in WINDOW_TASKS])
    if windowed:
        panels = []
        for task in sorted({r["task"] for r in windowed}):
            trows = [r for r in windowed if r["task"] == task]
            chance = min(r["chance"] for r in trows)
            panels.append(Panel(key=f"accuracy ({task})", rows=trows + _ceiling_rows(trows, "context"),
                                value=lambda r: r.get("accuracy"), logy=False, ylim=(-0.03, 1.05),
                                ylabel="held-out accuracy", title=f"task {task}",
                                hline=(chance, f"chance = {chance:.3g}"), share="accuracy",
                                facets=("task", "seq_len", "width")))
        blocks.append(Block(x or "context", panels, min(2, len(panels)),
                            "accuracy vs context window C"))
    recall = [r for r in rows if r.get("task") == "mqar" and is_number(r.get("accuracy"))]
    if recall:
        panels = []
        for n in sorted({r["seq_len"] for r in recall}):
            nrows = [r for r in recall if r["seq_len"] == n]
            chance = min(r["chance"] for r in nrows)
            panels.append(Panel(key=f"mqar accuracy (N = {n})", rows=nrows,
                                value=lambda r: r.get("accuracy"), logy=False, ylim=(-0.03, 1.05),
                                ylabel="MQAR accuracy", title=f"MQAR, N = {n}",
                                hline=(chance, f"chance = {chance:.3g}"), share="mqar",
                                facets=("task", "seq_len")))
        blocks.append(Block("width", panels, min(3, len(panels)), "MQAR accuracy vs model width"))
    curves = _curve_rows(rows)
    if curves:
        panels = [Panel(key=f"loss ({title})", rows=crows, value=lambda r: r.get("loss"),
                        ylabel="training loss (cross-entropy)", title=title, logy=True,
                        share="loss", facets=("task", "seq_len", "width", "context"))
                  for title, crows in curves]
        blocks.append(Block("step", panels, min(3, len(panels)), "training loss"))
    return blocks


def _curve_rows(rows):
    """[(title, one row per curve point)] per task and seq_len, at its largest width and window."""
    out = []
    groups: dict = {}
    for r in rows:
        if "loss_curve" in r.get("_data", {}):
            groups.setdefault((r.get("task"), r.get("seq_len")), []).append(r)
    for (task, n), grows in sorted(groups.items(), key=lambda kv: tuple(map(str, kv[0]))):
        width = max(r.get("width", 0) for r in grows)
        window = max(r.get("context_len", 0) for r in grows)
        chosen = [r for r in grows if r.get("width", 0) == width and r.get("context_len", 0) == window]
        points = [{**r, "step": (i + 1) * r.get("log_every", 1), "loss": float(loss)}
                  for r in chosen for i, loss in enumerate(r["_data"]["loss_curve"])]
        out.append((f"{task}, N = {n}, width {width}, C = {window}", points))
    return out


def table(rows, cols, group_by=()) -> str:
    """``tables.table``, followed by the accuracy grids when there are training cases."""
    text = tables.table(rows, cols, group_by)
    grids = summary_tables(rows)
    return f"{text}\n\n{grids}" if grids else text


def summary_tables(rows) -> str:
    """Accuracy grids: mixer x context window per windowed task, mixer x width per MQAR length."""
    rows = [r for r in rows if is_train(r) and is_number(r.get("accuracy"))]
    parts = []
    windowed = _with_window([r for r in rows if r.get("task") in WINDOW_TASKS])
    for task in sorted({r["task"] for r in windowed}):
        trows = [r for r in windowed if r["task"] == task]
        parts.append(_grid(trows, "context", "C",
                           f"accuracy vs context window C, task {task} (N = "
                           f"{', '.join(map(str, sorted({r['seq_len'] for r in trows})))}; chance "
                           f"{fmt(min(r['chance'] for r in trows))})", ceiling=True))
    recall = [r for r in rows if r.get("task") == "mqar"]
    for n in sorted({r["seq_len"] for r in recall}):
        nrows = [r for r in recall if r["seq_len"] == n]
        parts.append(_grid(nrows, "width", "width", f"MQAR accuracy vs model width, N = {n} "
                           f"(chance {fmt(min(r['chance'] for r in nrows))})"))
    return "\n\n".join(parts)


def _grid(rows, key, label, heading, ceiling=False) -> str:
    xs = sorted({r[key] for r in rows})
    mixers = list(dict.fromkeys(r["mixer"] for r in rows))
    cell = {}
    for r in rows:   # several seeds: their mean
        cell.setdefault((r["mixer"], r[key]), []).append(r["accuracy"])
    lines = [[label] + [str(x) for x in xs]]
    lines += [[m] + [f"{np.mean(cell[m, x]):.3f}" if (m, x) in cell else "-" for x in xs]
              for m in mixers]
    if ceiling:
        ceil = {r[key]: r["ceiling"] for r in rows}
        lines.append([CEILING] + [f"{ceil[x]:.3f}" for x in xs])
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    text = ["  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(line, widths)))
            for line in lines]
    return "\n".join([heading] + text)
