"""``hpcattn analyze`` on mixer results: the standard figures by content (recall, error, scaling),
causal and non-causal cases never merged, ``--metric``, and status/reason in the table."""
import csv
import json
import re

import pytest
from click.testing import CliRunner

from hpcattn import analysis as an
from hpcattn import results as store
from hpcattn.cli.analyze import analyze as analyze_cmd

MIXERS = ("exact_blockwise", "local")


def write_results(path, cases):
    """A results file holding ``cases``: (params, results) pairs, as the job runner writes them."""
    m = store.Master(str(path))
    m.prepare({"job_name": path.stem}, store.provenance())
    m.add_cases([{"index": i, "kind": "mixer", "params": p, "results": r} for i, (p, r) in enumerate(cases)])
    return path


def recall_case(mixer, n, dist, causal):
    params = {"task": "recall", "mixer": mixer, "seq_len": n, "distance": dist, "causal": causal,
              "queries": 32, "seed": 0}
    if dist >= n:
        return params, {"status": "not_applicable", "reason": f"distance {dist} >= seq_len {n}"}
    if mixer == "local" and not causal:
        return params, {"status": "unsupported", "reason": "local has no causal=false form"}
    acc = 1.0 if mixer == "exact_blockwise" or dist < 16 else 0.0625
    return params, {"status": "ok", "reason": "", "recall_accuracy": acc, "chance": 0.0625,
                    "queries": 64, "peak_alloc_bytes": 1000}


def error_case(mixer, n, causal):
    params = {"task": "error", "mixer": mixer, "seq_len": n, "causal": causal, "seed": 0}
    err = 0.0 if mixer == "exact_blockwise" else (0.5 if causal else 0.1) * n / 64
    return params, {"status": "ok", "reason": "", "rel_err": err, "max_err": err, "peak_alloc_bytes": n}


def scaling_case(mixer, n, causal):
    params = {"task": "scaling", "mixer": mixer, "seq_len": n, "causal": causal, "seed": 0,
              "memory_budget_mb": 1.0}
    need = n * n * 16 if mixer == "exact_blockwise" else n * 64
    if need > 2 ** 20:
        return params, {"status": "over_budget", "reason": "predicted 4 MiB > budget 1 MiB",
                        "predicted_bytes": need}
    return params, {"status": "ok", "reason": "", "wall_s": [n * 1e-5, n * 2e-5],
                    "peak_alloc_bytes": need, "predicted_bytes": need}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mixfig")
    bools = (False, True)
    return {
        "recall": write_results(tmp / "recall.h5", [recall_case(m, n, d, c) for m in MIXERS
                                                    for n in (64, 256) for d in (1, 16, 128) for c in bools]),
        "error": write_results(tmp / "error.h5", [error_case(m, n, c) for m in MIXERS
                                                  for n in (64, 256, 1024) for c in bools]),
        "scaling": write_results(tmp / "scaling.h5", [scaling_case(m, n, c) for m in MIXERS
                                                      for n in (64, 128, 256, 512) for c in bools]),
    }


def invoke(*args):
    return CliRunner().invoke(analyze_cmd, [str(a) for a in args], catch_exceptions=False)


def figure_text(rows, path, **kw):
    """Draw to SVG with text kept as text: (panels drawn, every string in the figure)."""
    matplotlib = pytest.importorskip("matplotlib")
    with matplotlib.rc_context({"svg.fonttype": "none"}):
        drawn = an.plot(rows, str(path), **kw)
    return drawn, path.read_text()


