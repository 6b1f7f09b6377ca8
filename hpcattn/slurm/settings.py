"""The ``[slurm]`` table of a job file: every key, what it may hold, and the settings of one
submission (:func:`resolve`: the table, then command-line overrides, then defaults).

Unknown keys and bad values are one-line :class:`~hpcattn.jobs.JobFileError` messages naming file,
line and key; a bad command-line value names the option.
"""
from __future__ import annotations

import dataclasses
import re

from ..errors import HpcattnError
from ..jobs import JobFileError, key_line

LAUNCHERS = ("srun", "mpiexec")
#: signals `hpcattn run` treats as "stop after the current case"
SIGNALS = ("USR1", "TERM", "INT")
#: keys whose command-line values are added to the job file's instead of replacing them
LIST_KEYS = ("setup", "extra", "after")

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


def as_list(v) -> list:
    """A key that takes one string or a list of them, as a list (None: empty)."""
    if v is None:
        return []
    return list(v) if isinstance(v, (list, tuple)) else [v]


# --- what each key may hold: value -> None when fine, else what was expected ----------------------

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
    ok = all(isinstance(x, str) and "\n" not in x for x in as_list(v))
    return None if ok else "a string or a list of strings, one line each"


def _choice(*choices):
    return lambda v: None if v in choices else "one of " + ", ".join(map(str, choices))


def _array(v):
    if isinstance(v, bool):
        return None
    return _positive(v) and "true, false or a concurrency limit (an integer >= 1)"


def _after(v):
    ok = all(isinstance(x, (int, str)) and not isinstance(x, bool) and DEP_RE.match(str(x)) for x in as_list(v))
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
    for key, value in table.items():
        line = key_line(text, "slurm", key)
        where = f"{path}:{line}" if line else path
        if key not in KEYS:
            raise JobFileError(f"{where}: slurm.{key} is not a known key; expected one of {', '.join(KEYS)}")
        problem = check_value(key, value)
        if problem:
            raise JobFileError(f"{where}: slurm.{key} = {value!r} is not valid; expected {problem}")


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
        if key in LIST_KEYS:
            value = as_list(table.get(key)) + as_list(value)
        settings[key] = value
    limit = time_seconds(settings["time"])
    if settings["signal_before"] is None:
        settings["signal_before"] = max(1, min(120, limit // 4))
    elif settings["signal_before"] >= limit:
        raise HpcattnError(f"signal_before = {settings['signal_before']} s is not below the time limit "
                           f"{settings['time']} ({limit} s); expected fewer seconds")
    return settings


def array_tasks(s: dict, n_cases: int) -> int | None:
    """Number of array tasks the settings ``s`` ask for over ``n_cases`` cases (None: no array)."""
    if s["array"] is False or (s["array"] is None and s["array_tasks"] is None):
        return None
    n = s["array_tasks"] or n_cases
    if n > n_cases:
        raise HpcattnError(f"array_tasks = {n} exceeds the job's {n_cases} cases; expected at most {n_cases}")
    return n
