"""Batch scripts from the templates: :func:`render_job` fills ``hpcattn.sbatch`` (one job, or a
job array whose tasks each write ``<results>.task<I>.h5``), :func:`render_merge` fills
``merge.sbatch`` (the job that merges an array's parts once every task ended).

Templates are plain :class:`string.Template` text. They are looked up in
``$HPCATTN_SLURM_TEMPLATES``, then ``hpcattn/slurm_templates`` (what an installed package
carries; in the source tree a link to the repository's ``slurm/`` folder), then that ``slurm/``
folder itself.
"""
from __future__ import annotations

import dataclasses
import os
import re
import shlex
import string
import sys
from pathlib import Path

from ..errors import HpcattnError
from ..jobs import array_task_path, key_line
from ..launch import find_mpiexec
from . import SlurmError
from .settings import WORD_CHARS, WORD_RE, array_tasks, as_list, has_control

PACKAGE_DIR = Path(__file__).resolve().parent.parent          # hpcattn/
TEMPLATE_DIRS = (PACKAGE_DIR / "slurm_templates", PACKAGE_DIR.parent / "slurm")
JOB_TEMPLATE = "hpcattn.sbatch"
MERGE_TEMPLATE = "merge.sbatch"
#: a job's Slurm comment: this prefix, then the absolute path of its results file
COMMENT_PREFIX = "hpcattn:"

PLACEHOLDER_LINE = re.compile(r"^\$\{(\w+)\}\s*$")


def template_path(name: str) -> Path:
    dirs = [Path(os.environ["HPCATTN_SLURM_TEMPLATES"])] if os.environ.get("HPCATTN_SLURM_TEMPLATES") else []
    for d in [*dirs, *TEMPLATE_DIRS]:
        if (d / name).is_file():
            return d / name
    where = ", ".join(str(d) for d in [*dirs, *TEMPLATE_DIRS])
    raise SlurmError(f"sbatch template {name} not found in {where}; expected the slurm/ folder of hpcattn "
                     "(or set HPCATTN_SLURM_TEMPLATES)")


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


class Shell(str):
    """Shell text placed into a command as it is (``"$SLURM_NTASKS"``); every other word is quoted."""


def _command(words) -> str:
    """One command line: each word quoted (``;``, ``$(...)``, ``&&`` arrive as literal arguments)."""
    return " ".join(w if isinstance(w, Shell) else _q(w) for w in words)


def _arg_path(path: str) -> str:
    """A path as a command's argument: ``./-x.toml``, not an option ``-x.toml``."""
    return os.path.join(".", path) if path.startswith("-") else path


def check_path(what: str, path: str, *, sbatch: bool = False) -> None:
    """Refuse a path that would break a line of the script (a control character); ``sbatch``:
    one that goes into an #SBATCH line, where sbatch also reads a backslash as an escape."""
    if has_control(path) or (sbatch and "\\" in path):
        bad = "a control character or a backslash" if sbatch else "a control character"
        raise HpcattnError(f"{what} {path!r} contains {bad}; expected a path on one line"
                           + (" without backslashes" if sbatch else ""))


def check_job(job, s: dict, workdir: str) -> None:
    """The parts of ``job`` that enter a batch script and that no [slurm] check has seen: its
    file, results path and name (the default Slurm job name), and the working directory."""
    def where(table, key):
        line = key_line(job.text, table, key)
        return f"{job.path}:{line}" if line else job.path

    check_path("job file", job.path)
    check_path(f"{where('output', 'path')}: output.path", job.output, sbatch=True)
    check_path("working directory", workdir, sbatch=True)
    if s["job_name"] is None and not WORD_RE.fullmatch(job.name):
        raise HpcattnError(f"{where('job', 'name')}: job.name = {job.name!r} is not usable as a Slurm job "
                           f"name; expected one word of {WORD_CHARS} (or set slurm.job_name)")


def log_dir(results: str) -> str:
    """Where the scripts and Slurm logs of a job go: ``results/<name>.slurm`` beside the results."""
    return os.path.splitext(results)[0] + ".slurm"


def job_mpiexec(python: str) -> str:
    """The mpiexec a job started by ``python`` uses: the one beside it (the ``mpich`` wheel's),
    else plain ``mpiexec`` from the job's PATH (this machine's PATH says nothing about the node's)."""
    return find_mpiexec(python, path="") or "mpiexec"


def _python(s: dict, python: str | None) -> str:
    """The Python that runs hpcattn in the job: [slurm] python, the caller's, else this one."""
    python = s["python"] or python or sys.executable
    check_path("python", python)
    return python


def _dependency(after) -> str | None:
    deps = [str(a) if ":" in str(a) else f"afterok:{a}" for a in as_list(after)]
    return ",".join(deps) or None


