"""What the CUDA kernels in ``kernels/`` are, declared once.

Everything a launch needs that is not the data — the kernel names, their argument lists, the
tile configuration (passed to the compiler as ``-D`` options), the launch geometry and the
dynamic shared-memory size — lives here. ``plan_attention`` turns arrays into a ``Launch`` for
any array module, so the CuPy path (``hpcattn.gpu.attention``) and the CPU emulation
(``hpcattn.emulation``) call the very same kernel with the very same arguments.

Importing this module needs NumPy only (no CuPy, no GPU).
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..devices import GPU_DTYPES
from ..errors import HpcattnError

#: kernels/ as shipped inside the package (``hpcattn/kernels`` links to the top-level folder in
#: the source tree, and ``pip install .`` copies the files there).
KERNEL_DIR = Path(__file__).resolve().parent.parent / "kernels"
ATTENTION_SOURCE = "attention_fwd.cu"

THREADS = 128
BLOCK_Q = 64
#: keys per shared-memory tile, by head_dim (shared memory per block: 64 KiB for d=64,
#: 72 KiB for d=128, float32 tiles whatever the input dtype).
BLOCK_K = {64: 64, 128: 32}
HEAD_DIMS = tuple(sorted(BLOCK_K))
#: keys per tile of the tensor-core (mma.sync) kernels, fp16/bf16 only, sm_80 and newer
MMA_BLOCK_K = 64
#: dtype name -> the suffix of its entry points (f16, bf16, f32), for every GPU dtype of devices
DTYPES = {dt: dt.replace("float", "f") for dt in GPU_DTYPES}
MMA_DTYPES = ("float16", "bfloat16")
#: "simt" (CUDA cores, every dtype) or "mma" (tensor cores, fp16/bf16)
VARIANTS = ("simt", "mma")
#: largest dynamic shared memory a block may opt in to, by compute capability (CUDA guide,
#: table "Technical Specifications per Compute Capability").
MAX_DYNAMIC_SMEM = {"80": 166912, "86": 101376, "87": 166912, "89": 101376, "90": 232448}


@dataclass(frozen=True)
class Arg:
    """One kernel parameter: ``kind`` is "ptr", "int32" or "float32" (its C type in the .cu)."""

    name: str
    kind: str


#: The parameter list of every ``attention_fwd_*`` entry point, in order.
ATTENTION_FWD_ARGS = (
    Arg("q", "ptr"), Arg("k", "ptr"), Arg("v", "ptr"), Arg("out", "ptr"), Arg("lse", "ptr"),
    Arg("q_pos", "ptr"), Arg("k_pos", "ptr"), Arg("q_bounds", "ptr"), Arg("k_bounds", "ptr"),
    Arg("n_q", "int32"), Arg("n_k", "int32"), Arg("heads", "int32"), Arg("kv_heads", "int32"),
    Arg("scale_log2", "float32"), Arg("causal", "int32"),
)


def attention_kernel_name(dtype: str, head_dim: int, variant: str = "simt") -> str:
    return f"attention_fwd_{'mma_' if variant == 'mma' else ''}{DTYPES[dtype]}_d{head_dim}"


#: every entry point in attention_fwd.cu with its argument list
KERNELS = {attention_kernel_name(dt, d, var): ATTENTION_FWD_ARGS
           for var in VARIANTS for dt in (MMA_DTYPES if var == "mma" else DTYPES) for d in HEAD_DIMS}


def attention_smem_bytes(head_dim: int, variant: str = "simt") -> int:
    """Dynamic shared memory of one block. SIMT: Qt[D][BQ], Kt[D][BK], Vs[BK][D], Ps[BQ][BK]
    floats; mma: Qs[BQ][D+8], Ks[BK][D+8], Vt[D][BK+8] 16-bit elements."""
    if variant == "mma":
        return 2 * (BLOCK_Q * (head_dim + 8) + MMA_BLOCK_K * (head_dim + 8) + head_dim * (MMA_BLOCK_K + 8))
    bk = BLOCK_K[head_dim]
    return 4 * (head_dim * BLOCK_Q + 2 * head_dim * bk + BLOCK_Q * bk)


def default_variant(dtype: str) -> str:
    """Tensor cores for fp16/bf16 unless HPCATTN_GPU_KERNEL=simt; SIMT for float32."""
    forced = os.environ.get("HPCATTN_GPU_KERNEL", "").strip()
    if forced and forced not in VARIANTS:
        raise HpcattnError(f"HPCATTN_GPU_KERNEL={forced!r}; expected one of {', '.join(VARIANTS)}")
    if dtype not in MMA_DTYPES:
        return "simt"
    return forced or "mma"


def compile_defines() -> tuple[str, ...]:
    """The -D options that configure the kernels (the .cu refuses to compile without them)."""
    return (f"-DHPCATTN_THREADS={THREADS}", f"-DHPCATTN_BLOCK_Q={BLOCK_Q}",
            f"-DHPCATTN_BLOCK_K_D64={BLOCK_K[64]}", f"-DHPCATTN_BLOCK_K_D128={BLOCK_K[128]}",
            f"-DHPCATTN_MMA_BLOCK_K={MMA_BLOCK_K}")


def compile_options() -> tuple[str, ...]:
    """Options the kernels are compiled with (CuPy adds its own; see hpcattn.gpu.nvrtc)."""
    return ("-I" + str(KERNEL_DIR),) + compile_defines()


def kernel_source(name: str = ATTENTION_SOURCE) -> str:
    path = KERNEL_DIR / name
    if not path.is_file():
        raise HpcattnError(f"kernel source {path} is missing; expected the kernels/ folder "
                           "installed with hpcattn (reinstall the package)")
    return path.read_text()


def sources_digest() -> str:
    """Hash of every kernel source and option: names a compiled artefact (emulation cache)."""
    h = hashlib.sha256("\0".join(compile_defines()).encode())
    for p in sorted(KERNEL_DIR.glob("*.cu*")):
        h.update(p.name.encode() + b"\0" + p.read_bytes())
    return h.hexdigest()[:16]


@dataclass
class Launch:
    kernel: str
    grid: tuple[int, int, int]
    block: tuple[int, int, int]
    smem: int
    values: dict      # Arg.name -> array (or None for a null pointer) / Python number
    out: object
    lse: object


def tile_bounds(pos, block: int, xp):
    """(min, max) position of each tile of ``block`` rows, flattened to int64 [2 * tiles]."""
    n = pos.shape[0]
    tiles = -(-n // block)
    pad = tiles * block - n
    info = np.iinfo(np.int64)
    lo = xp.concatenate([pos, xp.full(pad, info.max, dtype=xp.int64)]).reshape(tiles, block).min(1)
    hi = xp.concatenate([pos, xp.full(pad, info.min, dtype=xp.int64)]).reshape(tiles, block).max(1)
    return xp.ascontiguousarray(xp.stack([lo, hi], axis=1).reshape(-1))


def check_head_dim(head_dim: int) -> None:
    if head_dim not in BLOCK_K:
        raise HpcattnError(f"head_dim {head_dim} is not supported by the GPU kernels; "
                           f"expected one of {', '.join(map(str, HEAD_DIMS))}")


def plan_attention(q, k, v, *, causal: bool, scale: float, q_pos, k_pos, xp, variant=None) -> Launch:
    """Outputs allocated with ``xp`` and the kernel call that fills them.

    q (b, n_q, heads, d), k/v (b, n_k, kv_heads, d), C-contiguous, one dtype of ``DTYPES``;
    q_pos/k_pos int64 positions (ignored unless ``causal``); ``variant`` "simt" or "mma"
    (default: ``default_variant``).
    """
    b, n_q, heads, d = q.shape
    n_k, kv_heads = k.shape[1], k.shape[2]
    dtype = str(q.dtype)
    if dtype not in DTYPES:
        raise HpcattnError(f"dtype {dtype} is not supported by the GPU kernels; "
                           f"expected one of {', '.join(DTYPES)}")
    check_head_dim(d)
    variant = default_variant(dtype) if variant is None else variant
    if variant not in VARIANTS or (variant == "mma" and dtype not in MMA_DTYPES):
        raise HpcattnError(f"kernel variant {variant!r} for {dtype}; expected simt, or mma for "
                           f"{' / '.join(MMA_DTYPES)}")
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not x.flags.c_contiguous:
            raise HpcattnError(f"{name} is not C-contiguous; expected contiguous arrays")
    if max(n_q, n_k) >= 2**31 or b > 65535 or heads > 65535:
        raise HpcattnError(f"shape q {q.shape} k {k.shape} exceeds the kernel's limits; "
                           "expected sequence < 2**31 rows, batch and heads <= 65535")
    out = xp.empty(q.shape, dtype=q.dtype)
    lse = xp.empty((b, heads, n_q), dtype=xp.float32)
    values = dict(q=q, k=k, v=v, out=out, lse=lse, q_pos=None, k_pos=None, q_bounds=None,
                  k_bounds=None, n_q=n_q, n_k=n_k, heads=heads, kv_heads=kv_heads,
                  scale_log2=float(scale) * float(np.log2(np.e)), causal=0)
    if causal and n_q and n_k:  # (with no keys there is nothing to mask)
        q_pos = xp.ascontiguousarray(q_pos, dtype=xp.int64)
        k_pos = xp.ascontiguousarray(k_pos, dtype=xp.int64)
        values.update(q_pos=q_pos, k_pos=k_pos, q_bounds=tile_bounds(q_pos, BLOCK_Q, xp),
                      k_bounds=tile_bounds(k_pos, MMA_BLOCK_K if variant == "mma" else BLOCK_K[d], xp),
                      causal=1)
    grid = (-(-n_q // BLOCK_Q), heads, b)  # callers skip the launch when it is empty
    return Launch(attention_kernel_name(dtype, d, variant), grid, (THREADS, 1, 1),
                  attention_smem_bytes(d, variant), values, out, lse)
