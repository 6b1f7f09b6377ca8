"""One distributed attention case: make inputs, run the ring, time it, optionally check it.

This is what ``hpcattn run`` runs for its single-case options and what the job runner runs for
every attention case of a sweep. It knows nothing of files or command lines.
"""
from __future__ import annotations

import dataclasses
import resource
import time
import tracemalloc

import numpy as np

from .check import sampled_check
from .errors import CollectiveError
from .inputs import random_qkv
from .layouts import check_layout, positions
from .ring import ring_attention
from .validate import CPU_DTYPES, GPU_DTYPES

DEVICES = ("cpu", "gpu")
DTYPES = {"cpu": CPU_DTYPES, "gpu": GPU_DTYPES}


@dataclasses.dataclass
class AttentionCase:
    seq_len: int = 4096
    batch: int = 1
    heads: int = 8
    kv_heads: int | None = None      # None: same as heads
    head_dim: int = 64
    dtype: str = "float32"
    causal: bool = False
    layout: str = "contiguous"
    seed: int = 0
    repeats: int = 1
    check_rows: int = 0              # 0: no check
    block_q: int | None = None
    block_k: int | None = None
    device: str = "cpu"              # "gpu": CuPy arrays and the CUDA kernels, one GPU per rank

    def validate(self, size: int) -> None:
        """Collective-safe: every rank evaluates the same case and raises the same error."""
        for name in ("seq_len", "batch", "heads", "head_dim", "repeats"):
            val = getattr(self, name)
            if not isinstance(val, (int, np.integer)) or val < 1:
                raise CollectiveError(f"{name}={val!r} is invalid; expected a positive integer")
        kvh = self.heads if self.kv_heads is None else self.kv_heads
        if kvh < 1 or self.heads % kvh:
            raise CollectiveError(f"kv_heads={kvh} does not divide heads={self.heads}; "
                                  "expected heads to be a multiple of kv_heads")
        if self.device not in DEVICES:
            raise CollectiveError(f"device {self.device!r} is unknown; expected one of {', '.join(DEVICES)}")
        if self.dtype not in DTYPES[self.device]:
            raise CollectiveError(f"dtype {self.dtype!r} is not supported on {self.device}; expected one of "
                                  f"{', '.join(DTYPES[self.device])}")
        if self.device == "gpu":
            from .gpu.kernels import HEAD_DIMS

            if self.head_dim not in HEAD_DIMS:
                raise CollectiveError(f"head_dim={self.head_dim} is not supported by the GPU kernels; "
                                      f"expected one of {', '.join(map(str, HEAD_DIMS))}")
        try:
            check_layout(self.layout)
        except ValueError as exc:
            raise CollectiveError(str(exc)) from None
        if self.seq_len < size:
            raise CollectiveError(f"sequence length N={self.seq_len} is smaller than the number of "
                                  f"ranks P={size}; expected N >= P")
        if self.check_rows < 0:
            raise CollectiveError(f"check_rows={self.check_rows} is negative; expected >= 0")

    @property
    def flops(self) -> float:
        f = 4.0 * self.batch * self.seq_len ** 2 * self.heads * self.head_dim
        return f / 2 if self.causal else f


def attention_case(params: dict) -> tuple[AttentionCase, float | None]:
    """The case and check tolerance a job's parameter dict describes (``tolerance`` is not a case
    field: it only judges the check; None means the dtype's default)."""
    params = dict(params)
    tol = params.pop("tolerance", None)
    return AttentionCase(**params), tol


