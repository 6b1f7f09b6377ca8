"""The attention backward kernels of ``kernels/attention_bwd.cu``, declared once, and their CuPy entry.

Three launches per call, in this order: ``delta`` (D = rowsum(dout * out)), ``dq`` (one block
per query tile) and ``dkdv`` (one block per key tile and kv head, summing its GQA group in
registers, or per share of the group when the grid would be small: ``head_splits``); SIMT for
every dtype or tensor cores for fp16/bf16 (``variant``). The kernels write float32 gradients; ``attention_backward_gpu`` returns them in the
input dtype unless asked for ``grad_dtype="float32"`` (what a ring summing partial dK/dV over
steps needs). ``plan_attention_backward`` builds the launches for any array module, so CuPy and
the CPU emulation (``hpcattn.emulation.backward``) run the very same kernels with the very same
arguments. Importing this module needs NumPy only.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import HpcattnError
from ..validate import attention_scale, causal_positions
from . import kernels
from .kernels import Arg, Launch

BACKWARD_SOURCE = "attention_bwd.cu"
THREADS = 128
#: query rows per block of the delta kernel (8 lanes per row)
DELTA_ROWS = THREADS // 8
#: (rows per block, rows per streamed tile) by (stage, variant) and head_dim: the dQ kernel's
#: blocks own query rows and stream key tiles, the dK/dV kernel's own key rows and stream query
#: tiles. SIMT: float32 tiles that fit sm_89's 99 KiB of shared memory (``smem_bytes``) with at
#: most 2 x 64 accumulators per thread; mma: 16 rows per warp, 16-bit tiles, streamed tiles
#: small enough to stay clear of 255 registers (no spills) on sm_80/89/90.
TILES = {
    ("dq", "simt"): {64: (64, 32), 128: (32, 32)},
    ("dkdv", "simt"): {64: (64, 32), 128: (32, 32)},
    ("dq", "mma"): {64: (64, 32), 128: (64, 32)},
    ("dkdv", "mma"): {64: (64, 32), 128: (64, 16)},  # d128: 2 x 64 accumulators, ~220 registers
}
STAGES = ("delta", "dq", "dkdv")

#: ``attention_bwd_delta_*`` parameters
DELTA_ARGS = (Arg("out", "ptr"), Arg("dout", "ptr"), Arg("delta", "ptr"), Arg("n_q", "int32"),
              Arg("heads", "int32"))
#: ``attention_bwd_dq_*`` and ``attention_bwd_dkdv_*`` parameters (each ignores the other's outputs)
BACKWARD_ARGS = (
    Arg("q", "ptr"), Arg("k", "ptr"), Arg("v", "ptr"), Arg("dout", "ptr"), Arg("lse", "ptr"),
    Arg("delta", "ptr"), Arg("dq", "ptr"), Arg("dk", "ptr"), Arg("dv", "ptr"),
    Arg("q_pos", "ptr"), Arg("k_pos", "ptr"), Arg("q_bounds", "ptr"), Arg("k_bounds", "ptr"),
    Arg("n_q", "int32"), Arg("n_k", "int32"), Arg("heads", "int32"), Arg("kv_heads", "int32"),
    Arg("scale_log2", "float32"), Arg("scale", "float32"), Arg("causal", "int32"),
    Arg("head_splits", "int32"),
)
#: the dK/dV kernel splits a GQA group's query heads over this many blocks per kv head while the
#: grid has fewer blocks than this (each split writes a float32 slab; the slabs are added in order)
MIN_DKDV_BLOCKS = 256


def kernel_name(stage: str, dtype: str, head_dim: int, variant: str = "simt") -> str:
    kind = "_mma" if variant == "mma" and stage != "delta" else ""
    return f"attention_bwd_{stage}{kind}_{kernels.DTYPES[dtype]}_d{head_dim}"


#: every entry point of attention_bwd.cu with its argument list
KERNELS = {kernel_name(stage, dt, d, var): DELTA_ARGS if stage == "delta" else BACKWARD_ARGS
           for var in kernels.VARIANTS for stage in STAGES
           if not (stage == "delta" and var == "mma")  # one delta kernel serves both
           for dt in (kernels.MMA_DTYPES if var == "mma" else kernels.DTYPES) for d in kernels.HEAD_DIMS}


def smem_bytes(stage: str, head_dim: int, variant: str = "simt") -> int:
    """Dynamic shared memory of one block (the layouts in attention_bwd.cu / attention_bwd_mma.cuh:
    SIMT tiles are float32, mma tiles 16-bit with rows padded by 8)."""
    d = head_dim
    if stage == "delta":
        return 0
    rows, cols = TILES[stage, variant][d]
    if variant == "mma":
        tiles = 2 * (rows + cols) * (d + 8) + d * (cols + 8) * (1 if stage == "dq" else 2)
        return 2 * tiles + (0 if stage == "dq" else 4 * 2 * cols)
    if stage == "dq":
        return 4 * (2 * d * rows + 2 * cols * (d + 1) + cols * (rows + 4))
    return 4 * (2 * d * rows + 2 * cols * (d + 1) + 2 * cols * (rows + 4) + 2 * cols)


def compile_defines() -> tuple[str, ...]:
    """The -D options that configure the kernels (the .cu refuses to compile without them); the
    forward's configure the tensor-core helpers of attention_fwd_mma.cuh they share."""
    opts = [f"-DHPCATTN_BWD_THREADS={THREADS}"]
    for (stage, variant), by_dim in TILES.items():
        kind = "_mma" if variant == "mma" else ""
        for d, (rows, cols) in by_dim.items():
            opts += [f"-DHPCATTN_BWD_{stage}{kind}_ROWS_D{d}={rows}", f"-DHPCATTN_BWD_{stage}{kind}_COLS_D{d}={cols}"]
    return kernels.compile_defines() + tuple(opts)


