"""The CPU kernels in ``hpcattn bench``'s serial part, every candidate interleaved per repeat so
drift and the other work on the machine hit all of them alike:

* ``kernel_rates``: hpcattn's per-rank attention (the kernel it chooses) beside the NumPy
  blockwise kernel, the fused kernel, PyTorch's CPU flash kernel called by hpcattn, torch SDPA
  and a square GEMM;
* ``cores_rates``: one process on 1 core against C cores (worker threads with one BLAS thread
  each for the NumPy and fused kernels; torch's ``set_num_threads``), C = the cores this process
  may use;
* ``half_rates``: bfloat16 on the torch kernel beside torch SDPA bf16, or the one-line reason it
  is unavailable here;
* ``decode_rates``: decode-like shapes (many queries against 16 keys; 16 queries, a decode step
  of a batch or of a GQA group, and 64, a chunk of a prompt or a speculative step, against many
  keys) against the square shape's rate of the same kernel.
"""
from __future__ import annotations

import dataclasses

from ..measure import attention_flops, summarize
from .backward import interleaved
from .config import BenchConfig

DECODE_SHORT = 16
DECODE_CHUNK = 64
DECODE_LONG = 100_000


def _torch():
    try:
        import torch
    except ImportError:
        return None
    return torch


def _sdpa(cfg: BenchConfig, q, k, v, dtype=None):
    """torch SDPA on (b, h, N, d) copies of q, k, v (in torch ``dtype``), or None."""
    torch = _torch()
    if torch is None or not cfg.torch:
        return None
    tq, tk, tv = (torch.from_numpy(x.transpose(0, 2, 1, 3).copy()) for x in (q, k, v))
    if dtype is not None:
        tq, tk, tv = (x.to(dtype) for x in (tq, tk, tv))

    def run():
        with torch.inference_mode():
            torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, is_causal=cfg.causal)
    return run


def square_gemm(cfg: BenchConfig):
    """The reference GEMM: ``gemm_n`` x ``gemm_n`` squared in ``cfg.dtype`` into a preallocated
    out (2 n^3 FLOP a call)."""
    import numpy as np

    n = cfg.gemm_n
    a = np.random.default_rng(0).standard_normal((n, n)).astype(cfg.dtype)
    c = np.empty_like(a)
    return lambda: np.matmul(a, a, out=c)


def _kernel(q, k, v, causal, kernel=None, workers=None):
    from .. import cpu_kernels

    return lambda: cpu_kernels.attention(q, k, v, causal=causal, kernel=kernel, workers=workers)


def kernel_rates(cfg: BenchConfig, q, k, v, extra: dict) -> dict:
    """GFLOP/s of hpcattn (chosen kernel), its two kernels, torch SDPA, a square GEMM and the
    callables in ``extra`` (same FLOPs as attention), interleaved; ``kernel``: what hpcattn chose."""
    from .. import cpu_kernels
    from ..backend import attention

    runs = {"gemm": square_gemm(cfg),
            "hpcattn": lambda: attention(q, k, v, causal=cfg.causal),
            "numpy_blockwise": _kernel(q, k, v, cfg.causal, "numpy")}
    if cpu_kernels.fused_reason() is None and str(q.dtype) == "float32":
        runs["fused"] = _kernel(q, k, v, cfg.causal, "fused")
    if cpu_kernels.torch_reason() is None:
        runs["torch_flash"] = _kernel(q, k, v, cfg.causal, "torch")
    sdpa = _sdpa(cfg, q, k, v)
    if sdpa:
        runs["torch"] = sdpa
    runs.update(extra)
    walls = interleaved(runs, cfg.repeats)
    attention(q, k, v, causal=cfg.causal)
    flops = cfg.flops()
    res = {name: summarize(w, 2.0 * cfg.gemm_n ** 3 if name == "gemm" else flops)
           for name, w in walls.items()}
    res["kernel"] = cpu_kernels.LAST["forward"]
    if sdpa:
        res["torch"]["version"] = _torch().__version__
    return res


