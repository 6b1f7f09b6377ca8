"""The CPU backend's per-rank kernels and the choice between them.

Three kernels compute the same ``(out, lse)`` (the first and last also the gradients):

* ``numpy-blockwise``: ``hpcattn.blockwise`` / ``blockwise_backward``, the dependency-free
  fallback, which takes every mask (causal on any positions, windows, packed sequences) and dtype;
* ``cpp-fused``: ``hpcattn.cpu_fused``, the same blockwise forward compiled at run time (g++;
  register-blocked AVX2 or AVX-512 products, or NumPy's own sgemm elsewhere), float32, every
  mask, also as a ring rank's online state: auto's float32 forward wherever it builds (its
  reason is shown where it does not);
* ``torch-flash``: PyTorch's CPU flash kernel (``aten::_scaled_dot_product_flash_attention_for_cpu``
  and its backward), where torch is installed. It returns the log-sum-exp hpcattn needs, takes
  GQA as it is and reads hpcattn's (batch, N, heads, d) arrays as zero-copy transposed views
  (``torch.from_numpy(x).transpose(1, 2)``); its output comes back in that same memory order, so
  ``out`` is a view too. It can express no mask but top-left causal, so it is used only for
  unmasked or plain causal calls on default positions (0..N-1) with no tile sizes asked for.

``HPCATTN_CPU_KERNEL=auto|numpy|torch|fused`` (default auto: the fused kernel for float32
forwards where it builds, torch where it can express the call and the dtype is in
:data:`AUTO_TORCH_DTYPES`, see docs/performance-notes.md; ``torch``: torch for every call it can
express, a missing torch an error; ``fused``: the fused kernel for every float32 forward, a
failed build an error, else as auto; ``numpy`` never uses torch or the fused kernel). Every call
records the kernel it used in :data:`LAST`; torch is imported only when first needed, never by
``import hpcattn``.

All three use all of the process's kernel workers (``hpcattn._threads.kernel_workers``): torch
through ``torch.set_num_threads``, the others through ``hpcattn.cpu_pool`` (batch x heads [x query
tiles] over threads, one BLAS thread each).
"""
from __future__ import annotations

import importlib.util
import os
from contextlib import contextmanager

import numpy as np

from . import out_pool
from ._threads import kernel_workers
from .devices import CPU_ATTENTION_DTYPES
from .devices import CPU_HALF_DTYPES as HALF_DTYPES
from .errors import HpcattnError
from .machine import cpu_half_reason
from .validate import attention_scale

NUMPY_KERNEL, TORCH_KERNEL, FUSED_KERNEL = "numpy-blockwise", "torch-flash", "cpp-fused"
KERNEL_ENV = "HPCATTN_CPU_KERNEL"
CHOICES = ("auto", "numpy", "torch", "fused")
#: dtypes ``auto`` sends to torch where it can express the call: the half types, which only
#: torch's kernel runs. Not float32: torch's CPU kernel misses FlashAttention's accuracy rule
#: there (error <= 2x a same-precision reference: 2.3x at b=4, sq=113, sk=211, H=6, d=96,
#: causal; NumPy 1.47x, the fused kernel 1.70x). Not float64: 1.1-1.3x NumPy's speed, while
#: importing torch costs each process 2-3 s (more under load), longer than a whole small float64
#: job (docs/performance-notes.md). Both take it on request (HPCATTN_CPU_KERNEL=torch).
AUTO_TORCH_DTYPES = tuple(HALF_DTYPES)
#: the kernel each kind of call used last in this process ("forward", "backward")
LAST: dict[str, str] = {}

_torch = None


def requested() -> str:
    """``HPCATTN_CPU_KERNEL`` (auto when unset); HpcattnError for anything else."""
    want = os.environ.get(KERNEL_ENV, "auto").strip().lower() or "auto"
    if want not in CHOICES:
        raise HpcattnError(f"{KERNEL_ENV}={os.environ[KERNEL_ENV]!r} is unknown; expected one of "
                           f"{', '.join(CHOICES)}")
    return want


