"""``hpcattn submit``: render a job's sbatch script from ``slurm/`` and submit it."""
from __future__ import annotations

import os
import sys

import click

from . import Command

# option name -> [slurm] key; options left out (None) keep the job file's value
SLURM_OPTIONS = ("nodes", "ntasks_per_node", "cpus_per_task", "gpus_per_node", "gpus_per_task",
                 "gpu_bind", "mem", "time", "partition", "account", "qos", "constraint", "job_name",
                 "launcher", "srun_mpi", "launcher_args", "run_args", "python", "setup", "extra", "signal_before",
                 "array", "array_tasks", "merge_time", "after")


def _gpus(value):
    """--gpus-per-node 4 is a count; a100:4 stays text."""
    return int(value) if value is not None and value.isdigit() else value


def _save(folder: str, name: str, text: str) -> str:
    path = os.path.join(folder, name)
    with open(path, "w") as fh:
        fh.write(text)
    return path


# errors follow the command line's conventions (hpcattn.cli.Command): one line "hpcattn: error:",
# exit 2 for a bad job file, option or path, 1 when Slurm is missing, refuses or does not answer
@click.command(cls=Command, context_settings={"show_default": True})
@click.argument("job_file", metavar="JOB.toml")
@click.option("--dry-run", is_flag=True, help="Print the script(s) and submit nothing.")
@click.option("--nodes", type=int, default=None, help="Nodes (default: [slurm] nodes, else 1).")
@click.option("--ntasks-per-node", type=int, default=None, help="MPI ranks per node.")
@click.option("--cpus-per-task", "-c", type=int, default=None,
              help="Cores per rank; the job sets HPCATTN_NUM_THREADS to it.")
@click.option("--gpus-per-node", default=None, help="GPUs per node: a count or TYPE:COUNT.")
@click.option("--gpus-per-task", default=None, help="GPUs per rank: a count or TYPE:COUNT.")
@click.option("--gpu-bind", default=None, help="GPU binding passed to Slurm, e.g. closest.")
@click.option("--time", "-t", default=None, help="Time limit: minutes or HH:MM:SS (default 00:30:00).")
@click.option("--partition", default=None, help="Partition.")
@click.option("--account", "-A", default=None, help="Account to charge.")
@click.option("--qos", "-q", default=None, help="Quality of service.")
@click.option("--constraint", "-C", default=None, help="Node features, e.g. a100.")
@click.option("--mem", default=None, help="Memory per node: MB or e.g. 16G.")
@click.option("--job-name", "-J", default=None, help="Slurm job name (default: the job's name).")
@click.option("--array", type=click.IntRange(min=0), is_flag=False, flag_value=0, default=None,
              metavar="[K]", help="One array task per case (or per --array-tasks chunk), at most K "
                                  "running at once (no limit when K is left out or 0); a dependent "
                                  "job merges the parts. Put it after JOB.toml.")
@click.option("--array-tasks", type=int, default=None, help="Split the cases over this many array tasks.")
@click.option("--after", multiple=True, metavar="JOBID",
              help="Start after job JOBID succeeded (or TYPE:JOBID, e.g. afterany:123). Repeatable.")
@click.option("--launcher", type=click.Choice(["srun", "mpiexec"]), default=None,
              help="How ranks start (default srun --mpi=pmi2).")
@click.option("--srun-mpi", default=None, help="srun --mpi plugin (default pmi2, which MPICH needs).")
@click.option("--setup", multiple=True, metavar="LINE",
              help="Shell line run before the launch, e.g. 'module load cuda'. Repeatable; added to [slurm] "
                   "setup. Shell code: it runs in the job exactly as written.")
@click.option("--sbatch", "extra", multiple=True, metavar="OPTION",
              help="Extra sbatch option, e.g. --sbatch=--exclusive. Repeatable; added to [slurm] extra.")
@click.option("--signal-before", type=int, default=None,
              help="Seconds before the time limit that the job is asked to stop after its current case.")
@click.option("--run-args", default=None, metavar="OPTIONS",
              help="Options added to 'hpcattn run' in the job, e.g. '--device gpu --dtype bfloat16'; split "
                   "into words as a shell would, each passed on as one literal argument (nothing expands).")
