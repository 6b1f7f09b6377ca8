"""``hpcattn run``: one distributed attention case (or, with a job file, a sweep)."""
from __future__ import annotations

import sys

import click

from ..cases import AttentionCase, default_tolerance
from ..layouts import LAYOUTS
from ..launch import fail, relaunch, under_mpi, world


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
    lines = [
        "hpcattn run: exact ring attention",
        f"  sequence length N  {case.seq_len:,}  (batch {case.batch}, heads {case.heads}"
        + (f", kv heads {kvh}" if kvh != case.heads else "")
        + f", head_dim {case.head_dim}, {case.dtype}, {'causal' if case.causal else 'non-causal'})",
        f"  ranks              {res['ranks']}  (layout {case.layout}, positions per rank "
        f"{min(counts):,}..{max(counts):,})",
        f"  wall time          {np.median(walls):.3f} s  (median of {len(walls)}; min {min(walls):.3f} s,"
        f" max {max(walls):.3f} s; slowest rank)",
        f"  compute / wait     {max(res['compute_s']):.3f} s / {max(res['wait_s']):.3f} s  "
        "(slowest rank, last repeat)",
        f"  throughput         {res['gflops']:,.1f} GFLOP/s  ({case.flops:.3e} FLOP = 4*B*N^2*H*d"
        + ("/2, causal)" if case.causal else ")"),
        f"  peak memory/rank   {_fmt_bytes(max(res['peak_rss_bytes']))} RSS max, "
        f"{_fmt_bytes(min(res['peak_rss_bytes']))} min; arrays {_fmt_bytes(max(res['peak_alloc_bytes']))} max",
    ]
    ok = True
    if "max_abs_err" in res:
        ok = res["max_abs_err"] <= tol
        lines.append(
            f"  check              {res['rows']} sampled rows vs direct float64: max abs err "
            f"{res['max_abs_err']:.2e} (out), {res['max_lse_err']:.2e} (lse); tolerance {tol:.0e}: "
            + ("PASSED" if ok else "FAILED"))
    click.echo("\n".join(lines))
    return ok


@click.command(context_settings={"show_default": True})
@click.option("--np", "np_", type=click.IntRange(min=1), default=None,
              help="Number of MPI ranks. Starts mpiexec itself when not already under MPI; "
                   "leave it out under mpiexec/srun.")
@click.option("--seq-len", "-N", type=click.IntRange(min=1), default=4096, help="Global sequence length N.")
@click.option("--batch", "-B", type=click.IntRange(min=1), default=1, help="Batch size.")
@click.option("--heads", "-H", type=click.IntRange(min=1), default=8, help="Query heads.")
@click.option("--kv-heads", type=click.IntRange(min=1), default=None,
              help="Key/value heads (GQA/MQA); must divide --heads. Default: --heads.")
@click.option("--head-dim", "-d", type=click.IntRange(min=1), default=64, help="Head dimension.")
@click.option("--dtype", type=click.Choice(["float32", "float64"]), default="float32",
              help="Input dtype (accumulation happens in the same precision).")
@click.option("--causal/--no-causal", default=False, help="Causal mask (query i sees keys j <= i).")
@click.option("--layout", type=click.Choice(LAYOUTS), default="contiguous",
              help="How positions are spread over ranks; zigzag or striped balance causal work.")
@click.option("--seed", type=int, default=0, help="Seed of the random inputs (same global arrays for any P).")
@click.option("--repeats", type=click.IntRange(min=1), default=1, help="Timed repetitions.")
@click.option("--check", "check", is_flag=True,
              help="Verify sampled query rows against a direct float64 computation (cost O(rows*N)).")
@click.option("--check-rows", type=click.IntRange(min=1), default=64, help="Rows sampled by --check.")
@click.option("--tolerance", type=float, default=None,
              help="Max abs error --check accepts. Default 1e-5 (float32), 1e-10 (float64).")
@click.option("--block-q", type=click.IntRange(min=1), default=None, help="Query tile rows (tuning).")
@click.option("--block-k", type=click.IntRange(min=1), default=None, help="Key tile rows (tuning).")
def run(np_, seq_len, batch, heads, kv_heads, head_dim, dtype, causal, layout, seed, repeats,
        check, check_rows, tolerance, block_q, block_k):
    """Run exact ring attention on random inputs and print a one-screen summary.

    Every rank generates its shard of q, k, v (standard normal, defined per global position, so
    results do not depend on the rank count), the ranks run ring attention, and rank 0 prints N,
    ranks, layout, dtype, wall time, GFLOP/s (4*B*N^2*H*d, halved when causal) and peak memory per
    rank. Exit status: 0 on success, 1 when --check fails, 2 on bad input.

    \b
    Examples:
      hpcattn run --np 4 --seq-len 65536 --heads 8 --head-dim 64 --causal --layout zigzag --check
      mpiexec -n 4 hpcattn run -N 16384 --causal --layout striped --repeats 3
    """
    if np_ is not None and not under_mpi():
        sys.exit(relaunch(np_, ["run", *_strip_np(sys.argv[1:] if sys.argv[1:2] != ["run"]
                                                       else sys.argv[2:])]))
    comm = world()
    if np_ is not None and np_ != comm.size:
        fail(click.UsageError(f"--np {np_} was given but this job already runs on {comm.size} MPI "
                              "ranks; leave out --np under mpiexec/srun"), comm)
    case = AttentionCase(seq_len=seq_len, batch=batch, heads=heads, kv_heads=kv_heads,
                         head_dim=head_dim, dtype=dtype, causal=causal, layout=layout, seed=seed,
                         repeats=repeats, check_rows=check_rows if check else 0,
                         block_q=block_q, block_k=block_k)
    from ..cases import run_attention_case

    try:
        res = run_attention_case(case, comm)
    except Exception as exc:  # noqa: BLE001 - every failure must end the whole job
        fail(exc, comm)
    ok = True
    if comm.rank == 0:
        ok = print_summary(case, res, tolerance if tolerance is not None else default_tolerance(dtype))
    ok = comm.bcast(ok, root=0)
    if not ok:
        sys.exit(1)
