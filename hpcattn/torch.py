"""PyTorch adapter: hpcattn's attention as a differentiable torch operation (optional extra).

    >>> import torch, hpcattn.torch as ht
    >>> out = ht.ring_attention(q, k, v, causal=True, layout="zigzag")   # under mpiexec
    >>> out.sum().backward()                                              # q.grad, k.grad, v.grad

Tensors are ``(batch, seq, heads, head_dim)``, each rank holding its shard of the sequence
(``hpcattn.shard`` on a NumPy view, or :func:`shard` here). Data crosses between torch and
hpcattn through DLPack without copies. The forward runs ``hpcattn.ring_attention`` (or
``hpcattn.attention`` for :func:`attention`) and saves its log-sum-exp; the backward runs
``ring_attention_backward`` / ``attention_backward``: K/V and their dK/dV accumulators travel the
ring, so a million-token sequence trains without an N x N matrix anywhere.

CPU tensors (float32, float64) run the NumPy kernels; CUDA tensors (float16, bfloat16, float32;
head_dim 64 or 128) cross to CuPy through DLPack and run the CUDA kernels, forward and backward:
the backend is chosen from the arrays (``hpcattn.backend``), as for every hpcattn call.

Needs PyTorch (``pip install 'hpcattn[torch]'``); the rest of hpcattn never imports this module.
"""
from __future__ import annotations

import contextlib

import numpy as np
import torch

from .backend import attention as _attention
from .backend import attention_backward as _attention_backward
from .errors import HpcattnError
from .layouts import shard as _shard
from .ring import ring_attention as _ring_attention
from .ring_backward import ring_attention_backward as _ring_attention_backward

__all__ = ["attention", "ring_attention", "RingAttention", "shard"]


#: tensor dtypes by device kind (the backends' ``devices.DEVICE_DTYPES``)
_DTYPES = {False: (torch.float32, torch.float64), True: (torch.float16, torch.bfloat16, torch.float32)}


def _to_array(t: torch.Tensor):
    """The tensor's memory as a NumPy (CPU) or CuPy (CUDA) array, without a copy."""
    allowed = _DTYPES[t.is_cuda]
    if t.dtype not in allowed:
        names = [str(d) for d in allowed]
        raise HpcattnError(f"tensor on {t.device.type} has dtype {t.dtype}; expected "
                           f"{', '.join(names[:-1])} or {names[-1]}")
    if t.is_cuda:
        import cupy

        return cupy.from_dlpack(t.detach())
    return np.from_dlpack(t.detach())


@contextlib.contextmanager
def _device_of(t: torch.Tensor):
    """For a CUDA tensor: CuPy's current device and stream made the tensor's device and torch's
    current stream there, so the kernels run where, and in the order, torch expects."""
    if not t.is_cuda:
        yield
        return
    import cupy

    with cupy.cuda.Device(t.device.index):
        with cupy.cuda.Stream.from_external(torch.cuda.current_stream(t.device)):  # CUDA stream protocol
            yield


def _to_tensor(a) -> torch.Tensor:
    """A tensor on the array's memory (DLPack; a read-only NumPy array is copied, torch needs to
    own writeable memory)."""
    if isinstance(a, np.ndarray) or np.isscalar(a):
        a = np.ascontiguousarray(a)
        a = a if a.flags.writeable else a.copy()
    return torch.from_dlpack(a)


class _Attention(torch.autograd.Function):
    """hpcattn's forward and backward as one autograd node: ``forward(q, k, v, **kw) -> (out,
    lse)`` and ``backward(q, k, v, out, lse, dout, **kw) -> (dq, dk, dv)`` on arrays (single
    rank, or the ring with ``comm`` among ``kw``)."""

    @staticmethod
    def forward(ctx, q, k, v, fwd, bwd, kw):
        with _device_of(q):
            out, lse = fwd(*(_to_array(t) for t in (q, k, v)), **kw)
            out_t, lse_t = _to_tensor(out), _to_tensor(lse)
        ctx.save_for_backward(q, k, v, out_t, lse_t)
        ctx.bwd, ctx.kw = bwd, kw
        return out_t

    @staticmethod
    def backward(ctx, dout):
        with _device_of(dout):
            arrays = [_to_array(t) for t in ctx.saved_tensors]
            grads = ctx.bwd(*arrays, _to_array(dout.contiguous()), **ctx.kw)
            return (*(_to_tensor(g) for g in grads), None, None, None)


def attention(q, k, v, *, causal: bool = False, scale: float | None = None) -> torch.Tensor:
    """Exact attention of one rank's tensors, differentiable (``(batch, seq, heads, head_dim)``;
    k/v may have fewer heads: GQA/MQA)."""
    return _Attention.apply(q, k, v, _attention, _attention_backward, dict(causal=causal, scale=scale))


def ring_attention(q, k, v, comm=None, *, causal: bool = False, layout: str = "contiguous",
                   scale: float | None = None, kv_pieces: int = 1) -> torch.Tensor:
    """Exact attention over the sequence whose shards the ranks of ``comm`` (default
    ``MPI.COMM_WORLD``) hold, differentiable. Every rank calls it, forward and backward alike.
    ``kv_pieces``: each K/V block travels in this many pieces, both ways (``hpcattn.ring``)."""
    if comm is None:
        from mpi4py import MPI

        comm = MPI.COMM_WORLD
    return _Attention.apply(q, k, v, _ring_attention, _ring_attention_backward,
                            dict(comm=comm, causal=causal, layout=layout, scale=scale,
                                 kv_pieces=kv_pieces))


class RingAttention(torch.nn.Module):
    """:func:`ring_attention` as a module: ``RingAttention(causal=True, layout="zigzag")(q, k, v)``."""

    def __init__(self, comm=None, *, causal: bool = False, layout: str = "contiguous",
                 scale: float | None = None, kv_pieces: int = 1):
        super().__init__()
        self.comm, self.causal, self.layout, self.scale = comm, causal, layout, scale
        self.kv_pieces = kv_pieces

    def forward(self, q, k, v):
        return ring_attention(q, k, v, self.comm, causal=self.causal, layout=self.layout,
                              scale=self.scale, kv_pieces=self.kv_pieces)

    def extra_repr(self) -> str:
        pieces = f", kv_pieces={self.kv_pieces}" if self.kv_pieces != 1 else ""
        return f"causal={self.causal}, layout={self.layout!r}{pieces}"


def shard(x: torch.Tensor, comm=None, layout: str = "contiguous", axis: int = 1) -> torch.Tensor:
    """This rank's part of the global tensor ``x`` (the same on every rank) along ``axis``: a new
    tensor (no autograd link to ``x``), as ``hpcattn.shard`` gives for arrays."""
    return _to_tensor(_shard(np.from_dlpack(x.detach()), comm, layout, axis))
