"""hpcattn's fused CPU forward kernel (``cpp-fused``): ``kernels/cpu/attention_fwd.cpp``, built at
run time with the host C++ compiler and loaded with ctypes.

It computes what ``hpcattn.blockwise`` computes (float32, every mask, GQA, global positions) with
the tile loop in compiled code: the products by 6x16 register-blocked AVX2 kernels where the CPU
has AVX2+FMA, 6x64 ones in zmm registers where it has AVX-512 (else, and for folds of few query
rows, through the sgemm of the BLAS NumPy itself loaded, found in this process and passed as a
function pointer), and one fused pass per row for
mask, max, exp and sums, where the NumPy kernel makes several passes from Python. A call holds no
GIL (ctypes releases it), so the (batch x kv head x query rows) shares run on all the process's
kernel workers at once. :class:`FusedPartial` is a ring rank's online state on the same code.
Each call's tiles and packed keys/values are a NumPy scratch array allocated here (the kernel
says how many floats), so tracemalloc, the memory model's tests and ``hpcattn bench``'s max-N
count what the kernel holds.

Built once per (source, compiler, flags, CPU) under ``$HPCATTN_CPU_KERNEL_CACHE`` (default
``~/.cache/hpcattn/cpu-kernel``) with ``-O3 -march=native``; the build writes a temporary file and
renames it, so concurrent ranks never load half a library. :func:`reason` says why the kernel
cannot run here (no compiler, no CBLAS sgemm found in NumPy's BLAS, a failed build or a failed
self-check against float64), and ``hpcattn.cpu_kernels`` then uses the NumPy kernel and records
that it did.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from . import blockwise, out_pool
from .errors import HpcattnError
from .masks import resolve
from .validate import attention_scale, causal_positions

SOURCE = Path(__file__).resolve().parent / "kernels" / "cpu" / "attention_fwd.cpp"
CACHE_ENV = "HPCATTN_CPU_KERNEL_CACHE"
CXXFLAGS = ("-std=c++17", "-O3", "-fPIC", "-shared", "-fopenmp-simd", "-fno-math-errno", "-Wall")
#: query rows (positions x GQA group) per tile, and the most keys per tile: the AVX2 path keeps
#: a tile's packed keys and values (2 x keys x d floats) in 256 KiB of one core's L2, i.e. 512
#: keys at d=64 and 256 at d=128 (measured fastest among 128..1024 at N=8192 and 16384, H=8;
#: docs/performance-notes.md)
BLOCK_ROWS = 512
BLOCK_K = 512
L2_TILE_BYTES = 256 * 1024
#: query positions per call when all keys fit one key tile (all heads of these rows, then the next)
DECODE_ROWS = 2048
#: at most this many query rows (positions x GQA group): every kv head in one call, heads innermost
#: (the kernel's kFewRows)
FEW_ROWS = 16
#: query rows against keys past one tile that run in groups of FEW_ROWS, keys and values read in
#: place, never packed: at most HEADS_ROWS_ANY_KEYS, or HEADS_ROWS against HEADS_MIN_KEYS keys or
#: more (the kernel's kHeadsRowsAnyKeys, kHeadsRows, kHeadsMinKeys)
HEADS_ROWS_ANY_KEYS = 128
HEADS_ROWS = 256
HEADS_MIN_KEYS = 2048
#: a call of fewer flops (4 b Nq H Nk d) runs on the calling thread whatever the workers: waking
#: a pool thread costs tens to hundreds of microseconds on a VM. Two workers against one, side by
#: side (H=8, d=64, a Zen 4 VM): 1 x 16 keys 297 against 65 us; 128 x 128 keys (33.6 MFLOP)
#: 1.81x slower, 32 x 512 1.00x; 32 x 1024 (67.1 MFLOP) 0.78x, 256 x 256 0.68x
MIN_SPLIT_FLOPS = 1 << 26
#: fewer query rows in a call: the AVX2 path neither packs every key once nor stores out straight
#: (the kernel's kMicroMinRows)
MICRO_MIN_ROWS = 48


def heads_inner(rows: int, nk: int, block_k: int) -> bool:
    """Whether ``rows`` query rows (per kv head) against ``nk`` keys run heads innermost in one
    call for every kv head (the kernel's heads_inner)."""
    if rows <= FEW_ROWS:
        return True
    return nk > block_k and (rows <= HEADS_ROWS_ANY_KEYS or (rows <= HEADS_ROWS and nk >= HEADS_MIN_KEYS))


def key_tile(d: int) -> int:
    """Keys per tile for head dim ``d``: :data:`BLOCK_K`, fewer where the packed tile would not
    fit :data:`L2_TILE_BYTES` (a multiple of 16, the AVX2 path's panel width)."""
    d16 = -(-d // 16) * 16
    return max(16, min(BLOCK_K, L2_TILE_BYTES // (2 * 4 * d16) // 16 * 16))
#: CBLAS sgemm symbols tried in the libraries this process has loaded, with their integer width
SGEMM_SYMBOLS = (("scipy_cblas_sgemm64_", True), ("cblas_sgemm64_", True), ("cblas_sgemm", False))


class _Call(ctypes.Structure):
    _fields_ = [(name, ctypes.c_void_p) for name in ("q", "k", "v", "out", "lse")] + [
        (name, ctypes.c_int64) for name in ("nq", "nk", "g", "d", "q_stride", "k_stride",
                                             "v_stride", "o_stride", "lse_head_stride",
                                             "block_q", "block_k")] + [
        ("scale", ctypes.c_float), ("has_lo", ctypes.c_int32), ("has_hi", ctypes.c_int32),
        ("lo", ctypes.c_int64), ("hi", ctypes.c_int64), ("shift", ctypes.c_int64)] + [
        (name, ctypes.c_void_p) for name in ("q_pos", "k_pos", "q_seg", "k_seg", "gemm")] + [
        ("ilp64", ctypes.c_int32), ("scratch", ctypes.c_void_p), ("scratch_floats", ctypes.c_int64)] + [
        (name, ctypes.c_int64) for name in ("nh", "q_hs", "k_hs", "v_hs", "o_hs", "lse_hs")]


_state: dict = {}


def _loaded_libraries() -> list[str]:
    """Shared libraries mapped into this process whose name says BLAS (NumPy's among them)."""
    np.dot(np.ones((2, 2)), np.ones((2, 2)))  # NumPy has loaded its BLAS
    found = []
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                path = line.split()[-1] if len(line.split()) >= 6 else ""
                name = os.path.basename(path).lower()
                if path.startswith("/") and "blas" in name and path not in found:
                    found.append(path)
    except OSError:
        pass
    libs = Path(np.__file__).resolve().parent.parent / "numpy.libs"
    found += [str(p) for p in sorted(libs.glob("*blas*"))] if libs.is_dir() else []
    return found


def find_sgemm() -> tuple[int, bool, str]:
    """(address, ilp64, library) of a CBLAS sgemm in NumPy's BLAS; HpcattnError if none."""
    for path in _loaded_libraries():
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for symbol, ilp64 in SGEMM_SYMBOLS:
            fn = getattr(lib, symbol, None)
            if fn is not None:
                return ctypes.cast(fn, ctypes.c_void_p).value, ilp64, f"{os.path.basename(path)}:{symbol}"
    raise HpcattnError("no CBLAS sgemm found in the BLAS NumPy loaded (looked for "
                       f"{', '.join(s for s, _ in SGEMM_SYMBOLS)}); expected NumPy built on OpenBLAS")


def _cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "hpcattn" / "cpu-kernel")


def _cpu_key() -> bytes:
    """What -march=native depends on: the CPU's model and flags."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return os.uname().machine.encode()
    keep = [ln for ln in text.splitlines() if ln.split(":")[0].strip() in ("model name", "flags",
                                                                           "Features", "CPU part")]
    return "\n".join(sorted(set(keep))).encode()


def _flags(cxx: str, native: bool) -> list[str]:
    if not native:
        return list(CXXFLAGS)
    probe = subprocess.run([cxx, "-march=native", "-E", "-x", "c++", "-"], input="", text=True,
                           capture_output=True)
    return [*CXXFLAGS, "-march=native"] if probe.returncode == 0 else list(CXXFLAGS)


def build(native: bool = True) -> ctypes.CDLL:
    """The compiled kernel (built once per source, compiler, flags and CPU); HpcattnError if the
    compiler is missing or the build fails. ``native``: for this CPU (``-march=native``: on
    AVX2+FMA the register-blocked path), else the portable build (its GEMMs through sgemm)."""
    cxx = os.environ.get("CXX", "g++")
    if shutil.which(cxx) is None:
        raise HpcattnError(f"C++ compiler {cxx!r} not found; expected g++ (or set CXX) to build "
                           "the fused CPU kernel")
    cmd = [cxx, *_flags(cxx, native)]
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout
    h = hashlib.sha256("\0".join(cmd).encode() + version.encode() + _cpu_key() + SOURCE.read_bytes())
    root = _cache_dir()
    target = root / f"fused-{h.hexdigest()[:16]}.so"
    if not target.exists():
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=root) as tmp:
            so = Path(tmp) / "fused.so"
            res = subprocess.run([*cmd, "-o", str(so), str(SOURCE)], capture_output=True, text=True)
            if res.returncode:
                raise HpcattnError(f"fused CPU kernel build failed: {' '.join(cmd)} "
                                   f"({res.stderr.strip().splitlines()[-1] if res.stderr.strip() else 'no output'})")
            os.replace(so, target)  # atomic: concurrent builders write the same bytes
    info = os.lstat(target)
    if stat.S_ISLNK(info.st_mode) or not stat.S_ISREG(info.st_mode) or info.st_uid != os.getuid():
        raise HpcattnError(f"{target} is not a regular file of this user; expected the kernel "
                           f"library built here (remove it, or set {CACHE_ENV})")
    lib = ctypes.CDLL(str(target))
    lib.hpcattn_cpu_forward_f32.restype = ctypes.c_int
    lib.hpcattn_cpu_forward_f32.argtypes = [ctypes.POINTER(_Call)]
    lib.hpcattn_cpu_fold_f32.restype = ctypes.c_int
    lib.hpcattn_cpu_fold_f32.argtypes = [ctypes.POINTER(_Call)] + [ctypes.c_void_p] * 3
    lib.hpcattn_cpu_acc_stride.restype = ctypes.c_int64
    lib.hpcattn_cpu_acc_stride.argtypes = [ctypes.c_int64]
    lib.hpcattn_cpu_scratch_floats.restype = ctypes.c_int64
    lib.hpcattn_cpu_scratch_floats.argtypes = [ctypes.POINTER(_Call), ctypes.c_int32]
    lib.hpcattn_cpu_streams.restype = ctypes.c_int
    lib.hpcattn_cpu_streams.argtypes = [ctypes.POINTER(_Call)]
    for name in ("hpcattn_cpu_first_nonfinite_f32", "hpcattn_cpu_first_nonfinite_f64"):
        getattr(lib, name).restype = ctypes.c_int64
        getattr(lib, name).argtypes = [ctypes.c_void_p, ctypes.c_int64]
    return lib


def _mask_fields(mask) -> dict:
    """The call's mask fields from a resolved ``hpcattn.masks`` mask."""
    return dict(has_lo=mask.lo is not None, has_hi=mask.hi is not None, lo=mask.lo or 0,
                hi=mask.hi or 0, shift=mask.shift)


def _run(lib, c, state=None):
    """One kernel call on ``c`` (the forward, or with ``state`` = (acc, m, l) a fold), its tiles
    in a NumPy scratch array allocated here: what the kernel holds is then counted wherever this
    process's array memory is (tracemalloc, the memory model's measurements)."""
    n = lib.hpcattn_cpu_scratch_floats(ctypes.byref(c), state is not None)
    scratch = np.empty(n, np.float32)
    c.scratch, c.scratch_floats = scratch.ctypes.data, n
    if state is None:
        rc = lib.hpcattn_cpu_forward_f32(ctypes.byref(c))
    else:
        rc = lib.hpcattn_cpu_fold_f32(ctypes.byref(c), *(a.ctypes.data_as(ctypes.c_void_p) for a in state))
    if rc:
        raise HpcattnError(f"fused CPU kernel call failed (code {rc}); expected 0 with "
                           f"{n} floats of scratch")


def _self_check():
    """A small masked GQA call against float64 attention written here: wrong symbol widths or a
    bad build show up as a reason, not as wrong numbers."""
    rng = np.random.default_rng(0)
    q = rng.standard_normal((1, 37, 4, 16)).astype(np.float32)
    k = rng.standard_normal((1, 29, 2, 16)).astype(np.float32)
    v = rng.standard_normal((1, 29, 2, 16)).astype(np.float32)
    out, lse = attention(q, k, v, causal=True, scale=0.25, block_rows=8, block_k=8, _checked=True)
    kk, vv = np.repeat(k, 2, axis=2).astype(np.float64), np.repeat(v, 2, axis=2).astype(np.float64)
    s = np.einsum("bqhd,bkhd->bhqk", q.astype(np.float64), kk) * 0.25
    s = np.where(np.arange(29)[None, :] <= np.arange(37)[:, None], s, -np.inf)
    ref_lse = np.log(np.exp(s - s.max(-1, keepdims=True)).sum(-1)) + s.max(-1)
    ref = np.einsum("bhqk,bkhd->bqhd", np.exp(s - ref_lse[..., None]), vv)
    err = max(float(np.abs(out - ref).max()), float(np.abs(lse - ref_lse).max()))
    if not err < 1e-4:
        raise HpcattnError(f"fused CPU kernel self-check failed (max error {err:.3g}; expected "
                           "< 1e-4 against float64)")


def _load():
    if not _state:
        try:
            _state["gemm"] = find_sgemm()
            _state["lib"] = build()
            _self_check()
            _state["why"] = None
        except (HpcattnError, OSError, subprocess.SubprocessError) as exc:
            _state["why"] = f"the fused CPU kernel is unavailable ({str(exc).splitlines()[0]})"
    return _state


def first_nonfinite(x) -> int | None:
    """``hpcattn.cpu_kernels.first_nonfinite`` on a C-contiguous float32/float64 array, or None
    without the compiled library."""
    st = _load()
    if st["why"]:
        return None
    fn = (st["lib"].hpcattn_cpu_first_nonfinite_f32 if x.dtype == np.float32
          else st["lib"].hpcattn_cpu_first_nonfinite_f64)
    return int(fn(x.ctypes.data, x.size))


def reason() -> str | None:
    """None when the fused kernel runs here, else why not (one line)."""
    return _load()["why"]


def blas() -> str | None:
    """The library and symbol the kernel's GEMMs call (None when unavailable)."""
    st = _load()
    return st["gemm"][2] if st.get("gemm") and st["why"] is None else None


def _strided(x, inner):
    """``x`` (b, n, h, d) float32 whose last ``inner`` axes are contiguous (else a copy)."""
    need = x.itemsize
    for axis in range(3, 3 - inner, -1):
        if x.strides[axis] != need:
            return np.ascontiguousarray(x)
        need *= x.shape[axis]
    return x


def attention(q, k, v, *, causal=False, scale=None, q_pos=None, k_pos=None, mask=None, workers=1,
              block_rows=None, block_k=None, _checked=False):
    """``(out, lse)`` of float32 ``q`` (b, Nq, h, d), ``k``/``v`` (b, Nk, kv_heads, d) as
    ``hpcattn.blockwise.attention`` defines them, on ``workers`` threads (inputs validated by the
    caller). ``block_rows`` (query rows of a tile, GQA group included) and ``block_k`` default to
    :data:`BLOCK_ROWS` / :func:`key_tile`."""
    st = _state if _checked else _load()
    if st.get("why"):
        raise HpcattnError(st["why"])
    if q.dtype != np.float32 or k.dtype != np.float32 or v.dtype != np.float32:
        raise HpcattnError(f"q, k, v have dtypes {q.dtype}, {k.dtype}, {v.dtype}; the fused CPU "
                           "kernel expects float32")
    b, nq, h, d = q.shape
    nk, hkv = k.shape[1], k.shape[2]
    g = h // hkv
    q, k, v = _strided(q, 2), _strided(k, 1), _strided(v, 1)
    mask = resolve(mask, causal, nq, nk)
    segs = (None, None)
    if not mask.trivial:
        q_pos, k_pos = causal_positions(q_pos, k_pos, nq, nk)
        q_pos, k_pos = np.ascontiguousarray(q_pos), np.ascontiguousarray(k_pos)
        if mask.cu_seqlens is not None:
            segs = (np.ascontiguousarray(mask.segment(q_pos)), np.ascontiguousarray(mask.segment(k_pos)))
    else:
        q_pos = k_pos = None
    out = out_pool.empty_f32((b, nq, h, d))  # 64-byte aligned; a large one reused between calls
    lse = np.empty((b, h, nq), dtype=np.float32)
    bq = max(1, (block_rows or BLOCK_ROWS) // g)
    gemm, ilp64, _ = st["gemm"]
    base = dict(nk=nk, g=g, d=d, q_stride=q.strides[1] // 4, k_stride=k.strides[1] // 4,
                v_stride=v.strides[1] // 4, o_stride=h * d, lse_head_stride=nq, block_q=bq,
                block_k=block_k or key_tile(d), scale=attention_scale(scale, d), gemm=gemm,
                ilp64=ilp64, **_mask_fields(mask))

    def ptr(arr, offset_elems=0):
        return None if arr is None else arr.ctypes.data + offset_elems * arr.itemsize

    def make(i, j, r0, r1, nh=1):
        return _Call(q=q.ctypes.data + i * q.strides[0] + j * g * q.strides[2] + r0 * q.strides[1],
                  k=k.ctypes.data + i * k.strides[0] + j * k.strides[2],
                  v=v.ctypes.data + i * v.strides[0] + j * v.strides[2],
                  out=ptr(out, (i * nq + r0) * h * d + j * g * d),
                  lse=ptr(lse, (i * h + j * g) * nq + r0), nq=r1 - r0,
                  q_pos=ptr(q_pos, r0), k_pos=ptr(k_pos), q_seg=ptr(segs[0], r0),
                  k_seg=ptr(segs[1]), nh=nh, q_hs=g * q.strides[2] // 4, k_hs=k.strides[2] // 4,
                  v_hs=v.strides[2] // 4, o_hs=g * d, lse_hs=g * nq, **base)

    def call(i, j, r0, r1, nh=1):
        _run(st["lib"], make(i, j, r0, r1, nh))

    if 4 * b * nq * h * nk * d < MIN_SPLIT_FLOPS:
        workers = 1  # the same calls, on this thread: handing them to workers would cost more
    if hkv > 1 and heads_inner(nq * g, nk, base["block_k"]):
        # a few query rows against the cache: one call per group of kv heads, which folds every
        # head of the group over a key tile before the next tile (a head's keys alone are pieces
        # of rows that hold every head: read head by head, they are strided reads). A decode
        # step the kernel streams keeps memory busy from one thread: one group
        if st["lib"].hpcattn_cpu_streams(ctypes.byref(make(0, 0, 0, nq, nh=hkv))):
            workers = 1
        n_groups = min(max(1, workers), hkv)
        groups = [(hkv * s // n_groups, hkv * (s + 1) // n_groups) for s in range(n_groups)]
        from .cpu_pool import run_tasks

        run_tasks([(lambda i=i, a=a, e=e: call(i, a, 0, nq, nh=e - a)) for i in range(b) for a, e in groups],
                  workers)  # on this thread alone for one worker
        return out, lse
    if mask.trivial and nk <= base["block_k"] and hkv > 1:
        # many queries against keys that fit one tile, no mask: one call per batch entry (and
        # row chunk, on several workers), which runs every kv head of a query tile before the
        # next tile (q and out in memory order)
        if workers <= 1:
            for i in range(b):
                call(i, 0, 0, nq, nh=hkv)
            return out, lse
        from .cpu_pool import run_tasks

        # equal chunks of at least MICRO_MIN_ROWS rows, so each takes the path (and gives the
        # bits) the one-worker call does
        n = max(1, min(workers, nq // -(-MICRO_MIN_ROWS // g)))
        run_tasks([(lambda i=i, r0=r0, r1=r1: call(i, 0, r0, r1, nh=hkv))
                   for i in range(b) for r0, r1 in ((nq * s // n, nq * (s + 1) // n) for s in range(n))],
                  workers)
        return out, lse
    if workers <= 1:
        # keys that fit one tile (decode-like shapes): the time goes to reading q and writing
        # out, so every head of a chunk of rows runs before the next chunk (its q and out rows
        # stay in cache between heads instead of being streamed once per head)
        chunk = nq if nk > base["block_k"] else DECODE_ROWS
        for r0 in range(0, nq, chunk):
            for i in range(b):
                for j in range(hkv):
                    call(i, j, r0, min(nq, r0 + chunk))
        return out, lse
    from .cpu_pool import row_chunks, run_tasks

    rows = row_chunks(nq, b * hkv, workers, bq)
    run_tasks([(lambda i=i, j=j, r0=r0, r1=r1: call(i, j, r0, r1))
               for i in range(b) for j in range(hkv) for r0, r1 in rows], workers)
    return out, lse


class FusedPartial:
    """A ring rank's online state on the fused kernel (``blockwise.PartialAttention``'s interface
    and packed-block layout, so the ring's buffers, its traffic and its memory model are the
    NumPy state's): every arriving block is folded into per-(slab, row chunk) states by
    ``hpcattn_cpu_fold_f32`` on the kernel workers, while the calling thread keeps MPI
    progressing. Float32; no scaled copy of q is kept (each query tile is scaled as it is read)."""

    def __init__(self, q, kv_heads, *, causal, scale, q_pos, block_q=None, block_k=None, mask=None,
                 workers=1):
        from .cpu_pool import row_chunks

        st = _load()
        if st["why"]:
            raise HpcattnError(st["why"])
        self.lib, (self.gemm, self.ilp64, _) = st["lib"], st["gemm"]
        b, nq, h, d = q.shape
        self.q, self.b, self.nq, self.h, self.d = _strided(q, 2), b, nq, h, d
        self.hkv, self.g = kv_heads, h // kv_heads
        self.slabs = b * kv_heads
        self.mask = resolve(mask, causal)
        self.positioned = not self.mask.trivial
        self.q_pos = (np.ascontiguousarray(causal_positions(q_pos, None, nq, 0)[0])
                      if self.positioned else None)
        self.q_seg = (np.ascontiguousarray(self.mask.segment(self.q_pos))
                      if self.mask.cu_seqlens is not None else None)
        self.scale = attention_scale(scale, d)
        self.bq = max(1, (block_q * self.g if block_q else BLOCK_ROWS) // self.g)
        self.bk = block_k or key_tile(d)
        self.workers = max(1, workers)
        self.da = int(self.lib.hpcattn_cpu_acc_stride(d))
        self.chunks = row_chunks(nq, b * kv_heads, self.workers, self.bq)
        self.states = {}
        for i in range(b):
            for j in range(kv_heads):
                for r0, r1 in self.chunks:
                    rows = (r1 - r0) * self.g
                    self.states[i, j, r0] = (np.zeros((rows + 8, self.da), np.float32),
                                             np.full(rows, -np.inf, np.float32), np.zeros(rows))

    def packed_size(self, n: int) -> int:
        return blockwise.packed_size(self.slabs, n, self.d)

    def pack(self, k, v, buf):
        blockwise.pack_kv(k, v, buf)

    def add_packed(self, buf, n, k_pos, progress=None):
        """Fold in the key block packed in ``buf`` (``n`` keys at global positions ``k_pos``)."""
        from .cpu_pool import run_with_progress

        if n == 0:
            return
        if buf.dtype != np.float32 or not buf.flags.c_contiguous:
            raise HpcattnError(f"packed block has dtype {buf.dtype}; the fused CPU kernel expects "
                               "contiguous float32")
        d, g, mask = self.d, self.g, self.mask
        k_pos = (np.ascontiguousarray(causal_positions(None, k_pos, 0, n)[1])
                 if self.positioned else None)
        k_seg = np.ascontiguousarray(mask.segment(k_pos)) if self.q_seg is not None else None
        half = self.slabs * n * (d + 1)
        q = self.q
        fields = _mask_fields(mask)

        def call(i, j, r0, r1):
            acc, m, l = self.states[i, j, r0]
            sl = i * self.hkv + j
            c = _Call(q=q.ctypes.data + i * q.strides[0] + j * g * q.strides[2] + r0 * q.strides[1],
                      k=buf.ctypes.data + sl * n * (d + 1) * 4,
                      v=buf.ctypes.data + (half + sl * n * (d + 1)) * 4, out=None, lse=None,
                      nq=r1 - r0, nk=n, g=g, d=d, q_stride=q.strides[1] // 4, k_stride=d + 1,
                      v_stride=d + 1, o_stride=0, lse_head_stride=0, block_q=self.bq,
                      block_k=self.bk, scale=self.scale, **fields,
                      q_pos=None if self.q_pos is None else self.q_pos[r0:].ctypes.data,
                      k_pos=None if k_pos is None else k_pos.ctypes.data,
                      q_seg=None if self.q_seg is None else self.q_seg[r0:].ctypes.data,
                      k_seg=None if k_seg is None else k_seg.ctypes.data, gemm=self.gemm,
                      ilp64=self.ilp64)
            _run(self.lib, c, (acc, m, l))

        tasks = [(i, j, r0, r1) for i in range(self.b) for j in range(self.hkv) for r0, r1 in self.chunks]
        if progress is None and self.workers == 1:
            for t in tasks:
                call(*t)
            return
        # on worker threads (one at least), so that this thread keeps the ring's MPI moving
        run_with_progress([functools.partial(call, *t) for t in tasks], self.workers, progress)

    def result(self):
        """``(out, lse)`` as ``PartialAttention.result`` gives them (rows that saw no key: out 0,
        lse -inf); the state is spent."""
        b, nq, h, d, g = self.b, self.nq, self.h, self.d, self.g
        out = np.empty((b, nq, h, d), np.float32)
        lse = np.empty((b, h, nq), np.float32)
        while self.states:   # each chunk's state is freed once its rows are written
            (i, j, r0), (acc, m, l) = self.states.popitem()
            r1 = r0 + len(m) // g
            seen = l > 0
            l_safe = np.where(seen, l, 1.0)
            o = acc[: len(m), :d] / l_safe[:, None].astype(np.float32)
            o[~seen] = 0
            out[i, r0:r1, j * g:(j + 1) * g] = o.reshape(r1 - r0, g, d)
            val = np.where(seen, m + np.log(l_safe), -np.inf).astype(np.float32)
            lse[i, j * g:(j + 1) * g, r0:r1] = val.reshape(r1 - r0, g).T
            del acc, m, l, o
        return out, lse
