"""Hostile values for every input that reaches a rendered sbatch script (issue 12).

Each value goes through `hpcattn submit` (stand-in sbatch that keeps the scripts) as a [slurm]
key, as its command-line option, as [job] name, [output] path, the job file's name and the working
directory. It is either refused (exit 2, one printable line naming the key), or every script it
produced passes `bash -n`, carries exactly the #SBATCH directives written out below (parsed the
way sbatch reads them: the lines before the first command), and, run by bash with srun, mpiexec
and python replaced by stand-ins that record their argv, creates no PWNED file and hands the value
over as one literal argument (run_args/launcher_args: as the words shlex.split makes of it).
`setup` is shell code by design: its lines are checked to arrive verbatim, and not run.
"""
import json
import os
import shlex
import stat
import subprocess
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner

from hpcattn.cli.submit import submit
from hpcattn.slurm import settings

HOSTILE = [
    "x\ntouch PWNED", "x\n", "x\rtouch PWNED", "x\r\n#SBATCH --account=stolen", "x\x0btouch PWNED",
    "x\x1b]0;title\x07", "x\x7f", "x;touch PWNED", "x;touch>PWNED", "$(touch PWNED)",
    "$(touch${IFS}PWNED)", "`touch PWNED`", "`touch${IFS}PWNED`", "x && touch PWNED",
    "x&&touch>PWNED", "pmi2&touch>PWNED", "x|touch>PWNED", "x' ; touch PWNED; '", 'x" ; touch PWNED; "',
    "a'b", 'a"b', "x\\y", "x\\\ntouch PWNED", "-x", "x #SBATCH --account=stolen", "#SBATCH --account=stolen",
    "x\n#SBATCH --account=stolen\ny", "x\u2028touch PWNED", "x\u2029y", "x\u0085touch PWNED",
    "--flag 'two words' \"$(touch PWNED)\"",
]

JOB = """\
[job]
name = {name}
[sweep]
seq_len = [128, 256]
heads = 1
[output]
path = {output}
[slurm]
{slurm}
"""
#: the [slurm] table of every job here, unless the key under test replaces a line
BASE_SLURM = {"ntasks_per_node": "ntasks_per_node = 2", "signal_before": "signal_before = 7"}

#: options of `hpcattn submit` whose name is not the key's with dashes
OPTION = {"extra": "--sbatch"}
#: [slurm] keys that are not options of `hpcattn submit`
NOT_OPTIONS = {"signal"}
#: key -> the #SBATCH option its value becomes (job script, merge script)
DIRECTIVE = {"gpus_per_node": ("gpus-per-node", None), "gpus_per_task": ("gpus-per-task", None),
             "gpu_bind": ("gpu-bind", None), "mem": ("mem", None), "time": ("time", None),
             "constraint": ("constraint", None), "partition": ("partition", "partition"),
             "account": ("account", "account"), "qos": ("qos", "qos"), "merge_time": (None, "time"),
             "nodes": ("nodes", None), "ntasks_per_node": ("ntasks-per-node", None),
             "cpus_per_task": ("cpus-per-task", None)}


def toml_string(value: str) -> str:
    """A TOML basic string holding ``value`` (JSON's escapes are TOML's; DEL must be escaped too)."""
    return json.dumps(value).replace("\x7f", "\\u007f")


