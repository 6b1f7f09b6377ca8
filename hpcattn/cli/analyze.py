"""``hpcattn analyze``: tables, CSV/JSON and figures from results files."""
from __future__ import annotations

import json

import click

from . import Command, figure_path


@click.command(cls=Command)
@click.argument("files", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--group-by", "-g", multiple=True, metavar="KEY",
              help="Print one block per value of KEY (repeatable), e.g. --group-by layout.")
@click.option("--sort-by", "-s", multiple=True, metavar="KEY",
              help="Sort rows by KEY (repeatable); default: file and case order.")
@click.option("--where", "-w", multiple=True, metavar="KEY=VALUE",
              help="Keep only cases whose KEY equals VALUE (repeatable), e.g. --where causal=true.")
@click.option("--csv", "csv_path", type=click.Path(dir_okay=False, allow_dash=True), default=None,
              help="Also write every column of every case as CSV ('-' for stdout).")
@click.option("--json", "as_json", is_flag=True, help="Print the cases as JSON instead of the table.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), default=None,
              help="Write the standard figure for the cases' content to this PNG/PDF/SVG: recall "
                   "accuracy vs distance per sequence length and causal mode (chance drawn); "
                   "mixer error vs N; mixer time and peak memory vs N (over-budget cases "
                   "marked); attention time, memory, GFLOP/s and error vs N. Log scales where "
                   "values span decades. Needs matplotlib (pip install 'hpcattn[plot]').")
@click.option("--metric", "-m", "metrics", multiple=True, metavar="KEY",
              help="With --plot: draw KEY (any numeric result, e.g. recall_accuracy, rel_err, "
                   "wall_s, peak_alloc_bytes) versus --x instead of the standard figure, one "
                   "panel per KEY (repeatable); per-repeat/per-rank results as median and range.")
@click.option("--x", "x_key", default=None, metavar="KEY",
              help="Horizontal axis of --plot (default: distance for recall, else seq_len).")
@click.option("--series", multiple=True, metavar="KEY",
              help="Keys that tell plot lines apart (repeatable); default: the mixer, then every "
                   "other parameter that varies (except the panels' and seed).")
def analyze(files, group_by, sort_by, where, csv_path, as_json, plot_path, metrics, x_key,
            series):
    """Summarise one or more results files (from 'hpcattn run JOB.toml').

    Prints one row per completed case: the parameters that matter (sequence length, layout or
    mixer, and whatever the sweep varied), time per case (median over repeats, slowest rank),
    GFLOP/s, peak memory per rank (arrays; RSS), the check's max abs error and whether it passed,
    and any other scalar result. Several files are compared in one table (column 'file').
    Errors are one line; exit status 2 for a missing, unreadable or unusable file or option.

    \b
    Examples:
      hpcattn analyze results/quickstart.h5 --plot quickstart.png
      hpcattn analyze results/ring-scaling.h5 --sort-by seq_len --csv ring.csv
      hpcattn analyze a.h5 b.h5 --group-by layout --where causal=true
      hpcattn analyze results/mixers-recall.h5 -w status=ok -g mixer -s seq_len -s distance
      hpcattn analyze results/mixers-recall.h5 --plot recall.png
      hpcattn analyze results/mixers-recall.h5 -w distance=64 --plot r.png -m recall_accuracy
    """
    from .. import analysis as an
    from ..errors import HpcattnError

    # an HpcattnError below is one line, exit 2 (cli.Command)
    if plot_path:
        plot_path = figure_path(plot_path, "--plot")  # what matplotlib writes: out -> out.png
    if metrics and not plot_path:
        raise click.UsageError("--metric chooses what --plot draws; expected --plot FILE too")
    rows = an.load_rows(list(files))
    for line in an.damage_report(rows):  # completed cases whose activation files were lost or changed
        click.echo(f"hpcattn: warning: {line}", err=True)
    _check_keys(rows, group_by=group_by, sort_by=sort_by, where=where)
    rows = _filter(rows, where)
    if not rows:
        raise HpcattnError(f"no completed cases in {', '.join(files)}"
                           + (" match " + " ".join(where) if where else ""))
    an.check_metrics(rows, metrics)   # before the table: a typo costs nothing
    rows = an.sort_rows(rows, list(group_by) + list(sort_by))
    cols = an.columns(rows)
    if as_json:
        click.echo(json.dumps(an.public(rows), indent=1, default=str))
    else:
        click.echo(an.table(rows, cols, group_by=group_by))
    if csv_path:
        text = an.to_csv(rows, an.all_columns(rows))
        if csv_path == "-" and click.get_text_stream("stdout").isatty():
            # the CSV keeps the data exactly; a terminal gets control characters escaped
            text = "\n".join(an.printable(line) for line in text.split("\n"))
        with click.open_file(csv_path, "w") as fh:
            fh.write(text)
    if plot_path:
        drawn = an.plot(rows, plot_path, x=x_key, series=series or None, metrics=metrics,
                        title=", ".join(sorted({r["file"] for r in rows})))
        click.echo(f"figure: {plot_path} ({_panels(drawn)})", err=True)


def _panels(drawn) -> str:
    """'recall_accuracy x6, ...': the panels drawn, counted per metric."""
    counts: dict = {}
    for key in drawn:
        name = key.split(" (")[0]
        counts[name] = counts.get(name, 0) + 1
    return ", ".join(k if n == 1 else f"{k} x{n}" for k, n in counts.items()) or "no data"


def _check_keys(rows, **options) -> None:
    """A --group-by/--sort-by/--where key that no case has is a typo: name it and the known ones."""
    from .. import analysis as an
    from ..errors import HpcattnError

    known = an.all_columns(rows)
    for option, values in options.items():
        for value in values:
            key = value.partition("=")[0] if option == "where" else value
            if key not in known:
                raise HpcattnError(f"--{option.replace('_', '-')} {an.printable(key)!r}: no case has "
                                   f"that key; expected one of {', '.join(known)}")


def _filter(rows, where):
    for cond in where:
        key, sep, want = cond.partition("=")
        if not sep:
            from ..errors import HpcattnError

            raise HpcattnError(f"--where {cond!r} is not KEY=VALUE; expected e.g. layout=zigzag")
        rows = [r for r in rows if key in r and _same(r[key], want)]
    return rows


def _same(val, text: str) -> bool:
    if isinstance(val, bool):
        return text.lower() in (("true", "1", "yes") if val else ("false", "0", "no"))
    if isinstance(val, (int, float)):
        try:
            return float(text) == float(val)
        except ValueError:
            return False
    return str(val) == text
