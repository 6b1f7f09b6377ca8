"""The ``[slurm]`` table of a job file: every key, what it may hold, and the settings of one
submission (:func:`resolve`: the table, then command-line overrides, then defaults).

Unknown keys and bad values are one-line :class:`~hpcattn.jobs.JobFileError` messages naming file,
line and key; a bad command-line value names the option.
"""
from __future__ import annotations

import dataclasses
import re
import shlex
import unicodedata

from ..errors import HpcattnError
from ..jobs import JobFileError, key_line

LAUNCHERS = ("srun", "mpiexec")
#: signals `hpcattn run` treats as "stop after the current case"
SIGNALS = ("USR1", "TERM", "INT")
#: keys whose command-line values are added to the job file's instead of replacing them
LIST_KEYS = ("setup", "extra", "after")
#: options of `hpcattn submit` not named like their key
OPTION_NAMES = {"extra": "--sbatch"}

# Every value that reaches a batch script is checked here with a full match (re.fullmatch: `$`
# would let a final newline through) over ASCII classes, or is quoted by render. A newline in a
# value would end the #SBATCH line or the comment it sits in and start a command.
TIME_RE = re.compile(r"[0-9]+-[0-9]+(:[0-9]+(:[0-9]+)?)?|[0-9]+(:[0-9]+(:[0-9]+)?)?")
MEM_RE = re.compile(r"[0-9]+[KMGT]?")
GPUS_RE = re.compile(r"([A-Za-z0-9_.-]+:)?[1-9][0-9]*")
#: one #SBATCH value: names, lists and Slurm's feature/binding syntax (a100&ib, [a|b]*2, map_gpu:0,1)
WORD_RE = re.compile(r"[A-Za-z0-9_.,:+*&|()\[\]-]+")
WORD_CHARS = "letters, digits and _ . , : + * & | ( ) [ ] -"
PLUGIN_RE = re.compile(r"[A-Za-z0-9_.+-]+")
DEP_RE = re.compile(r"((after|afterany|afterok|afternotok|aftercorr|afterburstbuffer):)?"
                    r"[0-9]+(_[0-9]+)?(\+[0-9]+)?")


def has_control(text: str, *, tab: bool = False) -> bool:
    """True when ``text`` holds a control character (C0, DEL, C1 such as U+0085) or a Unicode
    line/paragraph separator: all of them end a line for bash, sbatch, str.splitlines or a terminal."""
    return any(unicodedata.category(c) in ("Cc", "Zl", "Zp") and not (tab and c == "\t") for c in text)


def shell_words(text: str) -> list[str] | None:
    """``text`` split into words as a shell would (quotes group, nothing expands); None when it
    cannot be split (an open quote) or holds a control character other than tab."""
    if has_control(text, tab=True):
        return None
    try:
        return shlex.split(text)
    except ValueError:
        return None


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
    if isinstance(v, str) and TIME_RE.fullmatch(v) and time_seconds(v) > 0:
        return None
    return "a time limit: minutes or \"HH:MM:SS\" (also \"MM:SS\", \"D-HH\", \"D-HH:MM:SS\")"


def _mem(v):
    if isinstance(v, int) and not isinstance(v, bool) and v >= 1:
        return None
    return None if isinstance(v, str) and MEM_RE.fullmatch(v) else "megabytes or a size such as \"16G\""


def _gpus(v):
    if isinstance(v, int) and not isinstance(v, bool):
        return None if v >= 0 else "a count >= 0"
    return None if isinstance(v, str) and GPUS_RE.fullmatch(v) else "a count or \"TYPE:COUNT\" such as \"a100:4\""


def _word(v):
    return None if isinstance(v, str) and WORD_RE.fullmatch(v) else f"one word of {WORD_CHARS}"


def _plugin(v):
    ok = isinstance(v, str) and PLUGIN_RE.fullmatch(v)
    return None if ok else "a plugin name such as pmi2 (letters, digits, _ . + -)"


def _args(v):
    ok = isinstance(v, str) and shell_words(v) is not None
    return None if ok else ("shell words on one line, with balanced quotes (each word is passed on "
                            "as one literal argument)")


def _program(v):
    ok = isinstance(v, str) and v.strip() and not has_control(v)
    return None if ok else "a path or command name on one line"


def _shell_lines(v):
    # shell code, run as written; a line must at least close its quotes, or it swallows the launch
    ok = all(isinstance(x, str) and shell_words(x) is not None for x in as_list(v))
    return None if ok else "a string or a list of strings, one shell line each, with balanced quotes"


def _sbatch_options(v):
    ok = all(isinstance(x, str) and shell_words(x) is not None for x in as_list(v))
    return None if ok else "a string or a list of strings, one line of sbatch options each, with balanced quotes"


def _choice(*choices):
    return lambda v: None if v in choices else "one of " + ", ".join(map(str, choices))


def _array(v):
    if isinstance(v, bool):
        return None
    return _positive(v) and "true, false or a concurrency limit (an integer >= 1)"


def _after(v):
    ok = all(isinstance(x, (int, str)) and not isinstance(x, bool) and DEP_RE.fullmatch(str(x)) for x in as_list(v))
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
    "srun_mpi": Key(_plugin, "PMI plugin passed as srun --mpi= (pmi2 suits MPICH)", "pmi2"),
    "launcher_args": Key(_args, "extra arguments for srun/mpiexec (words, each passed on literally)", ""),
    "run_args": Key(_args, "extra options for `hpcattn run` in the job, e.g. \"--device gpu\" (they "
                           "override the job's sweep values; words, each passed on literally)", ""),
    "python": Key(_program, "Python that runs hpcattn in the job; default the one running submit"),
    "setup": Key(_shell_lines, "shell lines run before the launch (module load ..., source venv/bin/activate); "
                         "shell code, run as written"),
    "extra": Key(_sbatch_options, "extra #SBATCH options, e.g. \"--exclusive\" or \"--mail-type=END\""),
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
            option = OPTION_NAMES.get(key, "--" + key.replace("_", "-"))
            raise HpcattnError(f"{option} {value!r} is not valid; expected {problem}")
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
