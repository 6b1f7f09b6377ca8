"""``hpcattn mixers``: list the token-mixer zoo, look at a mixing matrix, run the recall probe."""
from __future__ import annotations

import json

import click
import numpy as np

from . import Group, figure_path

SHADES = " .:-=+*#%@"


def _mixer_or_fail(name, params):
    from ..errors import HpcattnError
    from ..mixers import get_mixer

    try:
        return get_mixer(name, **params)
    except HpcattnError as exc:
        raise click.BadParameter(str(exc)) from None


def _parse_params(values) -> dict:
    """``-p window=16 -p rotary=false`` -> {"window": 16, "rotary": False} (TOML-like literals)."""
    out = {}
    for item in values:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{item!r} is not KEY=VALUE; expected e.g. -p window=16", param_hint="--param")
        try:
            out[key.strip()] = json.loads(raw.strip().lower() if raw.strip().lower() in ("true", "false") else raw)
        except json.JSONDecodeError:
            out[key.strip()] = raw.strip()
    return out


@click.group(cls=Group)
def mixers():
    """The token-mixer zoo: every mixer is y_i = sum_j P_ij v_j with its own P.

    \b
    Examples:
      hpcattn mixers list
      hpcattn mixers show local --seq-len 64 -p window=8 --causal
      hpcattn mixers show performer --seq-len 128 --png performer.png
      hpcattn mixers recall -N 256 -N 1024 --distance 1 --distance 64 --mixer local
    """


@mixers.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print the descriptions as JSON.")
def list_mixers(as_json):
    """Every mixer with its complexity, parameters (defaults) and capabilities."""
    from ..mixers import REGISTRY

    descs = [cls.describe() for cls in REGISTRY.values()]
    if as_json:
        click.echo(json.dumps(descs, indent=2))
        return
    for d in descs:
        causal = "/".join("causal" if m else "non-causal" for m in d["causal_modes"])
        flags = [causal, {"qkv": "uses q,k,v", "qv": "shared QK (q,v)", "v": "P from parameters (v only)"}[d["inputs"]],
                 "exact" if d["exact"] else "approximate"]
        click.echo(f"{d['name']:<16} time {d['time']:<36} memory {d['memory']}")
        click.echo(f"{'':<16} {d['summary']}")
        click.echo(f"{'':<16} {'; '.join(flags)}; forms: {', '.join(d['forms'])}")
        if d["params"]:
            click.echo(f"{'':<16} params: " + ", ".join(f"{k}={v['default']!r}" for k, v in d["params"].items()))
        click.echo(f"{'':<16} {d['reference']}")


@mixers.command()
@click.argument("name")
@click.option("--seq-len", "-N", default=64, show_default=True, type=click.IntRange(1, 4096))
@click.option("--causal/--no-causal", default=None, help="Default: causal when the mixer supports it.")
@click.option("--param", "-p", "params", multiple=True, metavar="KEY=VALUE", help="Mixer parameter (repeatable).")
@click.option("--head-dim", "-d", default=16, show_default=True, type=click.IntRange(1))
@click.option("--seed", default=0, show_default=True, type=click.IntRange(0), help="Seed of the random q/k.")
@click.option("--png", type=click.Path(dir_okay=False), default=None, help="Write a heat map of |P| (needs matplotlib).")
def show(name, seq_len, causal, params, head_dim, seed, png):
    """Build the mixing matrix P of NAME for random inputs and show it (text or --png)."""
    from ..inputs import random_qkv

    png = figure_path(png, "--png") if png else None  # matplotlib adds .png to a bare name
    mixer = _mixer_or_fail(name, _parse_params(params))
    causal = max(mixer.causal_modes) if causal is None else causal
    if causal not in mixer.causal_modes:
        raise click.BadParameter(f"{name} has no causal={str(causal).lower()} form", param_hint="--causal")
    q, k, _ = random_qkv(seed, np.arange(seq_len), 1, 1, 1, head_dim, "float64")
    p = np.abs(np.asarray(mixer.matrix(q, k, causal=causal))[0, 0])
    nonzero = float((p > 1e-12 * p.max()).mean()) if p.max() > 0 else 0.0
    click.echo(f"{name} ({mixer!r}) causal={str(causal).lower()} N={seq_len}: |P| max {p.max():.3g}, "
               f"row sums {np.asarray(mixer.matrix(q, k, causal=causal))[0, 0].real.sum(-1).mean():.3g} (mean), "
               f"{nonzero:.1%} of entries nonzero")
    if png:
        _heatmap(p, png, f"{name}: |P| (N={seq_len}, causal={str(causal).lower()})")
        click.echo(f"wrote {png}")
    else:
        click.echo(_text_heatmap(p))


