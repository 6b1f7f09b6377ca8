"""Token-mixer zoo under one template: ``y_i = sum_j P_ij v_j`` (see ``base.py``).

``REGISTRY`` maps names to mixer classes; ``get_mixer(name, **params)`` makes one.
Every family lives in its own module; importing this package registers them all.
"""
from .base import REGISTRY, Mixer, Param, get_mixer, register
from . import softmax, sparse, linear, lowrank, reformer, fourier, ssm, retention  # noqa: F401  (register)
from . import learned, gated  # noqa: F401  (register: the trainable families)


def mixer_names() -> list[str]:
    """Registered names, in registration order (exact first, then the approximations)."""
    return list(REGISTRY)


__all__ = ["REGISTRY", "Mixer", "Param", "get_mixer", "register", "mixer_names"]
