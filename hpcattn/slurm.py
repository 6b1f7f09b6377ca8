"""Slurm: render sbatch scripts from the templates in ``slurm/``, submit them, read job state.

* :func:`resolve` checks a job file's ``[slurm]`` table (unknown keys and bad values are one-line
  :class:`~hpcattn.jobs.JobFileError` messages naming file, line and key), applies command-line
  overrides and fills in defaults.
* :func:`render_job` / :func:`render_merge` fill ``slurm/hpcattn.sbatch`` and ``slurm/merge.sbatch``
  (stdlib :class:`string.Template`); a sweep can go out as a job array whose tasks each write
  ``<results>.task<I>.h5``, followed by a merge job that depends on the whole array.
* :func:`sbatch` submits with ``--parsable``; :func:`show_jobs` parses ``scontrol show job -o``
  (works without accounting; finished jobs stay visible for ``MinJobAge`` seconds).

Submission computes nothing and never imports the numeric code.
"""
from __future__ import annotations

import dataclasses
import os
import re
import shlex
import shutil
import string
import subprocess
import sys
from pathlib import Path

from .errors import HpcattnError

#: templates: $HPCATTN_SLURM_TEMPLATES, else slurm/ of the source tree (hpcattn/slurm_templates
#: links to it, so an installed package carries the same files)
TEMPLATE_DIRS = (Path(__file__).resolve().parent / "slurm_templates",
                 Path(__file__).resolve().parent.parent / "slurm")
JOB_TEMPLATE = "hpcattn.sbatch"
MERGE_TEMPLATE = "merge.sbatch"

LAUNCHERS = ("srun", "mpiexec")
#: signals `hpcattn run` treats as "stop after the current case"
SIGNALS = ("USR1", "TERM", "INT")
#: states after which a job never runs again (plus REQUEUE* which we leave to Slurm)
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED",
                "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE", "SPECIAL_EXIT", "REVOKED"}
COMMENT_PREFIX = "hpcattn:"


class SlurmError(HpcattnError):
    """Slurm is missing, refused something, or answered in a way we cannot read."""


# --- the [slurm] table --------------------------------------------------------------------------

TIME_RE = re.compile(r"^(\d+-\d+(:\d+(:\d+)?)?|\d+(:\d+(:\d+)?)?)$")
MEM_RE = re.compile(r"^\d+[KMGT]?$")
GPUS_RE = re.compile(r"^([A-Za-z0-9_.-]+:)?[1-9]\d*$")
TOKEN_RE = re.compile(r"^[^\s'\"\\$`;]+$")     # one shell word that needs no quoting in #SBATCH
DEP_RE = re.compile(r"^((after|afterany|afterok|afternotok|aftercorr|afterburstbuffer):)?"
                    r"\d+(_\d+)?(\+\d+)?$")


def time_seconds(value) -> int:
    """Seconds of a Slurm time limit: minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS."""
    if isinstance(value, int):
        return 60 * value
    days, _, rest = value.rpartition("-")
    parts = [int(p) for p in rest.split(":")]
    if days:
        h, m, s = (parts + [0, 0])[:3]
    elif len(parts) == 3:
        h, m, s = parts
    else:
        h, m, s = 0, parts[0], (parts[1] if len(parts) == 2 else 0)
    return ((int(days or 0) * 24 + h) * 60 + m) * 60 + s


def _positive(v):
    if not isinstance(v, int) or isinstance(v, bool):
        return "an integer"
    return None if v >= 1 else "a positive integer"


def _time(v):
    if isinstance(v, int) and not isinstance(v, bool) and v >= 1:
        return None
    if isinstance(v, str) and TIME_RE.match(v) and time_seconds(v) > 0:
        return None
    return "a time limit: minutes or \"HH:MM:SS\" (also \"MM:SS\", \"D-HH\", \"D-HH:MM:SS\")"


def _mem(v):
    if isinstance(v, int) and not isinstance(v, bool) and v >= 1:
        return None
    return None if isinstance(v, str) and MEM_RE.match(v) else "megabytes or a size such as \"16G\""


def _gpus(v):
    if isinstance(v, int) and not isinstance(v, bool):
        return None if v >= 0 else "a count >= 0"
    return None if isinstance(v, str) and GPUS_RE.match(v) else "a count or \"TYPE:COUNT\" such as \"a100:4\""


