"""``hpcattn status``: state of submitted jobs (via scontrol, which needs no accounting) and where
their logs and results are. What the records mean lives in :mod:`hpcattn.slurm.client`; this
module only words it."""
from __future__ import annotations

import os
import sys

import click

from . import Command


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
    from ..results import open_results

    try:
        with open_results(path) as f:
            done, total = len(f["cases"]), f.attrs.get("n_cases")
    except HpcattnError as exc:
        return f"{_rel(path)} (unreadable: {exc})"
    if part or total is None:
        return f"{_rel(path)} ({done} case{'s' if done != 1 else ''} complete)"
    return f"{_rel(path)} ({done}/{int(total)} cases complete)"


def _state(rec: dict) -> str:
    from ..slurm.client import state

    st = state(rec)
    reason = rec.get("Reason", "None")
    return f"{st} ({reason})" if st == "PENDING" and reason not in ("None", "") else st


def _run(rec: dict) -> str:
    """Exit status and time used, or only the limit for a job that has not started."""
    from ..slurm.client import exit_reason, state

    if state(rec) == "PENDING":
        return f"limit {rec.get('TimeLimit', '?')}"
    why = exit_reason(rec)
    exit_ = f"exit {rec.get('ExitCode', '?')}" + (f" ({why}; submit again to resume)" if why else "")
    return f"{exit_}  {rec.get('RunTime', '?')} of {rec.get('TimeLimit', '?')}"


def _logs(rec: dict, *, stderr: bool = True) -> str:
    from ..slurm.client import logs_of

    logs = logs_of(rec)
    if logs is None:
        return "-"
    out, err = logs
    return _rel(out) + (f", stderr {_rel(err)}" if stderr and err and err != out else "")


def report(records: list[dict]) -> str:
    """Human-readable status of ``records`` (from :func:`hpcattn.slurm.client.show_jobs`): one
    block per job, array tasks listed, logs and results files with how many cases they hold."""
    from ..slurm.client import by_job, is_array, is_final, results_of, state, task_count, task_results

    lines = []
    for job_id, recs in by_job(records):
        first = recs[0]
        results = results_of(first)
        name = first.get("JobName", "?")
        if not is_array(first):
            lines.append(f"job {job_id}  {name}  {_state(first)}  {_run(first)}  {first.get('NodeList') or '-'}")
            if first.get("Dependency", "(null)") != "(null)":
                lines.append(f"  after    {first['Dependency']}")
            lines.append(f"  log      {_logs(first)}")
            if results:
                lines.append(f"  results  {_cases(results, final=is_final(first))}")
            continue
        counts: dict[str, int] = {}
        for r in recs:
            counts[state(r)] = counts.get(state(r), 0) + task_count(r)
        summary = ", ".join(f"{n} {st}" for st, n in sorted(counts.items()))
        lines.append(f"array job {job_id}  {name}  tasks: {summary}  (stderr in .err beside each log)")
        for r in recs:
            task = r.get("ArrayTaskId", "?")
            line = f"  task {task:<3} {_state(r)}  {_run(r)}"
            part = task_results(results, r) if results else None
            if part:
                line += f"  part {_cases(part, part=True, final=is_final(r))}"
            if task.isdigit():
                line += f"  log {_logs(r, stderr=False)}"
            lines.append(line)
        if results:
            lines.append(f"  results  {_cases(results)}, written by the merge job")
    return "\n".join(lines)


@click.command(cls=Command)  # errors: one line, exit 2 for a bad id, 1 when Slurm fails
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
    from ..slurm import client

    bad = [j for j in job_ids if not client.JOB_ID_RE.fullmatch(j)]
    if bad:
        raise click.BadParameter(f"{bad[0]!r} is not a job id; expected a number such as 1234 (or 1234_5)",
                                 param_hint="JOBID")
    records = client.wait_for(job_ids) if wait and job_ids else client.show_jobs(job_ids)
    if not job_ids:
        records = client.mine(records)
    if not records:
        click.echo("hpcattn status: " + (f"Slurm does not know job(s) {', '.join(job_ids)} (finished jobs "
                                          "are forgotten after MinJobAge)" if job_ids else
                                          "no hpcattn jobs known to Slurm"))
        sys.exit(1 if job_ids else 0)
    click.echo(report(records))
    if wait and not client.all_completed(records):
        sys.exit(1)
