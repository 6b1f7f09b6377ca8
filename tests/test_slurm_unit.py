"""Slurm submission without Slurm: rendering, the [slurm] table's checks, the submit/status
commands against stand-in sbatch/scontrol programs (the real thing: test_slurm_cluster.py)."""
import os
import re
import shutil
import stat
import subprocess
import textwrap

import pytest
from click.testing import CliRunner

from hpcattn.slurm import SlurmError, client, settings
from hpcattn.slurm import render as slurm_render
from hpcattn.cli.status import report, status
from hpcattn.cli.submit import submit
from hpcattn.errors import HpcattnError
from hpcattn.jobs import JobFileError, load_job

JOB = """\
[job]
name = "demo"
[sweep]
seq_len = [256, 512, 1024]
causal = [false, true]
heads = 2
[output]
path = "out/demo.h5"
[slurm]
nodes = 2
ntasks_per_node = 4
time = "00:20:00"
{extra}
"""


@pytest.fixture
def job_file(tmp_path, monkeypatch):
    """Writes a job file (extra [slurm] lines appended) in a fresh working directory."""
    monkeypatch.chdir(tmp_path)

    def write(extra=""):
        path = tmp_path / "demo.toml"
        path.write_text(JOB.format(extra=extra))
        return "demo.toml"
    return write


def render(job_path, **overrides):
    job = load_job(job_path)
    s = settings.resolve(job.slurm, overrides, path=job.path, text=job.text)
    return job, s, slurm_render.render_job(job, s, python="/opt/py/bin/python")


def sbatch_lines(script):
    return [line for line in script.splitlines() if line.startswith("#SBATCH")]


# --- rendering ----------------------------------------------------------------------------------

def test_render_cpu_job(job_file, tmp_path):
    _, _, r = render(job_file())
    lines = sbatch_lines(r.script)
    for want in ("--job-name=demo", "--nodes=2", "--ntasks-per-node=4", "--cpus-per-task=1",
                 "--time=00:20:00", "--signal=USR1@120", f"--chdir={tmp_path}",
                 "--output=out/demo.slurm/%j.out", "--error=out/demo.slurm/%j.err",
                 f"--comment=hpcattn:{tmp_path}/out/demo.h5"):
        assert f"#SBATCH {want}" in lines
    assert not any("gpu" in line or "array" in line or "dependency" in line for line in lines)
    launch = r.script.strip().splitlines()[-1]
    assert launch == "srun --mpi=pmi2 /opt/py/bin/python -m hpcattn run demo.toml --output out/demo.h5"
    assert "${" not in r.script.replace("${SLURM_CPUS_PER_TASK:-1}", "")
    assert r.array_tasks is None and r.results == "out/demo.h5" and r.logs == "out/demo.slurm"
    assert not re.search(r"\n\n\n", r.script), "empty optional parts must not leave blank runs"
    subprocess.run(["bash", "-n"], input=r.script, text=True, check=True, timeout=10)


def test_render_gpu_job_with_options(job_file):
    _, _, r = render(job_file('gpus_per_node = "a100:4"\ngpu_bind = "closest"\naccount = "proj1"'),
                     partition="gpu", qos="high", constraint="a100&ib", mem="64G", cpus_per_task=8,
                     setup=["module load cuda/12", "source ~/venv/bin/activate"],
                     extra=["--exclusive", "#SBATCH --mail-type=END"], launcher="mpiexec",
                     launcher_args="-bind-to core", python="python", after=["11", "afterany:12"],
                     run_args="--device gpu --dtype bfloat16")
    lines = sbatch_lines(r.script)
    for want in ("--gpus-per-node=a100:4", "--gpu-bind=closest", "--account=proj1", "--partition=gpu",
                 "--qos=high", "--constraint=a100&ib", "--mem=64G", "--cpus-per-task=8",
                 "--exclusive", "--mail-type=END", "--dependency=afterok:11,afterany:12"):
        assert f"#SBATCH {want}" in lines
    body = r.script.split("set -eo pipefail\n", 1)[1]
    assert body.index("module load cuda/12") < body.index("source ~/venv/bin/activate") < body.index("mpiexec")
    assert r.script.strip().splitlines()[-1] == (
        'mpiexec -n "$SLURM_NTASKS" -bind-to core python -m hpcattn run demo.toml --output out/demo.h5 '
        '--device gpu --dtype bfloat16')
    subprocess.run(["bash", "-n"], input=r.script, text=True, check=True, timeout=10)


