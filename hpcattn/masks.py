"""Attention masks in one place: causal (top-left or bottom-right), sliding windows and packed
variable-length sequences, answered from *global positions*.

A :class:`Mask` says, for a query at global position ``i`` and a key at ``j``, whether the key is
visible (:meth:`Mask.visible`), and for a whole (query tile x key tile) whether it is ``NONE``
(skip it), ``FULL`` (compute it unmasked) or ``PARTIAL`` (mask it per element), from the tiles'
min/max positions alone (:meth:`Mask.classify`); that is what lets kernels skip empty tiles and
the ring skip (or stop before) key blocks on any layout.

Semantics (FlashAttention's ``window_size`` and ``cu_seqlens``):

* ``shift`` aligns query ``i`` with key ``i + shift``: 0 for ``align="top-left"`` (torch SDPA's
  ``is_causal``, hpcattn's default), ``n_k - n_q`` for ``"bottom-right"`` (FlashAttention >= 2.1).
  With ``diag = j - i - shift`` a key is visible when ``-left <= diag <= right`` (``-1``: no bound
  on that side); ``causal`` is the window's right bound 0 (a causal window may say ``right`` 0 or
  -1, nothing else).
* ``cu_seqlens``: int array ``[0, c1, ..., N]``, strictly increasing; token ``t`` belongs to
  sequence ``s`` with ``cu[s] <= t < cu[s+1]``, and tokens never attend across sequences.
  Positions stay global (packed) positions: for two tokens of one sequence ``j - i`` is the same
  as with per-sequence positions, so causal and windows act per sequence; the layouts (zigzag,
  striped) balance the packed sequence as a whole, not each sequence. Packed sequences are
  self-attention: ``n_q == n_k``.

A mask is made unbound (:func:`make_mask`, structure checked) and bound to the global lengths
(:meth:`Mask.bind`, ``cu_seqlens`` checked against N). Errors are one-line HpcattnErrors naming
the value and what was expected.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace

import numpy as np

from .errors import HpcattnError

ALIGNS = ("top-left", "bottom-right")
NONE, PARTIAL, FULL = 0, 1, 2   # what a tile needs (Mask.classify)
NO_WINDOW = (-1, -1)


@dataclass(frozen=True, eq=False)
class Mask:
    """Which keys each query sees; see the module docstring. Build with :func:`make_mask`."""

    causal: bool = False
    window: tuple = NO_WINDOW
    cu_seqlens: np.ndarray | None = None     # int64, read-only
    align: str = "top-left"
    n_q: int | None = None                   # global lengths, once bound
    n_k: int | None = None

    # --- what the mask is -------------------------------------------------------------------

    @property
    def lo(self) -> int | None:
        """Smallest visible ``diag = j - i - shift`` (None: unbounded)."""
        return None if self.window[0] < 0 else -self.window[0]

    @property
    def hi(self) -> int | None:
        """Largest visible ``diag`` (None: unbounded)."""
        if self.causal:
            return 0
        return None if self.window[1] < 0 else self.window[1]

    @property
    def shift(self) -> int:
        if self.align == "top-left" or self.n_q is None:
            return 0
        return int(self.n_k) - int(self.n_q)

    @property
    def trivial(self) -> bool:
        """Every key visible to every query: no positions needed."""
        return self.lo is None and self.hi is None and self.cu_seqlens is None

    @property
    def plain_causal(self) -> bool:
        """Exactly what ``causal=True`` with top-left positions means (what every backend has)."""
        return self.causal and self.lo is None and self.cu_seqlens is None and self.shift == 0

    @property
    def extended(self) -> bool:
        """More than plain causal or nothing: a window, packed sequences or a shifted diagonal."""
        return not (self.trivial or self.plain_causal)

    def bind(self, n_q: int, n_k: int) -> Mask:
        """This mask for global lengths ``n_q``/``n_k``; HpcattnError when it cannot apply."""
        if self.cu_seqlens is not None:
            if n_q != n_k:
                raise HpcattnError(f"cu_seqlens with seqlen_q={n_q} != seqlen_k={n_k}; expected "
                                   "packed sequences only in self-attention (equal lengths)")
            if int(self.cu_seqlens[-1]) != n_k:
                raise HpcattnError(f"cu_seqlens ends at {int(self.cu_seqlens[-1])}; expected it to "
                                   f"end at the sequence length N={n_k}")
        return replace(self, n_q=int(n_q), n_k=int(n_k))

    def describe(self) -> str:
        parts = [f"causal {self.align}" if self.causal else "non-causal"]
        if self.window != NO_WINDOW:
            parts.append(f"window {self.window[0]},{self.window[1]}")
        if self.cu_seqlens is not None:
            parts.append(f"{len(self.cu_seqlens) - 1} packed sequences")
        return ", ".join(parts)

    def digest(self) -> str:
        """A short fingerprint: ranks compare it to agree on one mask."""
        h = hashlib.sha1(repr((self.causal, tuple(self.window), self.align)).encode())
        if self.cu_seqlens is not None:
            h.update(np.ascontiguousarray(self.cu_seqlens, dtype=np.int64).tobytes())
        return h.hexdigest()[:16]

    def visible_pairs(self) -> int:
        """How many (query, key) pairs of the bound mask are visible (the work a kernel that
        skips hidden pairs does), in O(n_q) time: per query, its window clipped to its sequence."""
        q = np.arange(self.n_q, dtype=np.int64)
        first = np.zeros(self.n_q, np.int64)
        stop = np.full(self.n_q, self.n_k, np.int64)
        if self.cu_seqlens is not None:
            seg = self.segment(q)
            first, stop = self.cu_seqlens[seg], self.cu_seqlens[seg + 1]
        if self.lo is not None:
            first = np.maximum(first, q + self.shift + self.lo)
        if self.hi is not None:
            stop = np.minimum(stop, q + self.shift + self.hi + 1)
        return int(np.maximum(stop - first, 0).sum())

    # --- answering it -----------------------------------------------------------------------

    def segment(self, pos):
        """Index of the packed sequence of each position (0 everywhere without cu_seqlens)."""
        pos = np.asarray(pos, dtype=np.int64)
        if self.cu_seqlens is None:
            return np.zeros(pos.shape, np.int64)
        return np.searchsorted(self.cu_seqlens, pos, side="right") - 1

    def visible(self, q_pos, k_pos) -> np.ndarray:
        """bool (len(q_pos), len(k_pos)): may query ``q_pos[a]`` see key ``k_pos[b]``?"""
        q_pos = np.asarray(q_pos, dtype=np.int64)
        k_pos = np.asarray(k_pos, dtype=np.int64)
        vis = np.ones((len(q_pos), len(k_pos)), dtype=bool)
        diag = k_pos[None, :] - (q_pos + self.shift)[:, None]
        if self.lo is not None:
            vis &= diag >= self.lo
        if self.hi is not None:
            vis &= diag <= self.hi
        if self.cu_seqlens is not None:
            vis &= self.segment(q_pos)[:, None] == self.segment(k_pos)[None, :]
        return vis

    def bias(self, q_pos, k_pos, dtype, out=None) -> np.ndarray:
        """Additive mask (0 visible, -inf hidden), (len(q_pos), len(k_pos)) of ``dtype``; adding it
        to a score tile is much cheaper than ``np.putmask`` (measured)."""
        hidden = ~self.visible(q_pos, k_pos)
        if out is None:
            out = np.empty(hidden.shape, dtype=dtype)
        out.fill(0)
        np.copyto(out, -np.inf, where=hidden)
        return out

    def classify(self, qmin, qmax, kmin, kmax) -> np.ndarray:
        """NONE/PARTIAL/FULL (int8) of tiles whose query positions lie in ``[qmin, qmax]`` and key
        positions in ``[kmin, kmax]`` (arrays broadcast together). Exact for NONE and FULL in the
        sense that matters: NONE only if no pair is visible, FULL only if every pair is."""
        qmin, qmax, kmin, kmax = (np.asarray(x, dtype=np.int64) for x in (qmin, qmax, kmin, kmax))
        shape = np.broadcast_shapes(qmin.shape, qmax.shape, kmin.shape, kmax.shape)
        none = np.zeros(shape, dtype=bool)
        full = np.ones(shape, dtype=bool)
        dmin = kmin - qmax - self.shift         # every pair's diag lies in [dmin, dmax]
        dmax = kmax - qmin - self.shift
        if self.lo is not None:
            none |= dmax < self.lo
            full &= dmin >= self.lo
        if self.hi is not None:
            none |= dmin > self.hi
            full &= dmax <= self.hi
        if self.cu_seqlens is not None:
            sq0, sq1, sk0, sk1 = (self.segment(x) for x in (qmin, qmax, kmin, kmax))
            none |= (sq1 < sk0) | (sk1 < sq0)
            full &= (sq0 == sq1) & (sk0 == sk1) & (sq0 == sk0)
        return np.where(none, NONE, np.where(full, FULL, PARTIAL)).astype(np.int8)

    def tile_classes(self, q_tiles, k_tiles) -> np.ndarray:
        """(len(q_tiles), len(k_tiles)) classes of tiles given as ``(start, stop, min, max)``."""
        if not len(q_tiles) or not len(k_tiles):
            return np.zeros((len(q_tiles), len(k_tiles)), np.int8)
        if self.trivial:
            return np.full((len(q_tiles), len(k_tiles)), FULL, np.int8)
        qt, kt = np.asarray(q_tiles, np.int64), np.asarray(k_tiles, np.int64)
        return self.classify(qt[:, 2, None], qt[:, 3, None], kt[None, :, 2], kt[None, :, 3])

    def any_visible(self, q_pos, k_pos, chunks: int = 16) -> bool:
        """Whether any key of ``k_pos`` may be visible to a query of ``q_pos`` (conservative:
        True unless every pair is provably hidden), from ``chunks`` pieces of each."""
        if not len(q_pos) or not len(k_pos):
            return False
        if self.trivial:
            return True
        return bool((self.tile_classes(chunk_bounds(q_pos, chunks),
                                       chunk_bounds(k_pos, chunks)) != NONE).any())


def chunk_bounds(pos, chunks: int):
    """``(start, stop, min, max)`` of about ``chunks`` equal pieces of the position array."""
    pos = np.asarray(pos, dtype=np.int64)
    return tile_bounds(len(pos), max(1, -(-len(pos) // max(1, chunks))), pos)


def tile_bounds(n: int, block: int, pos=None) -> list:
    """``(start, stop, min position, max position)`` of each tile of ``block`` of ``n`` rows;
    without positions (nothing masked) min = max = 0."""
    if n == 0:
        return []
    starts = np.arange(0, n, block)
    stops = np.minimum(starts + block, n)
    if pos is None:
        lo = hi = np.zeros_like(starts)
    else:
        lo, hi = np.minimum.reduceat(pos, starts), np.maximum.reduceat(pos, starts)
    return list(zip(starts.tolist(), stops.tolist(), lo.tolist(), hi.tolist()))


def _int(name, value) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise HpcattnError(f"{name}={value!r} is not an integer; expected an integer >= -1")
    return int(value)


def check_window(window) -> tuple:
    """``window`` as ``(left, right)`` ints >= -1 (None: ``(-1, -1)``, no window)."""
    if window is None:
        return NO_WINDOW
    try:
        left, right = window
    except (TypeError, ValueError):
        raise HpcattnError(f"window={window!r} is not a pair; expected (left, right) with -1 "
                           "meaning unbounded") from None
    left, right = _int("window left", left), _int("window right", right)
    for side, val in (("left", left), ("right", right)):
        if val < -1:
            raise HpcattnError(f"window {side}={val} is below -1; expected -1 (unbounded) or a "
                               "count of positions >= 0")
    return left, right


def check_cu_seqlens(cu_seqlens):
    """``cu_seqlens`` as a read-only int64 array ``[0, ..., N]``, strictly increasing."""
    if cu_seqlens is None:
        return None
    raw = np.asarray(cu_seqlens)
    if raw.ndim != 1 or raw.size < 2:
        raise HpcattnError(f"cu_seqlens has shape {raw.shape}; expected a 1-D array [0, ..., N] "
                           "of at least 2 entries")
    if raw.dtype.kind not in "iu":
        raise HpcattnError(f"cu_seqlens has dtype {raw.dtype}; expected integers")
    cu = raw.astype(np.int64)
    if cu[0] != 0:
        raise HpcattnError(f"cu_seqlens starts at {int(cu[0])}; expected 0")
    steps = np.diff(cu)
    if (steps <= 0).any():
        i = int(np.argmax(steps <= 0))
        raise HpcattnError(f"cu_seqlens is not strictly increasing (entry {i + 1} = {int(cu[i + 1])} "
                           f"after {int(cu[i])}); expected cumulative lengths of non-empty sequences")
    cu.setflags(write=False)
    return cu


def _ints(name, text, example):
    try:
        return [int(part) for part in str(text).split(",")]
    except ValueError:
        raise HpcattnError(f"{name}={text!r} is not a comma-separated list of integers; expected "
                           f"e.g. {example}") from None


def parse_window(text):
    """``"L,R"`` (the command line's and job files' form) as ``(left, right)``; None stays None."""
    if text is None:
        return None
    values = _ints("window", text, "4096,0")
    if len(values) != 2:
        raise HpcattnError(f"window={text!r} has {len(values)} numbers; expected LEFT,RIGHT "
                           "(e.g. 4096,0; -1 is unbounded)")
    return check_window(tuple(values))


def parse_cu_seqlens(text):
    """``"0,c1,...,N"`` as a checked int64 array; None stays None."""
    if text is None:
        return None
    return check_cu_seqlens(np.array(_ints("cu_seqlens", text, "0,1000,41000,65536"), np.int64))


def make_mask(causal: bool = False, window=None, cu_seqlens=None, align: str = "top-left") -> Mask:
    """A checked, unbound :class:`Mask` (bind it to the global lengths with ``bind``)."""
    if align not in ALIGNS:
        raise HpcattnError(f"align={align!r} is unknown; expected one of {', '.join(ALIGNS)}")
    window = check_window(window)
    if causal and window[1] > 0:
        raise HpcattnError(f"window right={window[1]} with causal; expected 0 or -1 (causal "
                           "queries see no later key)")
    return Mask(causal=bool(causal), window=window, cu_seqlens=check_cu_seqlens(cu_seqlens),
                align=align)


def resolve(mask, causal: bool, n_q: int | None = None, n_k: int | None = None) -> Mask:
    """The mask a kernel applies: ``mask`` (bound to ``n_q``/``n_k`` when given and it is not
    bound yet), else plain top-left ``causal`` (or nothing), which needs no lengths."""
    if mask is None:
        return Mask(causal=bool(causal))
    return mask.bind(n_q, n_k) if mask.n_q is None and n_q is not None else mask
