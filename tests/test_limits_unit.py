"""Bad input and limits, refused up front with one-line messages: sweeps too large to build,
unbounded repeats, tolerances that are not finite non-negative numbers, repeated sweep values,
and attention cases whose inputs and working memory cannot fit on a rank (estimated before
anything is allocated, the same message on every rank)."""
import math
import tracemalloc

import numpy as np
import pytest

from hpcattn import footprint
from hpcattn.cases import AttentionCase, attention_case, resolved_params, run_attention_case
from hpcattn.errors import CollectiveError, HpcattnError
from hpcattn.jobs import MAX_CASES, Job, JobFileError, load_job

from jobfiles import write_job

BASE = '[job]\nname = "lim"\n\n[sweep]\n'


def load_err(tmp_path, text) -> str:
    path = tmp_path / "job.toml"
    path.write_text(text)
    with pytest.raises(JobFileError) as info:
        load_job(path)
    msg = str(info.value)
    assert "\n" not in msg
    return msg


# --- how many cases ---------------------------------------------------------------------------

def test_huge_sweep_is_counted_not_built(tmp_path):
    # 10^8 cases from four axes of 100 values; building them is what raised an empty MemoryError
    axes = "".join(f"{k} = {list(range(1, 101))}\n" for k in ("seq_len", "batch", "heads", "seed"))
    tracemalloc.start()
    try:
        msg = load_err(tmp_path, BASE + axes)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert "100,000,000 cases" in msg and f"at most {MAX_CASES:,}" in msg, msg
    assert "job.toml:4:" in msg and "HPCATTN_MAX_CASES" in msg
    assert peak < 16 * 2 ** 20


def test_case_cap_applies_to_a_job_built_in_python_and_can_be_raised(tmp_path, monkeypatch):
    job = Job(path="x.toml", text="", name="x",
              sweep={"seed": list(range(400)), "batch": list(range(1, 401))})
    assert job.n_cases == 160_000
    with pytest.raises(JobFileError, match=r"x\.toml: the sweep has 160,000 cases"):
        job.cases()
    monkeypatch.setenv("HPCATTN_MAX_CASES", "200000")
    assert len(job.cases()) == 160_000
    monkeypatch.setenv("HPCATTN_MAX_CASES", "many")
    with pytest.raises(JobFileError, match="HPCATTN_MAX_CASES='many' is not a positive integer"):
        job.cases()


def test_a_sweep_at_the_cap_loads(tmp_path, monkeypatch):
    monkeypatch.setenv("HPCATTN_MAX_CASES", "6")
    path = write_job(tmp_path / "j.toml", sweep={"seq_len": [16, 32, 64], "causal": [False, True]})
    assert len(load_job(path).cases()) == 6
    path = write_job(tmp_path / "j.toml", sweep={"seq_len": [16, 32, 64, 128], "causal": [False, True]})
    with pytest.raises(JobFileError, match=r"8 cases \(seq_len 4 x causal 2\); at most 6"):
        load_job(path)


# --- repeats ------------------------------------------------------------------------------------

def test_repeats_are_capped_everywhere(tmp_path):
    cap = footprint.MAX_REPEATS
    msg = load_err(tmp_path, BASE + f"repeats = [1, {cap + 1}]\n")
    assert msg.endswith(f"job.toml:5: sweep.repeats = {cap + 1} is too large; expected at most {cap}")
    assert load_job(write_job(tmp_path / "ok.toml", sweep={"repeats": cap})).cases()[0]["repeats"] == cap
    with pytest.raises(CollectiveError, match=f"repeats={10 ** 9} is too large; expected at most {cap}"):
        AttentionCase(seq_len=16, repeats=10 ** 9).validate(1)
    from hpcattn.mixers.cases import check_mixer_case

    with pytest.raises(HpcattnError,
                       match=f"mixer case repeats={cap + 1} is too large; expected at most {cap}"):
        check_mixer_case({"repeats": cap + 1})


# --- tolerance ---------------------------------------------------------------------------------

@pytest.mark.parametrize("text, shown", [("nan", "nan"), ("inf", "inf"), ("-inf", "-inf"),
                                         ("-1e-3", "-0.001")])