def cores_rates(cfg: BenchConfig, q, k, v) -> dict:
    """1 core against C cores in this one process: the NumPy and fused kernels on 1 and C
    workers, the torch kernel on 1 and C threads (interleaved); {'cores': C, 'reason': ...} where
    it cannot run."""
    from .. import cpu_kernels
    from .._threads import cores_available

    cores = cores_available()
    if cfg.threads != 1 or cores < 2:
        why = ("needs --threads 1 (one BLAS thread per worker)" if cfg.threads != 1
               else "this process may use only 1 core")
        return {"cores": cores, "reason": why}
    runs = {"numpy_1": _kernel(q, k, v, cfg.causal, "numpy", 1),
            f"numpy_{cores}": _kernel(q, k, v, cfg.causal, "numpy", cores)}
    if cpu_kernels.fused_reason() is None and str(q.dtype) == "float32":
        runs.update({"fused_1": _kernel(q, k, v, cfg.causal, "fused", 1),
                     f"fused_{cores}": _kernel(q, k, v, cfg.causal, "fused", cores)})
    if cpu_kernels.torch_reason() is None:
        runs.update({"torch_1": _kernel(q, k, v, cfg.causal, "torch", 1),
                     f"torch_{cores}": _kernel(q, k, v, cfg.causal, "torch", cores)})
    walls = interleaved(runs, cfg.repeats)
    return {"cores": cores, **{name: summarize(w, cfg.flops()) for name, w in walls.items()}}


def half_rates(cfg: BenchConfig, q, k, v) -> dict:
    """bfloat16 through hpcattn (torch kernel) beside torch SDPA bf16, or the reason."""
    from .. import cpu_kernels
    from ..devices import np_dtype

    why = cpu_kernels.half_reason("bfloat16")
    if why:
        return {"reason": why}
    qh, kh, vh = (x.astype(np_dtype("bfloat16")) for x in (q, k, v))
    runs = {"hpcattn": _kernel(qh, kh, vh, cfg.causal)}
    sdpa = _sdpa(cfg, q, k, v, _torch().bfloat16)
    if sdpa:
        runs["torch"] = sdpa
    walls = interleaved(runs, cfg.repeats)
    return {name: summarize(w, cfg.flops()) for name, w in walls.items()}


def decode_shapes(cfg: BenchConfig) -> list:
    """(queries, keys) of the decode-like shapes (the long side shrinks with --quick's N)."""
    long = min(DECODE_LONG, 16 * cfg.seq_len)
    return [(long, DECODE_SHORT), (DECODE_SHORT, long), (DECODE_CHUNK, long)]


def decode_rates(cfg: BenchConfig) -> list:
    """Per shape: hpcattn (chosen kernel), the blockwise kernel on its default tiles (what the
    shape got before tiles were picked from it), torch SDPA, and the square GEMM of the kernel
    table (``gemm``: whether the machine ran slower than when that table was timed); non-causal;
    ``reuse_out``: whether hpcattn's large outs were placed in the last freed one
    (``hpcattn.out_pool``)."""
    import numpy as np

    from .. import blockwise, out_pool
    from ..inputs import random_qkv

    gemm_call = square_gemm(cfg)
    rows = []
    for nq, nk in decode_shapes(cfg):
        h = cfg.heads
        q = random_qkv(0, np.arange(nq), cfg.batch, h, h, cfg.head_dim, cfg.dtype)[0]
        _, k, v = random_qkv(1, np.arange(nk), cfg.batch, h, h, cfg.head_dim, cfg.dtype)
        runs = {"hpcattn": _kernel(q, k, v, False),
                "blockwise_default_tiles": lambda: blockwise.attention(q, k, v)}
        sdpa = _sdpa(dataclasses.replace(cfg, causal=False), q, k, v)
        if sdpa:
            runs["torch"] = sdpa
        runs["gemm"] = gemm_call
        walls = interleaved(runs, cfg.repeats)
        gemm = summarize(walls.pop("gemm"), 2.0 * cfg.gemm_n ** 3)
        flops = attention_flops(cfg.batch, nq, h, cfg.head_dim, causal=False, n_k=nk)
        rows.append({"nq": nq, "nk": nk, "reuse_out": out_pool.enabled(), "gemm": gemm,
                     **{name: summarize(w, flops) for name, w in walls.items()}})
    return rows
