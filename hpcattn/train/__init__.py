"""Training small models on synthetic long-range tasks (the optional ``train`` extra: PyTorch).

- ``tasks``: the data (NumPy, seeded): MQAR, the "does long context help" task (known ceiling
  at every context window), a local task where long context does not help;
- ``model``: embedding + positions, L blocks of [mixer + MLP] with residuals and norms, readout;
  the mixer is any trainable registry mixer, run by its own ``_apply`` under torch autograd, or
  exact attention through ``hpcattn.torch`` (hpcattn's own blockwise backward);
- ``job``: one training case as the job runner calls it (``kind = "train"`` job files).

Only ``model`` and ``job.run_train_case`` import torch: checking a job file does not need it.
"""

EXACT = "exact"   # hpcattn's exact attention with its own backward (hpcattn.torch)


def trainable_mixers() -> list[str]:
    """Names a model can train: exact attention and every mixer written for any array namespace
    (``hpcattn.mixers.learned.Learned``: learned weights, torch-runnable code)."""
    from ..mixers import REGISTRY
    from ..mixers.learned import Learned

    return [EXACT] + [n for n, c in REGISTRY.items() if issubclass(c, Learned)]