def test_tolerance_must_be_finite_and_not_negative(tmp_path, text, shown):
    msg = load_err(tmp_path, BASE + f"check_rows = 4\ntolerance = {text}\n")
    assert f"job.toml:6: sweep.tolerance = {shown} " in msg, msg
    assert "expected a finite number >= 0" in msg or "must be >= 0" in msg, msg


@pytest.mark.parametrize("tol", [math.nan, math.inf, -1.0, "1e-3", True])
def test_tolerance_of_a_case_from_python(tol):
    with pytest.raises(HpcattnError, match="tolerance="):
        attention_case({"seq_len": 16, "check_rows": 4, "tolerance": tol})
    with pytest.raises(HpcattnError, match="tolerance="):
        resolved_params(AttentionCase(seq_len=16, check_rows=4), tol)


def test_mixer_float_keys_must_be_finite():
    from hpcattn.mixers.cases import check_mixer_case

    for key in ("memory_budget_mb", "sharpness"):
        for bad in (math.nan, math.inf):
            with pytest.raises(HpcattnError, match=f"mixer case {key}={bad!r} is not a finite number"):
                check_mixer_case({key: bad})


# --- repeated sweep values ---------------------------------------------------------------------

@pytest.mark.parametrize("values, key, shown", [
    ("[1024, 1024]", "seq_len", "1024"),
    ('["zigzag", "contiguous", "zigzag"]', "layout", "'zigzag'"),
    ("[1e-3, 0.001]", "tolerance", "0.001"),
    ("[1, 1.0]", "tolerance", "1"),
])
def test_repeated_sweep_value_is_named(tmp_path, values, key, shown):
    msg = load_err(tmp_path, BASE + f"check_rows = 4\n{key} = {values}\n")
    assert f"job.toml:6: sweep.{key} = " in msg
    assert f"repeats a value: {shown} appears 2 times; expected distinct values" in msg, msg


def test_repeated_value_of_a_key_left_to_the_mixer_code(tmp_path):
    msg = load_err(tmp_path, '[job]\nname = "m"\nkind = "mixer"\n[sweep]\nmixer = "local"\n'
                             'window = [4, 8, 4]\n')
    assert "job.toml:6: sweep.window = [4, 8, 4] repeats a value: 4 appears 2 times" in msg, msg


def test_command_line_overrides_are_checked_like_the_file(tmp_path):
    job = load_job(write_job(tmp_path / "j.toml", sweep={"seq_len": [16, 32]}))
    for key, val, words in (("tolerance", math.nan, "is not a finite number"),
                            ("repeats", 10 ** 6, "is too large; expected at most"),
                            ("seq_len", "16", "has type string; expected an integer")):
        with pytest.raises(JobFileError, match=f"{key} = {val!r} {words}"):
            job.with_overrides({key: val})


# --- memory per rank, before anything is allocated -------------------------------------------

