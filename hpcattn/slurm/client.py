"""Talking to Slurm and reading what it says about jobs.

* :func:`sbatch` submits with ``--parsable``; :func:`scancel` cancels.
* :func:`show_jobs` parses ``scontrol show job -o`` (works without accounting; finished jobs stay
  visible for ``MinJobAge`` seconds) into records, one dict per job or group of array tasks.
* The rest reads records: :func:`state`, :func:`is_final`, :func:`all_completed`, the array tasks
  a record stands for, the results files a job writes (:func:`results_of`, :func:`task_results`),
  how it ended (:func:`exit_reason`), and :func:`wait_for` until jobs ended.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time

from ..jobs import array_task_path
from . import SlurmError
from .render import COMMENT_PREFIX

#: states after which a job never runs again (plus REQUEUE* which we leave to Slurm)
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED",
                "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE", "SPECIAL_EXIT", "REVOKED"}
#: exit codes of `hpcattn run` stopped by a signal (128 + N), and what stopped it
STOPPED = {138: "stopped by SIGUSR1 before the time limit", 143: "stopped by SIGTERM",
           130: "stopped by SIGINT"}
#: the task id Slurm writes into log names of array tasks that have not started (NO_VAL)
UNSTARTED_TASK = "4294967294"

FIELD_RE = re.compile(r"\s+(?=[A-Za-z][\w:/]*=)")
JOB_ID_RE = re.compile(r"[0-9]+(_[0-9]+)?")   # whole ids only: use fullmatch


# --- commands -----------------------------------------------------------------------------------

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
    if not re.fullmatch(r"[0-9]+", job_id):
        raise SlurmError(f"sbatch answered {proc.stdout.strip()!r}; expected a job id")
    return job_id


def scancel(job_id: str, *args: str) -> None:
    proc = _call(["scancel", *args, str(job_id)])
    if proc.returncode != 0:
        raise SlurmError(f"scancel {job_id} failed: {_one_line(proc.stderr)}")


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


def wait_for(job_ids, *, poll: float = 2.0, timeout: float | None = None) -> list[dict]:
    """Poll scontrol until every job in ``job_ids`` (every task, for arrays) has ended."""
    start = time.monotonic()
    while True:
        records = show_jobs(job_ids)
        if records and all(is_final(r) for r in records):
            return records
        if not records:
            raise SlurmError(f"Slurm does not know job(s) {', '.join(map(str, job_ids))}")
        if timeout is not None and time.monotonic() - start > timeout:
            raise SlurmError(f"job(s) {', '.join(map(str, job_ids))} still not ended after {timeout:.0f} s")
        time.sleep(poll)


# --- reading records ----------------------------------------------------------------------------

def state(rec: dict) -> str:
    """JobState without decorations (``CANCELLED by 0`` -> ``CANCELLED``)."""
    return rec.get("JobState", "UNKNOWN").split()[0]


def is_final(rec: dict) -> bool:
    """True when the job will not run again (also: pending on a dependency that can never be met)."""
    return state(rec) in FINAL_STATES or rec.get("Reason") == "DependencyNeverSatisfied"


def all_completed(records: list[dict]) -> bool:
    """True when every job and array task of ``records`` ended with COMPLETED."""
    return all(state(r) == "COMPLETED" for r in records)


def results_of(rec: dict) -> str | None:
    """The results file ``hpcattn submit`` recorded in the job's comment."""
    comment = rec.get("Comment", "")
    return comment[len(COMMENT_PREFIX):] if comment.startswith(COMMENT_PREFIX) else None


def mine(records: list[dict]) -> list[dict]:
    """Records of jobs this user submitted through hpcattn."""
    uid = f"({os.getuid()})"
    return [r for r in records if results_of(r) is not None and r.get("UserId", "").endswith(uid)]


def by_job(records: list[dict]) -> list[tuple[str, list[dict]]]:
    """``records`` grouped by job (an array's tasks under the array's id), in job id order;
    the tasks of an array in task order."""
    groups: dict[str, list[dict]] = {}
    for rec in records:
        groups.setdefault(rec.get("ArrayJobId") or rec["JobId"], []).append(rec)
    for recs in groups.values():
        if is_array(recs[0]):
            recs.sort(key=first_task)
    return sorted(groups.items(), key=lambda kv: int(kv[0]))


def is_array(rec: dict) -> bool:
    return "ArrayJobId" in rec


def first_task(rec: dict) -> int:
    """The lowest array task id a record stands for (-1 when it names none)."""
    first = re.match(r"\d+", rec.get("ArrayTaskId", ""))
    return int(first.group()) if first else -1


def task_count(rec: dict) -> int:
    """Array tasks one record stands for: ``3`` -> 1, ``0-5%2`` -> 6, ``1,4-5`` -> 3."""
    n = 0
    for item in rec.get("ArrayTaskId", "").split("%")[0].split(","):
        lo, _, hi = item.partition("-")
        if lo.isdigit():
            n += int(hi) - int(lo) + 1 if hi.isdigit() else 1
    return n or 1


def task_results(results: str, rec: dict) -> str | None:
    """The part file the array task of ``rec`` writes (None unless the record is one task)."""
    task = rec.get("ArrayTaskId", "")
    return array_task_path(results, int(task)) if task.isdigit() else None


def logs_of(rec: dict) -> tuple[str, str] | None:
    """(stdout, stderr) log files of a record; None while Slurm has not named them (array tasks
    that have not started)."""
    out, err = rec.get("StdOut", ""), rec.get("StdErr", "")
    return None if UNSTARTED_TASK in out else (out, err)


def exit_reason(rec: dict) -> str | None:
    """Why a job ended other than by finishing, from Slurm's ExitCode (``status:signal``): the
    signal that killed it, or the signal `hpcattn run` stopped on (exit 128 + N)."""
    status, _, sig = rec.get("ExitCode", "?").partition(":")
    if sig.isdigit() and int(sig):
        try:
            return f"killed by {signal.Signals(int(sig)).name}"
        except ValueError:
            return f"killed by signal {sig}"
    return STOPPED.get(int(status)) if status.isdigit() else None
