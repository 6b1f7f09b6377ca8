"""The pass criterion for backward-kernel gradients, shared by the emulation and GPU tests.

Each of dq, dk, dv is compared with the float64 reference (``hpcattn.reference.naive_attention_backward``) by
its *scaled error* ``max|g - ref| / max(1, max|ref|)`` (relative to the gradient's size, and
absolute where the gradient is below 1, e.g. dq of a row with one key, exactly 0): float32
within 1e-5; float16/bfloat16 within twice the scaled error of a NumPy backward computed in that
precision (``lowprec_attention_backward``: FlashAttention's rule, as the forward's
``hpcattn.gpu.accuracy``), and never less than the float32 bound.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..reference import naive_attention_backward

FLOAT32_TOL = 1e-5
NAMES = ("dq", "dk", "dv")


def lowprec_attention_backward(q, k, v, out, lse, dout, *, causal, q_pos, k_pos, scale=None):
    """The FlashAttention-2 backward with every intermediate rounded to q's dtype (products
    accumulate in float32 and round their result, as fp16/bf16 GEMMs do): the error budget."""
    dtype = q.dtype

    def rnd(x):
        return x.astype(dtype).astype(np.float32)

    qf, kf, vf, of, gf = (np.asarray(x).astype(np.float32) for x in (q, k, v, out, dout))
    b, nq, h, d = q.shape
    nk, hkv = k.shape[1], k.shape[2]
    group = h // hkv
    kf, vf = np.repeat(kf, group, axis=2), np.repeat(vf, group, axis=2)
    scale = np.float32(1 / np.sqrt(d) if scale is None else scale)
    s = rnd(np.einsum("bqhd,bkhd->bhqk", qf, kf) * scale)
    lse = np.asarray(lse, dtype=np.float32)[..., None]  # (b, h, nq, 1); -inf: the row sees no key
    allowed = np.asarray(q_pos)[:, None] >= np.asarray(k_pos)[None, :] if causal else np.ones((nq, nk), bool)
    with np.errstate(over="ignore", invalid="ignore"):
        p = rnd(np.where(allowed & np.isfinite(lse), np.exp(s - lse), 0))
    dp = rnd(np.einsum("bqhd,bkhd->bhqk", gf, vf))
    delta = rnd((gf * of).sum(-1)).transpose(0, 2, 1)[..., None]
    ds = rnd(p * (dp - delta))
    dq = rnd(np.einsum("bhqk,bkhd->bqhd", ds, kf) * scale)
    dk = np.einsum("bhqk,bqhd->bkhd", ds, qf).reshape(b, nk, hkv, group, d).sum(3)
    dv = np.einsum("bhqk,bqhd->bkhd", p, gf).reshape(b, nk, hkv, group, d).sum(3)
    return dq, rnd(dk * scale), rnd(dv)


def scaled_error(got, ref) -> float:
    if not got.size:
        return 0.0
    return float(np.abs(got.astype(np.float64) - ref).max() / max(1.0, float(np.abs(ref).max())))


@dataclass
class GradVerdict:
    ok: bool
    errors: dict      # name -> scaled error
    budgets: dict     # name -> allowed scaled error
    detail: str

    def __str__(self):
        parts = ", ".join(f"{n} {self.errors[n]:.2e} (<= {self.budgets[n]:.2e})" for n in NAMES)
        return f"{'ok  ' if self.ok else 'FAIL'} {parts}{' ' + self.detail if self.detail else ''}"


def judge_backward(q, k, v, out, lse, dout, grads, *, causal=False, q_pos=None, k_pos=None,
                   scale=None) -> GradVerdict:
    """Compare kernel gradients ``(dq, dk, dv)`` (NumPy arrays) with the float64 reference."""
    ref = naive_attention_backward(q, k, v, dout, causal=causal, scale=scale, q_pos=q_pos, k_pos=k_pos)
    errors = {n: scaled_error(g, r) for n, g, r in zip(NAMES, grads, ref)}
    if str(q.dtype) == "float32":
        budgets = dict.fromkeys(NAMES, FLOAT32_TOL)
    else:
        low = lowprec_attention_backward(q, k, v, out, lse, dout, causal=causal, q_pos=q_pos, k_pos=k_pos,
                                         scale=scale)
        # never tighter than float32's bound: where the rounded reference happens to be exact
        # (one visible key: dS = P (dP - D) rounds to exactly 0) the kernel still rounds in float32
        budgets = {n: max(2 * scaled_error(g, r), FLOAT32_TOL) for n, g, r in zip(NAMES, low, ref)}
    problems = [f"{n} has non-finite values" for n, g in zip(NAMES, grads)
                if not np.isfinite(g.astype(np.float32)).all()]
    problems += [f"{n} has shape {g.shape}, expected {r.shape}" for n, g, r in zip(NAMES, grads, ref)
                 if g.shape != r.shape]
    ok = not problems and all(errors[n] <= budgets[n] for n in NAMES)
    return GradVerdict(ok, errors, budgets, "; ".join(problems))
