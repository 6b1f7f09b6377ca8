"""Blockwise attention on CuPy arrays with the kernels of ``kernels/`` (loaded by CuPy/NVRTC)."""
from __future__ import annotations

import numpy as np

from ..validate import attention_scale, causal_positions
from . import kernels

_modules: dict = {}  # CUDA device id -> cupy.RawModule (CuPy caches the cubin on disk too)
_configured: set = set()


def _function(name: str, smem: int):
    import cupy

    dev = cupy.cuda.Device().id
    mod = _modules.get(dev)
    if mod is None:
        mod = _modules[dev] = cupy.RawModule(code=kernels.kernel_source(), options=kernels.compile_options())
    fn = mod.get_function(name)
    if (dev, name) not in _configured:  # opt in to more than 48 KiB of dynamic shared memory
        fn.max_dynamic_shared_size_bytes = smem
        _configured.add((dev, name))
    return fn


def launch(plan: kernels.Launch) -> None:
    """Run ``plan`` on the current CUDA device and stream (asynchronously)."""
    if 0 in plan.grid:
        return
    args = []
    for arg in kernels.KERNELS[plan.kernel]:
        value = plan.values[arg.name]
        if arg.kind == "ptr":
            args.append(np.uint64(0) if value is None else value)
        elif arg.kind == "int32":
            args.append(np.int32(value))
        else:
            args.append(np.float32(value))
    _function(plan.kernel, plan.smem)(plan.grid, plan.block, tuple(args), shared_mem=plan.smem)


def _prepare(x):
    """C-contiguous and 16-byte aligned (the kernels load 16-byte vectors)."""
    import cupy

    x = cupy.ascontiguousarray(x)
    return x.copy() if x.data.ptr % 16 else x


def attention_gpu(q, k, v, *, causal: bool = False, scale: float | None = None, q_pos=None, k_pos=None,
                  variant: str | None = None):
    """``hpcattn.attention`` for CuPy arrays: returns ``(out, lse)`` on the device, lse float32.

    Supported: float32/float16/bfloat16, head_dim 64 or 128 (else ``HpcattnError``). ``variant``:
    "mma" (tensor cores; default for fp16/bf16 on sm_80+) or "simt" (CUDA cores; any dtype);
    ``HPCATTN_GPU_KERNEL=simt`` forces SIMT.
    """
    import cupy

    q, k, v = (_prepare(x) for x in (q, k, v))
    scale = attention_scale(scale, q.shape[3])
    if causal:
        q_pos, k_pos = causal_positions(q_pos, k_pos, q.shape[1], k.shape[1], cupy)
    if variant is None and int(cupy.cuda.Device().compute_capability) < 80:
        variant = "simt"  # mma.sync m16n8k16 needs sm_80
    plan = kernels.plan_attention(q, k, v, causal=causal, scale=scale, q_pos=q_pos, k_pos=k_pos, xp=cupy,
                                  variant=variant)
    launch(plan)
    if 0 in plan.grid:  # nothing launched: no query rows (or batch/heads 0)
        plan.lse.fill(-np.inf)
    return plan.out, plan.lse