class World:
    """A working directory, stand-in programs and `hpcattn submit` run in-process."""

    def __init__(self, tmp_path: Path, monkeypatch):
        self.root, self.monkeypatch = tmp_path, monkeypatch
        self.bin = tmp_path / "bin"
        self.calls = tmp_path / "calls"
        self.scripts = tmp_path / "submitted"
        for d in (self.bin, self.calls, self.scripts):
            d.mkdir()
        recorder = '#!/bin/bash\nprintf \'%s\\0\' "$0" "$@" > "$(mktemp "$STUB_CALLS/call.XXXXXX")"\n'
        for name in ("srun", "mpiexec", "python"):
            self.stub(self.bin / name, recorder)
        self.stub(self.bin / "sbatch", textwrap.dedent("""\
            #!/bin/bash
            n=$(( $(ls "$STUB_SCRIPTS" | wc -l) + 100 ))
            cat > "$STUB_SCRIPTS/$n"; echo "$n"
            """))
        self.recorder = recorder
        self.workdir = tmp_path / "work"
        self.workdir.mkdir()
        monkeypatch.setenv("PATH", f"{self.bin}:/usr/bin:/bin")
        monkeypatch.setenv("STUB_CALLS", str(self.calls))
        monkeypatch.setenv("STUB_SCRIPTS", str(self.scripts))

    @staticmethod
    def stub(path: Path, text: str) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        path.chmod(path.stat().st_mode | stat.S_IEXEC)

    def submit(self, job_text: str, args: list[str], *, job_file="job.toml", workdir: Path | None = None):
        workdir = workdir or self.workdir
        workdir.mkdir(exist_ok=True)
        (workdir / job_file).write_text(job_text)
        self.monkeypatch.chdir(workdir)
        for old in self.scripts.iterdir():
            old.unlink()
        res = CliRunner().invoke(submit, [*args, "--parsable", "--", job_file])
        scripts = [p.read_text() for p in sorted(self.scripts.iterdir(), key=lambda p: int(p.name))]
        return res, scripts

    def run(self, script: str, cwd: Path) -> list[list[str]]:
        """Run ``script`` with bash in ``cwd``; the argv of each stand-in called, in order."""
        for old in self.calls.iterdir():
            old.unlink()
        env = {"PATH": os.environ["PATH"], "STUB_CALLS": str(self.calls), "SLURM_NTASKS": "2",
               "SLURM_ARRAY_TASK_ID": "0", "HOME": str(self.root)}
        proc = subprocess.run(["bash", "-c", script, "job"], cwd=cwd, env=env, capture_output=True,
                              text=True, timeout=30)
        calls = sorted(self.calls.iterdir(), key=lambda p: p.stat().st_mtime_ns)
        argvs = [p.read_bytes().decode().split("\0")[:-1] for p in calls]
        assert proc.returncode == 0 and argvs, f"script failed ({proc.returncode}): {proc.stderr}\n{script}"
        return argvs


def directives(script: str, *, late_ok=False) -> list[tuple[str, ...]]:
    """The #SBATCH directives sbatch reads (lines before the first command, split as sbatch
    splits them), and no #SBATCH line anywhere after them (unless ``late_ok``: setup is shell code
    and may hold comments, which sbatch ignores there)."""
    lines = script.split("\n")
    assert lines[0] == "#!/bin/bash"
    found, body = [], None
    for i, line in enumerate(lines[1:], 1):
        if line.startswith("#SBATCH"):
            found.append(tuple(shlex.split(line[len("#SBATCH"):], comments=True)))
        elif line.strip() and not line.startswith("#"):
            body = lines[i:]
            break
    assert body is not None, "a script without a command"
    late = [line for line in body if line.lstrip().startswith("#SBATCH")]
    assert late_ok or not late, f"#SBATCH after the first command: {late}"
    return sorted(found)


def expected(kind: str, *, name: str, output: str, workdir: str, key=None, value=None, array=False):
    """The directives of a job (kind "job") or merge script, written out by hand."""
    logs = os.path.splitext(output)[0] + ".slurm"
    comment = "--comment=hpcattn:" + os.path.join(workdir, output)
    if kind == "job":
        log = "%A_%a" if array else "%j"
        d = {"job-name": name, "nodes": "1", "ntasks-per-node": "2", "cpus-per-task": "1",
             "time": "00:30:00", "signal": "USR1@7", "chdir": workdir, "output": f"{logs}/{log}.out",
             "error": f"{logs}/{log}.err"}
        if array:
            d["array"] = "0-1"
    else:
        d = {"job-name": f"{name}-merge", "nodes": "1", "ntasks": "1", "time": "00:10:00",
             "dependency": "afterany:100", "chdir": workdir, "output": f"{logs}/%j.merge.out"}
    extra = []
    if key in DIRECTIVE and DIRECTIVE[key][kind != "job"]:
        d[DIRECTIVE[key][kind != "job"]] = str(value)
    elif key == "job_name":
        d["job-name"] = value if kind == "job" else f"{value}-merge"
    elif key == "after" and kind == "job":
        d["dependency"] = value if ":" in value else f"afterok:{value}"
    elif key == "extra" and kind == "job":
        extra = [tuple(shlex.split(value.strip().removeprefix("#SBATCH"), comments=True))]
    return sorted([(f"--{opt}={val}",) for opt, val in d.items()] + [(comment,)] + extra)


