"""The attention backward kernels (``kernels/attention_bwd.cu``) run unmodified on the CPU.

>>> from hpcattn.emulation.backward import attention_backward_emulated
>>> dq, dk, dv = attention_backward_emulated(q, k, v, out, lse, dout, causal=True)

Same launches and arguments as the CuPy path (``hpcattn.gpu.backward``); slow (one fiber per
CUDA thread): keep shapes small.
"""
from __future__ import annotations

import numpy as np

from . import build, launch
from ..gpu import backward, kernels
from ..validate import attention_scale, causal_positions


def library():
    """The emulation library of attention_bwd.cu (built once per source hash)."""
    return build(kernels.KERNEL_DIR, backward.BACKWARD_SOURCE, backward.KERNELS, backward.compile_defines())


def attention_backward_emulated(q, k, v, out, lse, dout, *, causal=False, scale=None, q_pos=None, k_pos=None,
                                grad_dtype=None, variant=None, splits=None):
    """``hpcattn.gpu.backward.attention_backward_gpu`` for NumPy arrays, computed on the CPU
    (``variant`` and ``splits`` as in ``hpcattn.gpu.backward.plan_attention_backward``).

    The float32 outputs (and D) are poisoned (NaN) before the launches, so an element a kernel
    forgets stays NaN.
    """
    q, k, v, out, dout = (np.ascontiguousarray(x) for x in (q, k, v, out, dout))
    scale = attention_scale(scale, q.shape[3])
    if causal:
        q_pos, k_pos = causal_positions(q_pos, k_pos, q.shape[1], k.shape[1])
    plan = backward.plan_attention_backward(q, k, v, out, np.asarray(lse), dout, causal=causal, scale=scale,
                                            q_pos=q_pos, k_pos=k_pos, xp=np, variant=variant, splits=splits)
    for x in (plan.dq, plan.dk_slabs, plan.dv_slabs, plan.delta):
        x[...] = np.nan
    lib = library()
    for step in plan.launches:
        launch(step, lib=lib, spec=backward.KERNELS)
    return plan.gradients(q.dtype, grad_dtype)