def torch_reason() -> str | None:
    """None when PyTorch's CPU flash kernel can be called here, else why not."""
    global _torch
    if _torch is None:
        try:
            import torch

            torch.ops.aten._scaled_dot_product_flash_attention_for_cpu  # noqa: B018 - the probe
            _torch = torch
        except (ImportError, AttributeError, RuntimeError) as exc:
            _torch = False
            torch_reason.why = f"PyTorch's CPU flash kernel is unavailable ({exc})"
    return None if _torch else torch_reason.why


torch_reason.why = ""


def half_reason(dtype: str) -> str | None:
    """None when ``dtype`` (bfloat16/float16) can run on this CPU, else the one-line reason."""
    cpu = cpu_half_reason(dtype)
    if cpu:
        return cpu
    if requested() == "numpy":
        return f"{dtype} on CPU runs only on the torch-flash kernel; {KERNEL_ENV}=numpy forbids it"
    if dtype == "bfloat16" and importlib.util.find_spec("ml_dtypes") is None:
        return ("bfloat16 on CPU needs NumPy's bfloat16 type from the ml_dtypes package, which is "
                "not installed (pip install ml_dtypes, or '.[torch]')")
    why = torch_reason()
    return f"{dtype} on CPU needs PyTorch's CPU flash kernel: {why}" if why else None


def _default_positions(pos, n) -> bool:
    return pos is None or (len(pos) == n and (n == 0 or (int(pos[0]) == 0 and int(pos[-1]) == n - 1
                                                        and bool((np.diff(pos) == 1).all()))))


def expressible(q, k, *, causal, q_pos, k_pos, block_q, block_k, mask=None) -> bool:
    """Whether torch's kernel computes exactly this call: no mask beyond top-left causal, default
    positions where causal, no tile sizes asked for (those are the NumPy kernel's), keys present."""
    if block_q is not None or block_k is not None or k.shape[1] == 0 or q.shape[1] == 0:
        return False
    if mask is not None:
        if getattr(mask, "extended", True):
            return False
        causal = bool(mask.causal)
    if causal and not (_default_positions(q_pos, q.shape[1]) and _default_positions(k_pos, k.shape[1])):
        return False
    return str(q.dtype) in ("float32", "float64", *HALF_DTYPES)


def fused_reason() -> str | None:
    """None when the fused kernel (``hpcattn.cpu_fused``) runs here, else why not."""
    from . import cpu_fused

    return cpu_fused.reason()


#: elements from which the input check searches for NaN/Inf in compiled code (below it NumPy's
#: isfinite costs microseconds, and a first call need not load the compiled library for it)
COMPILED_CHECK_MIN = 1 << 16


def first_nonfinite(x) -> int | None:
    """The flat index of the first NaN or Inf of ``x``, -1 when there is none, or None where the
    compiled search does not apply (not a C-contiguous float32/float64 NumPy array of at least
    :data:`COMPILED_CHECK_MIN` elements, no compiled library here, or ``HPCATTN_CPU_KERNEL``
    asks for a kernel other than the fused one, which is then not built for this): one pass
    over ``x`` instead of NumPy's isfinite, which writes a boolean array as large as ``x`` and
    reads it."""
    if (type(x) is not np.ndarray or x.size < COMPILED_CHECK_MIN or not x.flags.c_contiguous
            or x.dtype not in (np.float32, np.float64) or requested() not in ("auto", "fused")):
        return None
    from . import cpu_fused

    return cpu_fused.first_nonfinite(x)


def _fused_for(want: str) -> bool:
    """Whether the fused kernel runs a call it can take under ``want`` (auto or fused); a
    ``fused`` request it cannot serve is an error."""
    why = fused_reason()
    if why is not None and want == "fused":
        raise HpcattnError(f"{KERNEL_ENV}=fused but {why}; expected g++ (or $CXX) and NumPy on "
                           "OpenBLAS, or auto/numpy")
    return why is None


