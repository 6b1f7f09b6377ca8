"""One distributed attention case: make inputs, run the ring, time it, optionally check it.

This is what ``hpcattn run`` runs for its single-case options and what the job runner runs for
every attention case of a sweep. It knows nothing of files or command lines.

Before a case allocates anything, its memory per rank (:mod:`hpcattn.footprint`) is compared
with what each host (and GPU) has available, collectively: a case that cannot fit is refused with
the same one-line CollectiveError on every rank. :func:`preflight` does the same for every case
of a job at once, so a sweep whose last case cannot fit can be refused before its first runs.
"""
from __future__ import annotations

import dataclasses
import math
import socket
import time

import numpy as np

from . import backend, cpu_kernels, exchange
from .check import sampled_backward_check, sampled_check
from .context import STRATEGIES, check_grid, context_attention, hybrid_attention_backward
from .devices import DEVICES, default_tolerance, np_dtype
from .errors import CollectiveError, HpcattnError
from . import footprint
from .footprint import MAX_REPEATS
from .inputs import random_qkv, random_rows
from .layouts import Distribution, check_layout
from .masks import make_mask, parse_cu_seqlens, parse_window
from ._threads import kernel_workers
from .measure import attention_backward_flops, attention_flops, peak_rss_bytes, traced_peak
from .ring_backward import ring_attention_backward
from .ulysses import ulysses_attention_backward

#: the gradient of each strategy (a new strategy without one is refused with backward = true)
BACKWARD = {"ring": ring_attention_backward, "ulysses": ulysses_attention_backward,
            "hybrid": hybrid_attention_backward}


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
    strategy: str = "ring"           # "ring", "ulysses" or "hybrid" (hpcattn.context)
    ulysses_size: int | None = None  # hybrid: ranks per all-to-all group (divides the rank count)
    backward: bool = False           # also time (and check) the gradients dq, dk, dv
    window: str | None = None        # "LEFT,RIGHT" (FlashAttention's window_size; -1 unbounded)
    cu_seqlens: str | None = None    # "0,c1,...,N": packed variable-length sequences
    kv_pieces: int = 1               # ring/hybrid: each K/V block travels in this many pieces

    def validate(self, size: int) -> None:
        """Collective-safe: every rank evaluates the same case and raises the same error."""
        for name in ("seq_len", "batch", "heads", "head_dim", "repeats", "kv_pieces"):
            val = getattr(self, name)
            if not isinstance(val, (int, np.integer)) or val < 1:
                raise CollectiveError(f"{name}={val!r} is invalid; expected a positive integer")
        if self.repeats > MAX_REPEATS:
            raise CollectiveError(f"repeats={self.repeats!r} is too large; expected at most {MAX_REPEATS}")
        kvh = self.heads if self.kv_heads is None else self.kv_heads
        if kvh < 1 or self.heads % kvh:
            raise CollectiveError(f"kv_heads={kvh} does not divide heads={self.heads}; "
                                  "expected heads to be a multiple of kv_heads")
        if self.device not in DEVICES:
            raise CollectiveError(f"device {self.device!r} is unknown; expected one of {', '.join(DEVICES)}")
        be = backend.by_name(self.device)
        if self.dtype not in be.dtypes:
            raise CollectiveError(f"dtype {self.dtype!r} is not supported on {self.device}; expected one of "
                                  f"{', '.join(be.dtypes)}")
        if be.head_dims is not None and self.head_dim not in be.head_dims:
            raise CollectiveError(f"head_dim={self.head_dim} is not supported by the {self.device.upper()} "
                                  f"kernels; expected one of {', '.join(map(str, be.head_dims))}")
        try:
            check_layout(self.layout)
        except ValueError as exc:
            raise CollectiveError(str(exc)) from None
        if self.seq_len < size:
            raise CollectiveError(f"sequence length N={self.seq_len} is smaller than the number of "
                                  f"ranks P={size}; expected N >= P")
        if self.check_rows < 0:
            raise CollectiveError(f"check_rows={self.check_rows} is negative; expected >= 0")
        if self.strategy not in STRATEGIES:
            raise CollectiveError(f"strategy {self.strategy!r} is unknown; expected one of "
                                  f"{', '.join(STRATEGIES)}")
        if self.strategy == "hybrid":
            check_grid(size, self.ulysses_size)
        elif self.ulysses_size is not None:
            raise CollectiveError(f"ulysses_size={self.ulysses_size} is for strategy 'hybrid', not "
                                  f"{self.strategy!r}; expected no ulysses_size")
        if self.kv_pieces != 1 and self.strategy == "ulysses":
            raise CollectiveError(f"kv_pieces={self.kv_pieces} is for the ring and hybrid strategies "
                                  "(ulysses passes no K/V blocks); expected 1")
        if self.backward and self.strategy not in BACKWARD:
            raise CollectiveError(f"backward = true needs a strategy with a backward pass "
                                  f"({', '.join(BACKWARD)}); {self.strategy!r} has a forward only")
        self.mask   # a bad window or cu_seqlens: the same CollectiveError on every rank

    @property
    def mask(self):
        """The case's bound ``hpcattn.masks.Mask`` (CollectiveError: the same on every rank)."""
        try:
            return make_mask(self.causal, parse_window(self.window),
                             parse_cu_seqlens(self.cu_seqlens)).bind(self.seq_len, self.seq_len)
        except HpcattnError as exc:
            raise CollectiveError(str(exc)) from None

    @property
    def mask_kw(self) -> dict:
        """``window``/``cu_seqlens`` as the strategies and the check take them (none: empty)."""
        kw = {}
        if self.window is not None:
            kw["window"] = parse_window(self.window)
        if self.cu_seqlens is not None:
            kw["cu_seqlens"] = parse_cu_seqlens(self.cu_seqlens)
        return kw

    @property
    def flops(self) -> float:
        """The FLOPs one repeat computes: the forward, plus 2.5x it with ``backward``. With a
        window or packed sequences, 4·B·H·d per visible (query, key) pair."""
        fwd = attention_flops(self.batch, self.seq_len, self.heads, self.head_dim, causal=self.causal)
        if self.mask_kw:
            fwd = 4.0 * self.batch * self.heads * self.head_dim * self.mask.visible_pairs()
        if not self.backward:
            return fwd
        return fwd + attention_backward_flops(self.batch, self.seq_len, self.heads, self.head_dim,
                                              causal=self.causal)


