"""hpcattn: exact blockwise and ring attention over MPI ranks, and a zoo of token mixers.

Public API: ``attention``, ``ring_attention``, ``shard``, ``unshard``, ``merge_partials``, the
other context-parallel strategies ``ulysses_attention``, ``hybrid_attention`` and
``context_attention(strategy=...)``, and the gradients ``attention_backward``,
``ring_attention_backward``, ``ulysses_attention_backward``, ``context_attention_backward``.
"""
from ._threads import configure_threads as _configure_threads

_configure_threads()  # before NumPy loads its BLAS: one BLAS thread per rank under mpiexec

from ._version import __version__  # noqa: E402
from .backend import attention, attention_backward, merge_partials  # noqa: E402
from .context import (context_attention, context_attention_backward, hybrid_attention,  # noqa: E402
                      hybrid_attention_backward)
from .errors import CollectiveError, HpcattnError  # noqa: E402
from .layouts import LAYOUTS, Distribution, shard, unshard  # noqa: E402
from .ring import ring_attention  # noqa: E402
from .ring_backward import ring_attention_backward  # noqa: E402
from .ulysses import ulysses_attention, ulysses_attention_backward  # noqa: E402

__all__ = ["attention", "ring_attention", "attention_backward", "ring_attention_backward", "shard",
           "unshard", "merge_partials", "LAYOUTS", "context_attention", "context_attention_backward",
           "ulysses_attention", "ulysses_attention_backward", "hybrid_attention",
           "hybrid_attention_backward",
           "Distribution", "HpcattnError", "CollectiveError", "__version__"]
