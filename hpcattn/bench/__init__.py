"""Side-by-side performance figures for ``hpcattn bench``.

Every figure that is compared with another is measured in the same run, under the same load and
thread settings:

* ``serial`` (one process, ``threads`` BLAS threads): this machine's GEMM rate (square, and the
  (512 x d) @ (d x 512) shape attention uses), blockwise attention, vanilla NumPy multi-head
  attention (full N x N scores) and, when PyTorch is importable, its
  ``scaled_dot_product_attention``;
* ``ring`` (under ``mpiexec -n P``, ``threads`` BLAS threads per rank): wall time over the rank's
  own compute time (1.0 = communication hidden), peak array memory over the theoretical shard
  footprint, throughput against 1 rank;
* ``maxn``: the longest N vanilla MHA fits in a per-rank memory budget against the longest N the
  ring runs on P ranks in the same budget per rank; both from memory measured in small real runs
  (bytes per N^2, bytes per token), then confirmed by real runs at the predicted maxima;
* ``backward``: hpcattn's forward and forward+backward beside torch SDPA's (one process, the four
  interleaved per repeat), and the ring forward+backward on each rank count (wall over compute);
  backward FLOPs = 2.5x forward (FlashAttention's convention, ``measure.attention_backward_flops``).

Each part runs in its own child process (``python -m hpcattn.bench PART JSON``, printing one JSON
line), so thread variables take effect before NumPy loads and peak memory is the run's own.
Memory is NumPy's traced allocations (``tracemalloc``: every array, nothing of the interpreter);
peak RSS is reported beside it.

Modules: ``config`` (what a run measures), ``baseline`` (vanilla MHA), ``parts`` (the serial,
ring and max-N parts), ``backward`` (the forward+backward part), ``report`` (the tables), ``run``
(the parent: children, printing, saving), ``worker`` (the child's entry).
"""
from .baseline import vanilla_mha
from .config import QUICK, BenchConfig
from .parts import shard_footprint
from .run import run_bench, save

__all__ = ["BenchConfig", "QUICK", "run_bench", "save", "shard_footprint", "vanilla_mha"]
