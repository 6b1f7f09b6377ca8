"""The log-sum-exp merge of two partial attention results, for any array module (NumPy, CuPy):
what the ring, the CUDA running state and ``hpcattn.merge_partials`` share."""
from __future__ import annotations


def merge_lse(out, lse, out_b, lse_b, xp):
    """Merge ``(out_b, lse_b)`` (attention over other keys) into ``(out, lse)`` in place.

    ``out``: (batch, N, heads, d); ``lse``: (batch, heads, N). The log-sum-exp weights make the
    result equal attention over the union of the two key sets; a side with lse -inf adds nothing.
    """
    new = xp.logaddexp(lse, lse_b)
    finite = xp.isfinite(new)
    safe = xp.where(finite, new, 0)
    wa = xp.where(finite, xp.exp(lse - safe), 0).astype(out.dtype, copy=False)
    wb = xp.where(finite, xp.exp(lse_b - safe), 0).astype(out.dtype, copy=False)
    out *= wa.transpose(0, 2, 1)[..., None]
    out += out_b * wb.transpose(0, 2, 1)[..., None]
    lse[...] = new
    return out, lse
