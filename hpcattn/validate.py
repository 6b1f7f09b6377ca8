"""Input checks shared by the single-rank and ring paths (one-line messages)."""
from __future__ import annotations

import numpy as np

from .backend import array_module
from .errors import HpcattnError

CPU_DTYPES = ("float32", "float64")
GPU_DTYPES = ("float16", "bfloat16", "float32")


def check_qkv(q, k, v, *, check_finite: bool = True, allowed=None) -> None:
    """Raise HpcattnError unless q/k/v are (batch, seq, heads, head_dim) arrays that fit together."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if getattr(x, "ndim", None) != 4:
            raise HpcattnError(
                f"{name} has shape {tuple(getattr(x, 'shape', ()))}; expected 4 dimensions "
                "(batch, seq, heads, head_dim)")
    xp = array_module(q)
    if allowed is None:
        allowed = GPU_DTYPES if xp is not np else CPU_DTYPES
    for name, x in (("q", q), ("k", k), ("v", v)):
        if str(x.dtype) not in allowed:
            raise HpcattnError(f"{name} has dtype {x.dtype}; expected one of {', '.join(allowed)}")
        if array_module(x) is not xp:
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
            check_finite_array(name, x)


def check_finite_array(name, x) -> None:
    xp = array_module(x)
    if x.size and not bool(xp.isfinite(x).all()):
        bad = tuple(int(i) for i in xp.argwhere(~xp.isfinite(x))[0])
        raise HpcattnError(f"{name} contains NaN or Inf (first at index {bad}); expected finite values")
