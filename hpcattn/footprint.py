"""What one rank of an attention case holds, estimated before anything is allocated, and the
other up-front limits of a run (timed repeats), so a case that cannot finish is refused at once.

The model follows what a ring rank really allocates (``hpcattn.cases``, ``hpcattn.ring``,
``blockwise.PartialAttention``, ``gpu.MergedAttention``), in bytes:

* ``inputs``: q, k, v of its ``n`` positions (host; on GPU also the float32 rows they are drawn as);
* ``outputs``: out and lse;
* ``ring``: the K/V data of the two ring buffers, sized for the largest rank's block, or with
  ``kv_pieces`` for its largest piece (one buffer on a single rank);
* ``packing``: the CPU layout's extra column of ones per key and value row (``[k, 1]``, ``[v, 1]``);
* ``state``: the running state: on CPU the scaled query copy ``[scale*q, -m]``, the accumulator
  ``[acc, l]`` and ``m``, and a score tile per kernel worker; on GPU each block's kernel output
  and the log-sum-exp merge's temporaries;
* ``result``: what finishing holds beside the outputs (CPU: the ring buffers and the scaled
  query copy are dropped first, so the accumulator, ``m`` and lse's float64 temporaries; GPU:
  the buffers and the merged state, which stay until the call returns);
* ``scratch``: fixed per rank: one chunk of random rows;
* ``check``: the sampled float64 check (after the ring: its peak is not added to the ring's).

The CPU terms are the NumPy kernel's; for float32 each is the larger of that and the fused
kernel's (``hpcattn.cpu_fused``, :func:`fused_bytes`): its state is the accumulator (rows padded
to 16 floats), ``m`` and a float64 ``l``, and each of its calls (one per kernel worker at a time)
holds a NumPy scratch array of its tiles and the arriving block's keys and values packed for
its products (2 x keys x d floats, d rounded up to 16, when at most 64 MiB). So the estimate
is an upper bound for either kernel.

``held`` (inputs, outputs, ring) is what a rank cannot do without (``hpcattn bench`` reports it
as the shard footprint); ``total`` is the estimate a case is refused by. On GPU ``device`` is
what lives in GPU memory and ``host`` what stays in host memory.
"""
from __future__ import annotations

import dataclasses
import os

import numpy as np

# a timed repeat is a whole case: a huge count is a typo or a run that never ends
MAX_REPEATS = 1000

GEN_CHUNK = 1024          # rows per random stream (hpcattn.inputs.CHUNK)
TILE_ROWS = 512           # CPU score tile rows and columns (blockwise.DEFAULT_BLOCK_*)
CHECK_KEY_CHUNK = 8192    # keys per step of the sampled check (hpcattn.check.KEY_CHUNK)


@dataclasses.dataclass(frozen=True)
class RankMemory:
    inputs: int = 0
    outputs: int = 0
    ring: int = 0
    packing: int = 0
    state: int = 0
    result: int = 0
    scratch: int = 0
    check: int = 0

    @property
    def held(self) -> int:
        return self.inputs + self.outputs + self.ring

    @property
    def total(self) -> int:
        """The peak of three phases: the ring (buffers and state, no output yet), finishing
        (the outputs beside ``result``) and the sampled check (after both are freed)."""
        ring_phase = self.ring + self.packing + self.state
        finish = self.outputs + self.result
        return self.inputs + self.scratch + max(ring_phase, finish, self.outputs + self.check)

    def parts(self) -> str:
        """'inputs 1.0 GiB, ring 2.0 GiB, ...' (the non-zero parts)."""
        return ", ".join(f"{f.name} {fmt_bytes(getattr(self, f.name))}"
                         for f in dataclasses.fields(self) if getattr(self, f.name))


