"""``hpcattn analyze``: table (grouped, sorted, filtered), CSV, JSON, the figure, several files,
and one-line errors for files that are not usable."""
import csv
import json
import sys

import pytest
from click.testing import CliRunner
from mpi4py import MPI

from hpcattn import analysis as an
from hpcattn import results as store, runner
from hpcattn.cli.analyze import analyze as analyze_cmd
from hpcattn.jobs import load_job

from jobfiles import TINY, write_job
from test_results_unit import CORRUPT_MESSAGES, corrupt_files


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("analyze")
    job = write_job(tmp / "a.toml", name="a", sweep={"seq_len": [16, 32, 64], "layout": ["contiguous", "zigzag"],
                                                     "causal": True, **TINY}, output=tmp / "a.h5")
    runner.run_job(load_job(job), MPI.COMM_SELF)
    other = write_job(tmp / "b.toml", name="b", sweep={"seq_len": [16, 32], **TINY}, output=tmp / "b.h5")
    runner.run_job(load_job(other), MPI.COMM_SELF)
    return tmp


def invoke(*args):
    return CliRunner().invoke(analyze_cmd, [str(a) for a in args], catch_exceptions=False)


def test_table_has_parameters_and_metrics(results):
    res = invoke(results / "a.h5")
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    assert lines[0].split() == ["case", "layout", "seq_len", "time_s", "gflops", "mem_MiB", "rss_MiB",
                                "max_abs_err", "check", "cpu_kernel"]
    # the kernel each case ran (one rank, float64 under auto: NumPy's)
    assert len(lines) == 7 and all(line.split()[-2] == "yes" for line in lines[1:])
    assert {line.split()[-1] for line in lines[1:]} == {"numpy-blockwise"}


def test_group_sort_and_filter(results):
    res = invoke(results / "a.h5", "--group-by", "layout", "--sort-by", "seq_len")
    blocks = res.output.strip().split("\n\n")
    assert [b.splitlines()[0] for b in blocks] == ["layout=contiguous", "layout=zigzag"]
    for block in blocks:
        ns = [int(line.split()[1]) for line in block.splitlines()[2:]]
        assert ns == [16, 32, 64]
    res = invoke(results / "a.h5", "--where", "layout=zigzag", "--where", "seq_len=32", "--json")
    (row,) = json.loads(res.output)
    assert (row["layout"], row["seq_len"], row["causal"], row["check_passed"]) == ("zigzag", 32, True, True)
    assert invoke(results / "a.h5", "--where", "causal=false").exit_code == 2


@pytest.mark.parametrize("option, value", [("--sort-by", "seqlen"), ("--group-by", "layot"),
                                           ("--where", "casual=true")])
def test_unknown_keys_are_refused_naming_the_known_ones(results, option, value):
    res = CliRunner().invoke(analyze_cmd, [str(results / "a.h5"), option, value])
    assert res.exit_code == 2
    key = value.partition("=")[0]
    assert f"hpcattn: error: {option} '{key}': no case has that key; expected one of " in res.output
    assert "seq_len" in res.output and "layout" in res.output


def test_csv_and_json_hold_every_case(results, tmp_path):
    out = tmp_path / "a.csv"
    res = invoke(results / "a.h5", "--csv", out)
    assert res.exit_code == 0
    rows = list(csv.DictReader(open(out)))
    assert len(rows) == 6 and {"seq_len", "layout", "wall_s", "gflops", "mem_mib", "max_abs_err"} <= set(rows[0])
    data = json.loads(invoke(results / "a.h5", "--json").output)
    assert len(data) == 6 and all(d["wall_s"] > 0 and d["kind"] == "attention" for d in data)
    assert not any(k.startswith("_") for d in data for k in d)


def test_several_files_in_one_table(results):
    res = invoke(results / "a.h5", results / "b.h5", "--sort-by", "file")
    lines = res.output.splitlines()
    assert lines[0].split()[:2] == ["file", "case"] and len(lines) == 9
    assert [line.split()[0] for line in lines[1:]] == ["a"] * 6 + ["b"] * 2


def test_plot_draws_every_panel(results, tmp_path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "fig.png"
    res = invoke(results / "a.h5", results / "b.h5", "--plot", png)
    assert res.exit_code == 0, res.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000
    rows = an.load_rows([results / "a.h5", results / "b.h5"])
    assert an.series_keys(rows, "seq_len") == ["file", "causal", "layout"]  # b is non-causal
    assert an.plot(rows, str(tmp_path / "f.svg")) == ["wall_s", "mem_mib", "gflops", "error"]


def test_plot_without_matplotlib_is_a_clear_error(results, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    res = invoke(results / "a.h5", "--plot", tmp_path / "x.png")
    assert res.exit_code == 2
    assert "--plot needs matplotlib, which is not installed; expected pip install 'hpcattn[plot]'" in res.output


def test_mixer_rows_plot_one_line_per_mixer(tmp_path):
    path = tmp_path / "m.h5"
    m = store.Master(str(path))
    m.prepare({"job_name": "m"}, store.provenance())
    m.add_cases([{"index": i, "kind": "mixer", "params": {"mixer": mx, "seq_len": n},
                  "results": {"wall_s": [n * 1e-3], "rel_err": 0.1, "peak_alloc_bytes": [n * 100]}}
                 for i, (mx, n) in enumerate([(a, b) for a in ("fnet", "local") for b in (64, 128)])])
    rows = an.load_rows([path])
    assert an.series_keys(rows, "seq_len") == ["mixer"]
    assert [an.error_of(r) for r in rows] == [0.1] * 4
    header = invoke(path).output.splitlines()[0].split()
    assert header[:3] == ["case", "mixer", "seq_len"] and "rel_err" in header


@pytest.mark.parametrize("kind", sorted(CORRUPT_MESSAGES))
def test_unusable_file_is_one_line_error(tmp_path, results, kind):
    bad = corrupt_files(tmp_path)[kind]
    res = invoke(results / "a.h5", bad)
    assert res.exit_code == 2
    assert res.output.count("\n") == 1 and CORRUPT_MESSAGES[kind] in res.output
    assert res.output.startswith("hpcattn: error: ")


def test_missing_file(tmp_path):
    res = invoke(tmp_path / "absent.h5")
    assert res.exit_code == 2 and "does not exist" in res.output