def job_text(*, name="hj", output="results/hj.h5", slurm="", key=None):
    lines = [line for k, line in BASE_SLURM.items() if k != key] + [slurm]
    return JOB.format(name=toml_string(name), output=toml_string(output), slurm="\n".join(lines))


def assert_refused(res, label: str, *, or_unknown_option=False):
    assert res.exit_code == 2, f"exit {res.exit_code}, expected 2 (refused) or a safe script:\n{res.output}"
    last = res.stderr.rstrip("\n").split("\n")[-1]
    named = label in last or (or_unknown_option and "No such option" in last)
    assert named and last.isprintable(), f"the error does not name {label} on one line: {res.stderr!r}"
    if res.stderr.startswith("hpcattn: error: "):
        assert res.stderr.count("\n") == 1, res.stderr
    else:
        assert last.startswith("Error: "), res.stderr  # click's own usage error (type or choice)


ALL_SCRIPTS = {("job", False), ("job", True), ("merge", True)}


def assert_safe(world: World, scripts, *, key=None, value=None, name="hj", output="results/hj.h5",
                workdir=None, argument=None, words=None, array=False, python=None, where=ALL_SCRIPTS):
    """Every script: bash -n, exactly the expected directives, and run: no PWNED, the value
    as one literal argument (``argument``, in the scripts ``where``: (kind, array)) or as its
    shell words (``words``, in the job script)."""
    workdir = workdir or world.workdir
    assert len(scripts) == (2 if array else 1), scripts
    assert key not in ("run_args", "launcher_args") or words is not None, f"{value!r} has an open quote"
    for kind, script in zip(["job", "merge"], scripts):
        subprocess.run(["bash", "-n"], input=script, text=True, check=True, timeout=10)
        want = expected(kind, name=name, output=output, workdir=str(workdir), key=key, value=value, array=array)
        assert directives(script, late_ok=key == "setup") == want, script
        if key == "setup":
            assert value in script.split("\n"), "setup lines arrive verbatim"
            continue
        if kind == "merge":
            for i in range(2):  # the parts the array tasks would have written
                part = workdir / f"{os.path.splitext(output)[0]}.task{i}.h5"
                part.parent.mkdir(parents=True, exist_ok=True)
                part.touch()
            if python and "/" not in python:
                world.stub(world.bin / python, world.recorder)
        argvs = world.run(script, workdir)
        pwned = [p for p in world.root.rglob("*") if p.name == "PWNED"]
        assert not pwned, f"{value!r} ran a command: {pwned}\n{script}"
        # one launch: the job script starts srun (mpiexec for the array), the merge step python
        program = {"job": "mpiexec" if array else "srun", "merge": python or "python"}[kind]
        assert len(argvs) == 1 and os.path.basename(argvs[0][0]) == program, argvs
        flat = [a for argv in argvs for a in argv]
        if argument is not None and (kind, array) in where:
            # a program found on PATH sees its own full path as $0
            assert argument in flat or any(a.endswith("/" + argument) for a in flat), \
                f"{argument!r} is not one argument of {argvs}"
        if words is not None and kind == "job":
            assert any(argv[i:i + len(words)] == words for argv in argvs for i in range(len(argv))), \
                f"{words} are not consecutive arguments of {argvs}"


# --- the cases ----------------------------------------------------------------------------------

KEYS = sorted(settings.KEYS)


def _expect(key, value) -> dict:
    """What assert_safe checks for an accepted ``value`` of [slurm] ``key``."""
    expect = {"key": key, "value": value}
    if key in ("run_args", "launcher_args"):
        try:
            expect["words"] = shlex.split(value)
        except ValueError:
            expect["words"] = None  # an open quote: it must be refused
    elif key == "srun_mpi":
        expect.update(argument=f"--mpi={value}", where={("job", False)})  # only srun has it
    elif key == "python":
        expect.update(argument=value, python=value)
    return expect


def _variants(key):
    """Extra options per run: plain (srun), and as an array with mpiexec (both scripts)."""
    if key in ("array", "array_tasks", "launcher"):
        return [([], False)]
    return [([], False), (["--array", "--launcher", "mpiexec"], True)]