def resolved_params(case: AttentionCase, tolerance: float | None) -> dict:
    """Every parameter of ``case`` with defaults filled in (what a results file records)."""
    params = dataclasses.asdict(case)
    if params["kv_heads"] is None:
        params["kv_heads"] = params["heads"]
    params = {k: v for k, v in params.items() if v is not None}
    if case.check_rows:
        params["tolerance"] = default_tolerance(case.dtype) if tolerance is None else float(tolerance)
    return params


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_attention_case(case: AttentionCase, comm, *, keep_activations: bool = False) -> dict:
    """Run ``case`` on every rank of ``comm``; returns the same summary dict on every rank.

    Keys: ``wall_s`` (list, max over ranks per repeat), ``compute_s``/``wait_s`` (per rank, last
    repeat), ``gflops`` (median wall), ``peak_rss_bytes``/``peak_alloc_bytes`` (per rank),
    ``counts`` (positions per rank), and with a check ``max_abs_err``/``max_lse_err``/``check_rows``.
    With ``keep_activations`` the dict also has ``local`` (this rank's q/k/v/out/lse and positions;
    not gathered).
    """
    size, rank = comm.size, comm.rank
    case.validate(size)
    n = case.seq_len
    pos = positions(n, size, rank, case.layout)
    kvh = case.heads if case.kv_heads is None else case.kv_heads
    # host copies (what the check and the activations see) and the arrays the ring computes on
    q, k, v = random_qkv(case.seed, pos, case.batch, case.heads, kvh, case.head_dim,
                         "float64" if case.dtype == "float64" else "float32")
    q, k, v = (_as_dtype(x, case.dtype) for x in (q, k, v))
    xq, xk, xv, sync = _on_device(case, comm, (q, k, v))
    blocks = {key: val for key, val in (("block_q", case.block_q), ("block_k", case.block_k)) if val}
    walls, stats = [], {}
    traced = tracemalloc.is_tracing()
    if not traced:
        tracemalloc.start()
    tracemalloc.reset_peak()
    base_alloc = tracemalloc.get_traced_memory()[0]
    for _ in range(case.repeats):
        comm.Barrier()
        t0 = time.perf_counter()
        out, lse = ring_attention(xq, xk, xv, comm, causal=case.causal, layout=case.layout,
                                  stats=stats, **blocks)
        sync()
        walls.append(comm.allreduce(time.perf_counter() - t0, op=_max_op()))
    peak_alloc = tracemalloc.get_traced_memory()[1] - base_alloc
    if not traced:
        tracemalloc.stop()
    per_rank = comm.allgather((peak_rss_bytes(), peak_alloc, stats.get("compute_s", 0.0),
                               stats.get("wait_s", 0.0), len(pos), stats.get("skipped", 0)))
    result = {
        "wall_s": walls,
        "gflops": case.flops / float(np.median(walls)) / 1e9,
        "peak_rss_bytes": [p[0] for p in per_rank],
        "peak_alloc_bytes": [p[1] for p in per_rank],
        "compute_s": [p[2] for p in per_rank],
        "wait_s": [p[3] for p in per_rank],
        "counts": [p[4] for p in per_rank],
        "skipped_blocks": [p[5] for p in per_rank],
        "ranks": size,
    }
    if case.device == "gpu":
        out, lse = out.get(), lse.get()
        result["gpu_pool_bytes"] = comm.allgather(_gpu_pool_bytes())
    if case.check_rows:
        result.update(sampled_check(q, k, v, out, lse, comm, n=n, layout=case.layout,
                                    causal=case.causal, rows=case.check_rows, seed=case.seed))
    if keep_activations:  # bfloat16 has no HDF5 type: stored as the float32 values it holds
        q, k, v, out = (x.astype(np.float32) if case.dtype == "bfloat16" else x for x in (q, k, v, out))
        result["local"] = {"q": q, "k": k, "v": v, "out": out, "lse": lse, "positions": pos}
    return result


def _as_dtype(x, dtype: str):
    """``x`` (float32/64) in ``dtype``; bfloat16 is ml_dtypes' NumPy type (CuPy takes it)."""
    if dtype == "bfloat16":
        from .gpu.check import np_dtype

        return x.astype(np_dtype(dtype))
    return x.astype(dtype, copy=False)


def _on_device(case: AttentionCase, comm, arrays):
    """The arrays the ring computes on and a function that waits for the device."""
    if case.device == "cpu":
        return (*arrays, lambda: None)
    try:
        import cupy

        from .gpu import select_device

        select_device(comm)  # one GPU per rank, by node-local rank
        problem = None
    except Exception as exc:  # noqa: BLE001 - no CuPy, no driver, no device: say which, everywhere
        problem = f"{type(exc).__name__}: {exc}".splitlines()[0]
    problems = [(r, p) for r, p in enumerate(comm.allgather(problem)) if p]
    if problems:
        r, p = problems[0]
        raise CollectiveError(f"device 'gpu' needs a CUDA GPU and CuPy (pip install 'hpcattn[gpu]'), "
                              f"but rank {r} has none usable ({p})")
    return (*(cupy.asarray(x) for x in arrays), cupy.cuda.get_current_stream().synchronize)


def _gpu_pool_bytes() -> int:
    """Bytes CuPy's memory pool holds (it keeps what it allocated: close to the peak)."""
    import cupy

    return int(cupy.get_default_memory_pool().total_bytes())


def _max_op():
    from mpi4py import MPI

    return MPI.MAX


TOLERANCES = {"float64": 1e-10, "float32": 1e-5, "float16": 5e-3, "bfloat16": 4e-2}


def default_tolerance(dtype: str) -> float:
    """Max abs error ``--check`` accepts. float64/float32 accumulate in their own precision; the
    half types accumulate in float32, and their error is that of rounding q, k, v and out to 11
    (float16) or 8 (bfloat16) significant bits (about 4x the worst error seen in the kernel
    emulation tests, which judge against a reference computed in that precision)."""
    return TOLERANCES[dtype]