def test_render_array_and_merge(job_file):
    job, s, r = render(job_file(), array=3)
    assert r.array_tasks == 6
    assert "#SBATCH --array=0-5%3" in sbatch_lines(r.script)
    assert "#SBATCH --output=out/demo.slurm/%A_%a.out" in sbatch_lines(r.script)
    assert r.script.strip().endswith('--array-task "$SLURM_ARRAY_TASK_ID" --array-tasks 6')
    merge = slurm_render.render_merge(job, s, r, "4242", python="/opt/py/bin/python")
    assert "#SBATCH --dependency=afterany:4242" in sbatch_lines(merge)
    parts = " ".join(f"out/demo.task{i}.h5" for i in range(6))
    assert f"for part in {parts}; do" in merge
    assert merge.strip().endswith('/opt/py/bin/python -m hpcattn merge out/demo.h5 "${parts[@]}"')
    subprocess.run(["bash", "-n"], input=merge, text=True, check=True, timeout=10)
    # chunks of cases, no concurrency limit
    _, _, r = render(job_file("array = true\narray_tasks = 2"))
    assert "#SBATCH --array=0-1" in sbatch_lines(r.script) and r.array_tasks == 2


def test_part_files_match_the_runner(job_file):
    """The merge job lists the files the array tasks write: both spelled out here by hand."""
    from types import SimpleNamespace

    from hpcattn.runner import output_path

    job, s, r = render(job_file(), array=True, array_tasks=3)
    merge = slurm_render.render_merge(job, s, r, "7")
    assert "for part in out/demo.task0.h5 out/demo.task1.h5 out/demo.task2.h5; do" in merge
    written = [output_path(SimpleNamespace(output="out/demo.h5"), None, i, 3) for i in range(3)]
    assert written == ["out/demo.task0.h5", "out/demo.task1.h5", "out/demo.task2.h5"]
    # the status of a task names the same part file; a record of several tasks names none
    assert client.task_results("out/demo.h5", {"ArrayTaskId": "2"}) == "out/demo.task2.h5"
    assert client.task_results("out/demo.h5", {"ArrayTaskId": "0-2%1"}) is None
    assert client.task_results("out/demo", {"ArrayTaskId": "1"}) == "out/demo.task1.h5"


def test_signal_before_follows_short_limits(job_file):
    assert render(job_file(), time="4")[1]["signal_before"] == 60
    assert render(job_file(), time="1")[1]["signal_before"] == 15
    assert render(job_file(), time="2-00:00:00")[1]["signal_before"] == 120
    with pytest.raises(HpcattnError, match=r"signal_before = 60 s is not below the time limit 1 \(60 s\)"):
        render(job_file(), time="1", signal_before=60)


@pytest.mark.parametrize("text,seconds", [(5, 300), ("5", 300), ("5:30", 330), ("01:02:03", 3723),
                                          ("2-3", 183600), ("1-00:10", 87000), ("1-00:00:01", 86401)])
def test_time_seconds(text, seconds):
    assert settings.time_seconds(text) == seconds
    assert settings.check_value("time", text) is None


# --- the [slurm] table and overrides -------------------------------------------------------------

def test_unknown_key_names_key_file_and_line(job_file):
    path = job_file("ntasks = 4")
    with pytest.raises(JobFileError) as err:
        render(path)
    msg = str(err.value)
    assert msg.startswith("demo.toml:13: slurm.ntasks is not a known key; expected one of nodes, ")
    assert "\n" not in msg


