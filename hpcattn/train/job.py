"""One training case, as the job runner calls it: ``run_train_case(case: dict) -> dict``.

``TRAIN_CASE_KEYS`` maps every allowed key to its type (the job parser checks names and types),
``CASE_DEFAULTS`` gives defaults, ``check_train_case(case)`` checks values and fills defaults
(what the runner records and compares on resume). Keys:

- ``task``: "mqar", "context" or "local" (``hpcattn.train.tasks``); ``mixer``: "exact" or a
  trainable registry mixer (``hpcattn.train.trainable_mixers``);
- ``seq_len``: N; ``context``: the window C the model sees (0 = N; context and local tasks);
  ``vocab``: vocabulary (mqar) or number of values (context, local); ``pairs``: mqar's kv pairs;
- model: ``width``, ``heads``, ``layers``; training: ``steps``, ``batch``, ``lr`` (Adam),
  ``seed``, ``eval_size`` (held-out sequences), ``log_every`` (steps per loss-curve point);
- mixer parameters as flat keys (``chunk``, ``hidden``, ...), as in mixer jobs.

Deterministic given the seed: torch and the data generator are seeded, torch runs one thread.
The result: ``accuracy`` (held-out), ``ceiling`` and ``chance`` of the task at this C,
``final_loss``, ``loss_curve`` / ``accuracy_curve`` (one point per ``log_every`` steps, train
batches), ``params`` (trainable parameters), ``flops`` (forward + backward of all steps: torch's
FlopCounterMode counts the matmuls, attention is counted by hpcattn's FlashAttention convention;
FFTs and elementwise work are not counted), ``wall_s`` and ``status``.
"""
from __future__ import annotations

import math
import os
import time

import numpy as np

from .._threads import KERNEL_THREADS_VAR
from ..errors import HpcattnError
from ..mixers.cases import MIXER_PARAM_KEYS
from . import trainable_mixers
from .tasks import TASKS, make_task

CASE_DEFAULTS = {
    "task": "mqar", "mixer": "exact", "seq_len": 64, "context": 0, "vocab": 32, "pairs": 4,
    "width": 32, "heads": 2, "layers": 2, "steps": 200, "batch": 32, "lr": 3e-3, "seed": 0,
    "eval_size": 512, "log_every": 10,
}
POSITIVE = ("seq_len", "vocab", "pairs", "width", "heads", "layers", "steps", "batch", "eval_size",
            "log_every")
MIXER_PARAMS = {k: v for k, v in MIXER_PARAM_KEYS.items() if k not in ("max_len", "seed")}
TRAIN_CASE_KEYS: dict[str, type] = {**{k: type(v) for k, v in CASE_DEFAULTS.items()}, **MIXER_PARAMS}


def check_train_case(case: dict) -> dict:
    """The case with defaults filled in; HpcattnError naming the first bad key or value."""
    for key in case:
        if key not in TRAIN_CASE_KEYS:
            raise HpcattnError(f"train case key {key!r} is unknown; expected one of "
                               f"{', '.join(TRAIN_CASE_KEYS)}")
    full = {**CASE_DEFAULTS, **case}
    for key, val in full.items():
        kind = TRAIN_CASE_KEYS[key]
        ok = (isinstance(val, kind) and not (kind is int and isinstance(val, bool))) or (
            kind is float and isinstance(val, int) and not isinstance(val, bool))
        if not ok:
            raise HpcattnError(f"train case {key}={val!r} has type {type(val).__name__}; "
                               f"expected {kind.__name__}")
    for key in POSITIVE:
        if full[key] < 1:
            raise HpcattnError(f"train case {key}={full[key]!r} is invalid; expected a positive integer")
    if not (math.isfinite(full["lr"]) and full["lr"] > 0):
        raise HpcattnError(f"train case lr={full['lr']!r} is invalid; expected a positive number")
    if full["seed"] < 0 or full["context"] < 0:
        raise HpcattnError(f"train case seed={full['seed']}, context={full['context']}: expected >= 0")
    if full["task"] not in TASKS:
        raise HpcattnError(f"train case task={full['task']!r} is unknown; expected one of {', '.join(TASKS)}")
    if full["context"] > full["seq_len"]:
        raise HpcattnError(f"train case context={full['context']} exceeds seq_len={full['seq_len']}; "
                           "expected context <= seq_len (0 = all of it)")
    if full["width"] % full["heads"]:
        raise HpcattnError(f"train case width={full['width']} is not a multiple of heads={full['heads']}")
    make_task(full)   # task parameters are checked by the task itself
    if full["mixer"] not in trainable_mixers():
        raise HpcattnError(f"train case mixer={full['mixer']!r} has no training form; expected one "
                           f"of {', '.join(trainable_mixers())}")
    _mixer_params(full)   # the mixer checks its parameter values
    return full