def refused_or_safe(world, label, *, job=None, options=(), job_file="job.toml", workdir=None,
                    or_unknown_option=False, **expect):
    """Submit plain and as an array: refused naming ``label``, or every script safe."""
    key = expect.get("key")
    python = [] if key == "python" else ["--python", str(world.bin / "python")]
    for args, array in _variants(key):
        res, scripts = world.submit(job or job_text(), [*python, *args, *options], job_file=job_file,
                                    workdir=workdir)
        if res.exit_code != 0:
            assert_refused(res, label, or_unknown_option=or_unknown_option)
            return
        assert_safe(world, scripts, array=array, workdir=workdir, **expect)


@pytest.fixture
def world(tmp_path, monkeypatch):
    return World(tmp_path, monkeypatch)


@pytest.mark.parametrize("value", HOSTILE, ids=ascii)
@pytest.mark.parametrize("key", KEYS)
def test_hostile_slurm_key(world, key, value):
    text = toml_string(value)
    line = f"{key} = [{text}]" if key in settings.LIST_KEYS else f"{key} = {text}"
    refused_or_safe(world, f"slurm.{key}", job=job_text(slurm=line, key=key), **_expect(key, value))


@pytest.mark.parametrize("value", HOSTILE, ids=ascii)
@pytest.mark.parametrize("key", [k for k in KEYS if k not in NOT_OPTIONS])
def test_hostile_submit_option(world, key, value):
    option = OPTION.get(key, "--" + key.replace("_", "-"))
    # --array takes an optional number: click reads "-x" after it as an unknown option
    refused_or_safe(world, option, options=[f"{option}={value}"], or_unknown_option=key == "array",
                    **_expect(key, value))


@pytest.mark.parametrize("value", HOSTILE, ids=ascii)
def test_hostile_job_name(world, value):
    refused_or_safe(world, "job.name", job=job_text(name=value), name=value)


@pytest.mark.parametrize("value", HOSTILE, ids=ascii)
def test_hostile_output_path(world, value):
    output = f"results/{value}.h5"
    # the array's tasks do not name the results file; its merge step does
    refused_or_safe(world, "output.path", job=job_text(output=output), output=output, argument=output,
                    where={("job", False), ("merge", True)})


@pytest.mark.parametrize("value", HOSTILE, ids=ascii)
def test_hostile_job_file_name(world, value):
    job_file = f"{value}.toml"
    refused_or_safe(world, "job file", job_file=job_file, argument=job_file,
                    where={("job", False), ("job", True)})


@pytest.mark.parametrize("value", HOSTILE, ids=ascii)
def test_hostile_working_directory(world, value):
    refused_or_safe(world, "working directory", workdir=world.root / f"w {value}")


def test_the_corpus_is_refused_where_it_must_be(world):
    """The checks above accept either outcome; these values must be refused (a newline in the
    header or a directive, an srun plugin that is not one word, a path that breaks a line)."""
    for key, value in [("job_name", "jn\n"), ("time", "00:10:00\n"), ("mem", "4G\n"), ("partition", "p\n"),
                       ("gpus_per_node", "4\n"), ("after", "12\n"), ("account", "a\n"),
                       ("srun_mpi", "pmi2&touch>PWNED"), ("srun_mpi", "pmi2\n"), ("run_args", "a\nb"),
                       ("extra", "--exclusive\r"), ("python", "py\nthon")]:
        res, _ = world.submit(job_text(slurm=f"{key} = {toml_string(value)}", key=key), [])
        assert_refused(res, f"slurm.{key}")
    res, _ = world.submit(job_text(), ["--job-name", "jn\n"])
    assert_refused(res, "--job-name")
    res, _ = world.submit(job_text(name="jn\n"), [])
    assert_refused(res, "job.name")
    res, _ = world.submit(job_text(output="results/x\ntouch PWNED\n#SBATCH --account=stolen\nx.h5"), [])
    assert_refused(res, "output.path")
    res, _ = world.submit(job_text(), [], job_file="a\nb.toml")
    assert_refused(res, "job file")
    res, _ = world.submit(job_text(), [], workdir=world.root / "w\nx")
    assert_refused(res, "working directory")
