"""Gradients of blockwise attention on one rank (NumPy), FlashAttention-2's backward.

Given the forward's ``out`` and log-sum-exp ``lse``, the softmax of a tile is recomputed as
``P = exp(S - lse)`` without any running max, so tiles are independent: ``D = rowsum(dout*out)``
once, then per (query tile x key tile) ``dv += Pᵀ dout``, ``dS = P ∘ (dout Vᵀ - D)``,
``dq += scale · dS K``, ``dk += scale · dSᵀ Q``. Memory is O(N·d) plus a few tiles; tiles the
mask (``hpcattn.masks``: causal, windows, packed sequences, by global positions) hides entirely
are skipped, fully visible ones get no mask, the others an additive 0/-inf tile.

The tricks of the forward apply (``blockwise.PartialAttention``): the g query heads of a kv head
are adjacent rows of one slab per (batch, kv head); the scale is folded into Q (so
``dk = dSᵀ (scale·Q)`` needs no scaling, and dq is scaled once at the end); ``-lse`` rides in an
extra column of Q against a column of ones in K, and ``-D`` in an extra column of dout against
ones in V, so a tile costs five GEMMs and two elementwise passes (exp, one multiply).
"""
from __future__ import annotations

import numpy as np

from .errors import HpcattnError
from .masks import PARTIAL, resolve, tile_bounds
from .validate import attention_scale, causal_positions, check_finite_array, check_qkv

# A (256 x 512) float32 tile is 512 KiB, and the backward keeps two (P and dS): about one
# core's L2. With GQA the g query heads of a kv head share the tile rows.
DEFAULT_BLOCK_ROWS = 256
DEFAULT_BLOCK_K = 512


def accumulator_dtype(dtype) -> np.dtype:
    """Where partial gradients live: float64 for float64 inputs, float32 for anything else."""
    return np.dtype(np.float64 if np.dtype(dtype) == np.float64 else np.float32)


def backward_input_error(q, k, v, out, lse, dout, *, check_finite: bool = True, allowed=None,
                         xp=np, find_nonfinite=None) -> str | None:
    """The one-line reason ``(q, k, v, out, lse, dout)`` cannot be differentiated, or None.

    ``allowed``/``xp``: the dtype names and array module of q's backend (default NumPy's), as
    ``validate.check_qkv`` takes them (with ``find_nonfinite``); every backend's backward checks
    its inputs here.
    """
    try:
        check_qkv(q, k, v, check_finite=check_finite, allowed=allowed, xp=xp,
                  find_nonfinite=find_nonfinite)
        b, nq, h, _ = q.shape
        for name, x, shape in (("out", out, q.shape), ("dout", dout, q.shape), ("lse", lse, (b, h, nq))):
            got = tuple(getattr(x, "shape", ()))
            if getattr(x, "ndim", None) is None or got != shape:
                raise HpcattnError(f"{name} has shape {got}; expected {shape} to match q {q.shape}")
        for name, x in (("out", out), ("dout", dout)):
            if x.dtype != q.dtype:
                raise HpcattnError(f"{name} has dtype {x.dtype}; expected q's dtype {q.dtype}")
            if type(x).__module__.partition(".")[0] != type(q).__module__.partition(".")[0]:
                raise HpcattnError(f"{name} is a {type(x).__module__} array but q is not; "
                                   "expected one backend")
        if str(lse.dtype) not in ("float32", "float64"):
            raise HpcattnError(f"lse has dtype {lse.dtype}; expected float32 or float64")
        if check_finite:
            check_finite_array("out", out, xp, find_nonfinite)
            check_finite_array("dout", dout, xp, find_nonfinite)
            if lse.size and not bool((xp.isfinite(lse) | (lse == -xp.inf)).all()):
                raise HpcattnError("lse contains NaN or +Inf; expected finite values or -inf "
                                   "(rows that see no key)")
    except HpcattnError as exc:
        return str(exc)
    return None


def attention_backward(q, k, v, out, lse, dout, *, causal: bool = False, scale: float | None = None,
                       q_pos=None, k_pos=None, block_q: int | None = None, block_k: int | None = None,
                       check_finite: bool = True, progress=None, mask=None):
    """Gradients ``(dq, dk, dv)`` of ``out = attention(q, k, v)`` given ``dout = dL/dout``.

    ``q``, ``out``, ``dout``: (batch, Nq, heads, head_dim); ``k``, ``v``: (batch, Nk, kv_heads,
    head_dim) with ``heads % kv_heads == 0``; ``lse``: (batch, heads, Nq) from the forward.
    ``dk``/``dv`` have the kv-head shape (the group's query heads summed) and every gradient
    has q's dtype; partial sums are float32 (float64 for float64 inputs). Rows with
    ``lse = -inf`` (no visible key) contribute nothing. ``mask`` (``hpcattn.masks.Mask``, bound
    to this call's lengths unless it is) replaces ``causal``.
    """
    if not isinstance(q, np.ndarray):
        raise HpcattnError(f"q is a {type(q).__module__} array; this backward runs on NumPy arrays "
                           "(hpcattn.attention_backward picks the backend)")
    err = backward_input_error(q, k, v, out, lse, dout, check_finite=check_finite)
    if err:
        raise HpcattnError(err)
    mask = resolve(mask, causal, q.shape[1], k.shape[1])
    state = BackwardState(q, out, lse, dout, k.shape[2], causal=causal, scale=scale, q_pos=q_pos,
                          block_q=block_q, block_k=block_k, mask=mask)
    dk, dv = state.block(k, v, k_pos=k_pos, progress=progress)
    return state.dq(), dk, dv


