"""Job files: a TOML description of a sweep of cases, checked before anything runs.

```toml
[job]
name = "quickstart"        # names the run; default output results/<name>.h5
kind = "attention"         # "attention" (distributed ring cases) | "mixer" (single-process cases)
description = "..."        # optional
[sweep]                    # a list is a sweep axis (cross product), a scalar is fixed
seq_len = [1024, 4096]
causal = [false, true]
layout = "zigzag"
[output]
path = "results/quickstart.h5"
activations = false        # keep q/k/v/out/lse
compression = "gzip"       # "gzip" | "lzf" | "none" (activations only)
[slurm]                    # kept raw for `hpcattn submit`, which validates it
```

Every mistake is a :class:`JobFileError` whose one-line message starts with ``FILE:LINE:`` and names
the key. ``tomllib`` reports no line numbers for values, so :func:`key_line` finds them by scanning
the text (good enough for the plain ``key = value`` lines job files consist of).

Limits checked before anything runs: at most MAX_CASES cases per sweep (counted as the product of
the axis lengths, never built; ``$HPCATTN_MAX_CASES`` raises it), at most MAX_REPEATS timed
repeats, finite tolerances, no value twice in one axis. (Over 300 lines: the key rules, the
limits and the line finder all serve this one parser and its messages.)
"""
from __future__ import annotations

import dataclasses
import itertools
import math
import os
import re
import tomllib
from collections.abc import Mapping

from .errors import HpcattnError
from .layouts import LAYOUTS
from .masks import parse_cu_seqlens, parse_window
from .devices import ALL_DTYPES, DEVICES
from .footprint import MAX_REPEATS

KINDS = ("attention", "mixer", "train")
COMPRESSIONS = ("gzip", "lzf", "none")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
# a sweep is counted (product of its axis lengths) before it is built: 10^8 case dicts do not fit
MAX_CASES = 100_000
MAX_CASES_VAR = "HPCATTN_MAX_CASES"   # raises the cap for a sweep that really needs more


class JobFileError(HpcattnError):
    """A job file that cannot be used; the message names file, line and key."""


# --- what a key may hold ------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Spec:
    """Type and value rule of one key: ``kind`` is int, float, bool or str."""

    kind: type
    minimum: float | None = None
    choices: tuple | None = None
    sweepable: bool = True
    maximum: float | None = None
    parse: object = None        # a callable that raises HpcattnError on a bad value (strings)

    def type_name(self) -> str:
        return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}[self.kind]

    def expectation(self) -> str:
        """What the key may hold, for messages: 'an integer or a list of integers'."""
        if not self.sweepable:
            return self.type_name()
        plural = {int: "integers", float: "numbers", bool: "booleans", str: "strings"}[self.kind]
        return f"{self.type_name()} or a list of {plural}"

    def type_ok(self, value) -> bool:
        if self.kind is float:
            return isinstance(value, (int, float)) and not isinstance(value, bool)
        if self.kind is int:
            return isinstance(value, int) and not isinstance(value, bool)
        return isinstance(value, self.kind)

    def value_problem(self, value) -> str | None:
        if self.choices is not None and value not in self.choices:
            return f"is not one of {', '.join(map(str, self.choices))}"
        if self.kind is float and not math.isfinite(value):   # nan passes every comparison
            low = "" if self.minimum is None else f" >= {self.minimum}"
            return f"is not a finite number; expected a finite number{low}"
        if self.minimum is not None and value < self.minimum:
            return "must be positive" if self.minimum == 1 else f"must be >= {self.minimum}"
        if self.maximum is not None and value > self.maximum:
            return f"is too large; expected at most {self.maximum}"
        if self.parse is not None:
            try:
                self.parse(value)
            except HpcattnError as exc:
                return f"is invalid: {exc}"
        return None


POSITIVE = Spec(int, minimum=1)