def attention_case(params: dict) -> tuple[AttentionCase, float | None]:
    """The case and check tolerance a job's parameter dict describes (``tolerance`` is not a case
    field: it only judges the check; None means the dtype's default)."""
    params = dict(params)
    tol = check_tolerance(params.pop("tolerance", None))
    return AttentionCase(**params), tol


def check_tolerance(tol) -> float | None:
    """``tol`` as a float (None stays None: the dtype's default); CollectiveError unless it is a
    finite number >= 0 (a nan tolerance fails every check, an infinite one passes every one)."""
    if tol is None:
        return None
    number = isinstance(tol, (int, float, np.integer, np.floating)) and not isinstance(tol, (bool, np.bool_))
    if not number or not math.isfinite(tol) or tol < 0:
        raise CollectiveError(f"tolerance={tol!r} is invalid; expected a finite number >= 0 (the "
                              "largest max abs error the check accepts)")
    return float(tol)


def resolved_params(case: AttentionCase, tolerance: float | None) -> dict:
    """Every parameter of ``case`` with defaults filled in (what a results file records)."""
    params = dataclasses.asdict(case)
    if params["kv_heads"] is None:
        params["kv_heads"] = params["heads"]
    params = {k: v for k, v in params.items() if v is not None}
    if case.check_rows:
        tolerance = check_tolerance(tolerance)
        params["tolerance"] = default_tolerance(case.dtype) if tolerance is None else tolerance
    return params


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
    dist = Distribution(case.seq_len, size, case.layout)
    be = _backend(case, comm)
    check_memory(case, comm, dist, be)   # before the first position or row exists
    pos = dist.positions(rank)
    kvh = case.heads if case.kv_heads is None else case.kv_heads
    # host copies (what the check and the activations see) and the arrays the ring computes on
    q, k, v = random_qkv(case.seed, pos, case.batch, case.heads, kvh, case.head_dim,
                         "float64" if case.dtype == "float64" else "float32")
    q, k, v = (x.astype(np_dtype(case.dtype), copy=False) for x in (q, k, v))
    xq, xk, xv = (be.to_device(x) for x in (q, k, v))
    dout = xdout = None
    if case.backward:
        dout = random_rows(case.seed, "dout", pos, case.batch, case.heads, case.head_dim,
                           "float64" if case.dtype == "float64" else "float32")
        dout = dout.astype(np_dtype(case.dtype), copy=False)
        xdout = be.to_device(dout)
    blocks = {key: val for key, val in (("block_q", case.block_q), ("block_k", case.block_k)) if val}
    kw = dict(causal=case.causal, layout=case.layout, **case.mask_kw, **blocks)
    pieces = {"kv_pieces": case.kv_pieces} if case.kv_pieces != 1 else {}
    walls, stats, bstats = [], {}, {}

    def repeats():
        grads = None
        for _ in range(case.repeats):
            exchange.barrier(comm, "starting a repeat")
            t0 = time.perf_counter()
            res = context_attention(xq, xk, xv, comm, strategy=case.strategy,
                                    ulysses_size=case.ulysses_size, stats=stats, **kw, **pieces)
            if case.backward:
                grid = {"ulysses_size": case.ulysses_size} if case.strategy == "hybrid" else {}
                grads = BACKWARD[case.strategy](xq, xk, xv, *res, xdout, comm, stats=bstats, **kw,
                                                **grid, **pieces)
            be.synchronize()
            walls.append(exchange.allreduce(comm, time.perf_counter() - t0, "timing a repeat",
                                            op=_max_op()))
        return res, grads

    cpu_kernels.LAST.clear()  # which CPU kernel this case's per-rank calls ran (provenance)
    ((out, lse), grads), peak_alloc = traced_peak(repeats)
    per_rank = exchange.allgather(comm, (peak_rss_bytes(), peak_alloc, stats.get("compute_s", 0.0),
                               stats.get("wait_s", 0.0), len(pos), stats.get("skipped", 0),
                               bstats.get("compute_s", 0.0), bstats.get("wait_s", 0.0),
                               stats.get("steps", 0)),
                                  "collecting the case's figures")
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
    if case.device == "cpu":  # the kernel the per-rank calls (or ring states) ran
        result["cpu_kernel"] = cpu_kernels.LAST.get("forward", cpu_kernels.NUMPY_KERNEL)
        if case.backward:
            result["cpu_kernel_backward"] = cpu_kernels.LAST.get("backward", cpu_kernels.NUMPY_KERNEL)
    if case.mask_kw:   # a window can stop the ring early: the steps each rank ran
        result["steps"] = [p[8] for p in per_rank]
    if case.backward:
        result["backward_compute_s"] = [p[6] for p in per_rank]
        result["backward_wait_s"] = [p[7] for p in per_rank]
    out, lse = be.to_host(out), be.to_host(lse)  # what the check and the activations see
    if case.device == "gpu":
        result["gpu_pool_bytes"] = exchange.allgather(comm, be.pool_bytes(), "GPU memory")
    if grads is not None:
        grads = dict(zip(("dq", "dk", "dv"), (be.to_host(g) for g in grads)))
    if case.check_rows:
        result.update(sampled_check(q, k, v, out, lse, comm, dist=dist, causal=case.causal,
                                    rows=case.check_rows, seed=case.seed, **case.mask_kw))
        if grads is not None:
            result.update(sampled_backward_check(q, k, v, out, lse, dout, *grads.values(), comm,
                                                 dist=dist, causal=case.causal,
                                                 rows=case.check_rows, seed=case.seed,
                                                 **case.mask_kw))
            # one figure the tolerance judges: the worst of out, dq, dk and dv
            result["max_out_err"] = result["max_abs_err"]
            result["max_abs_err"] = max(result["max_abs_err"], result["max_dq_err"],
                                        result["max_dk_err"], result["max_dv_err"])
    if keep_activations:  # bfloat16 has no HDF5 type: stored as the float32 values it holds
        local = {"q": q, "k": k, "v": v, "out": out, "lse": lse}
        if grads is not None:
            local.update(dout=dout, **grads)
        result["local"] = {name: x.astype(np.float32) if case.dtype == "bfloat16" and name != "lse" else x
                           for name, x in local.items()}
        result["local"]["positions"] = pos
    return result


