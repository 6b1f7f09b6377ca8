"""Windows, packed sequences and bottom-right causal on kernels that only know causal-by-positions.

The CUDA kernels mask one way: key ``j`` is visible to query ``i`` iff ``q_pos[i] >= k_pos[j]``
(or not at all). A ``hpcattn.masks.Mask`` is an intersection of up to three conditions on
``diag = j - i``: ``diag <= hi`` (the causal / right window bound), ``diag >= lo`` (the left
window bound) and "same packed sequence". This planner splits one masked call into calls in which
at most one bound is active, each of which the kernels can express:

* queries are sorted by position and cut into chunks that lie in one sequence and span at most
  ``hi - lo`` positions (so no key of a chunk is cut by both bounds);
* for a chunk with positions ``[qmin, qmax]`` the keys of its sequence split into a *lower*
  run ``[qmin+lo, qmax+lo)`` (only ``diag >= lo`` active: the kernel's causal test on negated
  positions, ``-j <= -(i+lo)``), a *plain* run ``[qmax+lo, qmin+hi]`` (every pair visible) and an
  *upper* run ``(qmin+hi, qmax+hi]`` (only ``diag <= hi``: ``j <= i+hi``); keys outside are hidden
  and never computed, so a window costs O(N·(w + chunk));
* the runs' ``(out, lse)`` are merged by log-sum-exp; the backward adds the runs' gradients
  (each computed against the global ``out`` and ``lse``, as the backward ring does).

Everything here is index arithmetic on the host plus slicing on ``xp`` (NumPy or CuPy); the
kernel is a parameter, so the NumPy blockwise kernel and the CUDA kernels (run on the GPU or under
``hpcattn.emulation``) are all tested through the same plan.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .merge import merge_lse

PLAIN, UPPER, LOWER = "plain", "upper", "lower"
#: widest query chunk (positions) when the mask leaves the choice free: big enough that
#: per-call overhead is small, small enough that an upper/lower run wastes little work
DEFAULT_SPAN = 1024


@dataclass(frozen=True)
class Run:
    """Keys ``k_sorted[start:stop]`` of one chunk, and which bound (if any) the kernel applies."""

    start: int
    stop: int
    kind: str


@dataclass(frozen=True)
class Chunk:
    """Queries ``q_sorted[start:stop]`` and the key runs they see."""

    start: int
    stop: int
    runs: tuple


@dataclass(frozen=True)
class Plan:
    q_order: np.ndarray     # q_sorted = q[:, q_order]
    k_order: np.ndarray
    q_sorted: np.ndarray    # positions, sorted
    k_sorted: np.ndarray
    lo: int | None          # bounds on j - i (the mask's shift folded in)
    hi: int | None
    chunks: tuple

    def kernel_positions(self, chunk: Chunk, run: Run):
        """``(q_pos, k_pos)`` for the kernel's causal test on this run (None for plain runs)."""
        qp = self.q_sorted[chunk.start:chunk.stop]
        kp = self.k_sorted[run.start:run.stop]
        if run.kind == UPPER:      # j <= i + hi
            return qp + self.hi, kp
        if run.kind == LOWER:      # j >= i + lo  <=>  -j <= -(i + lo)
            return -(qp + self.lo), -kp
        return None, None

    def pairs(self) -> int:
        """Query-key pairs the kernels are given (the work, before their own tile skipping)."""
        return sum((c.stop - c.start) * (r.stop - r.start) for c in self.chunks for r in c.runs)


def make_plan(mask, q_pos, k_pos, span: int = DEFAULT_SPAN) -> Plan:
    """The chunks and runs of a bound ``mask`` for queries at ``q_pos`` and keys at ``k_pos``
    (global positions, any order; NumPy integer arrays)."""
    q_pos = np.asarray(q_pos, dtype=np.int64)
    k_pos = np.asarray(k_pos, dtype=np.int64)
    q_order = np.argsort(q_pos, kind="stable")
    k_order = np.argsort(k_pos, kind="stable")
    qp, kp = q_pos[q_order], k_pos[k_order]
    lo = None if mask.lo is None else mask.lo + mask.shift
    hi = None if mask.hi is None else mask.hi + mask.shift
    limit = int(span) if lo is None or hi is None else max(0, min(int(span), hi - lo))
    cu = mask.cu_seqlens
    chunks = []
    s, n = 0, len(qp)
    while s < n:
        first, last = -np.inf, np.inf          # key positions of this chunk's sequence
        e = int(np.searchsorted(qp, qp[s] + limit, side="right"))
        if cu is not None:
            seq = int(np.searchsorted(cu, qp[s], side="right")) - 1
            first, last = int(cu[seq]), int(cu[seq + 1]) - 1
            e = min(e, int(np.searchsorted(qp, last, side="right")))
        qmin, qmax = int(qp[s]), int(qp[e - 1])
        plain_lo = first if lo is None else max(first, qmax + lo)
        plain_hi = last if hi is None else min(last, qmin + hi)
        ranges = []
        if lo is not None:
            ranges.append((max(first, qmin + lo), min(last, qmax + lo - 1), LOWER))
        ranges.append((plain_lo, plain_hi, PLAIN))
        if hi is not None:
            ranges.append((max(first, qmin + hi + 1), min(last, qmax + hi), UPPER))
        runs = []
        for a, b, kind in ranges:
            if a > b:
                continue
            ks = int(np.searchsorted(kp, a, side="left")) if a > -np.inf else 0
            ke = int(np.searchsorted(kp, b, side="right")) if b < np.inf else len(kp)
            if ks < ke:
                runs.append(Run(ks, ke, kind))
        chunks.append(Chunk(s, e, tuple(runs)))
        s = e
    return Plan(q_order, k_order, qp, kp, lo, hi, tuple(chunks))


