"""Jobs under mpiexec: the master file's stitched activations equal a single-rank run for every
layout and uneven lengths; mixer cases spread over the ranks and give the same file as one rank;
the collective mpio path where h5py has MPI. Also passes on 1 rank."""
import shutil
import tempfile
import types

import numpy as np
import pytest
from mpi4py import MPI

from hpcattn import results, runner
from hpcattn.jobs import load_job

from jobfiles import TINY, assert_same_results, comparable
from jobfiles import write_job as _write_job

MPI_SIZES = (2, 3)
COMM = MPI.COMM_WORLD


@pytest.fixture
def shared_dir():
    """One temporary directory, the same on every rank."""
    path = COMM.bcast(tempfile.mkdtemp(prefix="hpcattn-jobs-mpi-") if COMM.rank == 0 else None)
    yield path
    COMM.Barrier()
    if COMM.rank == 0:
        shutil.rmtree(path, ignore_errors=True)


def write_job(path, **kw):
    """Rank 0 writes the job file, the others wait: ranks writing one file at once can leave a
    rank reading it half-written (seen as a one-rank failure, then a hang, under CI load)."""
    if COMM.rank == 0:
        _write_job(path, **kw)
    COMM.Barrier()
    return path


def single_rank_reference(job, path):
    """Rank 0 runs the same job alone; the others wait."""
    ref = None
    if COMM.rank == 0:
        runner.run_job(job, MPI.COMM_SELF, output=path)
        ref = comparable(path)
    COMM.Barrier()
    return ref


def only(results: dict, words) -> dict:
    return {k: v for k, v in results.items() if k.endswith(words)}


@pytest.mark.mpi
@pytest.mark.timeout(120)
def test_stitched_activations_equal_single_rank(shared_dir):
    path = write_job(f"{shared_dir}/job.toml", activations=True, compression="gzip",
                     sweep={"seq_len": [37, 64], "layout": ["contiguous", "zigzag", "striped"],
                            "causal": [False, True], "kv_heads": 1, **TINY})
    job = load_job(path)
    summary = runner.run_job(job, COMM, output=f"{shared_dir}/p.h5")
    assert summary["ran"] == 12 and not summary["failed_checks"]
    ref = single_rank_reference(job, f"{shared_dir}/one.h5")
    if COMM.rank == 0:
        got = comparable(f"{shared_dir}/p.h5")
        with results.open_results(f"{shared_dir}/p.h5") as f:
            assert f.attrs["ranks"] == COMM.size
            assert int(f["cases/case_0000/ranks"][()]) == COMM.size
        # inputs are identical; outputs differ only by summation order across ranks
        assert_same_results(only(got, ("/q", "/k", "/v", "/params")), only(ref, ("/q", "/k", "/v", "/params")))
        assert_same_results(only(got, ("/out", "/lse")), only(ref, ("/out", "/lse")), rtol=1e-12, atol=1e-12)
        assert len(only(got, "/out")) == 12


@pytest.fixture
def fake_mixers(monkeypatch):
    import hpcattn.jobs as jobs

    seen = []

    def run_mixer_case(case):
        seen.append(case["seq_len"])
        rng = np.random.default_rng(case["seq_len"])
        return {"wall_s": [0.001 * COMM.rank], "y": rng.standard_normal(4), "rank_free": case["seq_len"] / 2}

    monkeypatch.setattr(runner, "_mixer_cases", lambda: types.SimpleNamespace(run_mixer_case=run_mixer_case))
    monkeypatch.setattr(jobs, "mixer_keys", lambda: {"mixer": jobs.Spec(str), "seq_len": jobs.POSITIVE})
    return seen


@pytest.mark.mpi
@pytest.mark.timeout(60)
def test_mixer_cases_spread_over_ranks(shared_dir, fake_mixers):
    path = write_job(f"{shared_dir}/m.toml", kind="mixer", sweep={"mixer": "fake", "seq_len": list(range(8, 15))})
    job = load_job(path)
    summary = runner.run_job(job, COMM, output=f"{shared_dir}/m.h5")
    assert summary["ran"] == 7
    per_rank = COMM.allgather(list(fake_mixers))
    assert sorted(sum(per_rank, [])) == list(range(8, 15))          # each case once
    assert max(map(len, per_rank)) == -(-7 // COMM.size)            # one case per rank at a time
    fake_mixers.clear()
    ref = single_rank_reference(job, f"{shared_dir}/m1.h5")
    if COMM.rank == 0:
        assert_same_results(comparable(f"{shared_dir}/m.h5"), ref)


@pytest.mark.mpi
@pytest.mark.timeout(60)
def test_mpio_single_file(shared_dir):
    if not results.have_mpio():
        pytest.skip("h5py was built without MPI (h5py.get_config().mpi is False), so the collective "
                    "mpio path cannot run; the per-rank shard files are used instead")
    path = write_job(f"{shared_dir}/job.toml", activations=True,
                     sweep={"seq_len": 29, "layout": "striped", **TINY})
    runner.run_job(load_job(path), COMM, output=f"{shared_dir}/p.h5")
    ref = single_rank_reference(load_job(path), f"{shared_dir}/one.h5")
    if COMM.rank == 0:
        files = sorted(p.name for p in __import__("pathlib").Path(f"{shared_dir}/p.h5.d/case_0000").iterdir())
        assert files == (["all.h5"] if COMM.size > 1 else ["r0.h5"])
        got = comparable(f"{shared_dir}/p.h5")
        assert_same_results(only(got, ("/q", "/out")), only(ref, ("/q", "/out")), rtol=1e-12, atol=1e-12)
