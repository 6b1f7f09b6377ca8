"""``hpcattn status``: state of submitted jobs (via scontrol, which needs no accounting) and where
their logs and results are."""
from __future__ import annotations

import os
import re
import sys
import time

import click


def _rel(path: str) -> str:
    """``path`` relative to the working directory when it lies below it."""
    if not path or path == "(null)":
        return "-"
    rel = os.path.relpath(path)
    return path if rel.startswith("..") else rel


def _cases(path: str, *, part: bool = False, final: bool = False) -> str:
    """What a results file holds, in words (never raises: status must always print)."""
    if not path:
        return "?"
    if not os.path.exists(path):
        return f"{_rel(path)} ({'missing' if final else 'not written yet'})"
    from ..errors import HpcattnError
    from ..store import open_results

    try:
        with open_results(path) as f:
            done, total = len(f["cases"]), f.attrs.get("n_cases")
    except HpcattnError as exc:
        return f"{_rel(path)} (unreadable: {exc})"
    if part or total is None:
        return f"{_rel(path)} ({done} case{'s' if done != 1 else ''} complete)"
    return f"{_rel(path)} ({done}/{int(total)} cases complete)"


def _task_key(rec: dict):
    task = rec.get("ArrayTaskId", "")
    first = re.match(r"\d+", task)
    return int(first.group()) if first else -1


def _state(rec: dict) -> str:
    from ..slurm import state

    st = state(rec)
    reason = rec.get("Reason", "None")
    return f"{st} ({reason})" if st == "PENDING" and reason not in ("None", "") else st


def _run(rec: dict) -> str:
    """Exit status and time used, or only the limit for a job that has not started."""
    from ..slurm import state

    if state(rec) == "PENDING":
        return f"limit {rec.get('TimeLimit', '?')}"
    return f"{_exit(rec)}  {rec.get('RunTime', '?')} of {rec.get('TimeLimit', '?')}"


def _n_tasks(rec: dict) -> int:
    """Array tasks one record stands for: ``3`` -> 1, ``0-5%2`` -> 6, ``1,4-5`` -> 3."""
    n = 0
    for item in rec.get("ArrayTaskId", "").split("%")[0].split(","):
        lo, _, hi = item.partition("-")
        if lo.isdigit():
            n += int(hi) - int(lo) + 1 if hi.isdigit() else 1
    return n or 1


def _logs(rec: dict, *, stderr: bool = True) -> str:
    out, err = rec.get("StdOut", ""), rec.get("StdErr", "")
    if "4294967294" in out:  # the record of not-yet-started array tasks has no real log name
        return "-"
    return _rel(out) + (f", stderr {_rel(err)}" if stderr and err and err != out else "")


#: exit codes of `hpcattn run` stopped by a signal (128 + N), and what to do about it
STOPPED = {138: "stopped by SIGUSR1 before the time limit", 143: "stopped by SIGTERM",
           130: "stopped by SIGINT"}


def _exit(rec: dict) -> str:
    """``exit 138:0 (stopped by SIGUSR1 ...)``: Slurm's ExitCode is status:signal."""
    code = rec.get("ExitCode", "?")
    status, _, sig = code.partition(":")
    why = None
    if sig.isdigit() and int(sig):
        import signal

        try:
            why = f"killed by {signal.Signals(int(sig)).name}"
        except ValueError:
            why = f"killed by signal {sig}"
    elif status.isdigit():
        why = STOPPED.get(int(status))
    return f"exit {code}" + (f" ({why}; submit again to resume)" if why else "")


def report(records: list[dict]) -> str:
    """Human-readable status of ``records`` (from :func:`hpcattn.slurm.show_jobs`): one block per
    job, array tasks listed, logs and results files with how many cases they hold."""
    from ..slurm import is_final, part_path, results_of, state

    groups: dict[str, list[dict]] = {}
    for rec in records:
        groups.setdefault(rec.get("ArrayJobId") or rec["JobId"], []).append(rec)
    lines = []
    for job_id, recs in sorted(groups.items(), key=lambda kv: int(kv[0])):
        first = recs[0]
        results = results_of(first)
        name = first.get("JobName", "?")
        if "ArrayJobId" not in first:
            lines.append(f"job {job_id}  {name}  {_state(first)}  {_run(first)}  {first.get('NodeList') or '-'}")
            if first.get("Dependency", "(null)") != "(null)":
                lines.append(f"  after    {first['Dependency']}")
            lines.append(f"  log      {_logs(first)}")
            if results:
                lines.append(f"  results  {_cases(results, final=is_final(first))}")
            continue
        recs.sort(key=_task_key)
        counts: dict[str, int] = {}
        for r in recs:
            counts[state(r)] = counts.get(state(r), 0) + _n_tasks(r)
        summary = ", ".join(f"{n} {st}" for st, n in sorted(counts.items()))
        lines.append(f"array job {job_id}  {name}  tasks: {summary}  (stderr in .err beside each log)")
        for r in recs:
            task = r.get("ArrayTaskId", "?")
            line = f"  task {task:<3} {_state(r)}  {_run(r)}"
            if results and task.isdigit():
                line += f"  part {_cases(part_path(results, int(task)), part=True, final=is_final(r))}"
            if task.isdigit():
                line += f"  log {_logs(r, stderr=False)}"
            lines.append(line)
        if results:
            lines.append(f"  results  {_cases(results)}, written by the merge job")
    return "\n".join(lines)


def wait_for(job_ids, *, poll: float = 2.0, timeout: float | None = None) -> list[dict]:
    """Poll scontrol until every job in ``job_ids`` (every task, for arrays) has ended."""
    from ..slurm import SlurmError, is_final, show_jobs

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


def mine(records: list[dict]) -> list[dict]:
    """Records of jobs this user submitted through hpcattn."""
    from ..slurm import results_of

    uid = f"({os.getuid()})"
    return [r for r in records if results_of(r) is not None and r.get("UserId", "").endswith(uid)]


@click.command()
@click.argument("job_ids", nargs=-1, metavar="[JOBID...]")
@click.option("--wait", is_flag=True, help="Wait until the jobs ended, then report; exit 1 unless all COMPLETED.")
def status(job_ids, wait):
    """State of Slurm jobs, their array tasks, logs and results files.

    Without JOBID: every job of yours that 'hpcattn submit' queued and Slurm still knows (finished
    jobs are forgotten after the cluster's MinJobAge, often 5 minutes). Uses scontrol, so it works
    where accounting (sacct) is disabled.

    \b
    Examples:
      hpcattn status
      hpcattn status 1234 1235
    """
    from ..errors import HpcattnError
    from .. import slurm

    bad = [j for j in job_ids if not re.match(r"^\d+(_\d+)?$", j)]
    if bad:
        raise click.BadParameter(f"{bad[0]!r} is not a job id; expected a number such as 1234 (or 1234_5)",
                                 param_hint="JOBID")
    try:
        records = wait_for(job_ids) if wait and job_ids else slurm.show_jobs(job_ids)
    except HpcattnError as exc:
        raise click.ClickException(str(exc)) from None
    if not job_ids:
        records = mine(records)
    if not records:
        click.echo("hpcattn status: " + (f"Slurm does not know job(s) {', '.join(job_ids)} (finished jobs "
                                          "are forgotten after MinJobAge)" if job_ids else
                                          "no hpcattn jobs known to Slurm"))
        sys.exit(1 if job_ids else 0)
    click.echo(report(records))
    if wait and not all(slurm.state(r) == "COMPLETED" for r in records):
        sys.exit(1)