def _sbatch_lines(options: list[tuple[str, object]], extra) -> str:
    """``#SBATCH --opt=value`` for every option that has a value, then the extra lines."""
    lines = [f"#SBATCH --{opt}={val}" for opt, val in options if val not in (None, "", False)]
    for line in as_list(extra):
        line = line.strip()
        lines.append(line if line.startswith("#SBATCH") else f"#SBATCH {line}")
    return "\n".join(lines)


def _common(s: dict) -> list[tuple[str, object]]:
    """Options every script of one submission shares (where it may run and who pays)."""
    return [("partition", s["partition"]), ("account", s["account"]), ("qos", s["qos"])]


def _shared_values(job, s: dict, workdir: str | None) -> dict:
    """Placeholders the job and the merge script fill alike."""
    workdir = os.path.abspath(workdir or os.getcwd())
    check_job(job, s, workdir)
    return {"job_name": s["job_name"] or job.name, "workdir": _q(workdir),
            "comment": _q(COMMENT_PREFIX + os.path.join(workdir, job.output)),
            "setup": "\n".join(as_list(s["setup"]))}


@dataclasses.dataclass
class Rendered:
    script: str
    results: str          # the job's results file (after the merge, for arrays)
    logs: str             # folder of scripts and Slurm logs
    array_tasks: int | None


def render_job(job, s: dict, *, workdir: str | None = None, python: str | None = None) -> Rendered:
    """The batch script of ``job`` (a :class:`hpcattn.jobs.Job`) with settings ``s`` from
    :func:`~hpcattn.slurm.settings.resolve`."""
    python = _python(s, python)
    shared = _shared_values(job, s, workdir)
    n_cases = len(job.cases())
    n_tasks = array_tasks(s, n_cases)
    logs = log_dir(job.output)
    pattern = "%A_%a" if n_tasks else "%j"
    run = [python, "-m", "hpcattn", "run", _arg_path(job.path)]
    if n_tasks:
        cases_note = f"{n_cases} cases over {n_tasks} array tasks, merged by a dependent job"
        run += ["--array-task", Shell('"$SLURM_ARRAY_TASK_ID"'), "--array-tasks", str(n_tasks)]
        limit = "" if s["array"] in (True, None) else f"%{s['array']}"
        array = f"0-{n_tasks - 1}{limit}"
    else:
        cases_note = f"{n_cases} cases"
        run += ["--output", job.output]
        array = None
    if s["launcher"] == "srun":
        launcher = ["srun", f"--mpi={s['srun_mpi']}"]
    else:
        launcher = [job_mpiexec(python), "-n", Shell('"$SLURM_NTASKS"')]
    # launcher_args and run_args are words (checked by settings.shell_words), each quoted
    launch = _command([*launcher, *shlex.split(s["launcher_args"] or ""), *run,
                       *shlex.split(s["run_args"] or "")])
    optional = _sbatch_lines(_common(s) + [
        ("constraint", s["constraint"]), ("mem", s["mem"]), ("gpus-per-node", s["gpus_per_node"] or None),
        ("gpus-per-task", s["gpus_per_task"] or None), ("gpu-bind", s["gpu_bind"]), ("array", array),
        ("dependency", _dependency(s["after"]))], s["extra"])
    values = {
        **shared, "job_file": job.path, "cases_note": cases_note,
        "results": job.output, "nodes": s["nodes"], "ntasks_per_node": s["ntasks_per_node"],
        "cpus_per_task": s["cpus_per_task"], "time": s["time"], "signal": s["signal"],
        "signal_before": s["signal_before"],
        "stdout": _q(f"{logs}/{pattern}.out"), "stderr": _q(f"{logs}/{pattern}.err"),
        "optional_sbatch": optional, "launch": launch,
    }
    return Rendered(fill(JOB_TEMPLATE, values), job.output, logs, n_tasks)


def render_merge(job, s: dict, rendered: Rendered, array_job_id: str, *, workdir: str | None = None,
                 python: str | None = None) -> str:
    """The merge step of an array job: runs after every task of ``array_job_id`` ended."""
    python = _python(s, python)
    if not re.fullmatch(r"[0-9]+|ARRAY_JOB_ID", array_job_id):
        raise SlurmError(f"array job id {array_job_id!r} is not a number; expected what sbatch --parsable printed")
    parts = [_arg_path(array_task_path(job.output, i)) for i in range(rendered.array_tasks)]
    values = {
        **_shared_values(job, s, workdir), "array_job_id": array_job_id, "merge_time": s["merge_time"],
        "stdout": _q(f"{rendered.logs}/%j.merge.out"), "optional_sbatch": _sbatch_lines(_common(s), None),
        "parts": _command(parts), "python": _q(python), "results": _q(_arg_path(job.output)),
    }
    return fill(MERGE_TEMPLATE, values)