def rank_memory(n: int, *, batch: int, heads: int, kv_heads: int, head_dim: int, dtype: str,
                n_max: int | None = None, ranks: int = 2, device: str = "cpu",
                check_rows: int = 0, backward: bool = False,
                workers: int = 1, kv_pieces: int = 1) -> tuple[RankMemory, RankMemory]:
    """(host, device) bytes of a rank holding ``n`` of the positions (``n_max``: the largest
    rank's count, which sizes the ring buffers, or ``kv_pieces`` of it rounded up; ``workers``:
    its CPU kernel threads). On CPU ``device`` is empty. ``backward`` adds what the gradients
    hold on top (:func:`backward_bytes`, whose travelling buffers ``kv_pieces`` shrinks too)."""
    n_max = n if n_max is None else n_max
    host, device_mem = _forward_memory(n, batch=batch, heads=heads, kv_heads=kv_heads,
                                       head_dim=head_dim, dtype=dtype, n_max=n_max, ranks=ranks,
                                       device=device, check_rows=check_rows, workers=workers,
                                       n_block=n_max if ranks == 1 else -(-n_max // max(1, kv_pieces)))
    if backward:
        extra = backward_bytes(n, batch=batch, heads=heads, kv_heads=kv_heads, head_dim=head_dim,
                               dtype=dtype, n_max=n_max, ranks=ranks, kv_pieces=kv_pieces)
        # the gradients run beside the forward's outputs: counted in both phases (an upper bound)
        if device == "cpu":
            host = dataclasses.replace(host, state=host.state + extra, result=host.result + extra)
        else:
            device_mem = dataclasses.replace(device_mem, state=device_mem.state + extra,
                                             result=device_mem.result + extra)
    return host, device_mem


def backward_bytes(n: int, *, batch: int, heads: int, kv_heads: int, head_dim: int, dtype: str,
                   n_max: int | None = None, ranks: int = 2, kv_pieces: int = 1) -> int:
    """What the ring backward adds per rank (an upper estimate): dout, dq and its accumulator,
    the scaled q/dout copies with their extra column, dk/dv, and the travelling K/V blocks with
    their dK/dV accumulators (two buffers each, accumulators in float32/float64; with
    ``kv_pieces`` a piece of the largest block each)."""
    item = np.dtype(dtype).itemsize if dtype != "bfloat16" else 2
    acc = 8 if dtype == "float64" else 4
    n_max = n if n_max is None else n_max
    q_row, kv_row = batch * heads * (head_dim + 1), batch * kv_heads * (head_dim + 1)
    buffers = 2 if ranks > 1 else 1
    n_block = n_max if ranks == 1 else -(-n_max // max(1, kv_pieces))
    return (n * q_row * (2 * item + 3 * acc) + 2 * n * kv_row * item
            + buffers * 2 * n_block * kv_row * (item + acc))


def fused_bytes(n: int, n_max: int, *, batch: int, heads: int, head_dim: int) -> tuple[int, int]:
    """(state, per worker call) of the fused kernel on a rank of ``n`` positions (float32), as
    ``kernels/cpu/attention_fwd.cpp``'s plan_of sizes them. State: accumulator rows of d rounded
    up to 16 floats (8 rows of padding per row chunk, a chunk :data:`TILE_ROWS` rows at least), m
    and a float64 l. A call: its query, score and
    key/value tiles of :data:`TILE_ROWS`, the key tiles' position ranges, and the arriving block
    of ``n_max`` keys packed when that takes at most 64 MiB."""
    d16 = -(-head_dim // 16) * 16
    chunks = n // TILE_ROWS + 1
    state = n * batch * heads * (d16 + 3) * 4 + 8 * d16 * 4 * batch * heads * chunks
    packed = 2 * (-(-n_max // 16) * 16) * d16 * 4
    tiles = ((TILE_ROWS + 8) * (head_dim + TILE_ROWS) + TILE_ROWS * (head_dim + d16)) * 4
    ranges = (-(-n_max // 16) + 64) * 4
    return state, (packed if packed <= 64 << 20 else 0) + tiles + ranges


def _forward_memory(n: int, *, batch: int, heads: int, kv_heads: int, head_dim: int, dtype: str,
                    n_max: int | None, ranks: int, device: str,
                    check_rows: int, workers: int = 1,
                    n_block: int | None = None) -> tuple[RankMemory, RankMemory]:
    """``n_block``: the keys one ring message carries at most (default ``n_max``)."""
    item = np.dtype(dtype).itemsize if dtype != "bfloat16" else 2
    n_max = n if n_max is None else n_max
    n_block = n_max if n_block is None else n_block
    b, h, hkv, d = batch, heads, kv_heads, head_dim
    q_row, kv_row, lse_row = b * h * d, b * hkv * d, b * h       # elements per position
    buffers = 2 if ranks > 1 else 1
    kv_data = buffers * 2 * n_block * kv_row * item
    rows = min(check_rows, n * ranks)
    keys = min(CHECK_KEY_CHUNK, n)
    # per chunk of keys: the float64 scores (the reference works in place), their causal mask,
    # the chunk's k/v in float64, and the sampled rows' partial results
    check = 0 if not rows else (rows * b * h * keys * 8 + rows * keys
                                + 2 * b * keys * hkv * d * 8 + 6 * rows * q_row * 8)
    qkv = n * (q_row + 2 * kv_row)
    if device == "cpu":
        gen = b * GEN_CHUNK * h * d * item                          # one chunk of random rows
        tile = TILE_ROWS * TILE_ROWS * item + TILE_ROWS * (d + 1) * item
        state = n * (2 * b * h * (d + 1) + lse_row) * item
        if dtype == "float32":  # the larger of the two kernels' terms
            f_state, f_call = fused_bytes(n, n_block, batch=b, heads=h, head_dim=d)
            state, tile = max(state, f_state), max(tile, f_call)
        state += workers * tile   # each kernel worker's call: tiles while the ring runs
        host = RankMemory(
            inputs=qkv * item, outputs=n * (q_row + lse_row) * item, ring=kv_data,
            packing=buffers * 2 * n_block * b * hkv * item,
            state=state,
            # finishing: the accumulator [acc, l] and m stay; seen, l_safe and lse in float64
            result=n * (b * h * (d + 1) + lse_row) * item + n * lse_row * 3 * 8,
            scratch=gen, check=check)
        return host, RankMemory()
    gen_item = 4                                                    # drawn as float32, then cast
    host = RankMemory(inputs=qkv * (gen_item + item), outputs=n * (q_row * item + lse_row * 4),
                      ring=kv_data,                                 # pinned staging (no CUDA-aware MPI)
                      result=kv_data, scratch=b * GEN_CHUNK * h * d * gen_item, check=check)
    state = n * (2 * q_row * item + 6 * lse_row * 4)
    device_mem = RankMemory(inputs=qkv * item, outputs=n * (q_row * item + lse_row * 4),
                            ring=kv_data, state=state, result=kv_data + state)
    return host, device_mem


def shortfall(reports, what: str) -> str | None:
    """The one-line refusal, or None when every rank's estimate fits. ``reports`` has one
    ``(where, memory, need: RankMemory, available, source)`` per rank and kind of memory
    (every rank passes the same gathered list, so every rank says the same). Ranks reporting the
    same ``where`` (a host, or a GPU of a host) share its memory: their needs add up."""
    groups: dict = {}
    for where, memory, need, avail, source in reports:
        g = groups.setdefault((where, memory), {"need": 0, "ranks": 0, "avail": None, "source": source,
                                                "largest": need})
        g["need"] += need.total
        g["ranks"] += 1
        if need.total > g["largest"].total:
            g["largest"] = need
        if avail is not None and (g["avail"] is None or avail < g["avail"]):
            g["avail"], g["source"] = avail, source
    for (where, memory), g in groups.items():
        if g["avail"] is not None and g["need"] > g["avail"]:
            big = g["largest"]
            shared = f", {fmt_bytes(g['need'])} for the {g['ranks']} ranks there" if g["ranks"] > 1 else ""
            return (f"{what} needs about {fmt_bytes(big.total)} of {memory} memory per rank "
                    f"({big.parts()}){shared}, but {where} has {fmt_bytes(g['avail'])} available "
                    f"({g['source']}); expected fewer positions per rank: more ranks, a shorter "
                    "seq_len, or fewer heads or batch")
    return None


# --- what is available ---------------------------------------------------------------------------

def host_available() -> tuple[int | None, str]:
    """(bytes this process may still allocate on this host, where the number comes from):
    MemAvailable of /proc/meminfo, or less where a cgroup (a container, a Slurm job) caps memory.
    (None, reason) where neither can be read."""
    found: list[tuple[int, str]] = []
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    found.append((int(line.split()[1]) * 1024, "MemAvailable"))
    except (OSError, ValueError, IndexError):
        pass
    cgroup = _cgroup_headroom()
    if cgroup is not None:
        found.append((cgroup, "cgroup memory.max"))
    if not found:
        return None, "no /proc/meminfo"
    return min(found)


def _cgroup_headroom() -> int | None:
    """memory.max - memory.current of this process's cgroup (v2), None when unlimited."""
    try:
        with open("/proc/self/cgroup") as fh:
            rel = next((ln.split(":", 2)[2].strip() for ln in fh if ln.startswith("0::")), None)
        if rel is None:
            return None
        base = os.path.join("/sys/fs/cgroup", rel.lstrip("/"))
        with open(os.path.join(base, "memory.max")) as fh:
            limit = fh.read().strip()
        if limit == "max":
            return None
        with open(os.path.join(base, "memory.current")) as fh:
            return max(0, int(limit) - int(fh.read().strip()))
    except (OSError, ValueError, StopIteration):
        return None


def device_available(be) -> tuple[int | None, str]:
    """(free bytes of the current GPU, counting what CuPy's pool holds unused, source)."""
    try:
        free, _total = be.xp.cuda.Device().mem_info
        return int(free) + int(be.xp.get_default_memory_pool().free_bytes()), "GPU free memory"
    except Exception as exc:  # noqa: BLE001 - no number is not a reason to refuse
        return None, f"GPU free memory unknown ({type(exc).__name__})"


def device_id(be) -> int | str:
    """The current GPU's number (ranks reporting the same one on a host share its memory)."""
    try:
        return int(be.xp.cuda.Device().id)
    except Exception:  # noqa: BLE001 - unknown: "?" is still one shared name
        return "?"


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PiB"
