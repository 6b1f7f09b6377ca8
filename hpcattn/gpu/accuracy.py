"""The pass criterion for kernel outputs, shared by the emulation tests, the GPU tests and
``python -m hpcattn.gpu.check``: against the float64 reference, float32 within 1e-5 and
float16/bfloat16 within twice the error of a NumPy reference computed in that precision
(FlashAttention's rule); lse (always float32) within 1e-5; rows that see no key exactly 0/-inf."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..reference import naive_attention

FLOAT32_TOL = 1e-5
LSE_TOL = 1e-5


def lowprec_attention(q, k, v, *, causal, q_pos, k_pos, scale=None):
    """Attention with every intermediate rounded to q's dtype (matmuls accumulate in float32 and
    round their result, as fp16/bf16 GEMMs do): the error budget of a low-precision reference."""
    dtype = q.dtype

    def rnd(x):
        return x.astype(dtype).astype(np.float32)

    qf, kf, vf = (x.astype(np.float32) for x in (q, k, v))
    g = q.shape[2] // k.shape[2]
    kf, vf = np.repeat(kf, g, axis=2), np.repeat(vf, g, axis=2)
    scale = np.float32(1 / np.sqrt(q.shape[3]) if scale is None else scale)
    s = rnd(np.einsum("bqhd,bkhd->bhqk", rnd(qf * scale), kf))
    if causal:
        s = np.where(np.asarray(q_pos)[:, None] >= np.asarray(k_pos)[None, :], s, -np.inf)
    m = s.max(-1, keepdims=True)
    p = rnd(np.exp(s - np.where(np.isfinite(m), m, 0)))
    l = rnd(p.sum(-1, keepdims=True))
    with np.errstate(invalid="ignore", divide="ignore"):
        o = rnd(np.einsum("bhqk,bkhd->bqhd", p, vf))
        return rnd(o / np.where(l > 0, l, 1).transpose(0, 2, 1, 3))


@dataclass
class Verdict:
    ok: bool
    err: float        # max |out - reference|
    budget: float     # allowed max error
    lse_err: float
    detail: str

    def __str__(self):
        return f"{'ok  ' if self.ok else 'FAIL'} out err {self.err:.2e} (<= {self.budget:.2e}), " \
               f"lse err {self.lse_err:.2e}{' ' + self.detail if self.detail else ''}"


def judge(q, k, v, out, lse, *, causal=False, q_pos=None, k_pos=None, scale=None) -> Verdict:
    """Compare kernel outputs (NumPy arrays) for inputs q, k, v with the float64 reference."""
    ref, ref_lse = naive_attention(q, k, v, causal=causal, scale=scale, q_pos=q_pos, k_pos=k_pos)
    out64 = out.astype(np.float64)
    err = float(np.abs(out64 - ref).max()) if out.size else 0.0
    seen = np.isfinite(ref_lse)
    lse_err = float(np.abs(lse[seen] - ref_lse[seen]).max()) if seen.any() else 0.0
    if str(q.dtype) == "float32":
        budget = FLOAT32_TOL
    else:
        low = lowprec_attention(q, k, v, causal=causal, q_pos=q_pos, k_pos=k_pos, scale=scale)
        budget = 2 * float(np.abs(low - ref).max())
    problems = []
    if not np.array_equal(np.isfinite(lse), seen):
        problems.append("lse finite where the reference is -inf (or the reverse)")
    if not np.all(out64[~seen.transpose(0, 2, 1)] == 0):
        problems.append("rows that see no key are not 0")
    if not np.isfinite(out64).all():
        problems.append("non-finite output")
    ok = not problems and err <= budget and lse_err <= LSE_TOL
    return Verdict(ok, err, budget, lse_err, "; ".join(problems))
