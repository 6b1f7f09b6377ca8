"""One mixer case, as the job runner calls it: ``run_mixer_case(case: dict) -> dict``.

Contract (the runner in ``hpcattn/runner.py`` relies on it)
----------------------------------------------------------
``case`` holds plain TOML values; ``MIXER_CASE_KEYS`` maps every allowed key to its type (the job
parser checks types and names bad keys), ``CASE_DEFAULTS`` gives the defaults, and
``check_mixer_case(case)`` checks the values and returns the case with every default filled in
(what the runner records and compares on resume). Keys:

- ``task``: "scaling" (time and peak memory), "recall" (associative-recall probe) or "error"
  (relative error against exact softmax attention on the same inputs);
- ``mixer``: a registry name (``hpcattn mixers list``);
- ``seq_len``, ``batch``, ``heads``, ``head_dim``, ``dtype`` ("float32"|"float64"), ``seed``,
  ``causal``, ``repeats`` (timed runs), ``memory_budget_mb`` (0 = no budget);
- recall only: ``distance`` (how far back the asked key sits), ``queries`` (per sequence),
  ``values`` (codewords; chance = 1/values), ``sharpness`` (score of the matching key);
- mixer parameters as flat keys (``window``, ``features``, ``rank``, ``landmarks``, ...): a key
  applies to the mixers that have a parameter of that name and is ignored by the others, so one
  sweep can mix families. ``seed`` also seeds the mixer's random features/projections/patterns.
  Python callers may pass ``params`` (a dict) instead.

The result is a flat dict: ``status`` ("ok", "over_budget", "unsupported" (the mixer lacks this
causal mode) or "not_applicable" (recall distance >= seq_len)) and ``reason`` (strings);
``predicted_bytes``, ``input_bytes``, ``budget_bytes``; when the mixer ran: ``wall_s`` (array,
one per repeat), ``peak_alloc_bytes`` (peak traced allocations during one apply, inputs
excluded: NumPy reports its buffers to tracemalloc), ``peak_rss_bytes``; task "error":
``rel_err`` (||y - y_exact||_F / ||y_exact||_F) and ``max_err`` (max |y - y_exact|); task
"recall": ``recall_accuracy``, ``chance``, ``queries``. Also ``time_complexity``,
``memory_complexity`` and ``mixer_params`` (JSON) describe the mixer.

Budget: a case whose predicted working memory (``Mixer.memory_bytes``) plus inputs exceeds the
budget, or (with or without a budget) the memory available on the host, is not run
("over_budget", nothing allocated); one that runs and whose measured peak plus
inputs exceeds it is recorded with its numbers and "over_budget". Single process: the runner
spreads cases over ranks.
"""
from __future__ import annotations

import json
import math
import time

import numpy as np

from .. import backend
from ..devices import MIXER_DTYPES
from ..errors import HpcattnError
from .. import footprint
from ..footprint import MAX_REPEATS
from ..inputs import random_qkv
from ..measure import peak_rss_bytes, traced_peak
from . import REGISTRY, get_mixer
from .recall import DEFAULTS as RECALL_DEFAULTS, recall_accuracy

TASKS = ("scaling", "recall", "error")

CASE_DEFAULTS = {
    "task": "scaling", "mixer": "exact_blockwise", "seq_len": 1024, "batch": 1, "heads": 2,
    "head_dim": 64, "dtype": "float32", "seed": 0, "causal": False, "repeats": 3,
    "memory_budget_mb": 1024.0, "distance": 1, **RECALL_DEFAULTS,
}
POSITIVE = ("seq_len", "batch", "heads", "head_dim", "repeats", "distance", "queries", "values")


def _mixer_param_types() -> dict[str, type]:
    kinds: dict[str, type] = {}
    for cls in REGISTRY.values():
        for key, spec in cls.params.items():
            kinds.setdefault(key, spec.kind or type(spec.default))
    return kinds


MIXER_PARAM_KEYS = {k: v for k, v in _mixer_param_types().items() if k not in CASE_DEFAULTS}
MIXER_CASE_KEYS: dict[str, type] = {**{k: type(v) for k, v in CASE_DEFAULTS.items()},
                                    **MIXER_PARAM_KEYS}