def case_memory(case: AttentionCase, dist: Distribution, rank: int):
    """(host, device) :class:`~hpcattn.footprint.RankMemory` of ``rank`` running ``case``."""
    kvh = case.heads if case.kv_heads is None else case.kv_heads
    return footprint.rank_memory(dist.count(rank), batch=case.batch, heads=case.heads, kv_heads=kvh,
                                 head_dim=case.head_dim, dtype=case.dtype, n_max=max(dist.counts),
                                 ranks=dist.size, device=case.device, check_rows=case.check_rows,
                                 backward=case.backward, workers=kernel_workers(),
                                 kv_pieces=case.kv_pieces)


def check_memory(case: AttentionCase, comm, dist: Distribution, be) -> None:
    """Collective: CollectiveError (the same on every rank) when the estimated memory of the
    ranks sharing a host (or a GPU) exceeds what is available there; nothing is allocated."""
    problem = _shortfall(case, dist, _available(comm, be if case.device == "gpu" else None))
    if problem:
        raise CollectiveError(problem)


def preflight(cases_params, comm) -> None:
    """Collective, before the first case of a job runs: CollectiveError naming the first
    attention case (index, parameters) whose estimated memory cannot fit on the ranks of
    ``comm``. ``cases_params``: a list of parameter dicts, or case index -> parameters. One exchange of what is available; each rank's estimate is computed everywhere."""
    if not isinstance(cases_params, dict):
        cases_params = dict(enumerate(cases_params))
    cases = {i: attention_case(p)[0] for i, p in cases_params.items()}
    gpu = next((c for c in cases.values() if c.device == "gpu"), None)
    available = _available(comm, _backend(gpu, comm) if gpu else None)
    for i, case in cases.items():
        problem = _shortfall(case, Distribution(case.seq_len, comm.size, case.layout), available)
        if problem:
            raise CollectiveError(f"case {i}: {problem}; no case was run")


