"""The one template every token mixer follows, and the registry that lists them.

Every mixer maps a sequence to a sequence as ``y_i = sum_j P_ij v_j``. A mixer class states
what P is built from (its flags), what its efficient algorithm costs (complexity strings and a
``memory_bytes`` estimate), its parameters with defaults, and provides two forms:

- ``apply(q, k, v, causal=...)``: the efficient algorithm, layout (batch, seq, heads, head_dim);
- ``matrix(q, k, causal=...)``: the explicit (batch, heads, N, N) mixing matrix P for the given
  inputs (input-independent mixers use q/k only for their shape), the naive form.

``from_matrix(P, v)`` applies an explicit P the way the template says, so
``apply(q, k, v) == from_matrix(matrix(q, k), v)`` is the test every mixer passes. A mixer whose
values are transformed per token before mixing (FNet's hidden-dimension FFT) says so by
overriding ``_values``/``_output``; for all others they are the identity.

Subclasses implement ``_apply(q, k, v, causal)`` and ``_matrix(q, k, causal)`` on head-major
arrays (batch, heads, seq, head_dim) and register themselves with ``@register``.
"""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import numpy as np

from .. import backend
from ..devices import MIXER_DTYPES
from ..errors import HpcattnError
from ..validate import check_qkv

REGISTRY: dict[str, type["Mixer"]] = {}


@dataclasses.dataclass(frozen=True)
class Param:
    """One mixer parameter: default, one-line help, and what values are allowed."""
    default: Any
    help: str
    minimum: float | None = None
    choices: tuple | None = None
    kind: type | None = None   # default: type(default)

    def check(self, mixer: str, name: str, value):
        kind = self.kind or type(self.default)
        if kind is float and isinstance(value, (int, np.integer)) and not isinstance(value, bool):
            value = float(value)
        if kind is int and isinstance(value, np.integer):
            value = int(value)
        if value is None and self.default is None:
            return None
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise HpcattnError(f"{mixer} parameter {name}={value!r} has type {type(value).__name__}; "
                               f"expected {kind.__name__}")
        if self.minimum is not None and value < self.minimum:
            raise HpcattnError(f"{mixer} parameter {name}={value!r} is too small; expected >= {self.minimum}")
        if self.choices is not None and value not in self.choices:
            raise HpcattnError(f"{mixer} parameter {name}={value!r} is not allowed; expected one of "
                               f"{', '.join(map(str, self.choices))}")
        return value


SEED = Param(0, "seed of the random projections/features/patterns (reproducible)", minimum=0)


def register(cls):
    """Class decorator: add a mixer to the registry under ``cls.name``."""
    if cls.name in REGISTRY:
        raise ValueError(f"mixer {cls.name!r} registered twice")
    REGISTRY[cls.name] = cls
    return cls


def get_mixer(name: str, **params) -> "Mixer":
    """An instance of the registered mixer ``name`` with ``params`` (others at their defaults)."""
    cls = REGISTRY.get(name)
    if cls is None:
        raise HpcattnError(f"unknown mixer {name!r}; expected one of {', '.join(sorted(REGISTRY))}")
    return cls(**params)