def fused_expressible(q, k, *, block_q, block_k, **_) -> bool:
    """Whether the fused kernel takes this call: a float32 forward with keys and queries, no
    tile sizes asked for (those are the NumPy kernel's); every mask and position is its own."""
    return (str(q.dtype) == "float32" and block_q is None and block_k is None and k.shape[1] > 0
            and q.shape[1] > 0)


def choose(q, k, kernel=None, *, backward=False, **call) -> str:
    """The kernel name for this call under ``kernel`` (auto|numpy|torch|fused; default
    :func:`requested`); ``backward``: for the gradients (the fused kernel has no backward)."""
    if kernel is not None and kernel not in CHOICES:
        raise HpcattnError(f"kernel {kernel!r} is unknown; expected one of {', '.join(CHOICES)}")
    want = kernel or requested()
    if want == "numpy":
        return NUMPY_KERNEL
    if (want in ("auto", "fused") and not backward and fused_expressible(q, k, **call)
            and _fused_for(want)):
        return FUSED_KERNEL
    if want == "fused":
        want = "auto"
    if want == "torch" and torch_reason():
        raise HpcattnError(f"{KERNEL_ENV}=torch but {torch_reason()}; expected torch installed "
                           "(pip install torch) or auto/numpy")
    if want == "auto" and str(q.dtype) not in AUTO_TORCH_DTYPES:
        return NUMPY_KERNEL
    if expressible(q, k, **call) and torch_reason() is None:
        return TORCH_KERNEL
    return NUMPY_KERNEL


def partial_kernel(q, *, block_q=None, block_k=None) -> str:
    """The kernel of a ring rank's online state for queries ``q`` (recorded as the forward's):
    the fused kernel where :func:`choose` would take it for a forward, else the NumPy kernel
    (torch's kernel has no state to fold blocks into)."""
    want = requested()
    kernel = NUMPY_KERNEL
    if (want in ("auto", "fused") and str(q.dtype) == "float32" and block_q is None
            and block_k is None and _fused_for(want)):
        kernel = FUSED_KERNEL
    LAST["forward"] = kernel
    return kernel


def check_half(q):
    """The dtype check of ``validate.check_qkv`` for the half types, with the reason."""
    if str(q.dtype) in HALF_DTYPES:
        why = half_reason(str(q.dtype))
        if why:
            usable = [dt for dt in CPU_ATTENTION_DTYPES if dt not in HALF_DTYPES or not half_reason(dt)]
            raise HpcattnError(f"q has dtype {q.dtype}; expected one of {', '.join(usable)} ({why})")


@contextmanager
def _torch_threads(workers):
    before = _torch.get_num_threads()
    _torch.set_num_threads(workers)
    try:
        yield
    finally:
        _torch.set_num_threads(before)


def _view(x):
    """(b, N, h, d) array -> torch (b, h, N, d) view of the same memory (bf16 through its bits)."""
    if str(x.dtype) == "bfloat16":
        bits = _torch.from_numpy(np.ascontiguousarray(x).view(np.uint16))
        return bits.view(_torch.bfloat16).transpose(1, 2)
    return _torch.from_numpy(x).transpose(1, 2)


def _array(t, dtype):
    """torch (b, h, N, d) tensor -> (b, N, h, d) NumPy array of ``dtype`` (a view when possible)."""
    t = t.transpose(1, 2)
    if str(dtype) == "bfloat16":
        return t.contiguous().view(_torch.uint16).numpy().view(dtype)
    return t.numpy()


def _call_kw(q, causal, scale, mask):
    if mask is not None:
        causal = bool(mask.causal)
    return causal, attention_scale(scale, q.shape[3])