@pytest.mark.parametrize("line,expect", [
    ("cpus_per_task = 0", "slurm.cpus_per_task = 0 is not valid; expected a positive integer"),
    ('cpus_per_task = "2"', "slurm.cpus_per_task = '2' is not valid; expected an integer"),
    ('merge_time = "1 hour"', "slurm.merge_time = '1 hour' is not valid; expected a time limit"),
    ('mem = "lots"', "expected megabytes or a size"),
    ('gpus_per_node = "four"', "expected a count or \"TYPE:COUNT\""),
    ('partition = "a b"', "slurm.partition = 'a b' is not valid; expected one word"),
    ('launcher = "mpirun"', "expected one of srun, mpiexec"),
    ('signal = "KILL"', "expected one of USR1, TERM, INT"),
    ('array = 0', "expected true, false or a concurrency limit"),
    ('after = ["x"]', "expected a job id"),
    ('setup = ["ok", 3]', "expected a string or a list of strings"),
])
def test_bad_values(job_file, line, expect):
    with pytest.raises(JobFileError, match=re.escape(expect)) as err:
        render(job_file(line))
    assert str(err.value).startswith("demo.toml:13: ")


def test_command_line_overrides_win_and_lists_append(job_file):
    _, s, _ = render(job_file('setup = "module load a"\nextra = ["--exclusive"]'), nodes=8,
                     time="01:00:00", setup=["module load b"], extra=["--requeue"])
    assert s["nodes"] == 8 and s["time"] == "01:00:00" and s["ntasks_per_node"] == 4
    assert s["setup"] == ["module load a", "module load b"] and s["extra"] == ["--exclusive", "--requeue"]
    with pytest.raises(HpcattnError, match=r"^--time '1h' is not valid; expected a time limit"):
        render(job_file(), time="1h")


def test_array_tasks_beyond_cases(job_file):
    with pytest.raises(HpcattnError, match="array_tasks = 7 exceeds the job's 6 cases; expected at most 6"):
        render(job_file(), array_tasks=7)


def test_template_placeholder_typo_is_reported(job_file, tmp_path, monkeypatch):
    tdir = tmp_path / "templates"
    tdir.mkdir()
    shutil.copy(slurm_render.template_path(slurm_render.MERGE_TEMPLATE), tdir)
    (tdir / slurm_render.JOB_TEMPLATE).write_text("#!/bin/bash\n#SBATCH --nodes=${nodez}\n")
    monkeypatch.setenv("HPCATTN_SLURM_TEMPLATES", str(tdir))
    with pytest.raises(SlurmError, match=r"uses placeholder \$\{nodez\}, which hpcattn does not fill"):
        render(job_file())


# --- submit and status against stand-in Slurm commands ----------------------------------------

def fake_tools(tmp_path, monkeypatch, **scripts):
    """A PATH holding only the given programs (name -> bash body)."""
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    for name, body in scripts.items():
        p = bindir / name
        p.write_text("#!/bin/bash\n" + textwrap.dedent(body))
        p.chmod(p.stat().st_mode | stat.S_IEXEC)
    # the stand-ins need cat and touch from /bin; without any, nothing else is reachable
    monkeypatch.setenv("PATH", f"{bindir}:/bin" if scripts else str(bindir))
    return bindir


def test_dry_run_prints_and_submits_nothing(job_file, tmp_path, monkeypatch):
    fake_tools(tmp_path, monkeypatch, sbatch="touch called; echo 1\n")
    res = CliRunner().invoke(submit, [job_file(), "--dry-run", "--array", "2", "--gpus-per-node", "4"])
    assert res.exit_code == 0, res.output
    assert res.output.startswith("#!/bin/bash\n")
    assert "#SBATCH --gpus-per-node=4" in res.output and "#SBATCH --array=0-5%2" in res.output
    assert "#SBATCH --dependency=afterany:ARRAY_JOB_ID" in res.output
    assert not (tmp_path / "called").exists() and not (tmp_path / "out").exists()


def test_submit_saves_scripts_and_chains_the_merge(job_file, tmp_path, monkeypatch):
    fake_tools(tmp_path, monkeypatch, sbatch="""\
        n=$(( $(cat count 2>/dev/null || echo 100) + 1 )); echo $n > count
        [ "$1" = --parsable ] || exit 9
        cat > stdin.$n; echo "$n"
        """)
    res = CliRunner().invoke(submit, [job_file(), "--array", "--parsable"])
    assert res.exit_code == 0, res.output
    assert res.output.split() == ["101", "102"]
    saved = (tmp_path / "out/demo.slurm/101.sbatch").read_text()
    assert saved == (tmp_path / "stdin.101").read_text() and "#SBATCH --array=0-5" in saved
    merge = (tmp_path / "out/demo.slurm/102.merge.sbatch").read_text()
    assert merge == (tmp_path / "stdin.102").read_text()
    assert "#SBATCH --dependency=afterany:101" in merge


