"""Ring attention with CuPy arrays across ranks (one GPU per rank, or ranks sharing one) equals
single-rank GPU attention, through the staged and (where the MPI is CUDA-aware) the device path.
Runs serially and under mpiexec -n 2; skipped without a GPU, with the reason."""
import numpy as np
import pytest

from hpcattn import ring_attention, shard
from hpcattn.gpu import attention_gpu, cuda_aware_mpi, make_ring_comm, select_device
from hpcattn.gpu.environment import no_gpu_reason
from hpcattn.gpu.ring import ENV_CUDA_AWARE, DeviceRingComm, StagedRingComm

MPI_SIZES = (2,)
MPI = pytest.importorskip("mpi4py.MPI")
cupy = pytest.importorskip("cupy", reason="CuPy not installed; GPU tests need pip install '.[gpu]'")

NO_GPU = no_gpu_reason()
pytestmark = [pytest.mark.mpi, pytest.mark.gpu, pytest.mark.timeout(300),
              pytest.mark.skipif(NO_GPU is not None, reason=f"no usable GPU: {NO_GPU}")]


@pytest.mark.parametrize("mode", ["staged", "cuda_aware"])
@pytest.mark.parametrize("layout, causal", [("contiguous", False), ("zigzag", True), ("striped", True)])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_ring_on_gpus_matches_single_rank(mode, layout, causal, dtype, monkeypatch):
    comm = MPI.COMM_WORLD
    if mode == "cuda_aware":
        monkeypatch.delenv(ENV_CUDA_AWARE, raising=False)
        aware, why = cuda_aware_mpi()
        if not comm.allreduce(int(aware), op=MPI.MIN):
            pytest.skip(f"MPI is not CUDA-aware on every rank ({why})")
    monkeypatch.setenv(ENV_CUDA_AWARE, "1" if mode == "cuda_aware" else "0")
    assert isinstance(make_ring_comm(comm), DeviceRingComm if mode == "cuda_aware" else StagedRingComm)
    select_device(comm)
    rng = np.random.default_rng(11)
    n, b, h, hkv, d = 517, 2, 4, 2, 64
    q, k, v = (cupy.asarray(rng.standard_normal(s, dtype=np.float32).astype(dtype))
               for s in ((b, n, h, d), (b, n, hkv, d), (b, n, hkv, d)))
    full_out, full_lse = attention_gpu(q, k, v, causal=causal)
    stats = {}
    out, lse = ring_attention(shard(q, comm, layout), shard(k, comm, layout), shard(v, comm, layout),
                              comm, causal=causal, layout=layout, stats=stats)
    want_out, want_lse = shard(full_out, comm, layout), shard(full_lse, comm, layout, axis=2)
    tol = 1e-5 if dtype == "float32" else 2e-3
    assert float(abs(out.astype(cupy.float32) - want_out.astype(cupy.float32)).max()) <= tol
    assert float(abs(lse - want_lse).max()) <= 1e-5
    assert stats["steps"] == comm.size