def _text_heatmap(p, size=48) -> str:
    """Coarse character picture of |P| (block maxima, square-root shading)."""
    n = p.shape[0]
    step = max(1, -(-n // size))
    m = -(-n // step)
    pad = np.zeros((m * step, m * step))
    pad[:n, :n] = p
    blocks = pad.reshape(m, step, m, step).max(axis=(1, 3))
    scaled = np.sqrt(blocks / blocks.max()) if blocks.max() > 0 else blocks
    idx = np.minimum((scaled * (len(SHADES) - 1)).round().astype(int), len(SHADES) - 1)
    return "\n".join("".join(SHADES[i] * 2 for i in row) for row in idx)


def _heatmap(p, path, title):
    try:
        import matplotlib
    except ImportError:
        raise click.UsageError("--png needs matplotlib, which is not installed; expected "
                               "pip install 'hpcattn[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 5))
    im = ax.imshow(p, cmap="viridis", interpolation="nearest")
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("key j")
    ax.set_ylabel("query i")
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


@mixers.command()
@click.option("--mixer", "names", multiple=True, help="Mixers (repeatable; default: all).")
@click.option("--seq-len", "-N", "lengths", multiple=True, type=click.IntRange(2), default=(256, 1024),
              show_default=True, help="Context lengths (repeatable).")
@click.option("--distance", "distances", multiple=True, type=click.IntRange(1), help="Key-query distances (repeatable).",
              default=(1, 16, 64, 200, 1000), show_default=True)
@click.option("--batch", default=2, show_default=True, type=click.IntRange(1), help="Sequences per cell.")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(0))
@click.option("--param", "-p", "params", multiple=True, metavar="MIXER.KEY=VALUE",
              help="Mixer parameter, e.g. -p local.window=32 (repeatable).")
def recall(names, lengths, distances, batch, seed, params):
    """Associative-recall accuracy versus context length and distance (chance = 1/16)."""
    from ..mixers import mixer_names
    from ..mixers.recall import recall_table

    names = list(names) or mixer_names()
    per_mixer: dict = {}
    for key, val in _parse_params(params).items():
        mixer, sep, pkey = key.partition(".")
        if not sep:
            raise click.BadParameter(f"{key!r} has no mixer; expected MIXER.KEY=VALUE", param_hint="--param")
        per_mixer.setdefault(mixer, {})[pkey] = val
    for name in set(names) | set(per_mixer):
        _mixer_or_fail(name, per_mixer.get(name, {}))
    rows = recall_table(names, lengths, distances, params=per_mixer, batch=batch, seed=seed,
                        dtype="float32")
    click.echo(f"{'mixer':<16} {'causal':<6} {'N':>6}  " + " ".join(f"d={d:<5}" for d in distances))
    cells: dict = {}
    for r in rows:
        cells.setdefault((r["mixer"], r["causal"], r["seq_len"]), {})[r["distance"]] = r["recall_accuracy"]
    for (name, causal, n), accs in cells.items():
        vals = " ".join(f"{accs[d]:<7.2f}" if accs[d] == accs[d] else f"{'-':<7}" for d in distances)
        click.echo(f"{name:<16} {str(causal).lower():<6} {n:>6}  {vals}")