def _available(comm, be=None) -> list[tuple]:
    """Per rank: (host name, host bytes available, source, GPU name, GPU bytes, source)."""
    node = socket.gethostname()
    gpu = (None, None, "")
    if be is not None:
        gpu = (f"GPU {footprint.device_id(be)} of {node}", *footprint.device_available(be))
    return exchange.allgather(comm, (f"host {node}", *footprint.host_available(), *gpu),
                              "checking memory")


def _shortfall(case: AttentionCase, dist: Distribution, available) -> str | None:
    """The refusal of ``case`` given every rank's ``available`` memory, or None."""
    memory: dict = {}   # ranks of equal count have equal needs (a case has two or three counts)
    reports = []
    for rank, (node, host_free, host_src, gpu, gpu_free, gpu_src) in enumerate(available):
        count = dist.count(rank)
        if count not in memory:
            memory[count] = case_memory(case, dist, rank)
        host, device = memory[count]
        reports.append((node, "host", host, host_free, host_src))
        if case.device == "gpu" and gpu is not None:
            reports.append((gpu, "GPU", device, gpu_free, gpu_src))
    ranks = f"{dist.size} rank{'s' if dist.size > 1 else ''}"
    return footprint.shortfall(reports, f"seq_len={case.seq_len} on {ranks}")


def _backend(case: AttentionCase, comm):
    """The case's device as a backend, its device chosen on every rank (collective: a rank
    without a usable GPU fails every rank with the same message)."""
    try:
        be = backend.by_name(case.device)
        be.use_device(comm)  # one GPU per rank, by node-local rank
        problem = None
    except Exception as exc:  # noqa: BLE001 - no CuPy, no driver, no device: say which, everywhere
        problem = f"{type(exc).__name__}: {exc}".splitlines()[0]
    problems = [(r, p) for r, p in enumerate(exchange.allgather(comm, problem, "choosing devices")) if p]
    if problems:
        r, p = problems[0]
        raise CollectiveError(f"device {case.device!r} needs a CUDA GPU and CuPy (pip install 'hpcattn[gpu]'), "
                              f"but rank {r} has none usable ({p})")
    return be


def _max_op():
    from mpi4py import MPI

    return MPI.MAX