def _mixer_params(case: dict) -> dict:
    from ..mixers import REGISTRY
    cls = REGISTRY.get(case["mixer"])
    if cls is None:
        return {}
    params = {k: v for k, v in case.items() if k in cls.params and k in MIXER_PARAMS}
    cls(**params)
    return params


def run_train_case(case: dict) -> dict:
    """Train one model (see the module docstring); returns the flat result dict."""
    case = check_train_case(case)
    try:
        import torch
    except ImportError:
        raise HpcattnError("train jobs need PyTorch; expected pip install 'hpcattn[train]'") from None
    from .model import Model, loss_and_accuracy

    # one thread for torch and for hpcattn's kernels: deterministic, and what tiny tiles want
    # (the runner gives each rank its own cases; worker threads only contend)
    threads, workers = torch.get_num_threads(), os.environ.get(KERNEL_THREADS_VAR)
    torch.set_num_threads(1)
    os.environ[KERNEL_THREADS_VAR] = "1"
    try:
        return _train(torch, Model, loss_and_accuracy, case)
    finally:
        torch.set_num_threads(threads)
        if workers is None:
            os.environ.pop(KERNEL_THREADS_VAR, None)
        else:
            os.environ[KERNEL_THREADS_VAR] = workers


def _train(torch, Model, loss_and_accuracy, case):
    task = make_task(case)
    seq = case["context"] or case["seq_len"] if case["task"] != "mqar" else case["seq_len"]
    torch.manual_seed(case["seed"])
    rng = np.random.default_rng([case["seed"], 1])
    model = Model(case["mixer"], _mixer_params(case), vocab=task.vocab, seq_len=seq,
                  width=case["width"], heads=case["heads"], layers=case["layers"], seed=case["seed"])
    opt = torch.optim.Adam(model.parameters(), lr=case["lr"])
    eval_tokens, eval_targets = task.batch(np.random.default_rng([case["seed"], 2]), case["eval_size"])
    losses, accs = [], []
    t0 = time.perf_counter()
    flops_per_step = None
    for step in range(case["steps"]):
        tokens, targets = (torch.from_numpy(a) for a in task.batch(rng, case["batch"]))
        if flops_per_step is None:
            flops_per_step = _step_flops(torch, model, loss_and_accuracy, tokens, targets, case)
        loss, acc = loss_and_accuracy(model(tokens), targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if not math.isfinite(loss.item()):
            return {"status": "diverged", "reason": f"loss {loss.item()} at step {step}",
                    **_summary(model, task, losses, accs, time.perf_counter() - t0, 0.0, case)}
        losses.append(loss.item())
        accs.append(acc.item())
    wall = time.perf_counter() - t0
    with torch.no_grad():
        accuracy = sum(loss_and_accuracy(model(torch.from_numpy(eval_tokens[i:i + 64])),
                                         torch.from_numpy(eval_targets[i:i + 64]))[1].item()
                       * len(eval_tokens[i:i + 64]) for i in range(0, len(eval_tokens), 64))
    res = _summary(model, task, losses, accs, wall, flops_per_step * case["steps"], case)
    return {"status": "ok", "reason": "", **res, "accuracy": accuracy / len(eval_tokens)}


def _summary(model, task, losses, accs, wall, flops, case):
    every = case["log_every"]

    def curve(values):
        return np.array([np.mean(values[i:i + every]) for i in range(0, len(values), every)])
    return {"ceiling": float(task.ceiling), "chance": float(task.chance),
            "final_loss": float(np.mean(losses[-every:])) if losses else float("nan"),
            "loss_curve": curve(losses), "accuracy_curve": curve(accs),
            "params": int(sum(p.numel() for p in model.parameters())), "flops": float(flops),
            "wall_s": float(wall), "context_len": int(case["context"] or case["seq_len"])}


def _step_flops(torch, model, loss_and_accuracy, tokens, targets, case) -> float:
    """FLOPs of one forward + backward: the matmuls torch counts, plus exact attention's."""
    from torch.utils.flop_counter import FlopCounterMode

    from ..measure import attention_backward_flops, attention_flops

    counter = FlopCounterMode(display=False)
    with counter:
        loss_and_accuracy(model(tokens), targets)[0].backward()
    model.zero_grad()
    total = float(counter.get_total_flops())
    if case["mixer"] == "exact":
        b, n = tokens.shape
        shape = (b, n, case["heads"], case["width"] // case["heads"])
        total += case["layers"] * (attention_flops(*shape, causal=True)
                                   + attention_backward_flops(*shape, causal=True))
    return total
