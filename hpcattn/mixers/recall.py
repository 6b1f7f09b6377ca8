"""Associative-recall probe: can a mixer fetch the value stored ``distance`` positions back?

No training: the projections are the identity. Every position j holds a token with a random unit
key e_j (per head) and a value v_j = E[c_j], one of ``values`` orthonormal codewords chosen at
random. A *query* token at position i repeats the key of the token at i - distance and carries
no value (v_i = 0); its query vector is q_i = sharpness * sqrt(d) * e_(i-distance), so under the
usual 1/sqrt(d) scale the matching key scores ``sharpness`` and a random key about
sharpness * N(0, 1/d). Every token's own query is its key times the same factor, so shared-QK
mixers (Reformer) see the same keys. The mixer's output at a query, decoded as the nearest
codeword (argmax of y . E_c), is correct when it is c_(i-distance). Chance is 1/values.

Exact softmax attention recalls at every distance (its weight splits between the target and the
query token itself, whose value is zero); a sliding window cannot see beyond its width; mixers
whose P ignores q/k (FNet, S4D) cannot do content-based lookup at all; low-rank, kernelised and
hashed mixers blur the lookup more as N grows. One call = one distance; queries are spread over
the sequence, at most N/8 of it, and never overlap their targets.
"""
from __future__ import annotations

import numpy as np

from ..errors import HpcattnError

DEFAULTS = {"queries": 32, "values": 16, "sharpness": 20.0}


def codebook(rng, heads, values, d):
    """(heads, values, d) unit codewords, orthonormal when values <= d."""
    g = rng.standard_normal((heads, d, max(values, 1)))
    if values <= d:
        return np.linalg.qr(g)[0].swapaxes(-1, -2)[:, :values]
    return (g / np.linalg.norm(g, axis=1, keepdims=True)).swapaxes(-1, -2)


def place_queries(rng, n, distance, wanted):
    """Query positions i (sorted) with targets i - distance, no position used twice."""
    used = np.zeros(n, dtype=bool)
    picked = []
    for i in rng.permutation(np.arange(distance, n)):
        if len(picked) == wanted:
            break
        if not used[i] and not used[i - distance]:
            used[i] = used[i - distance] = True
            picked.append(int(i))
    return np.sort(np.array(picked, dtype=np.int64))


def recall_inputs(seq_len, distance, *, batch=1, heads=1, head_dim=64, queries=32, values=16,
                  sharpness=20.0, seed=0, dtype="float64"):
    """(q, k, v, positions (batch, Q), targets (batch, Q, heads), codebook (heads, values, d))."""
    if not 1 <= distance < seq_len:
        raise HpcattnError(f"recall distance {distance} does not fit in seq_len {seq_len}; "
                           "expected 1 <= distance < seq_len")
    rng = np.random.default_rng([int(seed), int(seq_len), int(distance)])
    d = head_dim
    book = codebook(rng, heads, values, d)
    keys = rng.standard_normal((batch, seq_len, heads, d))
    keys /= np.linalg.norm(keys, axis=-1, keepdims=True)
    cls = rng.integers(0, values, size=(batch, seq_len, heads))
    v = book[np.arange(heads)[None, None], cls]                               # (b, n, h, d)
    wanted = max(1, min(queries, seq_len // 8))
    pos = np.stack([place_queries(rng, seq_len, distance, wanted) for _ in range(batch)])
    if pos.shape[1] == 0:
        raise HpcattnError(f"no query fits at distance {distance} in seq_len {seq_len}")
    rows = np.arange(batch)[:, None]
    keys[rows, pos] = keys[rows, pos - distance]
    v[rows, pos] = 0.0
    targets = cls[rows, pos - distance]                                       # (b, Q, h)
    q = keys * (sharpness * np.sqrt(d))
    return (q.astype(dtype), keys.astype(dtype), v.astype(dtype), pos, targets, book)


def recall_accuracy(mixer, seq_len, distance, *, causal=False, batch=1, heads=1, head_dim=64,
                    queries=32, values=16, sharpness=20.0, seed=0, dtype="float64") -> dict:
    """Fraction of queries whose decoded output is the right value, and what chance would give."""
    q, k, v, pos, targets, book = recall_inputs(
        seq_len, distance, batch=batch, heads=heads, head_dim=head_dim, queries=queries,
        values=values, sharpness=sharpness, seed=seed, dtype=dtype)
    y = np.asarray(mixer.apply(q, k, v, causal=causal), dtype=np.float64)
    out = y[np.arange(batch)[:, None], pos]                                   # (b, Q, h, d)
    guess = np.einsum("bqhd,hcd->bqhc", out, book).argmax(axis=-1)
    return {"recall_accuracy": float((guess == targets).mean()), "chance": 1.0 / values,
            "queries": int(targets.size)}


def recall_table(names, lengths, distances, *, params=None, causal=None, **probe) -> list[dict]:
    """Rows (mixer, seq_len, distance, accuracy) for a quick look; ``causal=None`` picks causal
    where the mixer supports it."""
    from . import get_mixer

    rows = []
    for name in names:
        mixer = get_mixer(name, **(params or {}).get(name, {}))
        mode = causal if causal is not None else max(mixer.causal_modes)
        if mode not in mixer.causal_modes:
            continue
        for n in lengths:
            for dist in distances:
                acc = (recall_accuracy(mixer, n, dist, causal=mode, **probe)["recall_accuracy"]
                       if dist < n else float("nan"))
                rows.append({"mixer": name, "causal": mode, "seq_len": n, "distance": dist,
                             "recall_accuracy": acc})
    return rows