class ThreadWorld:
    """``size`` ranks as threads of this process: allgather/bcast/Barrier through a barrier
    (enough for what a case does before its first allocation)."""

    def __init__(self, size):
        import threading

        self.size, self.slots, self.barrier = size, [None] * size, threading.Barrier(size, timeout=30)

    def comm(self, rank_of):
        world = self

        class Comm:
            size, rank_ = world.size, rank_of

            @property
            def rank(self):
                return self.rank_

            def allgather(self, x):
                world.barrier.wait()
                world.slots[rank_of] = x
                world.barrier.wait()
                out = list(world.slots)
                world.barrier.wait()
                return out

            def Barrier(self):
                world.barrier.wait()
        return Comm()

    def run(self, fn):
        """fn(comm) on every rank; returns each rank's result or exception."""
        import threading

        out = [None] * self.size

        def body(r):
            try:
                out[r] = fn(self.comm(r))
            except BaseException as exc:  # noqa: BLE001 - returned for the test to look at
                out[r] = exc
        threads = [threading.Thread(target=body, args=(r,)) for r in range(self.size)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        return out


def _no_allocation(monkeypatch):
    import hpcattn.cases as cases_mod
    from hpcattn.layouts import Distribution

    def boom(*a, **k):
        raise AssertionError("a rank started allocating")
    monkeypatch.setattr(cases_mod, "random_qkv", boom)
    monkeypatch.setattr(Distribution, "positions", boom)


def test_two_to_the_31_tokens_on_two_ranks_is_refused_before_any_allocation(monkeypatch):
    _no_allocation(monkeypatch)
    # the ranks see different MemAvailable (read at different moments): still one message
    free = iter([20 * 2 ** 30, 19 * 2 ** 30])
    seen = {}

    def available():
        import threading

        me = threading.current_thread().name
        seen.setdefault(me, next(free))
        return seen[me], "MemAvailable"
    monkeypatch.setattr(footprint, "host_available", available)
    case = AttentionCase(seq_len=2 ** 31, heads=8, head_dim=64)
    errs = ThreadWorld(2).run(lambda comm: run_attention_case(case, comm))
    assert all(isinstance(e, CollectiveError) for e in errs), errs
    msg = str(errs[0])
    assert str(errs[1]) == msg and "\n" not in msg
    assert msg.startswith("seq_len=2147483648 on 2 ranks needs about ")
    assert "TiB of host memory per rank (inputs 6.0 TiB" in msg, msg
    assert "for the 2 ranks there, but host " in msg and "19.0 GiB available (MemAvailable)" in msg


@pytest.mark.parametrize("kernel,dtype", [("numpy", "float64"), ("fused", "float32")])
def test_estimate_is_close_to_the_measured_peak(monkeypatch, kernel, dtype):
    from mpi4py import MPI

    from hpcattn import cpu_fused

    # kernels whose every allocation tracemalloc sees: NumPy's, and the fused one's (its tiles
    # and packed block are a NumPy scratch array); torch's allocator it does not see
    if kernel == "fused" and cpu_fused.reason() is not None:
        pytest.skip(cpu_fused.reason())
    monkeypatch.setenv("HPCATTN_CPU_KERNEL", kernel)
    from hpcattn.cases import case_memory
    from hpcattn.layouts import Distribution

    case = AttentionCase(seq_len=4096, heads=4, kv_heads=2, head_dim=16, dtype=dtype, check_rows=16)
    host, device = case_memory(case, Distribution(4096, 1, "contiguous"), 0)
    # a first run imports modules lazily (about 2 MiB of code objects that tracemalloc counts and
    # that stay): not the case's memory, which is what the model estimates. The same case, so
    # that the test does not depend on what earlier tests imported (a smaller warm-up case left
    # some imports to the measured run when this test ran alone)
    run_attention_case(case, MPI.COMM_SELF)
    tracemalloc.start()
    try:
        run_attention_case(case, MPI.COMM_SELF)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert device.total == 0
    assert peak <= host.total <= 1.3 * peak, (host.total, peak, host.parts())


def test_ranks_on_one_host_add_up_and_ranks_on_two_hosts_do_not():
    need = footprint.RankMemory(inputs=6 * 2 ** 30)
    both = [("host a", "host", need, 10 * 2 ** 30, "MemAvailable")] * 2
    msg = footprint.shortfall(both, "seq_len=8 on 2 ranks")
    assert "needs about 6.0 GiB of host memory per rank (inputs 6.0 GiB), 12.0 GiB for the 2 ranks " \
           "there, but host a has 10.0 GiB available (MemAvailable)" in msg
    apart = [("host a", "host", need, 10 * 2 ** 30, "x"), ("host b", "host", need, 10 * 2 ** 30, "x")]
    assert footprint.shortfall(apart, "") is None
    assert footprint.shortfall([("host a", "host", need, None, "unknown")], "") is None


def test_gpu_memory_is_checked_per_device(monkeypatch):
    host = footprint.RankMemory(inputs=2 ** 20)
    dev = footprint.RankMemory(inputs=3 * 2 ** 30)
    reports = [("host a", "host", host, 2 ** 40, "MemAvailable"),
               ("GPU 0 of a", "GPU", dev, 2 ** 30, "GPU free memory")]
    assert "of GPU memory per rank" in footprint.shortfall(reports, "x")
    _, device = footprint.rank_memory(1024, batch=1, heads=8, kv_heads=8, head_dim=64, dtype="float16",
                                      ranks=2, device="gpu")
    assert device.inputs == 3 * 1024 * 8 * 64 * 2 and device.ring == 2 * 2 * 1024 * 8 * 64 * 2


def test_available_memory_is_read_from_this_machine():
    free, source = footprint.host_available()
    assert free is None or (free > 0 and source in ("MemAvailable", "cgroup memory.max"))


def test_a_job_whose_last_case_cannot_fit_is_refused_before_the_first_runs(monkeypatch):
    from hpcattn.cases import preflight

    _no_allocation(monkeypatch)
    monkeypatch.setattr(footprint, "host_available", lambda: (2 ** 30, "MemAvailable"))
    params = [{"seq_len": n, "heads": 8, "head_dim": 64} for n in (1024, 4096, 2 ** 24)]
    errs = ThreadWorld(2).run(lambda comm: preflight(params, comm))
    assert all(isinstance(e, CollectiveError) for e in errs), errs
    assert str(errs[0]) == str(errs[1])
    assert str(errs[0]).startswith("case 2: seq_len=16777216 on 2 ranks needs about ")
    assert str(errs[0]).endswith("; no case was run")
    assert ThreadWorld(2).run(lambda comm: preflight(params[:2], comm)) == [None, None]


def test_bench_reports_the_same_model():
    from hpcattn.bench import BenchConfig, shard_footprint

    cfg = BenchConfig(batch=3, heads=2, head_dim=4, dtype="float32")
    host, _ = footprint.rank_memory(10, batch=3, heads=2, kv_heads=2, head_dim=4, dtype="float32")
    assert shard_footprint(cfg, 10) == host.held == 7920


def test_command_line_refuses_two_to_the_31_tokens_in_one_line():
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "hpcattn", "run", "--np", "2", "-N", str(2 ** 31),
                           "-H", "8", "-d", "64"], capture_output=True, text=True, timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode != 0 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("hpcattn: error: seq_len=2147483648 on 2 ranks needs about "), lines
    assert "available (" in lines[0] and "Traceback" not in proc.stdout + proc.stderr


