"""The NumPy kernels on all of a process's cores: (batch x kv heads) [x query tiles] split over
worker threads, each running ``hpcattn.blockwise`` (or ``blockwise_backward``) on its share with
one BLAS thread. NumPy's matmul and ufuncs release the GIL, so C threads run C tiles at once;
one-thread BLAS on L2-sized tiles beats C-thread BLAS on the same tiles (docs/performance-notes.md).

Shares are independent (a kv head's GQA group stays together; query tiles of one head only split
the rows, whose keys and positions stay whole), and every share writes its own slice of the
output, so the result is bit-for-bit the one-thread result. Calls with a progress callback (the
ring progresses MPI between tiles) stay on the calling thread.
"""
from __future__ import annotations

import functools
import threading
from concurrent.futures import ThreadPoolExecutor, wait

import numpy as np

from . import blockwise, blockwise_backward, cpu_short

_pools: dict[int, ThreadPoolExecutor] = {}


def pool(workers: int) -> ThreadPoolExecutor:
    if workers not in _pools:
        _pools[workers] = ThreadPoolExecutor(workers, thread_name_prefix="hpcattn-cpu")
    return _pools[workers]


def run_tasks(tasks, workers):
    """Run the callables in ``tasks`` on ``workers`` threads, this one among them: it and
    ``workers - 1`` pool threads take the next task until none is left; re-raises the first
    error (no task starts after one has failed). Waking a pool thread and being woken costs tens
    to hundreds of microseconds on a VM, so the calling thread works instead of waiting, and one
    task runs here alone."""
    if workers <= 1 or len(tasks) == 1:
        for task in tasks:
            task()
        return
    todo = iter(tasks)
    lock = threading.Lock()
    failed = []

    def drain():
        while True:
            with lock:
                task = None if failed else next(todo, None)
            if task is None:
                return
            try:
                task()
            except BaseException:
                failed.append(True)
                raise

    futs = [pool(workers - 1).submit(drain) for _ in range(min(workers, len(tasks)) - 1)]
    try:
        drain()
    finally:
        errors = []
        for fut in futs:
            try:
                fut.result()
            except BaseException as exc:
                errors.append(exc)
    if errors:
        raise errors[0]


def _mask_kw(mask):
    return {} if mask is None else {"mask": mask}


def run_with_progress(tasks, workers, progress=None):
    """Run the callables in ``tasks`` on ``workers`` threads while this thread calls
    ``progress`` (the ring's MPI progress) every 2 ms until they are done; re-raises the first
    error."""
    futs = [pool(workers).submit(t) for t in tasks]
    while progress is not None and not all(f.done() for f in futs):
        progress()
        wait(futs, timeout=0.002)
    for f in futs:
        f.result()


#: tasks per worker a call is split into at least: rows differ in cost (causal) and a core may be
#: slowed by other work, and the last task's tail idles the other workers (8 rather than 4 measured
#: 4.81 s against 4.97 s on 2 workers at N=16384, H=8, side by side)
TASKS_PER_WORKER = 8