def assert_png(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 30_000, len(data)


@pytest.mark.parametrize("kind", ["recall", "error", "scaling"])
def test_cli_writes_a_real_figure_per_job(files, tmp_path, kind):
    pytest.importorskip("matplotlib")
    png = tmp_path / f"{kind}.png"
    res = CliRunner().invoke(analyze_cmd, [str(files[kind]), "--plot", str(png)])
    assert res.exit_code == 0, res.output
    assert_png(png)
    expected = {"recall": "recall_accuracy x4", "error": "error x2", "scaling": "wall_s x2, mem_mib x2"}
    assert f"figure: {png} ({expected[kind]})" in res.output


def test_recall_figure_one_panel_per_length_and_causal_mode(files, tmp_path):
    rows = an.load_rows([files["recall"]])
    drawn, text = figure_text(rows, tmp_path / "r.svg")
    assert drawn == [f"recall_accuracy ({c}, N = {n})" for c in ("non-causal", "causal") for n in (64, 256)]
    assert "distance back to the key (tokens)" in text and "chance = 0.0625" in text
    assert "distance ≥ N: no case" in text               # distances past the sequence are shaded
    assert "not run (unsupported): local" in text        # local has no non-causal form here
    # against the context length instead: one panel per distance and causal mode
    drawn, text = figure_text(rows, tmp_path / "n.svg", x="seq_len")
    assert len(drawn) == 6 and "sequence length N (tokens)" in text and "N ≤ distance: no case" in text


def test_causal_and_non_causal_are_different_lines(files, tmp_path):
    rows = an.load_rows([files["error"]])
    assert an.series_keys(rows, "seq_len") == ["mixer", "causal"]
    assert an.series_keys(rows, "seq_len", facets=["causal"]) == ["mixer"]
    drawn, text = figure_text(rows, tmp_path / "m.svg", metrics=["rel_err"])
    assert drawn == ["rel_err"]
    assert "local, causal" in text and "local, non-causal" in text
    # the standard error figure splits them into panels instead; exact's 0 is marked, not dropped
    drawn, text = figure_text(rows, tmp_path / "e.svg")
    assert drawn == ["error (non-causal)", "error (causal)"]
    assert "exactly 0: exact_blockwise" in text and "‖y − y_exact‖" in text
    # an explicit --series that leaves causal out says it took the median over it
    drawn, text = figure_text(rows, tmp_path / "s.svg", metrics=["rel_err"], series=["mixer"])
    assert "lines: median over causal" in text


def test_where_still_filters_the_figure(files, tmp_path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "c.png"
    res = invoke(files["error"], "--where", "causal=true", "--plot", png)
    assert res.exit_code == 0 and "figure: " in res.output and "(error)" in res.output
    rows = an.load_rows([files["error"]])
    drawn, text = figure_text([r for r in rows if r["causal"]], tmp_path / "c.svg")
    assert drawn == ["error"] and "non-causal" not in text


def test_scaling_figure_marks_the_budget_wall(files, tmp_path):
    rows = an.load_rows([files["scaling"]])
    drawn, text = figure_text(rows, tmp_path / "s.svg")
    assert drawn == ["wall_s (non-causal)", "wall_s (causal)", "mem_mib (non-causal)", "mem_mib (causal)"]
    for label in ("budget 1 MiB (peak + inputs)", "over budget, not run",
                  "over budget, not run: predicted memory", "time per call (s, median of repeats)"):
        assert label in text


def test_metric_plots_any_result_and_per_repeat_arrays(files, tmp_path):
    rows = an.load_rows([files["scaling"]])
    assert rows[0]["_data"]["wall_s"].shape == (2,)
    assert an.metric_value(rows[0], "wall_s").tolist() == [64e-5, 128e-5]
    drawn, _ = figure_text(rows, tmp_path / "w.svg", metrics=["wall_s", "peak_alloc_bytes"])
    assert drawn == ["wall_s", "peak_alloc_bytes"]


@pytest.mark.parametrize("key, message", [
    ("nope", "--metric 'nope' is not recorded in these cases; expected one of "),
    ("status", "--metric 'status' is not numeric (e.g. 'ok'); expected one of "),
])
def test_metric_errors_are_one_line(files, tmp_path, key, message):
    res = invoke(files["recall"], "--plot", tmp_path / "x.png", "--metric", key)
    assert res.exit_code == 2
    assert res.output.count("\n") == 1 and f"hpcattn: error: {message}" in res.output
    assert "recall_accuracy" in res.output and not (tmp_path / "x.png").exists()


def test_metric_without_plot_is_a_usage_error(files):
    res = invoke(files["recall"], "--metric", "recall_accuracy")
    assert res.exit_code == 2 and "--metric chooses what --plot draws; expected --plot FILE too" in res.output


def test_status_and_reason_in_table_csv_and_json(files, tmp_path):
    res = invoke(files["recall"], "--where", "mixer=local", "--where", "seq_len=64")
    header, *lines = res.output.splitlines()
    assert header.split()[-2:] == ["status", "reason"]
    ends = [re.split(r"\s{2,}", line)[-2:] for line in lines]
    assert ["unsupported", "local has no causal=false form"] in ends
    assert ["not_applicable", "distance 128 >= seq_len 64"] in ends
    out = tmp_path / "r.csv"
    invoke(files["recall"], "--csv", out)
    rows = list(csv.DictReader(open(out)))
    assert {r["reason"] for r in rows} >= {"", "distance 128 >= seq_len 64", "local has no causal=false form"}
    data = json.loads(invoke(files["recall"], "--json").output)
    assert all("status" in d and "reason" in d for d in data)
    # all cases fine: no empty reason column
    assert invoke(files["recall"], "-w", "status=ok").output.splitlines()[0].split()[-1] == "status"


def test_result_named_like_a_parameter_keeps_both(files):
    row = next(r for r in an.load_rows([files["recall"]]) if r["status"] == "ok")
    assert row["queries"] == 32 and row["result_queries"] == 64