def _word(v):
    return None if isinstance(v, str) and TOKEN_RE.match(v) else "one word without spaces or quotes"


def _text(v):
    return None if isinstance(v, str) and "\n" not in v else "a string on one line"


def _lines(v):
    items = v if isinstance(v, list) else [v]
    ok = all(isinstance(x, str) and "\n" not in x for x in items)
    return None if ok else "a string or a list of strings, one line each"


def _choice(*choices):
    return lambda v: None if v in choices else "one of " + ", ".join(map(str, choices))


def _array(v):
    if isinstance(v, bool):
        return None
    return _positive(v) and "true, false or a concurrency limit (an integer >= 1)"


def _after(v):
    items = v if isinstance(v, list) else [v]
    ok = all(isinstance(x, (int, str)) and not isinstance(x, bool) and DEP_RE.match(str(x)) for x in items)
    return None if ok else "a job id such as 1234 or \"afterany:1234\" (or a list of them)"


@dataclasses.dataclass(frozen=True)
class Key:
    check: object          # value -> None when fine, else what was expected
    help: str
    default: object = None


#: every key the [slurm] table may hold; submit's options have the same names (with dashes)
KEYS: dict[str, Key] = {
    "nodes": Key(_positive, "nodes (--nodes)", 1),
    "ntasks_per_node": Key(_positive, "MPI ranks per node (--ntasks-per-node)", 1),
    "cpus_per_task": Key(_positive, "CPU cores per rank (--cpus-per-task); sets HPCATTN_NUM_THREADS", 1),
    "gpus_per_node": Key(_gpus, "GPUs per node (--gpus-per-node), a count or TYPE:COUNT"),
    "gpus_per_task": Key(_gpus, "GPUs per rank (--gpus-per-task)"),
    "gpu_bind": Key(_word, "GPU binding (--gpu-bind), e.g. closest or single:1"),
    "mem": Key(_mem, "memory per node (--mem), MB or e.g. 16G"),
    "time": Key(_time, "time limit (--time)", "00:30:00"),
    "partition": Key(_word, "partition (--partition)"),
    "account": Key(_word, "account to charge (--account)"),
    "qos": Key(_word, "quality of service (--qos)"),
    "constraint": Key(_word, "node features (--constraint), e.g. a100&ib"),
    "job_name": Key(_word, "Slurm job name (--job-name); default the job's name"),
    "launcher": Key(_choice(*LAUNCHERS), "srun (default) or mpiexec", "srun"),
    "srun_mpi": Key(_word, "PMI plugin passed as srun --mpi= (pmi2 suits MPICH)", "pmi2"),
    "launcher_args": Key(_text, "extra arguments for srun/mpiexec", ""),
    "run_args": Key(_text, "extra options for `hpcattn run` in the job, e.g. \"--device gpu\" (they "
                           "override the job's sweep values)", ""),
    "python": Key(_text, "Python that runs hpcattn in the job; default the one running submit"),
    "setup": Key(_lines, "shell lines run before the launch (module load ..., source venv/bin/activate)"),
    "extra": Key(_lines, "extra #SBATCH options, e.g. \"--exclusive\" or \"--mail-type=END\""),
    "signal": Key(_choice(*SIGNALS), "signal sent before the time limit", "USR1"),
    "signal_before": Key(_positive, "seconds before the time limit the signal comes; default "
                                    "min(120, a quarter of the limit)"),
    "array": Key(_array, "submit the sweep as a job array: true, or a limit of tasks running at once"),
    "array_tasks": Key(_positive, "array tasks the cases are split over; default one per case"),
    "merge_time": Key(_time, "time limit of the merge step of an array", "00:10:00"),
    "after": Key(_after, "start after these jobs (afterok unless a type is given)"),
}


def check_value(key: str, value) -> str | None:
    """None when ``value`` suits ``key``, else what was expected (for one-line messages)."""
    return KEYS[key].check(value)