class StandInCuda:
    """What check_memory asks of the CUDA backend: ``xp.cuda.Device()`` (id, mem_info) and the
    memory pool's unused bytes (no GPU needed)."""

    def __init__(self, free, pool_free=0):
        import types

        device = types.SimpleNamespace(id=3, mem_info=(free, 2 * free))
        pool = types.SimpleNamespace(free_bytes=lambda: pool_free)
        self.xp = types.SimpleNamespace(cuda=types.SimpleNamespace(Device=lambda: device),
                                        get_default_memory_pool=lambda: pool)


def test_gpu_case_is_checked_against_the_device_free_memory(monkeypatch):
    from mpi4py import MPI

    from hpcattn.cases import check_memory
    from hpcattn.layouts import Distribution

    monkeypatch.setattr(footprint, "host_available", lambda: (2 ** 40, "MemAvailable"))
    assert footprint.device_available(StandInCuda(5, 7)) == (12, "GPU free memory")
    assert footprint.device_available(object())[0] is None
    case = AttentionCase(seq_len=2 ** 20, heads=8, head_dim=64, dtype="float16", device="gpu")
    dist = Distribution(case.seq_len, 1, case.layout)
    with pytest.raises(CollectiveError, match=r"of GPU memory per rank .* but GPU 3 of \S+ has 1\.0 GiB "
                                              r"available \(GPU free memory\)"):
        check_memory(case, MPI.COMM_SELF, dist, StandInCuda(2 ** 30))
    check_memory(case, MPI.COMM_SELF, dist, StandInCuda(2 ** 36))


def test_mixer_case_without_budget_is_not_started_beyond_available_memory(monkeypatch):
    from hpcattn.mixers.cases import run_mixer_case

    monkeypatch.setattr(footprint, "host_available", lambda: (64 * 2 ** 20, "MemAvailable"))
    res = run_mixer_case({"mixer": "exact_blockwise", "seq_len": 2 ** 24, "heads": 8,
                          "memory_budget_mb": 0.0})
    assert res["status"] == "over_budget" and "MiB > 64 MiB available (MemAvailable)" in res["reason"]
    assert "wall_s" not in res
