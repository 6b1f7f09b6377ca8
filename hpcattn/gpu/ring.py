"""The ring exchange for CuPy buffers, and which GPU a rank uses.

With a CUDA-aware MPI, device buffers go to mpi4py as they are (``__cuda_array_interface__``);
otherwise each block is staged through pinned host buffers. Detection is automatic
(``MPIX_Query_cuda_support`` / ``MPIX_GPU_query_support`` in the loaded MPI library) and
``HPCATTN_CUDA_AWARE=0|1`` overrides it. Either way the stream is synchronised before a block is
posted (MPI does not order itself after our kernels), and the kernel for the current block runs
on the GPU while the host waits in MPI for the next one: compute overlaps the exchange.
"""
from __future__ import annotations

import ctypes
import os

import numpy as np

from .._threads import LOCAL_RANK_VARS  # node-local rank variables of each launcher
from ..errors import HpcattnError
from .. import exchange
from ..exchange import RingComm

ENV_CUDA_AWARE = "HPCATTN_CUDA_AWARE"


def cuda_aware_mpi() -> tuple[bool, str]:
    """(whether device buffers may be handed to MPI, why we think so)."""
    env = os.environ.get(ENV_CUDA_AWARE, "").strip()
    if env:
        if env not in ("0", "1"):
            raise HpcattnError(f"{ENV_CUDA_AWARE}={env!r}; expected 0 (stage through host) or 1 (CUDA-aware MPI)")
        return env == "1", f"set by {ENV_CUDA_AWARE}={env}"
    try:
        from mpi4py import MPI

        lib = ctypes.CDLL(MPI.__file__)  # dlsym on it searches the MPI library it links
    except (ImportError, OSError) as exc:
        return False, f"MPI library not inspectable ({exc})"
    query = getattr(lib, "MPIX_Query_cuda_support", None)
    if query is not None:
        query.restype = ctypes.c_int
        ok = bool(query())
        return ok, f"MPIX_Query_cuda_support() = {int(ok)}"
    query = getattr(lib, "MPIX_GPU_query_support", None)
    if query is not None:
        flag = ctypes.c_int(0)
        query(ctypes.c_int(0), ctypes.byref(flag))  # 0 = MPIX_GPU_SUPPORT_CUDA
        return bool(flag.value), f"MPIX_GPU_query_support(CUDA) = {flag.value}"
    return False, "the MPI library has no CUDA-support query; staging through host memory"


class _SyncedRingComm(RingComm):
    def send_recv(self, send_buf, recv_buf, tag=0, *, step=None):
        import cupy

        cupy.cuda.get_current_stream().synchronize()
        self._post(send_buf, recv_buf, tag, step)

    def _post(self, send_buf, recv_buf, tag, step):
        RingComm.send_recv(self, send_buf, recv_buf, tag, step=step)


class DeviceRingComm(_SyncedRingComm):
    """CUDA-aware MPI: device buffers go straight to MPI."""

    cuda_aware = True


class StagedRingComm(_SyncedRingComm):
    """Plain MPI: device -> pinned host -> MPI -> pinned host -> device."""

    cuda_aware = False

    def __init__(self, comm, **watchdog):
        super().__init__(comm, **watchdog)
        self._pinned = {}
        self._pending = None

    def _host(self, role, nbytes):
        import cupy

        buf = self._pinned.get(role)
        if buf is None or buf.nbytes < nbytes:
            buf = np.frombuffer(cupy.cuda.alloc_pinned_memory(max(nbytes, 1)), np.uint8)
            self._pinned[role] = buf
        return buf[:nbytes]

    def _post(self, send_buf, recv_buf, tag, step):
        host_send = self._host("send", send_buf.nbytes)
        host_recv = self._host("recv", recv_buf.nbytes)
        send_buf.data.copy_to_host(host_send.ctypes.data, send_buf.nbytes)
        RingComm.send_recv(self, host_send, host_recv, tag, step=step)
        self._pending = (host_recv, recv_buf)

    def wait(self):
        import cupy

        super().wait()
        if self._pending is not None:
            host_recv, recv_buf = self._pending
            self._pending = None
            # ordered before the next kernel on this stream; the next send_recv synchronises
            # the stream before host_recv is reused
            recv_buf.data.copy_from_host_async(host_recv.ctypes.data, recv_buf.nbytes,
                                               cupy.cuda.get_current_stream())


def make_ring_comm(comm):
    """The ring exchange for CuPy buffers on ``comm`` (the same choice on every rank)."""
    aware, _ = cuda_aware_mpi()
    aware = exchange.allreduce(comm, int(aware), "choosing the GPU exchange", op=_mpi_min()) == 1  # all agree
    return DeviceRingComm(comm) if aware else StagedRingComm(comm)


def _mpi_min():
    from mpi4py import MPI

    return MPI.MIN


def local_rank(comm=None) -> int:
    """This process's rank among the ranks on its node."""
    if comm is not None:
        from mpi4py import MPI

        node = comm.Split_type(MPI.COMM_TYPE_SHARED)
        try:
            return node.rank
        finally:
            node.Free()
    for var in LOCAL_RANK_VARS:
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 0


def select_device(comm=None) -> int:
    """Make GPU ``local_rank % visible GPUs`` current; call before creating CuPy arrays.

    With one visible GPU per rank (e.g. ``srun --gpus-per-task=1``) every rank uses its device 0.
    """
    import cupy

    count = cupy.cuda.runtime.getDeviceCount()
    if count == 0:
        raise HpcattnError("no CUDA device visible; expected at least one GPU for CuPy inputs")
    dev = local_rank(comm) % count
    cupy.cuda.Device(dev).use()
    return dev
