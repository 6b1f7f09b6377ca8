"""The conventions every ``hpcattn`` subcommand shares (hpcattn/cli/__init__.py): one-line errors
with one prefix and one exit-status rule, repeated single-value options refused, one meaning per
short option, figure paths as written; and a missing MPI, a single process's BLAS threads and a
multi-rank job run on one rank, as a new user meets them."""
import json
import os
import subprocess
import sys

import click
import pytest
from click.testing import CliRunner

from hpcattn import results as store
from hpcattn.cli import SHORT_OPTIONS, main

from conftest import ROOT
from jobfiles import TINY, write_job

PREFIX = "hpcattn: error: "


def invoke(*args, **kw):
    return CliRunner().invoke(main, [str(a) for a in args], prog_name="hpcattn", catch_exceptions=False, **kw)


def hpcattn(*args, env=None, timeout=120):
    try:
        return subprocess.run([sys.executable, "-m", "hpcattn", *map(str, args)], capture_output=True,
                              text=True, timeout=timeout, cwd=ROOT, env=env)
    except subprocess.TimeoutExpired:
        pytest.fail(f"hpcattn {' '.join(map(str, args))} hung for {timeout} s")


def assert_one_line_error(res, status: int, words: str):
    """Exit ``status`` and exactly one line on stderr: the prefix and ``words``."""
    code = res.exit_code if hasattr(res, "exit_code") else res.returncode
    err = res.stderr
    assert code == status, f"exit {code}, expected {status}: {err!r}"
    assert err.count("\n") == 1 and err.startswith(PREFIX), err
    assert words in err, err
    assert "Traceback" not in err and "Usage:" not in err and "Error:" not in err


# --- one line, one prefix, one exit-status rule ---------------------------------------------------

@pytest.mark.parametrize("args, status, words", [
    (["run", "--bogus"], 2, "No such option '--bogus' (see 'hpcattn run --help')"),
    (["run", "-N", "x"], 2, "'x' is not a valid integer"),
    (["nope"], 2, "No such command 'nope'"),
    (["mixers", "show", "local", "--bogus"], 2, "(see 'hpcattn mixers show --help')"),
    (["mixers", "show", "nope"], 2, "unknown mixer 'nope'"),
    (["bench", "--ranks", "1,x"], 2, "'1,x' is not a comma-separated list of rank counts"),
    (["analyze", "/nonexistent/r.h5"], 2, "does not exist"),
    (["merge", "out.h5", "/nonexistent/p.h5"], 2, "/nonexistent/p.h5"),
    (["submit", "/nonexistent/job.toml", "--dry-run"], 2, "/nonexistent/job.toml"),
])
def test_errors_are_one_line_with_one_prefix_and_status(args, status, words, tmp_path):
    assert_one_line_error(invoke(*args), status, words)


def test_a_file_the_system_refuses_is_a_runtime_failure(mixer_results, tmp_path):
    res = invoke("analyze", mixer_results, "--csv", tmp_path / "no" / "such" / "dir.csv")
    assert_one_line_error(res, 1, "No such file or directory")


def test_missing_job_file_is_status_2_as_a_user_runs_it():
    res = hpcattn("run", "/nonexistent/job.toml")
    assert_one_line_error(res, 2, "job file /nonexistent/job.toml does not exist")


def test_merge_help_documents_the_status_it_returns(tmp_path):
    assert "Exit status 2 when a part is missing" in " ".join(invoke("merge", "--help").output.split())
    assert invoke("merge", tmp_path / "o.h5", tmp_path / "absent.h5").exit_code == 2


@pytest.mark.parametrize("args", [[], ["mixers"]])
def test_a_group_without_a_subcommand_shows_its_help(args):
    res = invoke(*args)
    assert "Usage: hpcattn" in res.output and "Commands:" in res.output and PREFIX not in res.output


def test_ctrl_c_is_130_without_aborted(monkeypatch):
    import hpcattn.cli.info as info

    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(info, "collect", interrupted)
    res = invoke("info")
    assert res.exit_code == 130 and "Aborted" not in res.output


def test_a_bug_still_shows_its_traceback(monkeypatch):
    """Only errors a user can cause are one line; an internal error must stay debuggable."""
    import hpcattn.cli.info as info

    def broken():
        raise ZeroDivisionError("internal")

    monkeypatch.setattr(info, "collect", broken)
    with pytest.raises(ZeroDivisionError):
        invoke("info")


# --- an option that takes one value is given once ---------------------------------------------