def _slabs(x, b, n, hkv, g):
    """(b, n, hkv*g, c) -> (b, hkv, n, g, c) view: the g heads of a kv head, row by row."""
    return x.reshape(b, n, hkv, g, -1).transpose(0, 2, 1, 3, 4)


class BackwardState:
    """What a rank keeps while key blocks pass by: ``[scale·q, -lse]``, ``[dout, -D]`` and the dq
    accumulator, one slab per (batch, kv head).

    ``block(k, v, k_pos)`` returns that block's ``(dk, dv)`` and adds its share to dq; ``dq()``
    gives dq when every block has been seen. The ring uses the packed forms: ``pack`` puts a
    block into a flat buffer of ``packed_size(n)`` elements of ``packed_dtype``, and
    ``add_block`` accumulates into a flat gradient buffer of ``grads_size(n)`` elements of
    ``acc_dtype`` (``unpack_grads`` reads it). The CUDA backend's state
    (``gpu.partial_backward.PerBlockBackward``) has the same interface.
    """

    def __init__(self, q, out, lse, dout, kv_heads, *, causal=False, scale=None, q_pos=None,
                 block_q=None, block_k=None, mask=None):
        b, nq, h, d = q.shape
        g = h // kv_heads
        self.b, self.nq, self.h, self.hkv, self.g, self.d = b, nq, h, kv_heads, g, d
        self.slabs = b * kv_heads
        self.dtype, self.acc_dtype = q.dtype, accumulator_dtype(q.dtype)
        self.packed_dtype = self.acc_dtype  # [k, 1] / [v, 1] feed float32/float64 GEMMs as they are
        self.mask = resolve(mask, causal)   # bound by the caller (the ring: global lengths)
        self.positioned = not self.mask.trivial
        self.scale = attention_scale(scale, d)
        self.q_pos = causal_positions(q_pos, None, nq, 0)[0] if self.positioned else None
        self.block_q = block_q or max(1, DEFAULT_BLOCK_ROWS // g)
        self.block_k = block_k or DEFAULT_BLOCK_K
        dt = self.acc_dtype
        qa = np.empty((b, kv_heads, nq, g, d + 1), dtype=dt)
        np.multiply(_slabs(q, b, nq, kv_heads, g), dt.type(self.scale), out=qa[..., :d])
        # lse (b, h, nq) -> (b, hkv, nq, g); rows that saw no key get -inf, so P = 0 there
        lse_s = lse.reshape(b, kv_heads, g, nq).transpose(0, 1, 3, 2)
        qa[..., d] = np.where(np.isneginf(lse_s), -np.inf, np.negative(lse_s))
        da = np.empty((b, kv_heads, nq, g, d + 1), dtype=dt)
        da[..., :d] = _slabs(dout, b, nq, kv_heads, g)
        da[..., d] = -np.einsum("...i,...i->...", da[..., :d], _slabs(out, b, nq, kv_heads, g).astype(dt, copy=False))
        self.qa = qa.reshape(self.slabs, nq * g, d + 1)
        self.da = da.reshape(self.slabs, nq * g, d + 1)
        self.dq_acc = np.zeros((self.slabs, nq * g, d), dtype=dt)
        self.q_tiles = tile_bounds(nq, self.block_q, self.q_pos)
        self._rows = min(self.block_q, max(nq, 1)) * g
        self._scratch = (0, None)

    # --- the packed forms the ring moves ---------------------------------------------------

    def packed_size(self, n: int) -> int:
        return 2 * self.slabs * n * (self.d + 1)

    def grads_size(self, n: int) -> int:
        return 2 * self.slabs * n * self.d

    def pack(self, k, v, buf):
        """``[k, 1]`` then ``[v, 1]``, each (slabs, n, d+1), into the flat ``buf``."""
        n, d = k.shape[1], self.d
        packed = buf[: self.packed_size(n)].reshape(2, self.b, self.hkv, n, d + 1)
        packed[0, ..., :d] = k.transpose(0, 2, 1, 3)
        packed[1, ..., :d] = v.transpose(0, 2, 1, 3)
        packed[..., d] = 1

    def unpack_grads(self, grads, n: int):
        """``(dk, dv)`` in the caller's layout (batch, n, kv_heads, d) and dtype."""
        g = grads[: self.grads_size(n)].reshape(2, self.b, self.hkv, n, self.d).transpose(0, 1, 3, 2, 4)
        return g[0].astype(self.dtype), g[1].astype(self.dtype)

    # --- computing ---------------------------------------------------------------------------

    def block(self, k, v, *, k_pos=None, progress=None):
        """``(dk, dv)`` of the key block ``k``, ``v`` (at global positions ``k_pos``); its share of
        dq is accumulated."""
        n = k.shape[1]
        buf = np.empty(self.packed_size(n), dtype=self.acc_dtype)
        self.pack(k, v, buf)
        grads = np.zeros(self.grads_size(n), dtype=self.acc_dtype)
        self.add_block(buf, n, k_pos, grads, progress)
        return self.unpack_grads(grads, n)

    def _tile_buffers(self, cols):
        """Preallocated P and dS tiles and the GEMM outputs, grown when a wider block arrives."""
        if self._scratch[0] < cols:
            rows, d, dt = self._rows, self.d, self.acc_dtype
            self._scratch = (cols, (np.empty(rows * cols, dt), np.empty(rows * cols, dt),
                                    np.empty(rows * cols, dt), np.empty((rows, d), dt),
                                    np.empty((cols, d), dt)))
        return self._scratch[1]

    def add_block(self, buf, n, k_pos, grads, progress=None):
        """Accumulate the key block packed in ``buf`` (``n`` keys at ``k_pos``) into ``grads``
        (flat, ``grads_size(n)``: dk then dv in slab form) and into dq."""
        d, g, mask = self.d, self.g, self.mask
        if self.positioned:
            k_pos = causal_positions(self.q_pos, k_pos, self.nq, n)[1]
        kv = buf[: self.packed_size(n)].reshape(2, self.slabs, n, d + 1)
        dkv = grads[: self.grads_size(n)].reshape(2, self.slabs, n, d)
        k_tiles = tile_bounds(n, self.block_k, k_pos if self.positioned else None)
        classes = mask.tile_classes(self.q_tiles, k_tiles)   # NONE tiles are never touched
        p_buf, ds_buf, bias_buf, tq, tk_full = self._tile_buffers(min(self.block_k, max(n, 1)))
        for j, (ks, ke, _, _) in enumerate(k_tiles):
            cols = ke - ks
            tk = tk_full[:cols]
            for i in np.flatnonzero(classes[:, j]):
                qs, qe = self.q_tiles[i][:2]
                r0, r1 = qs * g, qe * g
                p = p_buf[: (r1 - r0) * cols].reshape(r1 - r0, cols)
                ds = ds_buf[: (r1 - r0) * cols].reshape(r1 - r0, cols)
                bias = None
                if classes[i, j] == PARTIAL:
                    # one additive mask (0 or -inf) built once for every slab, since adding it
                    # costs a fifth of np.putmask
                    bias = mask.bias(np.repeat(self.q_pos[qs:qe], g), k_pos[ks:ke], self.acc_dtype,
                                     out=bias_buf[: (r1 - r0) * cols].reshape(r1 - r0, cols))
                for sl in range(self.slabs):
                    _tile(self.qa[sl, r0:r1], self.da[sl, r0:r1], kv[0, sl, ks:ke], kv[1, sl, ks:ke],
                          self.dq_acc[sl, r0:r1], dkv[0, sl, ks:ke], dkv[1, sl, ks:ke],
                          p, ds, tq[: r1 - r0], tk, bias, d)
                if progress is not None:
                    progress()

    def dq(self):
        """dq (batch, Nq, heads, d) in q's dtype, once every key block has been added."""
        dq = np.multiply(self.dq_acc, self.acc_dtype.type(self.scale))
        dq = dq.reshape(self.b, self.hkv, self.nq, self.g, self.d).transpose(0, 2, 1, 3, 4)
        return dq.reshape(self.b, self.nq, self.h, self.d).astype(self.dtype)


def _tile(qa, da, ka, va, dq, dk, dv, p, ds, tq, tk, bias, d):
    """One (query tile x key tile) of one slab: five GEMMs, exp and one multiply."""
    np.matmul(qa, ka.T, out=p)              # scale·q·kᵀ - lse
    if bias is not None:
        p += bias
    np.exp(p, out=p)                        # P
    np.matmul(da, va.T, out=ds)             # dout·vᵀ - D
    np.multiply(ds, p, out=ds)              # dS with respect to the scaled scores
    np.matmul(p.T, da[:, :d], out=tk)
    dv += tk
    np.matmul(ds.T, qa[:, :d], out=tk)      # Q already carries the scale
    dk += tk
    np.matmul(ds, ka[:, :d], out=tq)        # scaled once in dq()
    dq += tq