def check_table(table: dict, path: str, text: str) -> None:
    """Check a job file's raw ``[slurm]`` table; :class:`JobFileError` naming file, line and key."""
    from .jobs import JobFileError, key_line

    for key, value in table.items():
        line = key_line(text, "slurm", key)
        where = f"{path}:{line}" if line else path
        if key not in KEYS:
            raise JobFileError(f"{where}: slurm.{key} is not a known key; expected one of {', '.join(KEYS)}")
        problem = check_value(key, value)
        if problem:
            raise JobFileError(f"{where}: slurm.{key} = {value!r} is not valid; expected {problem}")


def _as_list(v) -> list:
    if v is None:
        return []
    return list(v) if isinstance(v, (list, tuple)) else [v]


def resolve(table: dict, overrides: dict, *, path: str = "<job>", text: str = "") -> dict:
    """Settings for one submission: ``table`` (the job's [slurm], checked here), then
    ``overrides`` (command line; None means not given; list keys append), then defaults."""
    check_table(table, path, text)
    settings = {k: key.default for k, key in KEYS.items()}
    settings.update(table)
    for key, value in overrides.items():
        if value is None or (isinstance(value, (list, tuple)) and not value):
            continue
        problem = check_value(key, value)
        if problem:
            raise HpcattnError(f"--{key.replace('_', '-')} {value!r} is not valid; expected {problem}")
        if key in ("setup", "extra", "after"):
            value = _as_list(table.get(key)) + _as_list(value)
        settings[key] = value
    limit = time_seconds(settings["time"])
    if settings["signal_before"] is None:
        settings["signal_before"] = max(1, min(120, limit // 4))
    elif settings["signal_before"] >= limit:
        raise HpcattnError(f"signal_before = {settings['signal_before']} s is not below the time limit "
                           f"{settings['time']} ({limit} s); expected fewer seconds")
    return settings


# --- rendering ----------------------------------------------------------------------------------

def template_path(name: str) -> Path:
    dirs = [Path(os.environ["HPCATTN_SLURM_TEMPLATES"])] if os.environ.get("HPCATTN_SLURM_TEMPLATES") else []
    for d in [*dirs, *TEMPLATE_DIRS]:
        if (d / name).is_file():
            return d / name
    where = ", ".join(str(d) for d in [*dirs, *TEMPLATE_DIRS])
    raise SlurmError(f"sbatch template {name} not found in {where}; expected the slurm/ folder of hpcattn "
                     "(or set HPCATTN_SLURM_TEMPLATES)")


PLACEHOLDER_LINE = re.compile(r"^\$\{(\w+)\}\s*$")


def fill(name: str, values: dict) -> str:
    """Fill template ``name``; every placeholder must have a value (a typo is an error). Lines
    starting with ``##`` are notes about the template and are left out."""
    path = template_path(name)
    lines = []
    for line in path.read_text().splitlines(keepends=True):
        if line.startswith("##"):
            continue  # a note about the template itself, not for the rendered script
        alone = PLACEHOLDER_LINE.match(line)
        if alone and values.get(alone.group(1)) == "":
            continue  # an optional part that is empty leaves no blank line
        lines.append(line)
    try:
        return string.Template("".join(lines)).substitute(values)
    except KeyError as exc:
        raise SlurmError(f"{path} uses placeholder ${{{exc.args[0]}}}, which hpcattn does not fill; "
                         f"expected one of {', '.join(sorted(values))}") from None
    except ValueError as exc:
        raise SlurmError(f"{path}: {exc}; write a literal dollar sign as $$") from None


def _q(path: str) -> str:
    return shlex.quote(str(path))


def log_dir(results: str) -> str:
    """Where the scripts and Slurm logs of a job go: ``results/<name>.slurm`` beside the results."""
    return os.path.splitext(results)[0] + ".slurm"


def part_path(results: str, task: int) -> str:
    """Results file of array task ``task`` (what ``hpcattn run --array-task`` writes by default)."""
    from .jobs import array_task_path

    return array_task_path(results, task)


def _dependency(after) -> str | None:
    deps = [str(a) if ":" in str(a) else f"afterok:{a}" for a in _as_list(after)]
    return ",".join(deps) or None


def _sbatch_lines(options: list[tuple[str, object]], extra) -> str:
    """``#SBATCH --opt=value`` for every option that has a value, then the extra lines."""
    lines = [f"#SBATCH --{opt}={val}" for opt, val in options if val not in (None, "", False)]
    for line in _as_list(extra):
        line = line.strip()
        lines.append(line if line.startswith("#SBATCH") else f"#SBATCH {line}")
    return "\n".join(lines)


def _common(s: dict) -> list[tuple[str, object]]:
    """Options every script of one submission shares (where it may run and who pays)."""
    return [("partition", s["partition"]), ("account", s["account"]), ("qos", s["qos"])]


def _setup(s: dict) -> str:
    return "\n".join(_as_list(s["setup"]))


def array_tasks(s: dict, n_cases: int) -> int | None:
    """Number of array tasks (None: no array)."""
    if s["array"] is False or (s["array"] is None and s["array_tasks"] is None):
        return None
    n = s["array_tasks"] or n_cases
    if n > n_cases:
        raise HpcattnError(f"array_tasks = {n} exceeds the job's {n_cases} cases; expected at most {n_cases}")
    return n


def mpiexec_beside(python: str) -> str:
    """The mpiexec installed next to ``python`` (the ``mpich`` wheel's), else plain mpiexec."""
    here = os.path.join(os.path.dirname(python), "mpiexec")
    return here if os.path.isabs(python) and os.access(here, os.X_OK) else "mpiexec"


@dataclasses.dataclass
class Rendered:
    script: str
    results: str          # the job's results file (after the merge, for arrays)
    logs: str             # folder of scripts and Slurm logs
    array_tasks: int | None


def render_job(job, s: dict, *, workdir: str | None = None, python: str | None = None) -> Rendered:
    """The batch script of ``job`` (a :class:`hpcattn.jobs.Job`) with settings ``s`` from :func:`resolve`."""
    workdir = os.path.abspath(workdir or os.getcwd())
    python = s["python"] or python or sys.executable
    n_cases = len(job.cases())
    n_tasks = array_tasks(s, n_cases)
    logs = log_dir(job.output)
    pattern = "%A_%a" if n_tasks else "%j"
    run = [python, "-m", "hpcattn", "run", job.path]
    if n_tasks:
        cases_note = f"{n_cases} cases over {n_tasks} array tasks, merged by a dependent job"
        run_args = " ".join(map(_q, run)) + f' --array-task "$SLURM_ARRAY_TASK_ID" --array-tasks {n_tasks}'
        limit = "" if s["array"] in (True, None) else f"%{s['array']}"
        array = f"0-{n_tasks - 1}{limit}"
    else:
        cases_note = f"{n_cases} cases"
        run_args = " ".join(map(_q, [*run, "--output", job.output]))
        array = None
    if s["launcher"] == "srun":
        launch = f"srun --mpi={s['srun_mpi']}"
    else:
        launch = f'{_q(mpiexec_beside(python))} -n "$SLURM_NTASKS"'
    launch = " ".join(filter(None, [launch, s["launcher_args"], run_args, s["run_args"]]))
    optional = _sbatch_lines(_common(s) + [
        ("constraint", s["constraint"]), ("mem", s["mem"]), ("gpus-per-node", s["gpus_per_node"] or None),
        ("gpus-per-task", s["gpus_per_task"] or None), ("gpu-bind", s["gpu_bind"]), ("array", array),
        ("dependency", _dependency(s["after"]))], s["extra"])
    values = {
        "job_name": s["job_name"] or job.name, "job_file": job.path, "cases_note": cases_note,
        "results": job.output, "nodes": s["nodes"], "ntasks_per_node": s["ntasks_per_node"],
        "cpus_per_task": s["cpus_per_task"], "time": s["time"], "signal": s["signal"],
        "signal_before": s["signal_before"], "workdir": _q(workdir),
        "stdout": _q(f"{logs}/{pattern}.out"), "stderr": _q(f"{logs}/{pattern}.err"),
        "comment": _q(COMMENT_PREFIX + os.path.join(workdir, job.output)), "optional_sbatch": optional,
        "setup": _setup(s), "launch": launch,
    }
    return Rendered(fill(JOB_TEMPLATE, values), job.output, logs, n_tasks)


def render_merge(job, s: dict, rendered: Rendered, array_job_id: str, *, workdir: str | None = None,
                 python: str | None = None) -> str:
    """The merge step of an array job: runs after every task of ``array_job_id`` ended."""
    workdir = os.path.abspath(workdir or os.getcwd())
    python = s["python"] or python or sys.executable
    parts = [part_path(job.output, i) for i in range(rendered.array_tasks)]
    values = {
        "job_name": s["job_name"] or job.name, "array_job_id": array_job_id, "merge_time": s["merge_time"],
        "workdir": _q(workdir), "stdout": _q(f"{rendered.logs}/%j.merge.out"),
        "comment": _q(COMMENT_PREFIX + os.path.join(workdir, job.output)),
        "optional_sbatch": _sbatch_lines(_common(s), None), "setup": _setup(s),
        "parts": " ".join(map(_q, parts)), "python": _q(python), "results": _q(job.output),
    }
    return fill(MERGE_TEMPLATE, values)


# --- talking to Slurm ---------------------------------------------------------------------------

def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise SlurmError(f"{name} not found on PATH; expected a Slurm client (run on a cluster login "
                         "node, or see slurm/local-cluster.sh for a one-node Slurm on this machine)")
    return path


def _call(args: list[str], *, stdin: str | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    try:
        return subprocess.run([_tool(args[0]), *args[1:]], input=stdin, capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        raise SlurmError(f"{args[0]} did not answer within {timeout:.0f} s; is slurmctld up?") from None


def _one_line(text: str) -> str:
    return " ".join(text.split()) or "no message"


def sbatch(script: str, *args: str) -> str:
    """Submit ``script`` (text) with ``sbatch --parsable``; the job id (the array's id for arrays)."""
    proc = _call(["sbatch", "--parsable", *args], stdin=script)
    if proc.returncode != 0:
        raise SlurmError(f"sbatch rejected the script: {_one_line(proc.stderr or proc.stdout)}")
    job_id = proc.stdout.strip().split(";")[0]
    if not re.match(r"^\d+$", job_id):
        raise SlurmError(f"sbatch answered {proc.stdout.strip()!r}; expected a job id")
    return job_id


def scancel(job_id: str, *args: str) -> None:
    proc = _call(["scancel", *args, str(job_id)])
    if proc.returncode != 0:
        raise SlurmError(f"scancel {job_id} failed: {_one_line(proc.stderr)}")


FIELD_RE = re.compile(r"\s+(?=[A-Za-z][\w:/]*=)")


def parse_scontrol(text: str) -> list[dict]:
    """Records of ``scontrol show job -o`` (one line per job or array task) as dicts."""
    jobs = []
    for line in text.splitlines():
        line = line.strip()
        if not line.startswith("JobId="):
            continue
        rec = {}
        for field in FIELD_RE.split(line):
            key, _, val = field.partition("=")
            rec.setdefault(key, val)
        jobs.append(rec)
    return jobs


def show_jobs(job_ids=()) -> list[dict]:
    """``scontrol show job -o`` for ``job_ids`` (all visible jobs when empty). A job Slurm no longer
    knows (purged after MinJobAge) is simply absent."""
    records = []
    for job_id in list(job_ids) or [None]:
        proc = _call(["scontrol", "show", "job", "-o", *([str(job_id)] if job_id else [])])
        if proc.returncode != 0:
            if "Invalid job id" in proc.stderr:
                continue
            raise SlurmError(f"scontrol show job {job_id or ''} failed: {_one_line(proc.stderr)}".replace("  ", " "))
        records.extend(parse_scontrol(proc.stdout))
    return records


def state(rec: dict) -> str:
    """JobState without decorations (``CANCELLED by 0`` -> ``CANCELLED``)."""
    return rec.get("JobState", "UNKNOWN").split()[0]


def is_final(rec: dict) -> bool:
    """True when the job will not run again (also: pending on a dependency that can never be met)."""
    return state(rec) in FINAL_STATES or rec.get("Reason") == "DependencyNeverSatisfied"


def results_of(rec: dict) -> str | None:
    """The results file ``hpcattn submit`` recorded in the job's comment."""
    comment = rec.get("Comment", "")
    return comment[len(COMMENT_PREFIX):] if comment.startswith(COMMENT_PREFIX) else None