@pytest.mark.parametrize("args, names", [
    (["run", "-N", "4096", "-N", "8192"], "--seq-len/-N was given 2 times"),
    (["run", "--seq-len=64", "-N", "128", "-H", "2"], "--seq-len/-N was given 2 times"),
    (["run", "--causal", "--no-causal"], "--causal/--no-causal was given 2 times"),
    (["run", "--np", "2", "--np", "3"], "--np was given 2 times"),
    (["mixers", "show", "local", "-N", "8", "--seq-len", "16"], "--seq-len/-N was given 2 times"),
    (["analyze", "x.h5", "--plot", "a.png", "--plot", "b.png"], "--plot was given 2 times"),
    (["submit", "job.toml", "--time", "10", "--time", "20", "--dry-run"], "--time/-t was given 2 times"),
])
def test_repeated_single_value_option_is_refused(args, names):
    assert_one_line_error(invoke(*args), 2, names + "; expected it once")


def test_repeatable_options_still_repeat():
    res = invoke("mixers", "recall", "--mixer", "local", "-N", "64", "-N", "96", "--distance", "2",
                 "--distance", "3", "-p", "local.window=4", "--batch", "1")
    assert res.exit_code == 0, res.output
    assert [ln.split()[2] for ln in res.output.splitlines()[1:]] == ["64", "96"]


def test_a_repeat_as_a_user_types_it_runs_nothing():
    res = hpcattn("run", "-N", "4096", "-N", "8192")
    assert_one_line_error(res, 2, "--seq-len/-N was given 2 times")
    assert res.stdout == ""


# --- one meaning per short option -------------------------------------------------------------

def commands(group=main, path=("hpcattn",)):
    ctx = click.Context(group, info_name=path[-1])
    for name in group.list_commands(ctx):
        cmd = group.get_command(ctx, name)
        yield " ".join(path + (name,)), cmd
        if isinstance(cmd, click.Group):
            yield from commands(cmd, path + (name,))


@pytest.mark.parametrize("path, cmd", list(commands()), ids=lambda v: v if isinstance(v, str) else "")
def test_short_options_mean_one_thing_everywhere(path, cmd):
    ctx = click.Context(cmd, info_name=path)
    clashes = []
    for param in cmd.get_params(ctx):
        opts = param.opts + param.secondary_opts
        long = [o for o in opts if o.startswith("--")]
        for short in (o for o in opts if len(o) == 2):
            if SHORT_OPTIONS.get(short) not in long:
                clashes.append(f"{short} is {'/'.join(long)} here but {SHORT_OPTIONS.get(short, 'unlisted')} "
                               "in hpcattn.cli.SHORT_OPTIONS")
    assert not clashes, f"{path}: " + "; ".join(clashes)


# --- figures are written where the message says ------------------------------------------------

@pytest.fixture
def mixer_results(tmp_path):
    """Two mixer cases (local at N=64 and 128): enough for a figure."""
    master = store.Master(str(tmp_path / "m.h5"))
    master.prepare({"job_name": "m"}, store.provenance())
    cases = [{"index": i, "kind": "mixer", "params": {"mixer": "local", "seq_len": 64 << i},
              "results": {"wall_s": [0.01 * (i + 1)], "rel_err": 0.2}} for i in range(2)]
    master.add_cases(cases)
    return tmp_path / "m.h5"


def test_plot_without_suffix_prints_the_file_it_wrote(mixer_results, tmp_path):
    pytest.importorskip("matplotlib")
    res = invoke("analyze", mixer_results, "--plot", tmp_path / "out")
    assert res.exit_code == 0, res.output
    assert (tmp_path / "out.png").read_bytes()[:4] == b"\x89PNG"
    assert f"figure: {tmp_path / 'out.png'} (" in res.stderr


def test_png_without_suffix_prints_the_file_it_wrote(tmp_path):
    pytest.importorskip("matplotlib")
    res = invoke("mixers", "show", "local", "-N", "16", "--png", tmp_path / "p")
    assert res.exit_code == 0, res.output
    assert (tmp_path / "p.png").exists() and f"wrote {tmp_path / 'p.png'}" in res.output


def test_plot_to_a_non_figure_suffix_is_refused_before_any_work(mixer_results, tmp_path):
    res = invoke("analyze", mixer_results, "--plot", tmp_path / "fig.h5")
    assert_one_line_error(res, 2, "'.h5', which is not a figure format; expected one of .png, .pdf, .svg")


# --- without MPI ---------------------------------------------------------------------------------

