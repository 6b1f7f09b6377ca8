"""``hpcattn merge``: combine the results files of one job's parts (Slurm array tasks)."""
from __future__ import annotations

import click

from . import Command


@click.command(cls=Command)
@click.argument("out", type=click.Path(dir_okay=False))
@click.argument("parts", nargs=-1, required=True, type=click.Path(dir_okay=False))
def merge(out, parts):
    """Merge PARTS (results files of one job, e.g. from 'hpcattn run JOB.toml --array-task I
    --array-tasks N') into OUT.

    OUT gets every completed case of every part, with activations re-linked into OUT.h5.d/ (hard
    links where possible), so OUT stands alone and can be resumed with
    'hpcattn run JOB.toml --output OUT'. An existing OUT counts as one more part, so merging again
    after more tasks finished is safe. OUT is written under the lock a run takes (merging into a
    file a run is writing is refused). A part must be intact (every activation file matching the
    checksum recorded when its case completed) and of the same job (name, kind, case count, sweep
    and activations; the message names the first that differs). Exit status 2 when a part is
    missing, corrupt, or belongs to another job, or OUT is locked (one line, 'hpcattn: error:
    ...'); 1 when writing fails (e.g. disk full); 0 otherwise (missing cases are listed).

    \b
    Example:
      hpcattn merge results/ring-scaling.h5 results/ring-scaling.task*.h5
    """
    from ..results import merge as merge_files

    s = merge_files(out, list(parts))  # an HpcattnError is shown in one line, exit 2 (cli.Command)
    total = s["n_cases"]
    line = f"hpcattn merge: {s['cases']}" + (f"/{total}" if total is not None else "") + \
        f" cases from {s['parts']} files -> {out}"
    click.echo(line)
    if s["missing"]:
        shown = ", ".join(map(str, s["missing"][:20])) + (" ..." if len(s["missing"]) > 20 else "")
        click.echo(f"  missing cases: {shown} (rerun their array tasks, then merge again)", err=True)