# keys of an attention case (hpcattn.cases.AttentionCase) plus the check's tolerance
ATTENTION_KEYS: dict[str, Spec] = {
    "seq_len": POSITIVE, "batch": POSITIVE, "heads": POSITIVE, "kv_heads": POSITIVE,
    "head_dim": POSITIVE, "dtype": Spec(str, choices=ALL_DTYPES),
    "device": Spec(str, choices=DEVICES),
    "causal": Spec(bool), "layout": Spec(str, choices=LAYOUTS), "seed": Spec(int, minimum=0),
    "repeats": Spec(int, minimum=1, maximum=MAX_REPEATS), "check_rows": Spec(int, minimum=0),
    "tolerance": Spec(float, minimum=0),
    "block_q": POSITIVE, "block_k": POSITIVE, "kv_pieces": POSITIVE,
    "strategy": Spec(str, choices=("ring", "ulysses", "hybrid")), "ulysses_size": POSITIVE,
    "backward": Spec(bool),
    # masks as the command line writes them: "LEFT,RIGHT" and "0,c1,...,N" (a list sweeps them)
    "window": Spec(str, parse=parse_window), "cu_seqlens": Spec(str, parse=parse_cu_seqlens),
}

TABLES: dict[str, dict[str, Spec]] = {
    "job": {"name": Spec(str, sweepable=False), "kind": Spec(str, choices=KINDS, sweepable=False),
            "description": Spec(str, sweepable=False)},
    "output": {"path": Spec(str, sweepable=False), "activations": Spec(bool, sweepable=False),
               "compression": Spec(str, choices=COMPRESSIONS, sweepable=False)},
}


def mixer_keys() -> dict[str, Spec]:
    """Sweep keys of mixer cases, from ``hpcattn.mixers.cases.MIXER_CASE_KEYS``.

    That constant may map key -> type (or a :class:`Spec`), or just list the names (then only the
    names are checked here and the mixer code checks the values).
    """
    try:
        from .mixers.cases import MIXER_CASE_KEYS
    except ImportError as exc:
        raise JobFileError(f"mixer jobs need hpcattn.mixers.cases, which cannot be imported: {exc}") from None
    if isinstance(MIXER_CASE_KEYS, Mapping):
        return {k: _as_spec(v) for k, v in MIXER_CASE_KEYS.items()}
    return {k: None for k in MIXER_CASE_KEYS}


def _as_spec(v):
    if isinstance(v, Spec) or v is None:
        return v
    if isinstance(v, type) and v in (int, float, bool, str):
        return Spec(v)
    return None  # something richer than we understand: leave the value to the mixer code


def sweep_keys(kind: str) -> dict[str, Spec | None]:
    if kind == "train":   # training cases: hpcattn.train.job (checking them needs no torch)
        from .train.job import TRAIN_CASE_KEYS
        return {k: _as_spec(v) for k, v in TRAIN_CASE_KEYS.items()}
    return ATTENTION_KEYS if kind == "attention" else mixer_keys()


# --- the job ------------------------------------------------------------------------------------

@dataclasses.dataclass
class Job:
    path: str
    text: str
    name: str
    kind: str = "attention"
    description: str = ""
    sweep: dict = dataclasses.field(default_factory=dict)   # key -> list of values, file order
    output: str = ""
    activations: bool = False
    compression: str = "none"
    slurm: dict = dataclasses.field(default_factory=dict)

    @property
    def axes(self) -> list[str]:
        """Keys that take more than one value."""
        return [k for k, vals in self.sweep.items() if len(vals) > 1]

    @property
    def n_cases(self) -> int:
        """How many cases the sweep has, counted without building them."""
        return math.prod(len(vals) for vals in self.sweep.values())

    def cases(self) -> list[dict]:
        """The cross product of the sweep, in a stable order (last key varies fastest);
        JobFileError when it has more than :func:`max_cases` cases."""
        check_case_count(self, self.path)
        keys = list(self.sweep)
        return [dict(zip(keys, combo)) for combo in itertools.product(*(self.sweep[k] for k in keys))]

    def with_overrides(self, overrides: Mapping) -> "Job":
        """A copy where each key of ``overrides`` is fixed to one value (command-line options)."""
        allowed = sweep_keys(self.kind)
        sweep = dict(self.sweep)
        for key, val in overrides.items():
            if key not in allowed:
                raise JobFileError(f"{key!r} does not apply to {self.kind} jobs ({self.path}); "
                                   f"expected one of {', '.join(allowed)}")
            spec = allowed[key]
            problem = None if spec is None else (
                None if spec.type_ok(val) else f"has type {_toml_type(val)}; expected {spec.type_name()}")
            problem = problem or (spec and spec.value_problem(val))
            if problem:
                raise JobFileError(f"{key} = {val!r} {problem} (given on the command line for {self.path})")
            sweep[key] = [val]
        return dataclasses.replace(self, sweep=sweep)


