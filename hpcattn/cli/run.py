"""``hpcattn run``: one distributed attention case (or, with a job file, a sweep)."""
from __future__ import annotations

import sys

import click

from .. import exchange
from ..cases import AttentionCase, check_tolerance
from ..context import STRATEGIES
from ..devices import ALL_DTYPES, CPU_DTYPES, DEVICES, GPU_DTYPES, default_tolerance
from ..layouts import LAYOUTS
from ..errors import UsageError
from ..launch import fail, load_mpi, relaunch, under_mpi, world
from . import Command


def _strip_np(argv: list[str]) -> list[str]:
    """The command line without ``--np N`` / ``--np=N`` (for the relaunched processes)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--np":
            skip = True
        elif not arg.startswith("--np="):
            out.append(arg)
    return out


def _fmt_bytes(b: float) -> str:
    return f"{b / 2**20:,.1f} MiB" if b < 2**30 else f"{b / 2**30:,.2f} GiB"


def print_summary(case: AttentionCase, res: dict, tol: float | None) -> bool:
    """One-screen summary (rank 0). Returns False when the check failed."""
    import numpy as np

    walls = res["wall_s"]
    kvh = case.heads if case.kv_heads is None else case.kv_heads
    counts = res["counts"]
    what = {"ring": "ring attention", "ulysses": "Ulysses (all-to-all) attention",
            "hybrid": f"hybrid attention (all-to-all in groups of {case.ulysses_size}, ring across)"}
    lines = [
        f"hpcattn run: exact {what[case.strategy]}" + (", forward + backward" if case.backward else ""),
        f"  sequence length N  {case.seq_len:,}  (batch {case.batch}, heads {case.heads}"
        + (f", kv heads {kvh}" if kvh != case.heads else "")
        + f", head_dim {case.head_dim}, {case.dtype}, {'causal' if case.causal else 'non-causal'})",
        f"  ranks              {res['ranks']}  (layout {case.layout}, positions per rank "
        f"{min(counts):,}..{max(counts):,}"
        + (f"; K/V blocks in {case.kv_pieces} pieces" if case.kv_pieces != 1 else "") + ")",
    ]
    if "cpu_kernel" in res:   # the per-rank kernel the calls ran (HPCATTN_CPU_KERNEL chooses)
        from .. import cpu_kernels

        kernels = res["cpu_kernel"] + (f", backward {res['cpu_kernel_backward']}"
                                       if "cpu_kernel_backward" in res else "")
        lines.append(f"  CPU kernel         {kernels}  ({cpu_kernels.KERNEL_ENV}="
                     f"{cpu_kernels.requested()})")
    if case.mask_kw:
        steps = res.get("steps")
        lines.append(f"  mask               {case.mask.describe()}"
                     + (f"; ring steps {max(steps)} of {res['ranks']}"
                        if steps and case.strategy == "ring" else ""))
    lines += [
        f"  wall time          {np.median(walls):.3f} s  (median of {len(walls)}; min {min(walls):.3f} s,"
        f" max {max(walls):.3f} s; slowest rank)",
        f"  compute / wait     {max(res['compute_s']):.3f} s / {max(res['wait_s']):.3f} s  "
        + ("forward " if case.backward else "") + "(slowest rank, last repeat)",
    ]
    if case.backward:
        lines.append(f"                     {max(res['backward_compute_s']):.3f} s / "
                     f"{max(res['backward_wait_s']):.3f} s  backward (slowest rank, last repeat)")
    lines += [
        f"  throughput         {res['gflops']:,.1f} GFLOP/s  ({case.flops:.3e} FLOP = "
        + ("3.5 x " if case.backward else "")
        + ("4*B*H*d*(visible pairs)" if case.mask_kw else
           "4*B*N^2*H*d" + ("/2, causal" if case.causal else ""))
        + ("; backward = 2.5 x forward)" if case.backward else ")"),
        f"  peak memory/rank   {_fmt_bytes(max(res['peak_rss_bytes']))} RSS max, "
        f"{_fmt_bytes(min(res['peak_rss_bytes']))} min; arrays {_fmt_bytes(max(res['peak_alloc_bytes']))} max",
    ]
    ok = True
    if "max_abs_err" in res:
        ok = res["max_abs_err"] <= tol
        errs = (f"{res['max_out_err']:.2e} (out), {res['max_dq_err']:.2e} (dq), "
                f"{res['max_dk_err']:.2e} (dk), {res['max_dv_err']:.2e} (dv)" if case.backward
                else f"{res['max_abs_err']:.2e} (out)")
        lines.append(
            f"  check              {res['rows']} sampled rows vs direct float64: max abs err "
            f"{errs}, {res['max_lse_err']:.2e} (lse); tolerance {tol:.0e}: "
            + ("PASSED" if ok else "FAILED"))
    click.echo("\n".join(lines))
    return ok


# command-line option -> job sweep key (an option given on the command line overrides the job)
OVERRIDES = {"seq_len": "seq_len", "batch": "batch", "heads": "heads", "kv_heads": "kv_heads",
             "head_dim": "head_dim", "dtype": "dtype", "causal": "causal", "layout": "layout",
             "seed": "seed", "repeats": "repeats", "tolerance": "tolerance", "block_q": "block_q",
             "block_k": "block_k", "device": "device", "strategy": "strategy",
             "ulysses_size": "ulysses_size", "backward": "backward", "window": "window",
             "cu_seqlens": "cu_seqlens", "kv_pieces": "kv_pieces"}
JOB_ONLY = ("output", "array_task", "array_tasks", "force")


def _given(ctx, name: str) -> bool:
    from click.core import ParameterSource

    return ctx.get_parameter_source(name) in (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT)


def job_overrides(ctx, values: dict) -> dict:
    """Sweep keys fixed by options the user typed (not by defaults)."""
    over = {key: values[opt] for opt, key in OVERRIDES.items() if _given(ctx, opt)}
    if values["check"] or _given(ctx, "check_rows"):
        over["check_rows"] = values["check_rows"]
    return over


def _load(job_file, overrides):
    from ..jobs import load_job

    return load_job(job_file).with_overrides(overrides)


@click.command(cls=Command, context_settings={"show_default": True})
@click.argument("job_file", required=False, metavar="[JOB.toml]")
@click.option("--np", "np_", type=click.IntRange(min=1), default=None,
              help="Number of MPI ranks. Starts mpiexec itself when not already under MPI; "
                   "leave it out under mpiexec/srun.")
@click.option("--output", "-o", type=click.Path(dir_okay=False), default=None,
              help="Results file of a job (default: the job's [output] path, results/<name>.h5).")
@click.option("--array-task", type=click.IntRange(min=0), default=None,
              help="Run only cases c with c % ARRAY_TASKS == ARRAY_TASK (Slurm arrays); "
                   "default output <stem>.task<I>.h5, combine with 'hpcattn merge'.")
@click.option("--array-tasks", type=click.IntRange(min=1), default=None,
              help="Number of array tasks the job's cases are split over.")
@click.option("--force", is_flag=True, help="Recompute every case, discarding earlier results in the output.")
@click.option("--progress/--no-progress", default=None, show_default=False,
              help="Progress bar on rank 0. Default: only when stderr is a terminal "
                   "(--np passes it on when yours is).")
@click.option("--seq-len", "-N", type=click.IntRange(min=1), default=4096, help="Global sequence length N.")
@click.option("--batch", "-B", type=click.IntRange(min=1), default=1, help="Batch size.")
@click.option("--heads", "-H", type=click.IntRange(min=1), default=8, help="Query heads.")
@click.option("--kv-heads", type=click.IntRange(min=1), default=None,
              help="Key/value heads (GQA/MQA); must divide --heads. Default: --heads.")
@click.option("--head-dim", "-d", type=click.IntRange(min=1), default=64, help="Head dimension.")
@click.option("--dtype", type=click.Choice(ALL_DTYPES), default="float32",
              help=f"Input dtype. CPU: {'/'.join(CPU_DTYPES)} (accumulated in that precision); GPU: "
                   f"{'/'.join(GPU_DTYPES)} (accumulated in float32).")
@click.option("--device", type=click.Choice(DEVICES), default="cpu",
              help="cpu: NumPy. gpu: CuPy arrays and the CUDA kernels, one GPU per rank (chosen by "
                   "node-local rank); needs pip install 'hpcattn[gpu]'.")
@click.option("--causal/--no-causal", default=False, help="Causal mask (query i sees keys j <= i).")
@click.option("--layout", type=click.Choice(LAYOUTS), default="contiguous",
              help="How positions are spread over ranks; zigzag or striped balance causal work.")
@click.option("--seed", type=int, default=0, help="Seed of the random inputs (same global arrays for any P).")
@click.option("--repeats", type=click.IntRange(min=1), default=1, help="Timed repetitions.")
@click.option("--check", "check", is_flag=True,
              help="Verify sampled query rows against a direct float64 computation (cost O(rows*N)).")
@click.option("--check-rows", type=click.IntRange(min=1), default=64, help="Rows sampled by --check.")
@click.option("--tolerance", type=float, default=None,
              help="Max abs error --check accepts. Default 1e-10 (float64), 1e-5 (float32), "
                   "5e-3 (float16), 4e-2 (bfloat16).")
@click.option("--strategy", type=click.Choice(STRATEGIES), default="ring",
              help="Context parallelism: ring (K/V blocks travel the ring), ulysses (all-to-all "
                   "over heads) or hybrid (all-to-all inside groups of --ulysses-size ranks, ring "
                   "across groups).")
@click.option("--ulysses-size", type=click.IntRange(min=1), default=None,
              help="With --strategy hybrid: ranks per all-to-all group; must divide the rank count.")
@click.option("--backward", is_flag=True,
              help="Also compute the gradients dq, dk, dv (ring or ulysses) for a random dout and time "
                   "forward+backward; with --check, sampled rows of dq and sampled key rows of dk/dv "
                   "are checked against float64 too.")
@click.option("--window", metavar="LEFT,RIGHT", default=None,
              help="Sliding window (FlashAttention's window_size): query i sees keys i-LEFT..i+RIGHT; "
                   "-1 is unbounded, with --causal RIGHT is 0 or -1. The contiguous ring stops "
                   "early: O(N*w) work.")
@click.option("--cu-seqlens", metavar="0,C1,...,N", default=None,
              help="Packed variable-length sequences (FlashAttention's cu_seqlens, cumulative "
                   "lengths from 0 to N): tokens never attend across sequences.")
@click.option("--block-q", type=click.IntRange(min=1), default=None, help="Query tile rows (tuning).")
@click.option("--block-k", type=click.IntRange(min=1), default=None, help="Key tile rows (tuning).")
@click.option("--kv-pieces", type=click.IntRange(min=1), default=1,
              help="Ring and hybrid: each K/V block travels in this many pieces, one ring per "
                   "piece, so the two ring buffers hold a piece, not a block (less memory per "
                   "rank, more messages).")
@click.pass_context
def run(ctx, job_file, np_, output, array_task, array_tasks, force, progress, seq_len, batch, heads,
        kv_heads, head_dim, dtype, device, causal, layout, seed, repeats, check, check_rows,
        tolerance, strategy, ulysses_size, backward, window, cu_seqlens, block_q, block_k,
        kv_pieces):
    """Run exact ring attention on random inputs, or every case of a job file.

    Without JOB.toml: one case, and rank 0 prints N, ranks, layout, dtype, wall time, GFLOP/s
    (4*B*N^2*H*d, halved when causal) and peak memory per rank. Every rank generates its shard of
    q, k, v (defined per global position, so results do not depend on the rank count).

    With JOB.toml: every case of the job's sweep (options typed here override the job's values),
    results written to HDF5 as they complete. Rerunning skips completed cases; SIGTERM, SIGINT or
    SIGUSR1 stop after the current case with the file intact.

    Exit status: 0 on success, 1 when a check fails (or MPI is missing), 2 on bad input, 128+N
    when stopped by signal N (130: Ctrl-C). With --np, the command stands in for mpiexec: the
    signals above are passed on to it, it exits with mpiexec's status, and mpiexec never outlives
    it. A job file run on 1 rank without --np says so first when its [slurm] table asks for more.

    \b
    Examples:
      hpcattn run --np 4 --seq-len 65536 --heads 8 --head-dim 64 --causal --layout zigzag --check
      hpcattn run --np 4 -N 65536 --causal --cu-seqlens 0,1000,41000,65536 --window 4096,0 --check
      mpiexec -n 4 hpcattn run -N 16384 --causal --layout striped --repeats 3
      mpiexec -n 4 hpcattn run jobs/quickstart.toml
      hpcattn run --np 2 jobs/ring-scaling.toml --array-task 0 --array-tasks 4
    """
    values = ctx.params
    if job_file is None:
        given = [f"--{name.replace('_', '-')}" for name in JOB_ONLY if _given(ctx, name)]
        if given:
            raise click.UsageError(f"{given[0]} needs a job file; expected 'hpcattn run JOB.toml {given[0]} ...'")
    elif (array_task is None) != (array_tasks is None) or (
            array_tasks is not None and array_task >= array_tasks):
        raise click.UsageError(f"--array-task {array_task} --array-tasks {array_tasks} is not a valid "
                               "pair; expected both, with 0 <= ARRAY_TASK < ARRAY_TASKS")
    if np_ is not None and not under_mpi():
        argv = _strip_np(sys.argv[1:] if sys.argv[1:2] != ["run"] else sys.argv[2:])
        load_mpi(initialize=False)  # one line here, not one per rank, when MPI is missing
        if job_file is not None:
            _load(job_file, job_overrides(ctx, values))  # a bad job file: before any process starts
            if progress is None and sys.stderr.isatty():
                argv.append("--progress")  # mpiexec gives the ranks pipes, not our terminal
        sys.exit(relaunch(np_, ["run", *argv]))
    comm = world()
    if np_ is not None and np_ != comm.size:
        fail(UsageError(f"--np {np_} was given but this job already runs on {comm.size} MPI "
                        "ranks; leave out --np under mpiexec/srun"), comm)
    if job_file is not None:
        sys.exit(_run_job_file(ctx, comm, job_file, values))
    case = AttentionCase(seq_len=seq_len, batch=batch, heads=heads, kv_heads=kv_heads,
                         head_dim=head_dim, dtype=dtype, causal=causal, layout=layout, seed=seed,
                         repeats=repeats, check_rows=check_rows if check else 0,
                         block_q=block_q, block_k=block_k, device=device, strategy=strategy,
                         ulysses_size=ulysses_size, backward=backward, window=window,
                         cu_seqlens=cu_seqlens, kv_pieces=kv_pieces)
    from ..cases import run_attention_case

    try:
        tolerance = check_tolerance(tolerance)
        res = run_attention_case(case, comm)
    except Exception as exc:  # noqa: BLE001 - every failure must end the whole job
        fail(exc, comm)
    ok = True
    if comm.rank == 0:
        ok = print_summary(case, res, tolerance if tolerance is not None else default_tolerance(dtype))
    ok = exchange.bcast(comm, ok, "the check's verdict")
    if not ok:
        sys.exit(1)


def _run_job_file(ctx, comm, job_file, values) -> int:
    """Load the job on rank 0 (one reader, one message), run it on all ranks; the exit status."""
    import time

    from ..errors import CollectiveError, HpcattnError
    from ..runner import run_job

    job = err = None
    if comm.rank == 0:
        try:
            job = _load(job_file, job_overrides(ctx, values))
        except HpcattnError as exc:
            err = str(exc)
    job, err = exchange.bcast(comm, (job, err), "loading the job file")
    if err:
        fail(CollectiveError(err), comm)
    if comm.rank == 0 and comm.size == 1 and values["np_"] is None and not under_mpi():
        _say_one_rank(job, job_file)
    t0 = time.monotonic()
    try:
        summary = run_job(job, comm, output=values["output"], array_task=values["array_task"],
                          array_tasks=values["array_tasks"], force=values["force"],
                          progress=values["progress"], argv=sys.argv)
    except Exception as exc:  # noqa: BLE001 - every failure must end the whole job
        fail(exc, comm)
    if comm.rank == 0:
        print_job_summary(job, summary, time.monotonic() - t0)
    if summary["stopped"]:
        return 128 + summary["stopped"]
    return 1 if summary["failed_checks"] else 0


def job_ranks(job) -> int:
    """The ranks a job file asks for: its [slurm] nodes x ntasks_per_node (1 when unset or not
    numbers; ``hpcattn submit`` validates the table)."""
    total = 1
    for key in ("nodes", "ntasks_per_node"):
        value = job.slurm.get(key, 1)
        total *= value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 1
    return total


def _say_one_rank(job, job_file) -> None:
    ranks = job_ranks(job)
    if ranks > 1:
        click.echo(f"hpcattn run: {job.name} runs on 1 rank (no --np, not under mpiexec), but its "
                   f"[slurm] table asks for {ranks}; for that: hpcattn run --np {ranks} {job_file}",
                   err=True)


def print_job_summary(job, s: dict, seconds: float) -> None:
    import signal

    done = s["skipped"] + s["ran"]
    part = f" (array part: {s['selected']} of {s['total']})" if s["selected"] != s["total"] else ""
    click.echo(f"hpcattn run: job {job.name}: {done}/{s['selected']} cases complete{part}, "
               f"{s['ran']} run now, {s['skipped']} already done, {seconds:.1f} s -> {s['path']}")
    if s["failed_checks"]:
        click.echo(f"  check FAILED in cases {', '.join(map(str, s['failed_checks']))} "
                   f"(see max_abs_err in {s['path']})", err=True)
    if s["stopped"]:
        click.echo(f"  stopped by {signal.Signals(s['stopped']).name}; rerun the same command to "
                   f"finish the remaining {s['selected'] - done} cases", err=True)
    elif done == s["selected"]:
        click.echo(f"  next: hpcattn analyze {s['path']}")