def compile_options() -> tuple[str, ...]:
    return ("-I" + str(kernels.KERNEL_DIR),) + compile_defines()


def kernel_source() -> str:
    return kernels.kernel_source(BACKWARD_SOURCE)


def head_splits(group: int, dkdv_blocks: int) -> int:
    """Blocks per kv head of the dK/dV kernel: enough to reach ``MIN_DKDV_BLOCKS`` blocks, at most
    one per query head of the group, each the same number of heads (ceil(group / splits))."""
    wanted = min(group, max(1, -(-MIN_DKDV_BLOCKS // max(1, dkdv_blocks))))
    per = -(-group // wanted)
    return -(-group // per)


@dataclass
class BackwardPlan:
    """The three launches of one backward call and the float32 arrays they fill (dk/dv as
    (head_splits, *k.shape) slabs, one per share of the GQA group)."""

    launches: tuple[Launch, ...]   # delta, dq, dkdv
    dq: object
    dk_slabs: object
    dv_slabs: object
    delta: object

    def gradients(self, dtype, grad_dtype=None):
        """(dq, dk, dv) in ``dtype`` (the inputs'), or float32 when ``grad_dtype`` is float32."""
        if grad_dtype is not None and np.dtype(grad_dtype) != np.float32:
            raise HpcattnError(f"grad_dtype {grad_dtype!r}; expected None (the input dtype) or 'float32'")
        # slab 0 + slab 1 + ...: a fixed order, so the result does not depend on the run
        dk, dv = (x[0] if x.shape[0] == 1 else x.sum(axis=0) for x in (self.dk_slabs, self.dv_slabs))
        if grad_dtype is not None:
            return self.dq, dk, dv
        return tuple(g.astype(dtype) for g in (self.dq, dk, dv))


def _check_operands(q, k, v, out, lse, dout) -> None:
    b, n_q, heads, d = q.shape
    if k.shape != v.shape or k.ndim != 4 or k.shape[0] != b or k.shape[3] != d:
        raise HpcattnError(f"k {k.shape} / v {v.shape} do not match q {q.shape}; expected "
                           f"(batch={b}, n_k, kv_heads, head_dim={d}) both")
    if k.shape[2] == 0 or heads % k.shape[2]:
        raise HpcattnError(f"{heads} query heads with {k.shape[2]} kv heads; expected a divisor")
    for name, x in (("out", out), ("dout", dout)):
        if x.shape != q.shape or x.dtype != q.dtype:
            raise HpcattnError(f"{name} {x.shape} {x.dtype}; expected q's shape {q.shape} and dtype {q.dtype}")
    if lse.shape != (b, heads, n_q):
        raise HpcattnError(f"lse {lse.shape}; expected (batch, heads, n_q) = {(b, heads, n_q)}")
    for name, x in (("q", q), ("k", k), ("v", v), ("out", out), ("dout", dout)):
        if x.dtype != q.dtype:
            raise HpcattnError(f"{name} is {x.dtype}; expected q's dtype {q.dtype}")
        if not x.flags.c_contiguous:
            raise HpcattnError(f"{name} is not C-contiguous; expected contiguous arrays")


def plan_attention_backward(q, k, v, out, lse, dout, *, causal: bool, scale: float, q_pos, k_pos,
                            xp, variant=None, splits=None) -> BackwardPlan:
    """float32 outputs allocated with ``xp`` and the three kernel calls that fill them.

    Layouts as ``plan_attention``: q/out/dout (b, n_q, heads, d), k/v (b, n_k, kv_heads, d),
    lse (b, heads, n_q) from the forward; q_pos/k_pos int64 global positions (causal only);
    ``variant`` "simt" or "mma" (default ``kernels.default_variant``, as the forward);
    ``splits`` the dK/dV kernel's blocks per kv head (default ``head_splits``).
    """
    b, n_q, heads, d = q.shape
    dtype = str(q.dtype)
    if dtype not in kernels.DTYPES:
        raise HpcattnError(f"dtype {dtype} is not supported by the GPU kernels; "
                           f"expected one of {', '.join(kernels.DTYPES)}")
    kernels.check_head_dim(d)
    variant = kernels.default_variant(dtype) if variant is None else variant
    if variant not in kernels.VARIANTS or (variant == "mma" and dtype not in kernels.MMA_DTYPES):
        raise HpcattnError(f"kernel variant {variant!r} for {dtype}; expected simt, or mma for "
                           f"{' / '.join(kernels.MMA_DTYPES)}")
    _check_operands(q, k, v, out, lse, dout)
    n_k, kv_heads = k.shape[1], k.shape[2]
    if max(n_q, n_k) >= 2**31 or b > 65535 or heads > 65535:
        raise HpcattnError(f"shape q {q.shape} k {k.shape} exceeds the kernel's limits; "
                           "expected sequence < 2**31 rows, batch and heads <= 65535")
    lse = xp.ascontiguousarray(lse, dtype=xp.float32)
    bq, bk = TILES["dq", variant][d]
    bkv, bq2 = TILES["dkdv", variant][d]
    group = heads // kv_heads
    splits = head_splits(group, -(-n_k // bkv) * kv_heads * b) if splits is None else int(splits)
    if not 1 <= splits <= group:
        raise HpcattnError(f"splits {splits}; expected 1 to {group} (the query heads per kv head)")
    dq = xp.empty(q.shape, dtype=xp.float32)
    dk = xp.empty((splits, *k.shape), dtype=xp.float32)
    dv = xp.empty((splits, *k.shape), dtype=xp.float32)
    delta = xp.empty((b, heads, n_q), dtype=xp.float32)
    common = dict(q=q, k=k, v=v, dout=dout, lse=lse, delta=delta, dq=None, dk=None, dv=None,
                  q_pos=None, k_pos=None, q_bounds=None, k_bounds=None, n_q=n_q, n_k=n_k, heads=heads,
                  kv_heads=kv_heads, scale_log2=float(scale) * float(np.log2(np.e)), scale=float(scale),
                  causal=0, head_splits=splits)
    causal = bool(causal and n_q and n_k)  # with no rows or no keys there is nothing to mask
    if causal:
        q_pos = xp.ascontiguousarray(q_pos, dtype=xp.int64)
        k_pos = xp.ascontiguousarray(k_pos, dtype=xp.int64)
        common.update(q_pos=q_pos, k_pos=k_pos, causal=1)

    def bounds(q_block, k_block):
        if not causal:
            return {}
        return dict(q_bounds=kernels.tile_bounds(q_pos, q_block, xp),
                    k_bounds=kernels.tile_bounds(k_pos, k_block, xp))

    block = (THREADS, 1, 1)
    launches = (
        Launch(kernel_name("delta", dtype, d), (-(-n_q // DELTA_ROWS), heads, b), block, 0,
               dict(out=out, dout=dout, delta=delta, n_q=n_q, heads=heads), None, None),
        Launch(kernel_name("dq", dtype, d, variant), (-(-n_q // bq), heads, b), block,
               smem_bytes("dq", d, variant), {**common, "dq": dq, **bounds(bq, bk)}, None, None),
        Launch(kernel_name("dkdv", dtype, d, variant), (-(-n_k // bkv), kv_heads * splits, b), block,
               smem_bytes("dkdv", d, variant), {**common, "dk": dk, "dv": dv, **bounds(bq2, bkv)}, None, None),
    )
    return BackwardPlan(launches, dq, dk, dv, delta)


_modules: dict = {}  # CUDA device id -> cupy.RawModule of attention_bwd.cu
_configured: set = set()


def _function(name: str, smem: int):
    import cupy

    dev = cupy.cuda.Device().id
    mod = _modules.get(dev)
    if mod is None:
        mod = _modules[dev] = cupy.RawModule(code=kernel_source(), options=compile_options())
    fn = mod.get_function(name)
    if smem and (dev, name) not in _configured:  # opt in to more than 48 KiB of dynamic shared memory
        fn.max_dynamic_shared_size_bytes = smem
        _configured.add((dev, name))
    return fn


def launch(plan: Launch) -> None:
    """Run one backward launch on the current CUDA device and stream (asynchronously)."""
    if 0 in plan.grid:
        return
    args = []
    for arg in KERNELS[plan.kernel]:
        value = plan.values[arg.name]
        if arg.kind == "ptr":
            args.append(np.uint64(0) if value is None else value)
        else:
            args.append(np.int32(value) if arg.kind == "int32" else np.float32(value))
    _function(plan.kernel, plan.smem)(plan.grid, plan.block, tuple(args), shared_mem=plan.smem)


def attention_backward_gpu(q, k, v, out, lse, dout, *, causal: bool = False, scale: float | None = None,
                           q_pos=None, k_pos=None, grad_dtype=None, variant: str | None = None, splits=None):
    """Gradients ``(dq, dk, dv)`` of ``hpcattn.attention`` for CuPy arrays, from the forward's
    ``out`` and ``lse`` and the output gradient ``dout``; dk/dv have the kv-head shape (the GQA
    group's query heads summed). float32/float16/bfloat16, head_dim 64 or 128. Returned in q's
    dtype, or float32 with ``grad_dtype="float32"``. ``variant`` as ``attention_gpu``'s: "mma"
    (tensor cores; default for fp16/bf16 on sm_80+) or "simt"; ``splits`` as in
    ``plan_attention_backward`` (default: enough dK/dV blocks to fill the GPU)."""
    import cupy

    q, k, v, out, dout = (_prepare(x) for x in (q, k, v, out, dout))
    scale = attention_scale(scale, q.shape[3])
    if causal:
        q_pos, k_pos = causal_positions(q_pos, k_pos, q.shape[1], k.shape[1], cupy)
    if variant is None and int(cupy.cuda.Device().compute_capability) < 80:
        variant = "simt"  # mma.sync m16n8k16 needs sm_80
    plan = plan_attention_backward(q, k, v, out, cupy.asarray(lse), dout, causal=causal, scale=scale,
                                   q_pos=q_pos, k_pos=k_pos, xp=cupy, variant=variant, splits=splits)
    for step in plan.launches:
        launch(step)
    return plan.gradients(q.dtype, grad_dtype)


def _prepare(x):
    """C-contiguous and 16-byte aligned (the kernels load 16-byte vectors)."""
    import cupy

    x = cupy.ascontiguousarray(x)
    return x.copy() if x.data.ptr % 16 else x