def check_mixer_case(case: dict) -> dict:
    """The case with defaults filled in; HpcattnError naming the first bad key or value."""
    for key in case:
        if key not in MIXER_CASE_KEYS and key != "params":
            raise HpcattnError(f"mixer case key {key!r} is unknown; expected one of "
                               f"{', '.join(MIXER_CASE_KEYS)}")
    full = {**CASE_DEFAULTS, **case}
    for key, val in full.items():
        kind = MIXER_CASE_KEYS.get(key)
        ok = (kind is None or (isinstance(val, kind) and not (kind is int and isinstance(val, bool)))
              or (kind is float and isinstance(val, int) and not isinstance(val, bool)))
        if not ok:
            raise HpcattnError(f"mixer case {key}={val!r} has type {type(val).__name__}; "
                               f"expected {kind.__name__}")
        if kind is float and not math.isfinite(val):   # nan passes every range check below
            raise HpcattnError(f"mixer case {key}={val!r} is not a finite number; expected a "
                               "finite number")
    for key in POSITIVE:
        if full[key] < 1:
            raise HpcattnError(f"mixer case {key}={full[key]!r} is invalid; expected a positive integer")
    if full["repeats"] > MAX_REPEATS:
        raise HpcattnError(f"mixer case repeats={full['repeats']!r} is too large; expected at most "
                           f"{MAX_REPEATS}")
    for key, allowed in (("task", TASKS), ("dtype", MIXER_DTYPES), ("mixer", tuple(REGISTRY))):
        if full[key] not in allowed:
            raise HpcattnError(f"mixer case {key}={full[key]!r} is unknown; expected one of "
                               f"{', '.join(allowed)}")
    for key in ("memory_budget_mb", "sharpness", "seed"):
        if full[key] < 0:
            raise HpcattnError(f"mixer case {key}={full[key]!r} is negative; expected >= 0")
    make_mixer(full)  # parameter values are checked by the mixer itself
    return full


def make_mixer(case: dict):
    cls = REGISTRY[case["mixer"]]
    params = {k: v for k, v in case.items() if k in cls.params and k in MIXER_CASE_KEYS}
    params.update(case.get("params") or {})
    return get_mixer(case["mixer"], **params)


def run_mixer_case(case: dict) -> dict:
    """Run one case (see the module docstring); returns the flat result dict."""
    case = check_mixer_case(case)
    mixer = make_mixer(case)
    n, b, h, d = case["seq_len"], case["batch"], case["heads"], case["head_dim"]
    itemsize = np.dtype(case["dtype"]).itemsize
    budget = int(case["memory_budget_mb"] * 2 ** 20)
    input_bytes = 3 * b * n * h * d * itemsize
    predicted = int(mixer.memory_bytes(n, b, h, d, itemsize))
    res = {"status": "ok", "reason": "", "predicted_bytes": predicted, "input_bytes": input_bytes,
           "budget_bytes": budget, "time_complexity": mixer.time_complexity,
           "memory_complexity": mixer.memory_complexity,
           "mixer_params": json.dumps(mixer.param_values, sort_keys=True)}
    causal = case["causal"]
    if causal not in mixer.causal_modes:
        return {**res, "status": "unsupported",
                "reason": f"{mixer.name} has no causal={str(causal).lower()} form"}
    if case["task"] == "recall" and case["distance"] >= n:
        return {**res, "status": "not_applicable",
                "reason": f"distance {case['distance']} >= seq_len {n}"}
    if budget and predicted + input_bytes > budget:
        return {**res, "status": "over_budget",
                "reason": f"predicted {(predicted + input_bytes) / 2**20:.0f} MiB > budget "
                          f"{case['memory_budget_mb']:g} MiB"}
    free, source = footprint.host_available()   # also without a budget: never start what cannot fit
    if free is not None and predicted + input_bytes > free:
        return {**res, "status": "over_budget",
                "reason": f"predicted {(predicted + input_bytes) / 2**20:.0f} MiB > "
                          f"{free / 2**20:.0f} MiB available ({source})"}
    if case["task"] == "recall":
        out, peak = traced_peak(lambda: recall_accuracy(
            mixer, n, case["distance"], causal=causal, batch=b, heads=h, head_dim=d,
            queries=case["queries"], values=case["values"], sharpness=case["sharpness"],
            seed=case["seed"], dtype=case["dtype"]))
        res.update(out)
    else:
        q, k, v = random_qkv(case["seed"], np.arange(n), b, h, h, d, case["dtype"])
        y, peak = traced_peak(lambda: mixer.apply(q, k, v, causal=causal))
        walls = []
        for _ in range(case["repeats"] if case["task"] == "scaling" else 0):
            t0 = time.perf_counter()
            mixer.apply(q, k, v, causal=causal)
            walls.append(time.perf_counter() - t0)
        if walls:
            res["wall_s"] = np.array(walls)
        if case["task"] == "error":
            res.update(output_error(y, q, k, v, causal))
    res["peak_alloc_bytes"] = int(peak)
    res["peak_rss_bytes"] = peak_rss_bytes()
    if budget and peak + input_bytes > budget:
        res["status"] = "over_budget"
        res["reason"] = f"measured {(peak + input_bytes) / 2**20:.0f} MiB > budget {case['memory_budget_mb']:g} MiB"
    return res


def output_error(y, q, k, v, causal) -> dict:
    """Error of ``y`` against exact softmax attention (blockwise, float64) on the same inputs."""
    f64 = [np.asarray(x, dtype=np.float64) for x in (q, k, v)]
    exact = backend.attention(*f64, causal=causal)[0]
    diff = np.asarray(y, dtype=np.float64) - exact
    return {"rel_err": float(np.linalg.norm(diff) / np.linalg.norm(exact)),
            "max_err": float(np.abs(diff).max())}