def test_sbatch_missing(job_file, tmp_path, monkeypatch):
    fake_tools(tmp_path, monkeypatch)
    res = CliRunner().invoke(submit, [job_file()])
    assert res.exit_code == 1, "a missing Slurm is a runtime failure"
    assert res.stderr.startswith("hpcattn: error: sbatch not found on PATH; expected a Slurm client")
    assert len(res.output.strip().splitlines()) == 1


def test_sbatch_rejection_shows_slurms_message(job_file, tmp_path, monkeypatch):
    fake_tools(tmp_path, monkeypatch, sbatch="""\
        echo "sbatch: error: Batch job submission failed: Invalid partition name specified" >&2; exit 1
        """)
    res = CliRunner().invoke(submit, [job_file(), "--partition", "nosuch"])
    assert res.exit_code == 1
    assert res.output.strip() == ("hpcattn: error: sbatch rejected the script: sbatch: error: Batch job "
                                  "submission failed: Invalid partition name specified")
    assert not list((tmp_path / "out/demo.slurm").glob("*.sbatch"))


def test_bad_slurm_table_stops_submit(job_file, tmp_path, monkeypatch):
    fake_tools(tmp_path, monkeypatch, sbatch="touch called; echo 1\n")
    res = CliRunner().invoke(submit, [job_file("gpus = 4")])
    assert res.exit_code == 2, "a bad job file is an input error"
    assert res.stderr.startswith("hpcattn: error: demo.toml:13: slurm.gpus is not a known key")
    assert not (tmp_path / "called").exists()


# one array (two tasks done, two pending) and a pending merge job, as `scontrol show job -o` prints them
SCONTROL = """\
JobId=51 ArrayJobId=50 ArrayTaskId=1 JobName=demo UserId=u(0) JobState=FAILED Reason=NonZeroExitCode Dependency=(null) ExitCode=138:0 RunTime=00:00:04 TimeLimit=00:20:00 NodeList=n1 Comment=hpcattn:{d}/out/demo.h5  StdErr={d}/out/demo.slurm/50_1.err StdIn=/dev/null StdOut={d}/out/demo.slurm/50_1.out Power=
JobId=50 ArrayJobId=50 ArrayTaskId=0 JobName=demo UserId=u(0) JobState=CANCELLED by 0 Reason=None Dependency=(null) ExitCode=0:15 RunTime=00:00:03 TimeLimit=00:20:00 NodeList=n1 Comment=hpcattn:{d}/out/demo.h5  StdErr={d}/out/demo.slurm/50_0.err StdIn=/dev/null StdOut={d}/out/demo.slurm/50_0.out Power=
JobId=52 ArrayJobId=50 ArrayTaskId=2-3%2 JobName=demo UserId=u(0) JobState=PENDING Reason=JobArrayTaskLimit Dependency=(null) ExitCode=0:0 RunTime=00:00:00 TimeLimit=00:20:00 NodeList= Comment=hpcattn:{d}/out/demo.h5  StdErr={d}/out/demo.slurm/50_4294967294.err StdIn=/dev/null StdOut={d}/out/demo.slurm/50_4294967294.out Power=
JobId=53 JobName=demo-merge UserId=u(0) JobState=PENDING Reason=Dependency Dependency=afterany:50_*(unfulfilled) ExitCode=0:0 RunTime=00:00:00 TimeLimit=00:10:00 NodeList= Comment=hpcattn:{d}/out/demo.h5  StdErr={d}/out/demo.slurm/53.merge.out StdIn=/dev/null StdOut={d}/out/demo.slurm/53.merge.out Power=
JobId=60 JobName=other UserId=u(0) JobState=RUNNING Reason=None ExitCode=0:0 Command=/x y.sh StdOut=/x.out
"""


