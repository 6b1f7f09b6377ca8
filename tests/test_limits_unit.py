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
    job = Job(path="x.toml", text="", name="x", sweep={"seed": list(range(400)), "batch": list(range(1, 401))})
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

    with pytest.raises(HpcattnError, match=f"mixer case repeats={cap + 1} is too large; expected at most {cap}"):
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
