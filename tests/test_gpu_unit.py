"""GPU-path logic that needs no GPU: CUDA-aware detection and its override, node-local rank,
``hpcattn info`` telling the truth on this machine."""
import glob
import json

import pytest
from click.testing import CliRunner

from hpcattn.errors import HpcattnError
from hpcattn.gpu import cuda_aware_mpi
from hpcattn.gpu.ring import ENV_CUDA_AWARE, LOCAL_RANK_VARS, local_rank

MPI = pytest.importorskip("mpi4py.MPI")


@pytest.mark.parametrize("value, want", [("0", False), ("1", True)])
def test_env_overrides_cuda_aware_detection(monkeypatch, value, want):
    monkeypatch.setenv(ENV_CUDA_AWARE, value)
    assert cuda_aware_mpi() == (want, f"set by {ENV_CUDA_AWARE}={value}")


def test_bad_override_is_a_clear_error(monkeypatch):
    monkeypatch.setenv(ENV_CUDA_AWARE, "yes")
    with pytest.raises(HpcattnError, match=r"HPCATTN_CUDA_AWARE='yes'; expected 0 .* or 1"):
        cuda_aware_mpi()


def test_detection_asks_the_mpi_library(monkeypatch):
    monkeypatch.delenv(ENV_CUDA_AWARE, raising=False)
    aware, why = cuda_aware_mpi()
    assert "MPIX_" in why or "no CUDA-support query" in why
    if "pypi.org/p/mpich" in MPI.Get_library_version():  # the PyPI MPICH is built without CUDA
        assert aware is False


def test_local_rank_from_launcher_environment(monkeypatch):
    for var in LOCAL_RANK_VARS:
        monkeypatch.delenv(var, raising=False)
    assert local_rank() == 0
    monkeypatch.setenv("SLURM_LOCALID", "3")
    assert local_rank() == 3
    assert local_rank(MPI.COMM_SELF) == 0


def _gpu_device_nodes() -> int:
    """GPUs the kernel driver exposes (/dev/nvidia0, 1, ...): a fact found without CuPy."""
    return len(glob.glob("/dev/nvidia[0-9]*"))


def test_info_reports_the_machine_truthfully(monkeypatch):
    from hpcattn.cli.info import info

    monkeypatch.delenv(ENV_CUDA_AWARE, raising=False)
    res = CliRunner().invoke(info, ["--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.output)
    assert data["mpi"]["library"].split()[0] in MPI.Get_library_version()
    if "pypi.org/p/mpich" in MPI.Get_library_version():  # the PyPI MPICH is built without CUDA
        assert data["mpi"]["cuda_aware"] is False
    # no GPU device node: no GPU can be listed, and the report says why
    gpus = data["gpu"]["gpus"]
    assert len(gpus) <= _gpu_device_nodes()
    if not gpus:
        assert data["gpu"]["gpus_reason"]
    assert "attention_fwd.cu" in data["kernels"]["kernel_sources"]
    text = CliRunner().invoke(info, []).output
    assert "CUDA-aware" in text and ("GPUs: none" in text) == (not gpus)


def test_no_gpu_reason_says_no_gpu_on_a_machine_without_one():
    """Without any /dev/nvidia* node the skip reason says "no GPU", not CUDA's "driver version is
    insufficient" (which sends people looking for a driver update on a laptop)."""
    from hpcattn.gpu.environment import no_gpu_reason

    reason = no_gpu_reason()
    if _gpu_device_nodes():
        pytest.skip("this machine has GPU device nodes")
    if reason is not None and "CuPy not installed" in reason:
        pytest.skip("CuPy is not installed here")
    assert reason is not None and reason.startswith("no GPU (no /dev/nvidia* device"), reason


@pytest.mark.parametrize("value, want", [("0", False), ("1", True)])
def test_info_reports_the_cuda_aware_override(monkeypatch, value, want):
    from hpcattn.cli.info import info

    monkeypatch.setenv(ENV_CUDA_AWARE, value)
    data = json.loads(CliRunner().invoke(info, ["--json"]).output)
    assert data["mpi"]["cuda_aware"] is want
    assert data["mpi"]["cuda_aware_reason"] == f"set by {ENV_CUDA_AWARE}={value}"