def max_cases() -> int:
    """The cap on cases per job: MAX_CASES, or ``$HPCATTN_MAX_CASES`` when set."""
    text = os.environ.get(MAX_CASES_VAR)
    if text is None:
        return MAX_CASES
    try:
        cap = int(text)
    except ValueError:
        cap = 0
    if cap < 1:
        raise JobFileError(f"{MAX_CASES_VAR}={text!r} is not a positive integer; expected e.g. "
                           f"{MAX_CASES_VAR}={MAX_CASES}")
    return cap


def check_case_count(job: Job, where: str) -> None:
    """JobFileError naming the count and the cap when ``job`` has too many cases."""
    n, cap = job.n_cases, max_cases()
    if n > cap:
        axes = " x ".join(f"{k} {len(job.sweep[k])}" for k in job.axes)
        raise JobFileError(f"{where}: the sweep has {n:,} cases ({axes}); at most {cap:,} are "
                           f"allowed (set {MAX_CASES_VAR} to raise the cap); expected fewer "
                           "sweep values, or several jobs")


def array_task_path(output: str, task: int) -> str:
    """Results file of array task ``task`` of a job whose results go to ``output``:
    ``<stem>.task<I>.h5`` (two writers must never share one master)."""
    stem, ext = os.path.splitext(output)
    return f"{stem}.task{task}{ext or '.h5'}"