@click.option("--launcher-args", default=None, metavar="ARGS",
              help="Extra arguments for srun/mpiexec; words, each passed on literally (like --run-args).")
@click.option("--python", default=None, help="Python running hpcattn in the job (default: this one).")
@click.option("--wait", is_flag=True, help="Wait until the job (and its merge step) ended; print its status; "
                                           "exit 1 unless everything COMPLETED.")
@click.option("--parsable", is_flag=True, help="Print only the job id (then the merge job's id).")
def submit(job_file, dry_run, wait, parsable, **options):
    """Submit JOB.toml to Slurm as a batch job (or a job array) running 'hpcattn run'.

    The script comes from the template slurm/hpcattn.sbatch, filled from the job's [slurm] table
    and the options given here (which win). It is saved beside the results, in
    results/<name>.slurm/<JOBID>.sbatch, together with Slurm's logs. Resubmitting a job resumes
    it: completed cases are never redone. Before the time limit the job gets a signal and stops
    after its current case.

    Every value that enters the script is checked (names, times, sizes: one word, no control
    characters) or quoted; --run-args and --launcher-args are split into words, each passed on
    literally. Two are not checked: --setup ([slurm] setup) is shell code, run in the job exactly
    as written, and --sbatch ([slurm] extra) is sbatch options as written; give them only what
    you would type into a batch script yourself. Errors exit 2 (job file, option, path) or 1
    (Slurm missing, refusing or not answering).

    \b
    Examples:
      hpcattn submit jobs/quickstart.toml --dry-run
      hpcattn submit jobs/ring-scaling.toml --nodes 2 --ntasks-per-node 4 --gpus-per-node 4 \\
          --run-args '--device gpu' --time 01:00:00
      hpcattn submit jobs/ring-scaling.toml --array 2 --partition debug
      hpcattn submit jobs/ring-scaling.toml --after 1234
    """
    from ..jobs import load_job
    from ..slurm import client, render, settings as slurm_settings

    overrides = {key: options.get(key) for key in SLURM_OPTIONS}
    overrides.update(gpus_per_node=_gpus(options["gpus_per_node"]), gpus_per_task=_gpus(options["gpus_per_task"]),
                     setup=list(options["setup"]), extra=list(options["extra"]), after=list(options["after"]))
    if options["array"] is not None:
        overrides["array"] = options["array"] or True
    render.check_path("job file", job_file)  # before any message quotes the name
    job = load_job(job_file)
    settings = slurm_settings.resolve(job.slurm, overrides, path=job.path, text=job.text)
    rendered = render.render_job(job, settings)
    if dry_run:
        click.echo(rendered.script, nl=False)
        if rendered.array_tasks:
            click.echo("\n# --- then, queued behind the array (its id in place of ARRAY_JOB_ID): ---")
            click.echo(render.render_merge(job, settings, rendered, "ARRAY_JOB_ID"), nl=False)
        return
    os.makedirs(rendered.logs, exist_ok=True)  # Slurm opens the logs there, maybe at once
    job_id = client.sbatch(rendered.script)
    saved = _save(rendered.logs, f"{job_id}.sbatch", rendered.script)
    ids = [job_id]
    if rendered.array_tasks:
        merge_script = render.render_merge(job, settings, rendered, job_id)
        merge_id = client.sbatch(merge_script)
        _save(rendered.logs, f"{merge_id}.merge.sbatch", merge_script)
        ids.append(merge_id)
    if parsable:
        click.echo("\n".join(ids))
    else:
        what = (f"job array {job_id} ({rendered.array_tasks} tasks; merge job {ids[1]} after it)"
                if rendered.array_tasks else f"job {job_id}")
        click.echo(f"hpcattn submit: {job.name} is Slurm {what}")
        click.echo(f"  script   {saved}")
        click.echo(f"  logs     {rendered.logs}/")
        click.echo(f"  results  {rendered.results}")
        click.echo(f"  next:    hpcattn status {' '.join(ids)}")
    if wait:
        from .status import report

        records = client.wait_for(ids)
        click.echo(report(records), err=parsable)
        if not client.all_completed(records):
            sys.exit(1)