@pytest.fixture(params=["library", "module"])
def no_mpi_env(request, tmp_path):
    """An environment where mpi4py cannot load its MPI: the real mpi4py pointed at a library that
    does not exist, or a stand-in mpi4py whose MPI module raises what mpi4py raises then."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PMI_", "HYDRA_", "OMPI_", "MPI_LOCAL"))}
    if request.param == "library":
        env["MPI4PY_LIBMPI"] = str(tmp_path / "missing" / "libmpi.so.12")
    else:
        fake = tmp_path / "fake" / "mpi4py"
        fake.mkdir(parents=True)
        (fake / "__init__.py").write_text("__version__ = '4.1.2'\n")
        (fake / "MPI.py").write_text("raise RuntimeError('cannot load MPI library\\nlibmpi.so: cannot open')\n")
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(fake.parent), env.get("PYTHONPATH")]))
    return env


@pytest.mark.parametrize("args", [["run", "-N", "4096"], ["run", "--np", "2", "-N", "4096"]])
def test_run_without_mpi_says_what_to_install(no_mpi_env, args):
    res = hpcattn(*args, env=no_mpi_env)
    assert_one_line_error(res, 1, "MPI cannot be used (cannot load MPI library); install one: "
                                  "pip install 'hpcattn[mpi]'")


def test_info_without_mpi_reports_everything_else(no_mpi_env):
    res = hpcattn("info", env=no_mpi_env)
    assert res.returncode == 0 and res.stderr == "", res.stderr
    mpi = [ln for ln in res.stdout.splitlines() if ln.startswith("MPI:")]
    assert len(mpi) == 1 and "cannot load MPI library" in mpi[0] and "pip install 'hpcattn[mpi]'" in mpi[0]
    for part in ("Machine:", "BLAS", "GPUs:", "Kernels:"):
        assert part in res.stdout
    data = json.loads(hpcattn("info", "--json", env=no_mpi_env).stdout)
    assert data["mpi"]["mpi4py"] is None and data["cores"] >= 1


# --- one process: one BLAS thread; a multi-rank job on one rank says so ----------------------------

def clean_env(**extra):
    env = {k: v for k, v in os.environ.items()
           if not k.endswith("_NUM_THREADS") and not k.startswith(("PMI_", "HYDRA_", "OMPI_", "MPI_LOCAL", "SLURM_"))}
    return {**env, **extra}


def test_the_command_as_one_process_uses_one_blas_thread():
    data = json.loads(hpcattn("info", "--json", env=clean_env()).stdout)
    assert data["thread_vars"]["OPENBLAS_NUM_THREADS"] == data["thread_vars"]["OMP_NUM_THREADS"] == "1"
    mine = json.loads(hpcattn("info", "--json", env=clean_env(OPENBLAS_NUM_THREADS="2")).stdout)
    assert mine["thread_vars"]["OPENBLAS_NUM_THREADS"] == "2"      # the user's setting stands


def test_a_program_importing_hpcattn_keeps_its_threads_and_np_ranks_choose_their_own():
    code = ("import os, sys\n"
            "imported = sys.argv[1] == 'import'\n"
            "sys.argv[0] = 'python' if imported else '/venv/bin/hpcattn'\n"
            "import hpcattn._threads as t\n"
            "print(os.environ.get('OPENBLAS_NUM_THREADS'), t.inherited_environment().get('OPENBLAS_NUM_THREADS'))\n")
    for how, expected in (("import", "None None"), ("command", "1 None")):
        proc = subprocess.run([sys.executable, "-c", code, how], capture_output=True, text=True,
                              timeout=60, env=clean_env())
        assert proc.stdout.strip() == expected, (how, proc.stdout, proc.stderr)


def test_runs_the_command_reads_the_interpreter_command_line():
    from hpcattn._threads import runs_the_command

    py = sys.executable
    assert runs_the_command(["/v/bin/hpcattn", "run"], [py, "/v/bin/hpcattn", "run"])
    assert runs_the_command(["-m"], [py, "-m", "hpcattn", "run"])
    assert runs_the_command(["-m"], [py, "-X", "dev", "-u", "-mhpcattn"])
    assert not runs_the_command(["-m"], [py, "-m", "pytest", "-m", "hpcattn"])
    assert not runs_the_command(["-c"], [py, "-c", "import hpcattn", "-m", "hpcattn"])
    assert not runs_the_command(["prog.py"], [py, "prog.py", "-m", "hpcattn"])


@pytest.mark.timeout(300)
def test_a_multi_rank_job_on_one_rank_says_so_first(tmp_path):
    job = write_job(tmp_path / "two.toml", sweep={**TINY, "seq_len": [16]}, name="two",
                    output=tmp_path / "two.h5", extra="\n[slurm]\nnodes = 1\nntasks_per_node = 2\n")
    res = hpcattn("run", job, env=clean_env(), timeout=240)
    assert res.returncode == 0, res.stderr
    assert res.stderr.splitlines()[0] == (f"hpcattn run: two runs on 1 rank (no --np, not under mpiexec), "
                                          f"but its [slurm] table asks for 2; for that: hpcattn run --np 2 {job}")
    plain = write_job(tmp_path / "one.toml", sweep={**TINY, "seq_len": [16]}, name="one", output=tmp_path / "one.h5")
    res = hpcattn("run", plain, env=clean_env(), timeout=240)
    assert res.returncode == 0 and "runs on 1 rank" not in res.stderr, res.stderr