def test_parse_scontrol():
    recs = client.parse_scontrol(SCONTROL.format(d="/w"))
    assert [r["JobId"] for r in recs] == ["51", "50", "52", "53", "60"]
    assert recs[1]["JobState"] == "CANCELLED by 0" and client.state(recs[1]) == "CANCELLED"
    assert recs[0]["Comment"] == "hpcattn:/w/out/demo.h5" and client.results_of(recs[0]) == "/w/out/demo.h5"
    assert recs[4]["Command"] == "/x y.sh" and client.results_of(recs[4]) is None
    assert [client.is_final(r) for r in recs] == [True, True, False, False, False]


@pytest.mark.parametrize("task,n,first", [("3", 1, 3), ("0-5%2", 6, 0), ("1,4-5", 3, 1), ("", 1, -1)])
def test_array_task_ranges(task, n, first):
    rec = {"ArrayTaskId": task} if task else {}
    assert client.task_count(rec) == n and client.first_task(rec) == first


def test_records_grouped_by_job_tasks_in_order():
    recs = client.parse_scontrol(SCONTROL.format(d="/w"))
    groups = client.by_job(recs)
    assert [(job, [r["JobId"] for r in rs]) for job, rs in groups] == [
        ("50", ["50", "51", "52"]), ("53", ["53"]), ("60", ["60"])]
    assert [client.exit_reason(r) for r in groups[0][1]] == [
        "killed by SIGTERM", "stopped by SIGUSR1 before the time limit", None]
    assert not client.all_completed(recs) and client.all_completed([{"JobState": "COMPLETED"}])


def test_status_report(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    text = report(client.parse_scontrol(SCONTROL.format(d=tmp_path))[:4])
    lines = text.splitlines()
    assert lines[0].startswith("array job 50  demo  tasks: 1 CANCELLED, 1 FAILED, 2 PENDING")
    assert lines[1].startswith("  task 0   CANCELLED  exit 0:15 (killed by SIGTERM; submit again to resume)")
    assert lines[1].endswith("  log out/demo.slurm/50_0.out")
    assert lines[2].startswith("  task 1   FAILED  exit 138:0 (stopped by SIGUSR1 before the time limit; "
                               "submit again to resume)  00:00:04 of 00:20:00")
    assert lines[3] == "  task 2-3%2 PENDING (JobArrayTaskLimit)  limit 00:20:00"
    assert lines[4] == "  results  out/demo.h5 (not written yet), written by the merge job"
    assert "part out/demo.task0.h5 (missing)" in lines[1], "task 0 ended: its file will not come"
    assert lines[5] == "job 53  demo-merge  PENDING (Dependency)  limit 00:10:00  -"
    assert lines[6] == "  after    afterany:50_*(unfulfilled)"


def test_status_command(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "jobs.txt").write_text(SCONTROL.format(d=tmp_path).replace("UserId=u(0)", f"UserId=u({os.getuid()})"))
    fake_tools(tmp_path, monkeypatch, scontrol=f"""\
        if [ "$4" = 99 ]; then echo "slurm_load_jobs error: Invalid job id specified" >&2; exit 1; fi
        cat {tmp_path}/jobs.txt
        """)
    res = CliRunner().invoke(status, [])
    assert res.exit_code == 0, res.output
    assert "array job 50" in res.output and "job 53" in res.output and "other" not in res.output
    res = CliRunner().invoke(status, ["99"])
    assert res.exit_code == 1 and "Slurm does not know job(s) 99" in res.output
    res = CliRunner().invoke(status, ["x1"])
    assert res.exit_code == 2 and "'x1' is not a job id" in res.output


def test_job_mpiexec_is_the_one_beside_python(tmp_path, monkeypatch):
    (tmp_path / "python").touch()
    elsewhere = tmp_path / "path"
    elsewhere.mkdir()
    (elsewhere / "mpiexec").write_text("#!/bin/sh\n")
    (elsewhere / "mpiexec").chmod(0o755)
    monkeypatch.setenv("PATH", str(elsewhere))  # this machine's PATH says nothing about the node's
    assert slurm_render.job_mpiexec(str(tmp_path / "python")) == "mpiexec"
    mpiexec = tmp_path / "mpiexec"
    mpiexec.write_text("#!/bin/sh\n")
    mpiexec.chmod(0o755)
    assert slurm_render.job_mpiexec(str(tmp_path / "python")) == str(mpiexec)
    assert slurm_render.job_mpiexec("python") == "mpiexec"