class Mixer:
    """Base class. Class attributes describe the mixer; instances hold parameter values."""

    name: ClassVar[str]
    summary: ClassVar[str]                 # one line: what P is
    reference: ClassVar[str] = ""          # the paper
    time_complexity: ClassVar[str]         # of apply, N = seq, d = head_dim, per (batch, head)
    memory_complexity: ClassVar[str]       # extra memory of apply beyond inputs/output
    causal_modes: ClassVar[tuple] = (False, True)  # which ``causal`` values apply accepts
    inputs: ClassVar[str] = "qkv"          # "qkv"; "qv" (shared QK: k unused); "v" (P from params only)
    exact: ClassVar[bool] = False          # equals softmax attention up to rounding
    params: ClassVar[dict[str, Param]] = {}
    forms: ClassVar[tuple[str, ...]] = ()  # other forms ("_<form>" methods like _apply) that agree

    def __init__(self, **params):
        unknown = sorted(set(params) - set(self.params))
        if unknown:
            raise HpcattnError(f"{self.name} has no parameter {unknown[0]!r}; expected one of "
                               f"{', '.join(self.params) or '(none)'}")
        for key, spec in self.params.items():
            setattr(self, key, spec.check(self.name, key, params.get(key, spec.default)))

    def __repr__(self):
        args = ", ".join(f"{k}={getattr(self, k)!r}" for k in self.params)
        return f"{type(self).__name__}({args})"

    @property
    def param_values(self) -> dict:
        return {k: getattr(self, k) for k in self.params}

    # ---- public forms (layout batch, seq, heads, head_dim) ----
    def apply(self, q, k, v, *, causal: bool = False):
        """The efficient algorithm: returns y with the shape and dtype of v (heads of q)."""
        return self._run("_apply", q, k, v, causal)

    def matrix(self, q, k, *, causal: bool = False):
        """Explicit mixing matrix P, shape (batch, heads, N, N) (complex for Fourier mixing)."""
        qh, kh, _, xp = self._prepare(q, k, None, causal)
        return self._matrix(xp, qh, kh, causal)

    def form(self, name: str, q, k, v, *, causal: bool = True):
        """Another form of the same mixer (``name`` in ``forms``, e.g. "recurrent")."""
        if name not in self.forms:
            raise HpcattnError(f"mixer {self.name} has no form {name!r}; expected one of "
                               f"{', '.join(self.forms) or '(none)'}")
        return self._run("_" + name, q, k, v, causal)

    def from_matrix(self, p, v):
        """``y_i = sum_j P_ij v_j`` with an explicit P (and this mixer's per-token value maps)."""
        xp = backend.select(v).xp
        vh = xp.moveaxis(v, 2, 1)
        if vh.shape[1] != p.shape[1]:
            vh = xp.repeat(vh, p.shape[1] // vh.shape[1], axis=1)
        y = self._output(xp, p @ self._values(xp, vh))
        return xp.moveaxis(y.astype(v.dtype, copy=False), 1, 2)

    def memory_bytes(self, n: int, batch: int, heads: int, head_dim: int, itemsize: int) -> int:
        """Predicted peak extra bytes of ``apply`` (working arrays and output), for budgets."""
        return 4 * batch * heads * n * head_dim * itemsize

    # ---- hooks for subclasses (head-major arrays; ``xp``: their array module, chosen once) ----
    def _apply(self, xp, q, k, v, causal):
        raise NotImplementedError

    def _matrix(self, xp, q, k, causal):
        raise NotImplementedError

    def _values(self, xp, v):
        return v

    def _output(self, xp, y):
        return y

    # ---- helpers ----
    def _run(self, method, q, k, v, causal):
        qh, kh, vh, xp = self._prepare(q, k, v, causal)
        y = getattr(self, method)(xp, qh, kh, vh, causal)
        return xp.moveaxis(y.astype(v.dtype, copy=False), 1, 2)

    def _prepare(self, q, k, v, causal):
        """Validate and turn (b, n, h, d) inputs into head-major views (b, h, n, d); also
        returns their array module (the backend is chosen here, once per call)."""
        if causal not in self.causal_modes:
            modes = " or ".join(str(m).lower() for m in self.causal_modes)
            raise HpcattnError(f"mixer {self.name} does not support causal={str(causal).lower()}; "
                               f"expected causal={modes}")
        ref = next(x for x in (q, v, k) if x is not None)
        q = ref if q is None else q
        k = (q if self.inputs != "qkv" or k is None else k)
        xp = backend.select(q).xp
        check_qkv(q, k, k if v is None else v, allowed=MIXER_DTYPES, xp=xp)
        group = q.shape[2] // k.shape[2]

        def heads_major(x, repeat):
            x = xp.moveaxis(x, 2, 1)
            return xp.repeat(x, group, axis=1) if repeat and group > 1 else x

        return (heads_major(q, False), heads_major(k, self.inputs == "qkv"),
                None if v is None else heads_major(v, True), xp)

    def rng(self, *stream: int) -> np.random.Generator:
        """Seeded generator for one named stream of this mixer's randomness."""
        tag = sum(ord(c) << (8 * (i % 4)) for i, c in enumerate(self.name))
        return np.random.default_rng([int(getattr(self, "seed", 0)), tag, *map(int, stream)])

    @classmethod
    def describe(cls) -> dict:
        """Plain description (for ``hpcattn mixers list`` and result files)."""
        return {"name": cls.name, "summary": cls.summary, "reference": cls.reference,
                "time": cls.time_complexity, "memory": cls.memory_complexity,
                "causal_modes": [bool(m) for m in cls.causal_modes], "inputs": cls.inputs,
                "exact": cls.exact,
                "params": {k: {"default": p.default, "help": p.help} for k, p in cls.params.items()},
                "forms": ["apply", "matrix", *cls.forms]}


# ---- numerics shared by several families ----

def masked_softmax(xp, s, bias=None):
    """Row softmax of scores ``s`` (+ additive ``bias``, -inf hides a key) over the last axis.

    Works in place on ``s`` (callers pass a fresh score array: one N x N buffer, not five).
    Returns (p, lse); rows that see no key get p = 0 and lse = -inf.
    """
    if bias is not None:
        if s.shape == xp.broadcast_shapes(s.shape, bias.shape):
            s += bias
        else:
            s = s + bias
    m = s.max(axis=-1, keepdims=True)
    m = xp.where(xp.isfinite(m), m, 0).astype(s.dtype, copy=False)
    s -= m
    xp.exp(s, out=s)
    total = s.sum(axis=-1, keepdims=True)
    seen = total > 0
    s /= xp.where(seen, total, 1)
    with np.errstate(divide="ignore"):
        lse = xp.where(seen, xp.log(xp.where(seen, total, 1)) + m, -np.inf)[..., 0]
    return s, lse


def scores(q, k, scale=None):
    """Fresh (b, h, Nq, Nk) score array q k^T * scale (default 1/sqrt(d))."""
    s = q @ k.swapaxes(-1, -2)
    s *= scale or scale_of(q.shape[-1])
    return s


def causal_bias(n: int, xp, dtype, offset: int = 0):
    """(n, n) additive mask: 0 where key j <= query i (+offset), -inf above."""
    i = xp.arange(n)
    return xp.where(i[None, :] <= i[:, None] + offset, 0.0, -np.inf).astype(dtype)


def scale_of(d: int) -> float:
    return 1.0 / np.sqrt(d)


def as_xp(xp, x, like):
    """A NumPy array (our seeded randomness is drawn on the host) as an ``xp`` array of
    ``like``'s dtype."""
    return xp.asarray(np.asarray(x, dtype=like.dtype))
