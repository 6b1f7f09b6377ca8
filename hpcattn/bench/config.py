"""What one ``hpcattn bench`` run measures: shapes, threads, parts (and the ``--quick`` sizes)."""
from __future__ import annotations

import dataclasses

from ..measure import attention_flops

#: the parts a run can measure (``--parts``): per-rank rates, ring scaling, the max-N
#: comparison, forward+backward beside torch SDPA (serial and on the ring), and every
#: context-parallel strategy on the largest --ranks (``bench.strategies``)
SECTIONS = ("serial", "ring", "maxn", "backward", "strategies")


@dataclasses.dataclass
class BenchConfig:
    seq_len: int = 16384
    batch: int = 1
    heads: int = 8
    head_dim: int = 64
    dtype: str = "float32"
    causal: bool = False
    threads: int = 1                 # BLAS threads per process / per rank
    ranks: tuple = (1, 2)
    repeats: int = 3
    budget_mb: float = 256.0         # per-rank memory budget of the max-N comparison
    kv_pieces: int | None = None     # the ring's K/V pieces; None: 1, and max-N picks its own
    gemm_n: int = 2048
    torch: bool = True
    sections: tuple = SECTIONS

    @property
    def layout(self) -> str:
        return "zigzag" if self.causal else "contiguous"

    def flops(self, n: int | None = None, heads: int | None = None) -> float:
        return attention_flops(self.batch, self.seq_len if n is None else n, heads or self.heads,
                               self.head_dim, causal=self.causal)


QUICK = dict(seq_len=1024, heads=2, head_dim=32, repeats=1, budget_mb=8.0, gemm_n=512)
