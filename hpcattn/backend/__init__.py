"""The one switch between NumPy and CuPy: a ``Backend`` chosen once per call.

``select(q)`` picks it from the input arrays, ``by_name("cpu" | "gpu")`` from a device name (the
command line's ``--device``). A backend carries everything that differs between the two:

* ``name``, ``xp`` (the array module), ``dtypes`` (``hpcattn.devices``) and ``head_dims``
  (those its kernels take; None: any),
* ``attention(q, k, v, *, causal, scale, q_pos, k_pos, block_q, block_k, progress)``: per-rank
  attention of validated inputs, ``(out, lse)``,
* ``partial(q, kv_heads, *, causal, scale, q_pos, block_q, block_k)``: the running state a ring
  rank folds key/value blocks into (``packed_size``, ``pack``, ``add_packed``, ``result``),
* ``attention_backward(q, k, v, out, lse, dout, *, causal, scale, q_pos, k_pos, block_q, block_k,
  progress)``: per-rank gradients ``(dq, dk, dv)`` of validated inputs,
* ``backward_state(q, out, lse, dout, kv_heads, *, causal, scale, q_pos, block_q, block_k)``: what
  a ring rank differentiates every passing key block against with the global lse
  (``packed_size``/``packed_dtype``, ``pack``, ``grads_size``/``acc_dtype``, ``add_block``,
  ``unpack_grads``, ``dq``; NumPy: ``blockwise_backward.BackwardState``, CUDA:
  ``gpu.partial_backward.PerBlockBackward``),
* ``ring_comm(comm)``: the exchange (``hpcattn.exchange.RingComm`` or its CUDA forms),
* ``clock()``: the step clock (``start``, ``computed``, ``stop() -> (compute s, rest s)``),
* ``use_device(comm)``, ``to_device(x)``, ``to_host(x)``, ``synchronize()``, ``pool_bytes()``.

Algorithms above (ring, mixers, cases) ask for a backend once and never test array types again;
this package is the only one that imports ``hpcattn.gpu`` (in ``cuda.py``, when CuPy arrays or
``"gpu"`` are asked for), so ``import hpcattn`` never loads CuPy.
"""
from __future__ import annotations

from ..blockwise_backward import backward_input_error
from ..devices import DEVICES
from ..errors import HpcattnError
from ..merge import merge_lse
from ..validate import check_qkv
from .cpu import NUMPY, NumpyBackend

_cuda = None


def is_gpu_array(x) -> bool:
    return type(x).__module__.startswith("cupy")


def _cuda_backend():
    global _cuda
    if _cuda is None:
        from .cuda import CudaBackend

        _cuda = CudaBackend()
    return _cuda


def select(x):
    """The backend of array ``x``: CUDA for CuPy arrays, NumPy for everything else."""
    return _cuda_backend() if is_gpu_array(x) else NUMPY


def by_name(device: str):
    """The backend of a device name: "cpu" (NumPy) or "gpu" (CuPy and the CUDA kernels)."""
    if device == "cpu":
        return NUMPY
    if device == "gpu":
        return _cuda_backend()
    raise ValueError(f"device {device!r} is unknown; expected one of {', '.join(DEVICES)}")


def attention(q, k, v, *, causal: bool = False, scale: float | None = None,
              q_pos=None, k_pos=None, block_q: int | None = None, block_k: int | None = None,
              check_finite: bool = True, progress=None):
    """Exact softmax attention on one rank, computed blockwise, on q's backend.

    Parameters
    ----------
    q : array (batch, Nq, heads, head_dim), NumPy (float32/float64) or CuPy (float16/bfloat16/
        float32; head_dim 64 or 128).
    k, v : arrays (batch, Nk, kv_heads, head_dim); ``heads % kv_heads == 0`` (GQA/MQA).
    causal : query at position i sees keys at positions j <= i.
    scale : score scale, default ``1/sqrt(head_dim)``.
    q_pos, k_pos : global positions of the rows (default ``0..N-1``), used by the causal mask.
    block_q, block_k : tile sizes of the NumPy kernel (the CUDA kernels use their own).
    progress : optional callable run between tiles (the ring uses it to progress MPI).

    Returns
    -------
    out : (batch, Nq, heads, head_dim), dtype of q.
    lse : (batch, heads, Nq) log-sum-exp of the scaled scores (float32 for float32/16 inputs,
        float64 for float64). Rows that see no key get out = 0 and lse = -inf.
    """
    be = select(q)
    check_qkv(q, k, v, check_finite=check_finite, allowed=be.dtypes, xp=be.xp)
    return be.attention(q, k, v, causal=causal, scale=scale, q_pos=q_pos, k_pos=k_pos,
                        block_q=block_q, block_k=block_k, progress=progress)


def attention_backward(q, k, v, out, lse, dout, *, causal: bool = False, scale: float | None = None,
                       q_pos=None, k_pos=None, block_q: int | None = None, block_k: int | None = None,
                       check_finite: bool = True, progress=None):
    """Gradients ``(dq, dk, dv)`` of ``out = attention(q, k, v)`` given ``dout = dL/dout``, on q's
    backend (FlashAttention-2's backward: never an N x N matrix).

    ``q``, ``k``, ``v``, ``causal``, ``scale``, ``q_pos``, ``k_pos``, ``block_q``, ``block_k``,
    ``progress`` as for :func:`attention`; ``out`` (q's shape and dtype) and ``lse`` (batch,
    heads, Nq) are what :func:`attention` returned for them, ``dout`` the gradient of the loss
    with respect to ``out`` (q's shape and dtype). ``dk``/``dv`` have the kv-head shape (a GQA
    group's query heads summed); all three have q's dtype, accumulated in float32 (float64 for
    float64). Bad input raises HpcattnError with a one-line message.
    """
    be = select(q)
    err = backward_input_error(q, k, v, out, lse, dout, check_finite=check_finite, allowed=be.dtypes,
                               xp=be.xp)
    if err:
        raise HpcattnError(err)
    return be.attention_backward(q, k, v, out, lse, dout, causal=causal, scale=scale, q_pos=q_pos,
                                 k_pos=k_pos, block_q=block_q, block_k=block_k, progress=progress)


def merge_partials(out, lse, out_b, lse_b):
    """Merge partial attention ``(out_b, lse_b)`` over other keys into ``(out, lse)`` in place.

    ``out``: (batch, N, heads, d); ``lse``: (batch, heads, N). Uses the log-sum-exp weights, so
    the merged result equals attention over the union of the two key sets.
    """
    return merge_lse(out, lse, out_b, lse_b, select(out).xp)


__all__ = ["select", "by_name", "is_gpu_array", "attention", "attention_backward", "merge_partials",
           "NumpyBackend"]
