"""``hpcattn bench``: side-by-side performance figures (see ``hpcattn.bench``)."""
from __future__ import annotations

import dataclasses

import click

from . import Command

from ..bench.config import SECTIONS  # the parts, defined with the bench


def _ranks(ctx, param, value):
    try:
        ranks = tuple(int(x) for x in value.split(","))
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a comma-separated list of rank counts; "
                                 "expected e.g. 1,2") from None
    if not ranks or min(ranks) < 1:
        raise click.BadParameter(f"{value!r} has a rank count below 1; expected positive integers")
    return tuple(sorted(set(ranks)))


def _sections(ctx, param, value):
    parts = tuple(x.strip() for x in value.split(",") if x.strip())
    bad = [x for x in parts if x not in SECTIONS]
    if bad or not parts:
        raise click.BadParameter(f"{value!r} names unknown parts {bad}; expected a comma-separated "
                                 f"subset of {','.join(SECTIONS)}")
    return parts


@click.command(cls=Command, context_settings={"show_default": True})
@click.option("--quick", is_flag=True,
              help="Tiny shapes (N=1024, H=2, d=32, one repeat, 8 MiB budget): proves the command "
                   "works in seconds; explicit options still override.")
@click.option("--seq-len", "-N", type=click.IntRange(min=1), default=None,
              help="Sequence length N. [default: 16384; --quick: 1024]")
@click.option("--batch", "-B", type=click.IntRange(min=1), default=1, help="Batch size.")
@click.option("--heads", "-H", type=click.IntRange(min=1), default=None, help="Heads. [default: 8]")
@click.option("--head-dim", "-d", type=click.IntRange(min=1), default=None,
              help="Head dimension. [default: 64]")
@click.option("--dtype", type=click.Choice(["float32", "float64"]), default="float32")
@click.option("--causal/--no-causal", default=False,
              help="Causal attention (FLOPs halved; the ring uses the zigzag layout).")
@click.option("--threads", type=click.IntRange(min=1), default=1,
              help="BLAS threads per measuring process and per rank.")
@click.option("--ranks", default="1,2", callback=_ranks,
              help="Rank counts of the ring part (throughput scaling is against 1 rank).")
@click.option("--repeats", type=click.IntRange(min=1), default=None,
              help="Timed repeats (median and min-max reported). [default: 3; --quick: 1]")
@click.option("--max-n-budget", "budget_mb", type=click.FloatRange(min=1), default=None,
              help="Per-rank memory budget (MiB of arrays) of the max-N comparison, which uses the "
                   "largest --ranks. [default: 256; --quick: 8]")
@click.option("--kv-pieces", type=click.IntRange(min=1), default=None,
              help="Each ring K/V block travels in this many pieces (the ring buffers hold one). "
                   "[default: 1; max-N: the fewest of 1, 2, 4, 8, 16 whose measured peak per "
                   "rank is within 2% of the least]")
@click.option("--parts", "sections", default=",".join(SECTIONS), callback=_sections,
              help="Which parts to run.")
@click.option("--no-torch", is_flag=True, help="Skip the PyTorch SDPA comparison.")
@click.option("--output", "-o", type=click.Path(dir_okay=False), default="results/bench.h5",
              help="HDF5 results file (hpcattn results format; replaced if it exists).")
@click.option("--no-output", is_flag=True, help="Print the tables only.")
def bench(quick, seq_len, batch, heads, head_dim, dtype, causal, threads, ranks, repeats,
          budget_mb, kv_pieces, sections, no_torch, output, no_output):
    """Measure blockwise and ring attention side by side with this machine's GEMM rate, vanilla
    NumPy attention and (when installed) PyTorch's SDPA, in one run under one load.

    Prints the machine, library versions and thread settings, then the tables: per-rank
    GFLOP/s and the ratio to the single-process GEMM rate; the ring on each --ranks count (wall
    over compute time, peak memory over the shard footprint, scaling against 1 rank); the
    longest N vanilla MHA and the ring each fit in --max-n-budget MiB per rank, predicted from
    measured memory and confirmed by real runs; forward+backward beside torch SDPA; and every
    context-parallel strategy (ring, Ulysses, hybrid grids) on the largest --ranks with the
    bytes each rank sent, counted at the MPI calls, beside the model's prediction. Benchmarks
    report, they never fail on timings.

    \b
    Examples:
      hpcattn bench --quick
      hpcattn bench --seq-len 16384 --heads 8 --head-dim 64 --ranks 1,2
      hpcattn bench --parts ring --seq-len 65536 --ranks 2 --repeats 1
      hpcattn bench --parts strategies --ranks 4 --heads 8 --causal
    """
    from ..bench import QUICK, BenchConfig, run_bench, save

    base = dataclasses.replace(BenchConfig(), **QUICK) if quick else BenchConfig()
    given = {"seq_len": seq_len, "heads": heads, "head_dim": head_dim, "repeats": repeats,
             "budget_mb": budget_mb}
    cfg = dataclasses.replace(base, batch=batch, dtype=dtype, causal=causal, threads=threads,
                              ranks=ranks, sections=sections, torch=not no_torch, kv_pieces=kv_pieces,
                              **{k: v for k, v in given.items() if v is not None})
    if cfg.seq_len < max(cfg.ranks):
        raise click.BadParameter(f"--seq-len {cfg.seq_len} is smaller than the largest rank count "
                                 f"{max(cfg.ranks)}; expected N >= P", param_hint="--seq-len")
    try:
        results = run_bench(cfg, echo=click.echo)
    except RuntimeError as exc:
        raise click.ClickException(str(exc)) from None
    if not no_output:
        save(results, output)
        click.echo(f"\nfigures written to {output}")