def attention(q, k, v, *, causal=False, scale=None, q_pos=None, k_pos=None, block_q=None,
              block_k=None, progress=None, mask=None, workers=None, kernel=None):
    """Per-rank ``(out, lse)`` on the chosen kernel (inputs validated by the caller); ``workers``
    (default ``_threads.kernel_workers()``) and ``kernel`` (default ``HPCATTN_CPU_KERNEL``)."""
    check_half(q)
    workers = kernel_workers() if workers is None else workers
    kernel = choose(q, k, kernel, causal=causal, q_pos=q_pos, k_pos=k_pos, block_q=block_q,
                    block_k=block_k, mask=mask)
    LAST["forward"] = kernel
    if kernel == FUSED_KERNEL:
        from . import cpu_fused

        res = cpu_fused.attention(q, k, v, causal=causal, scale=scale, q_pos=q_pos, k_pos=k_pos,
                                  mask=mask, workers=workers)
        if progress is not None:
            progress()
        return res
    if kernel == NUMPY_KERNEL:
        from .cpu_pool import numpy_attention

        return numpy_attention(q, k, v, causal=causal, scale=scale, q_pos=q_pos, k_pos=k_pos,
                               block_q=block_q, block_k=block_k, progress=progress, mask=mask,
                               workers=workers)
    causal, scale = _call_kw(q, causal, scale, mask)
    op = _torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    with _torch_threads(workers), _torch.inference_mode():
        out, lse = op(_view(q), _view(k), _view(v), 0.0, causal, scale=scale)
    if progress is not None:
        progress()
    return _array(out, q.dtype), lse.numpy()


def attention_backward(q, k, v, out, lse, dout, *, causal=False, scale=None, q_pos=None, k_pos=None,
                       block_q=None, block_k=None, progress=None, mask=None, workers=None,
                       kernel=None):
    """Per-rank ``(dq, dk, dv)`` on the chosen kernel (inputs validated by the caller)."""
    check_half(q)
    workers = kernel_workers() if workers is None else workers
    kernel = choose(q, k, kernel, backward=True, causal=causal, q_pos=q_pos, k_pos=k_pos,
                    block_q=block_q, block_k=block_k, mask=mask)
    if kernel == TORCH_KERNEL and str(lse.dtype) != ("float64" if q.dtype == np.float64 else "float32"):
        kernel = NUMPY_KERNEL  # torch's backward reads its own lse precision
    LAST["backward"] = kernel
    if kernel == NUMPY_KERNEL:
        from .cpu_pool import numpy_attention_backward

        return numpy_attention_backward(q, k, v, out, lse, dout, causal=causal, scale=scale,
                                        q_pos=q_pos, k_pos=k_pos, block_q=block_q, block_k=block_k,
                                        progress=progress, mask=mask, workers=workers)
    causal, scale = _call_kw(q, causal, scale, mask)
    op = _torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
    with _torch_threads(workers), _torch.inference_mode():
        grads = op(_view(dout), _view(q), _view(k), _view(v), _view(out),
                   _torch.from_numpy(np.ascontiguousarray(lse)), 0.0, causal, scale=scale)
    if progress is not None:
        progress()
    return tuple(_array(g, q.dtype) for g in grads)


def describe() -> dict:
    """What ``hpcattn info`` and the bench print: the request, the default kernel, the reasons."""
    try:
        want = requested()
    except HpcattnError as exc:
        return {"requested": os.environ.get(KERNEL_ENV), "error": str(exc)}
    why = torch_reason()
    on_torch = [] if want == "numpy" or why else list(AUTO_TORCH_DTYPES if want in ("auto", "fused")
                                                       else CPU_ATTENTION_DTYPES)
    fused = "not used (numpy requested)" if want == "numpy" else (fused_reason() or "available")
    return {"requested": want, "torch_dtypes": on_torch, "torch": why or "available", "fused": fused,
            "workers": kernel_workers(), "last": dict(LAST), "reuse_out": out_pool.enabled(),
            **{dt: half_reason(dt) or "available" for dt in HALF_DTYPES}}
