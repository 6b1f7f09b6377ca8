"""The one switch between NumPy and CuPy: a ``Backend`` chosen once per call.

``select(q)`` picks it from the input arrays, ``by_name("cpu" | "gpu")`` from a device name (the
command line's ``--device``). A backend carries everything that differs between the two:

* ``name``, ``xp`` (the array module), ``dtypes`` (``hpcattn.devices``) and ``head_dims``
  (those its kernels take; None: any),
* ``attention(q, k, v, *, causal, scale, q_pos, k_pos, block_q, block_k, progress)``: per-rank
  attention of validated inputs, ``(out, lse)``,
* ``masks``: whether its kernels take a ``mask=`` (``hpcattn.masks.Mask``: windows, packed
  sequences, bottom-right alignment) beside ``causal``; :func:`mask_kwargs` gives a backend
  its mask, or refuses one it cannot apply,
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
from ..masks import make_mask
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


NO_GPU_MASKS = "window/cu_seqlens are not supported on the GPU backend yet"


def mask_kwargs(be, mask) -> dict:
    """The keyword arguments that give backend ``be``'s kernels ``mask`` (None: none): ``causal``
    alone when it is nothing or plain top-left causal (every backend has that), else also
    ``mask=``; HpcattnError when ``be`` cannot apply it (the CUDA kernels, for now)."""
    if mask is None or not mask.extended:
        return {"causal": bool(mask is not None and mask.causal)}
    if not getattr(be, "masks", False):
        raise HpcattnError(NO_GPU_MASKS if be.name == "gpu" else
                           f"the {be.name} backend takes no window/cu_seqlens/alignment masks")
    return {"causal": mask.causal, "mask": mask}


def _mask(causal, window, cu_seqlens, align, n_q, n_k):
    return make_mask(causal, window, cu_seqlens, align).bind(n_q, n_k)


def attention(q, k, v, *, causal: bool = False, scale: float | None = None,
              q_pos=None, k_pos=None, block_q: int | None = None, block_k: int | None = None,
              check_finite: bool = True, progress=None, window=None, cu_seqlens=None,
              align: str = "top-left"):
    """Exact softmax attention on one rank, computed blockwise, on q's backend.

    Parameters
    ----------
    q : array (batch, Nq, heads, head_dim), NumPy (float32/float64) or CuPy (float16/bfloat16/
        float32; head_dim 64 or 128).
    k, v : arrays (batch, Nk, kv_heads, head_dim); ``heads % kv_heads == 0`` (GQA/MQA).
    causal : query at position i sees keys at positions j <= i.
    scale : score scale, default ``1/sqrt(head_dim)``.
    q_pos, k_pos : global positions of the rows (default ``0..N-1``), used by the mask.
    block_q, block_k : tile sizes of the NumPy kernel (the CUDA kernels use their own).
    progress : optional callable run between tiles (the ring uses it to progress MPI).
    window : ``(left, right)``, FlashAttention's ``window_size``: query i sees keys in
        ``[i - left, i + right]`` (-1: unbounded; with ``causal`` right is 0). NumPy only.
    cu_seqlens : packed variable-length sequences, ``[0, ..., N]`` strictly increasing (as
        FlashAttention's): tokens never attend across sequences. NumPy only.
    align : ``"top-left"`` (torch SDPA's ``is_causal``) or ``"bottom-right"`` (FlashAttention's):
        where the causal diagonal and the window sit when Nq != Nk. See ``hpcattn.masks``.

    Returns
    -------
    out : (batch, Nq, heads, head_dim), dtype of q.
    lse : (batch, heads, Nq) log-sum-exp of the scaled scores (float32 for float32/16 inputs,
        float64 for float64). Rows that see no key get out = 0 and lse = -inf.
    """
    be = select(q)
    allowed = getattr(be, "attention_dtypes", be.dtypes)  # CPU: half types where the CPU has them
    check_qkv(q, k, v, check_finite=check_finite, allowed=allowed, xp=be.xp,
              find_nonfinite=getattr(be, "find_nonfinite", None))
    kw = mask_kwargs(be, _mask(causal, window, cu_seqlens, align, q.shape[1], k.shape[1]))
    return be.attention(q, k, v, scale=scale, q_pos=q_pos, k_pos=k_pos, block_q=block_q,
                        block_k=block_k, progress=progress, **kw)


def attention_backward(q, k, v, out, lse, dout, *, causal: bool = False, scale: float | None = None,
                       q_pos=None, k_pos=None, block_q: int | None = None, block_k: int | None = None,
                       check_finite: bool = True, progress=None, window=None, cu_seqlens=None,
                       align: str = "top-left"):
    """Gradients ``(dq, dk, dv)`` of ``out = attention(q, k, v)`` given ``dout = dL/dout``, on q's
    backend (FlashAttention-2's backward: never an N x N matrix).

    ``q``, ``k``, ``v``, ``causal``, ``scale``, ``q_pos``, ``k_pos``, ``block_q``, ``block_k``,
    ``progress``, ``window``, ``cu_seqlens``, ``align`` as for :func:`attention`; ``out`` (q's
    shape and dtype) and ``lse`` (batch, heads, Nq) are what :func:`attention` returned for them, ``dout`` the gradient of the loss
    with respect to ``out`` (q's shape and dtype). ``dk``/``dv`` have the kv-head shape (a GQA
    group's query heads summed); all three have q's dtype, accumulated in float32 (float64 for
    float64). Bad input raises HpcattnError with a one-line message.
    """
    be = select(q)
    if hasattr(be, "check_dtype"):  # CPU: a half type this CPU cannot run, with the reason, first
        be.check_dtype(q)
    err = backward_input_error(q, k, v, out, lse, dout, check_finite=check_finite,
                               allowed=getattr(be, "attention_dtypes", be.dtypes),
                               xp=be.xp, find_nonfinite=getattr(be, "find_nonfinite", None))
    if err:
        raise HpcattnError(err)
    kw = mask_kwargs(be, _mask(causal, window, cu_seqlens, align, q.shape[1], k.shape[1]))
    return be.attention_backward(q, k, v, out, lse, dout, scale=scale, q_pos=q_pos, k_pos=k_pos,
                                 block_q=block_q, block_k=block_k, progress=progress, **kw)


def merge_partials(out, lse, out_b, lse_b):
    """Merge partial attention ``(out_b, lse_b)`` over other keys into ``(out, lse)`` in place.

    ``out``: (batch, N, heads, d); ``lse``: (batch, heads, N). Uses the log-sum-exp weights, so
    the merged result equals attention over the union of the two key sets.
    """
    return merge_lse(out, lse, out_b, lse_b, select(out).xp)


__all__ = ["select", "by_name", "is_gpu_array", "attention", "attention_backward", "merge_partials",
           "mask_kwargs", "NumpyBackend"]