def load_job(path) -> Job:
    """Read and check a job file; raises :class:`JobFileError` naming file, line and key."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as fh:
            raw = fh.read()
    except FileNotFoundError:
        raise JobFileError(f"job file {path} does not exist; expected a TOML file such as "
                           "jobs/quickstart.toml") from None
    except OSError as exc:
        raise JobFileError(f"job file {path} cannot be read: {exc.strerror}") from None
    try:
        text = raw.decode("utf-8")
        data = tomllib.loads(text)
    except UnicodeDecodeError as exc:
        raise JobFileError(f"{path}: not UTF-8 text (byte {exc.start}); expected a TOML file") from None
    except tomllib.TOMLDecodeError as exc:
        msg = str(exc)
        m = re.search(r"\(at line (\d+), column \d+\)", msg)
        where = f"{path}:{m.group(1)}" if m else path
        msg = re.sub(r"\s*\(at line \d+, column \d+\)", "", msg)
        raise JobFileError(f"{where}: TOML syntax error: {msg}") from None
    return parse_job(data, text, path)


def parse_job(data: dict, text: str, path: str) -> Job:
    def err(table, key, message):
        line = key_line(text, table, key)
        where = f"{path}:{line}" if line else path
        dotted = f"{table}.{key}" if key else f"[{table}]"
        return JobFileError(f"{where}: {dotted} {message}")

    for table, val in data.items():
        if table not in ("job", "sweep", "output", "slurm"):
            raise err(table, None, "is not a known table; expected [job], [sweep], [output] or [slurm]")
        if not isinstance(val, dict):
            raise err(table, None, f"must be a table, got {type(val).__name__}")
    if "job" not in data:
        raise JobFileError(f"{path}: the [job] table is missing; expected at least [job] name = \"...\"")
    values = {}
    for table in ("job", "output"):
        for key, val in data.get(table, {}).items():
            _check_key(err, table, key, val, TABLES[table])
            values[key] = val
    if "name" not in values:
        raise err("job", None, "has no name; expected name = \"...\" (it names the results file)")
    if not NAME_RE.fullmatch(values["name"]):
        raise err("job", "name", f"= {values['name']!r} is not usable as a file name; expected letters, "
                                  "digits, '.', '_' or '-'")
    kind = values.get("kind", "attention")
    allowed = sweep_keys(kind)
    sweep = {}
    for key, val in data.get("sweep", {}).items():
        _check_key(err, "sweep", key, val, allowed)
        sweep[key] = list(val) if isinstance(val, list) else [val]
    if kind == "mixer" and "mixer" in allowed and "mixer" not in sweep:
        raise err("sweep", None, "has no mixer; expected mixer = \"name\" or a list of names")
    out = values.get("path", os.path.join("results", values["name"] + ".h5"))
    job = Job(path=path, text=text, name=values["name"], kind=kind,
              description=values.get("description", ""), sweep=sweep, output=out,
              activations=values.get("activations", False),
              compression=values.get("compression", "none"), slurm=dict(data.get("slurm", {})))
    line = key_line(text, "sweep", None)
    check_case_count(job, f"{path}:{line}" if line else path)
    return job


def _check_key(err, table, key, val, allowed):
    if key not in allowed:
        raise err(table, key, f"is not a known key; expected one of {', '.join(allowed)}")
    spec = allowed[key]
    if isinstance(val, list):
        if spec is not None and not spec.sweepable:
            raise err(table, key, f"= {val!r} is a list; expected {spec.type_name()} (it cannot be swept)")
        if not val:
            raise err(table, key, "= [] is empty; expected at least one value")
        repeated = _repeated(val)
        if repeated is not None:
            raise err(table, key, f"= {val!r} repeats a value: {repeated[0]!r} appears "
                                  f"{repeated[1]} times; expected distinct values")
        items = val
    else:
        items = [val]
    for item in items:
        if isinstance(item, (dict, list)):
            raise err(table, key, f"= {val!r} holds a {type(item).__name__}; expected plain values")
        if spec is None:
            continue
        if not spec.type_ok(item):
            raise err(table, key, f"= {item!r} has type {_toml_type(item)}; expected {spec.expectation()}")
        problem = spec.value_problem(item)
        if problem:
            raise err(table, key, f"= {item!r} {problem}")


def _repeated(values) -> tuple | None:
    """(first value that appears more than once, how often) or None; 1 and 1.0 are the same
    value (they make the same case), true and 1 are not."""
    def same_as(v):
        return ("bool", v) if isinstance(v, bool) else (
            ("number", v) if isinstance(v, (int, float)) else (type(v).__name__, repr(v)))
    seen: dict = {}
    for v in values:
        seen.setdefault(same_as(v), []).append(v)
    for group in seen.values():
        if len(group) > 1:
            return group[0], len(group)
    return None


def _toml_type(val) -> str:
    return {bool: "boolean", int: "integer", float: "float", str: "string"}.get(type(val), type(val).__name__)


def key_line(text: str, table: str, key: str | None) -> int | None:
    """1-based line of ``key`` in ``[table]`` (or of the table header when ``key`` is None)."""
    current = None
    header = re.compile(r"^\s*\[\s*([A-Za-z0-9_.\"'-]+)\s*\]\s*(#.*)?$")
    for lineno, line in enumerate(text.splitlines(), 1):
        m = header.match(line)
        if m:
            current = m.group(1).strip("\"'")
            if key is None and current == table:
                return lineno
            continue
        if key is None:
            continue
        m = re.match(r"^\s*([A-Za-z0-9_.\"'-]+)\s*=", line)
        if not m:
            continue
        name = m.group(1).replace('"', "").replace("'", "")
        full = f"{current}.{name}" if current else name
        if full == f"{table}.{key}":
            return lineno
    return None
