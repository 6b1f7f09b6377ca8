"""The one description of this machine (hpcattn.machine, plus the GPU path's hpcattn.gpu.environment)
as provenance and ``hpcattn info`` see it, including GPUs faked through a stand-in CuPy."""
import json
import sys
import types

import pytest
from click.testing import CliRunner
from mpi4py import MPI

from hpcattn import machine, results
from hpcattn.cli.info import info


def test_thread_settings_read_the_environment(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
    monkeypatch.setenv("HPCATTN_NUM_THREADS", "2")
    got = machine.thread_settings()
    assert got["OMP_NUM_THREADS"] == "3" and got["MKL_NUM_THREADS"] == ""
    assert got["HPCATTN_NUM_THREADS"] == "2"


def test_mpi_library_is_one_line_of_what_mpi_says():
    mpi = machine.mpi_library()
    assert mpi["library"] and "\n" not in mpi["library"] and "\x00" not in mpi["library"]
    assert mpi["library"] in MPI.Get_library_version()
    major, minor = map(int, mpi["standard"].split("."))
    assert major >= 3 and minor >= 0


def test_describe_names_host_cpu_blas_and_versions():
    d = machine.describe()
    assert d["hosts"] and d["cores"] >= 1 and d["cpu"] and d["blas"]
    assert d["versions"]["numpy"] and d["versions"]["hpcattn"]


def fake_cupy(count, fail_on=None):
    """A CuPy stand-in whose runtime reports ``count`` GPUs (properties of ``fail_on`` raise)."""
    def props(i):
        if i == fail_on:
            raise RuntimeError("cudaErrorUnknown: device lost\nsecond line")
        return {"name": f"Fake GPU {i}".encode(), "major": 9, "minor": 0, "totalGlobalMem": 80 * 2**30}

    runtime = types.SimpleNamespace(getDeviceCount=lambda: count, driverGetVersion=lambda: 12040,
                                    runtimeGetVersion=lambda: 12020, getDeviceProperties=props)
    nvrtc = types.SimpleNamespace(getVersion=lambda: (12, 2))
    cuda = types.SimpleNamespace(runtime=runtime, nvrtc=nvrtc)
    return {"cupy": types.SimpleNamespace(__version__="13.0.0", cuda=cuda), "cupy.cuda": cuda,
            "cupy.cuda.nvrtc": nvrtc}


@pytest.mark.parametrize("count", [0, 2])
def test_gpus_reach_info_and_provenance(monkeypatch, count):
    for name, mod in fake_cupy(count).items():
        monkeypatch.setitem(sys.modules, name, mod)
    prov = results.provenance()
    assert prov["gpu_count"] == count and list(prov["gpu_names"]) == [f"Fake GPU {i}" for i in range(count)]
    assert (prov["cupy_version"], prov["cuda_runtime_version"], prov["cuda_driver_version"]) == \
        ("13.0.0", 12020, 12040)
    data = json.loads(CliRunner().invoke(info, ["--json"]).output)
    assert data["gpu"]["nvrtc"] == "12.2"
    assert [g["sm"] for g in data["gpu"]["gpus"]] == ["90"] * count
    text = CliRunner().invoke(info, []).output
    assert (f"GPUs: {count}" in text) == bool(count) and ("GPUs: none" in text) == (not count)


def test_a_failing_gpu_probe_is_a_reason_not_a_crash(monkeypatch):
    for name, mod in fake_cupy(2, fail_on=1).items():
        monkeypatch.setitem(sys.modules, name, mod)
    prov = results.provenance()
    assert not any(k.startswith(("gpu_", "cuda_", "cupy_")) for k in prov)
    text = CliRunner().invoke(info, []).output
    assert "GPUs: none (cudaErrorUnknown: device lost)" in text
