"""hpcattn: exact blockwise and ring attention over MPI ranks, and a zoo of token mixers.

Public API: ``attention``, ``ring_attention``, ``shard``, ``unshard``, ``merge_partials``.
"""
from ._threads import configure_threads as _configure_threads

_configure_threads()  # before NumPy loads its BLAS: one BLAS thread per rank under mpiexec

from ._version import __version__  # noqa: E402
from .backend import attention, merge_partials  # noqa: E402
from .errors import CollectiveError, HpcattnError  # noqa: E402
from .layouts import LAYOUTS, Distribution, shard, unshard  # noqa: E402
from .ring import ring_attention  # noqa: E402

__all__ = ["attention", "ring_attention", "shard", "unshard", "merge_partials", "LAYOUTS",
           "Distribution", "HpcattnError", "CollectiveError", "__version__"]
