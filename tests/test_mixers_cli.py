"""hpcattn mixers list / show / recall."""
import pytest
from click.testing import CliRunner

from hpcattn.cli import main
from hpcattn.mixers import REGISTRY


def run(*args):
    return CliRunner().invoke(main, ["mixers", *args])


def test_list_shows_every_mixer_with_complexity():
    res = run("list")
    assert res.exit_code == 0, res.output
    for name, cls in REGISTRY.items():
        line = next(ln for ln in res.output.splitlines() if ln.startswith(name + " "))
        assert cls.time_complexity in line and cls.memory_complexity in line
    assert "window=64" in res.output and "shared QK" in res.output


def test_show_prints_a_banded_matrix():
    res = run("show", "local", "-N", "32", "-p", "window=2", "--causal")
    assert res.exit_code == 0, res.output
    assert "causal=true N=32" in res.output
    rows = res.output.splitlines()[1:]
    assert rows[0].strip() and rows[0][2:].strip() == ""       # first query sees only itself
    assert rows[-1][:40].strip() == ""                          # last query sees only recent keys


def test_show_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "p.png"
    res = run("show", "retnet", "-N", "24", "--png", str(out))
    assert res.exit_code == 0, res.output
    assert out.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("args,match", [
    (("show", "nope"), "unknown mixer 'nope'"),
    (("show", "local", "-p", "windw=3"), "no parameter 'windw'"),
    (("show", "fnet", "--causal"), "fnet has no causal=true form"),
    (("show", "local", "-p", "window"), "is not KEY=VALUE"),
])
def test_show_errors_are_usage_errors(args, match):
    res = run(*args)
    assert res.exit_code == 2 and match in res.output


def test_recall_table():
    res = run("recall", "--mixer", "exact_blockwise", "--mixer", "local", "-N", "128", "--distance", "4", "--distance", "100",
              "-p", "local.window=8", "--batch", "2")
    assert res.exit_code == 0, res.output
    lines = {ln.split()[0]: ln.split() for ln in res.output.splitlines()[1:]}
    assert lines["exact_blockwise"][3:] == ["1.00", "1.00"]
    assert lines["local"][3] == "1.00" and float(lines["local"][4]) < 0.3