def _lse_dtype(dtype):
    return np.float64 if np.dtype(dtype) == np.float64 else np.float32


def attention(attend, q, k, v, mask, *, scale=None, q_pos=None, k_pos=None, xp=np,
              span: int = DEFAULT_SPAN):
    """``(out, lse)`` of attention under ``mask`` (bound) by calls of
    ``attend(q, k, v, causal=, scale=, q_pos=, k_pos=) -> (out, lse)``, a kernel that masks by
    positions only. ``q_pos``/``k_pos``: global positions (default ``0..n-1``)."""
    b, nq, h, d = q.shape
    nk = k.shape[1]
    plan = make_plan(mask, np.arange(nq) if q_pos is None else q_pos,
                     np.arange(nk) if k_pos is None else k_pos, span)
    qo, ko = xp.asarray(plan.q_order), xp.asarray(plan.k_order)
    qs = xp.take(q, qo, axis=1)
    ks, vs = xp.take(k, ko, axis=1), xp.take(v, ko, axis=1)
    out = xp.zeros((b, nq, h, d), dtype=q.dtype)
    lse = xp.full((b, h, nq), -np.inf, dtype=_lse_dtype(q.dtype))
    for c in plan.chunks:
        acc = None
        for r in c.runs:
            qp, kp = plan.kernel_positions(c, r)
            o, l = attend(qs[:, c.start:c.stop], ks[:, r.start:r.stop], vs[:, r.start:r.stop],
                          causal=r.kind != PLAIN, scale=scale,
                          q_pos=None if qp is None else xp.asarray(qp),
                          k_pos=None if kp is None else xp.asarray(kp))
            l = l.astype(lse.dtype, copy=False)
            if acc is None:
                acc = (o.astype(q.dtype, copy=True), l.copy())
            else:
                merge_lse(acc[0], acc[1], o.astype(q.dtype, copy=False), l, xp)
        if acc is not None:
            out[:, c.start:c.stop] = acc[0]
            lse[:, :, c.start:c.stop] = acc[1]
    result, result_lse = xp.empty_like(out), xp.empty_like(lse)
    result[:, qo] = out
    result_lse[:, :, qo] = lse
    return result, result_lse


def attention_backward(attend_backward, q, k, v, out, lse, dout, mask, *, scale=None, q_pos=None,
                       k_pos=None, xp=np, span: int = DEFAULT_SPAN, out_dtype=None, **attend_kw):
    """``(dq, dk, dv)`` under ``mask`` by calls of ``attend_backward(q, k, v, out, lse, dout,
    causal=, scale=, q_pos=, k_pos=, **attend_kw)``; every run is differentiated against the
    global ``out`` and ``lse``, so the runs' gradients add up to the exact ones (summed in
    float32, float64 for float64). ``out_dtype``: the gradients' dtype (default the inputs')."""
    nq, nk = q.shape[1], k.shape[1]
    plan = make_plan(mask, np.arange(nq) if q_pos is None else q_pos,
                     np.arange(nk) if k_pos is None else k_pos, span)
    qo, ko = xp.asarray(plan.q_order), xp.asarray(plan.k_order)
    qs, os_, ds = (xp.take(x, qo, axis=1) for x in (q, out, dout))
    ls = xp.take(lse, qo, axis=2)
    ks, vs = xp.take(k, ko, axis=1), xp.take(v, ko, axis=1)
    acc = _lse_dtype(q.dtype)
    dq = xp.zeros(q.shape, dtype=acc)
    dk = xp.zeros(k.shape, dtype=acc)
    dv = xp.zeros(v.shape, dtype=acc)
    for c in plan.chunks:
        rows = slice(c.start, c.stop)
        for r in c.runs:
            keys = slice(r.start, r.stop)
            qp, kp = plan.kernel_positions(c, r)
            gq, gk, gv = attend_backward(qs[:, rows], ks[:, keys], vs[:, keys], os_[:, rows],
                                         ls[:, :, rows], ds[:, rows], causal=r.kind != PLAIN,
                                         scale=scale, q_pos=None if qp is None else xp.asarray(qp),
                                         k_pos=None if kp is None else xp.asarray(kp), **attend_kw)
            dq[:, rows] += gq
            dk[:, keys] += gk
            dv[:, keys] += gv
    grads = []
    for g, order, like in ((dq, qo, q), (dk, ko, k), (dv, ko, v)):
        dtype = like.dtype if out_dtype is None else np.dtype(out_dtype)
        back = xp.empty(g.shape, dtype=dtype)
        back[:, order] = g.astype(dtype, copy=False)
        grads.append(back)
    return tuple(grads)