def row_chunks(nq, shares, workers, block):
    """Query row ranges: enough that ``shares`` x chunks keeps ``workers`` busy
    (:data:`TASKS_PER_WORKER` per worker, for balance), each a whole number of tiles."""
    per = TASKS_PER_WORKER * workers
    want = -(-per // shares) if shares < per else 1
    step = max(block, -(-nq // want) // block * block)
    return [(r, min(r + step, nq)) for r in range(0, nq, step)]


def wide_key_tile(query_rows: int) -> int | None:
    """Key tile for a call with few query rows (per kv head): as many keys as keep the score
    tile at the default tile's size; None (the default) for ordinary shapes."""
    rows = min(query_rows, blockwise.DEFAULT_BLOCK_ROWS)
    if rows >= blockwise.DEFAULT_BLOCK_ROWS:
        return None
    return max(blockwise.DEFAULT_BLOCK_K, blockwise.DEFAULT_BLOCK_ROWS * blockwise.DEFAULT_BLOCK_K // rows)


def _short(q, k, v, *, causal, scale, workers):
    """``cpu_short`` (many queries, few keys), its (batch, head) shares split over workers."""
    from .validate import attention_scale

    scale = attention_scale(scale, q.shape[3])
    shares = [(i, j) for i in range(q.shape[0]) for j in range(q.shape[2])]
    if workers <= 1 or len(shares) == 1:
        return cpu_short.attention(q, k, v, causal=causal, scale=scale)
    out = np.empty_like(q)
    lse = np.empty((q.shape[0], q.shape[2], q.shape[1]), dtype=q.dtype)

    def part(mine):
        return lambda: cpu_short.attention(q, k, v, causal=causal, scale=scale, shares=mine,
                                           out=out, lse=lse)
    run_tasks([part(shares[w::workers]) for w in range(workers)], workers)
    return out, lse


def numpy_attention(q, k, v, *, causal, scale, q_pos=None, k_pos=None, block_q=None, block_k=None,
                    progress=None, mask=None, workers=1):
    """``blockwise.attention`` on ``workers`` threads (same arguments, same result)."""
    b, nq, h, d = q.shape
    hkv = k.shape[2]
    g = h // hkv
    plain = mask is None or not mask.extended
    default_pos = q_pos is None and k_pos is None
    if block_q is None and block_k is None and plain and default_pos and cpu_short.applies(nq, k.shape[1]):
        return _short(q, k, v, causal=causal if mask is None else mask.causal, scale=scale,
                      workers=workers)
    block_k = block_k or wide_key_tile(nq * g)
    kw = dict(causal=causal, scale=scale, block_q=block_q, block_k=block_k, **_mask_kw(mask))
    if workers <= 1 or progress is not None or b * hkv * nq <= 1:
        return blockwise.attention(q, k, v, q_pos=q_pos, k_pos=k_pos, progress=progress, **kw)
    positioned = causal or (mask is not None and not mask.trivial)
    if positioned:
        # a mask binds to the call's lengths: row chunks get explicit global positions
        q_pos = np.arange(nq) if q_pos is None else np.asarray(q_pos)
        k_pos = np.arange(k.shape[1]) if k_pos is None else np.asarray(k_pos)
        if mask is not None and mask.n_q is None:
            mask = mask.bind(nq, k.shape[1])
            kw["mask"] = mask
    block = block_q or max(1, blockwise.DEFAULT_BLOCK_ROWS // g)
    rows = row_chunks(nq, b * hkv, workers, block)
    out = np.empty_like(q)
    lse = np.empty((b, h, nq), dtype=q.dtype)

    def share(i, j, r0, r1):
        hs = slice(j * g, (j + 1) * g)

        def run():
            o, l = blockwise.attention(q[i:i + 1, r0:r1, hs], k[i:i + 1, :, j:j + 1],
                                       v[i:i + 1, :, j:j + 1],
                                       q_pos=None if q_pos is None else q_pos[r0:r1], k_pos=k_pos, **kw)
            out[i:i + 1, r0:r1, hs] = o
            lse[i:i + 1, hs, r0:r1] = l
        return run
    run_tasks([share(i, j, r0, r1) for i in range(b) for j in range(hkv) for r0, r1 in rows], workers)
    return out, lse


def numpy_attention_backward(q, k, v, out, lse, dout, *, causal, scale, q_pos=None, k_pos=None,
                             block_q=None, block_k=None, progress=None, mask=None, workers=1):
    """``blockwise_backward.attention_backward`` on ``workers`` threads, one (batch, kv head)
    share each (dk/dv sum over all queries, so rows are not split)."""
    kw = dict(causal=causal, scale=scale, q_pos=q_pos, k_pos=k_pos, block_q=block_q,
              block_k=block_k, check_finite=False, **_mask_kw(mask))
    b, _, h, _ = q.shape
    hkv = k.shape[2]
    if workers <= 1 or progress is not None or b * hkv == 1:
        return blockwise_backward.attention_backward(q, k, v, out, lse, dout, progress=progress, **kw)
    g = h // hkv
    dq, dk, dv = np.empty_like(q), np.empty_like(k), np.empty_like(v)

    def share(i, j):
        hs, ks = slice(j * g, (j + 1) * g), slice(j, j + 1)

        def run():
            grads = blockwise_backward.attention_backward(
                q[i:i + 1, :, hs], k[i:i + 1, :, ks], v[i:i + 1, :, ks], out[i:i + 1, :, hs],
                lse[i:i + 1, hs], dout[i:i + 1, :, hs], **kw)
            dq[i:i + 1, :, hs], dk[i:i + 1, :, ks], dv[i:i + 1, :, ks] = grads
        return run
    run_tasks([share(i, j) for i in range(b) for j in range(hkv)], workers)
    return dq, dk, dv


class ThreadedPartial:
    """A ring rank's online state (``blockwise.PartialAttention``'s interface) on ``workers``
    threads: the query rows are dealt out tile by tile (round robin, so causal work stays
    balanced on any layout) to one state per worker, and every state reads the same packed K/V
    block, so the ring's buffers and their layout are those of one state."""

    def __init__(self, q, kv_heads, *, causal, scale, q_pos, block_q=None, block_k=None, mask=None,
                 workers=2):
        g = q.shape[2] // kv_heads
        block = block_q or max(1, blockwise.DEFAULT_BLOCK_ROWS // g)
        tiles = [np.arange(s, min(s + block, q.shape[1])) for s in range(0, q.shape[1], block)]
        self.rows = [np.concatenate(tiles[w::workers]) for w in range(min(workers, len(tiles)))]
        self.shape, self.dtype, self.workers = q.shape, q.dtype, len(self.rows)
        kw = dict(causal=causal, scale=scale, block_q=block_q, block_k=block_k, **_mask_kw(mask))
        self.parts = [blockwise.PartialAttention(q[:, r], kv_heads, q_pos=None if q_pos is None
                                                 else np.asarray(q_pos)[r], **kw) for r in self.rows]

    def packed_size(self, n: int) -> int:
        return self.parts[0].packed_size(n)

    def pack(self, k, v, buf):
        self.parts[0].pack(k, v, buf)

    def add_packed(self, buf, n, k_pos, progress=None):
        # the ring's progress (MPI) stays on this thread, between the workers' tiles
        run_with_progress([functools.partial(p.add_packed, buf, n, k_pos) for p in self.parts],
                          self.workers, progress)

    def result(self):
        b, nq, h, _ = self.shape
        out = np.empty(self.shape, dtype=self.dtype)
        lse = np.empty((b, h, nq), dtype=self.dtype)
        for r, part in zip(self.rows, self.parts):
            out[:, r], lse[:, :, r] = part.result()
        return out, lse
