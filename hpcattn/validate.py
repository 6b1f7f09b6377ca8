"""Input checks shared by the single-rank and ring paths (one-line messages), and the one place
that fills in attention's defaults (score scale, causal positions) for every kernel."""
from __future__ import annotations

import numpy as np

from .devices import CPU_DTYPES
from .errors import HpcattnError


def _library(x) -> str:
    """The array library ``x`` belongs to (``numpy``, ``cupy``, ...), by its type's module."""
    return type(x).__module__.partition(".")[0]


def check_qkv(q, k, v, *, check_finite: bool = True, allowed=None, xp=np, find_nonfinite=None) -> None:
    """Raise HpcattnError unless q/k/v are (batch, seq, heads, head_dim) arrays that fit together.

    ``allowed``: the dtype names accepted (default: the CPU kernels', ``devices.CPU_DTYPES``);
    ``xp``: the array module of q (the caller's backend), used for the finiteness check;
    ``find_nonfinite``: the backend's faster form of that check (see :func:`check_finite_array`).
    """
    for name, x in (("q", q), ("k", k), ("v", v)):
        if getattr(x, "ndim", None) != 4:
            raise HpcattnError(
                f"{name} has shape {tuple(getattr(x, 'shape', ()))}; expected 4 dimensions "
                "(batch, seq, heads, head_dim)")
    allowed = CPU_DTYPES if allowed is None else allowed
    for name, x in (("q", q), ("k", k), ("v", v)):
        if str(x.dtype) not in allowed:
            raise HpcattnError(f"{name} has dtype {x.dtype}; expected one of {', '.join(allowed)}")
        if _library(x) != _library(q):
            raise HpcattnError(f"{name} is a {type(x).__module__} array but q is not; expected one backend")
    if not (q.dtype == k.dtype == v.dtype):
        raise HpcattnError(f"q, k, v have dtypes {q.dtype}, {k.dtype}, {v.dtype}; expected one dtype")
    if k.shape != v.shape:
        raise HpcattnError(f"k has shape {k.shape} but v has {v.shape}; expected equal shapes")
    b, nq, h, d = q.shape
    if k.shape[0] != b:
        raise HpcattnError(f"k/v batch {k.shape[0]} differs from q batch {b}")
    if k.shape[3] != d:
        raise HpcattnError(f"k/v head_dim {k.shape[3]} differs from q head_dim {d}")
    hkv = k.shape[2]
    if hkv == 0 or h % hkv:
        raise HpcattnError(f"q has {h} heads and k/v {hkv}; expected q heads to be a multiple of k/v heads")
    if d == 0:
        raise HpcattnError("head_dim is 0; expected at least 1")
    if check_finite:
        for name, x in (("q", q), ("k", k), ("v", v)):
            check_finite_array(name, x, xp, find_nonfinite)


def check_finite_array(name, x, xp=np, find_nonfinite=None) -> None:
    """HpcattnError naming the first NaN or Inf of ``x``. ``find_nonfinite(x)``, where given:
    the flat index of the first one, -1 for none, or None where it does not apply to ``x``
    (then ``xp.isfinite`` decides)."""
    first = find_nonfinite(x) if find_nonfinite is not None and x.size else None
    if first is not None:
        if first < 0:
            return
        bad = tuple(int(i) for i in np.unravel_index(first, x.shape))
        raise HpcattnError(f"{name} contains NaN or Inf (first at index {bad}); expected finite values")
    if x.size and not bool(xp.isfinite(x).all()):
        bad = tuple(int(i) for i in xp.argwhere(~xp.isfinite(x))[0])
        raise HpcattnError(f"{name} contains NaN or Inf (first at index {bad}); expected finite values")


# --- attention's defaults, for every kernel (NumPy, CUDA, the CPU emulation of the CUDA kernels) --

def attention_scale(scale, head_dim: int) -> float:
    """The score scale: ``1/sqrt(head_dim)`` unless given; refuses a non-finite one."""
    scale = 1.0 / np.sqrt(head_dim) if scale is None else float(scale)
    if not np.isfinite(scale):
        raise ValueError(f"scale {scale} is not finite; expected a finite number")
    return scale


def causal_positions(q_pos, k_pos, n_q: int, n_k: int, xp=np):
    """int64 global positions of the query and key rows (default ``0..n-1``) as ``xp`` arrays."""
    q_pos = xp.arange(n_q, dtype=xp.int64) if q_pos is None else xp.asarray(q_pos, dtype=xp.int64)
    k_pos = xp.arange(n_k, dtype=xp.int64) if k_pos is None else xp.asarray(k_pos, dtype=xp.int64)
    if q_pos.shape != (n_q,) or k_pos.shape != (n_k,):
        raise ValueError(f"q_pos/k_pos have shapes {q_pos.shape}/{k_pos.shape}; expected ({n_q},)/({n_k},)")
    return q_pos, k_pos
