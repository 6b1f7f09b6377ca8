"""Synthetic sequence tasks whose dependency range is controlled, as NumPy batches.

Every task gives ``batch(rng, size) -> (tokens (size, C) int64, targets (size, C) int64)``
with target -1 where no answer is asked (the loss and accuracy skip those), plus ``vocab`` (the
embedding size), ``chance`` (accuracy of a uniform guess) and ``ceiling`` (the best accuracy any
model can reach from the C tokens it sees).

- ``mqar``: Zoology's multi-query associative recall. ``pairs`` key-value pairs (keys from the
  first half of the vocabulary, values from the second, distinct keys) open the sequence; query
  keys, each followed by the answer position, are scattered in the rest over noise token 0. The
  answer is the value that followed the key. Chance = 2 / vocab; ceiling 1.
- ``context``: one value token (``vocab`` values) sits D tokens before the last position, D
  uniform on 1..seq_len-1, among noise tokens (their own 8 symbols); the last token asks for it.
  The model sees the last ``context`` = C tokens, so the value is in view when D <= C - 1 and
  the ceiling at C is P(D <= C-1) + (1 - P(D <= C-1)) / values, chance 1 / values.
- ``local``: y_t = (x_t + x_{t-1}) mod values at every position t >= 1: only two tokens matter,
  the ceiling is 1 at every C and longer context cannot help.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from ..errors import HpcattnError

TASKS = ("mqar", "context", "local")


@dataclasses.dataclass(frozen=True)
class MQAR:
    seq_len: int
    vocab: int
    pairs: int

    def __post_init__(self):
        if self.vocab < 4 or self.vocab % 2:
            raise HpcattnError(f"mqar vocab={self.vocab} is invalid; expected an even number >= 4")
        if self.pairs > self.vocab // 2 - 1:
            raise HpcattnError(f"mqar pairs={self.pairs} needs more keys than vocab={self.vocab} "
                               f"has ({self.vocab // 2 - 1}); expected pairs <= vocab/2 - 1")
        if 4 * self.pairs > self.seq_len:
            raise HpcattnError(f"mqar pairs={self.pairs} does not fit seq_len={self.seq_len}; "
                               "expected seq_len >= 4 * pairs (pairs, then a query and answer each)")

    @property
    def chance(self):
        return 2.0 / self.vocab

    ceiling = 1.0

    def batch(self, rng, size):
        half, n, p = self.vocab // 2, self.seq_len, self.pairs
        tokens = np.zeros((size, n), dtype=np.int64)
        targets = np.full((size, n), -1, dtype=np.int64)
        free = np.arange(2 * p, n - 1)                  # query slots: a key and its answer slot
        for row in range(size):
            keys = rng.choice(np.arange(1, half), p, replace=False)
            vals = rng.integers(half, self.vocab, p)
            tokens[row, 0:2 * p:2], tokens[row, 1:2 * p:2] = keys, vals
            slots = np.sort(rng.choice(free[(free - 2 * p) % 2 == 0], p, replace=False))
            order = rng.permutation(p)
            tokens[row, slots] = keys[order]
            targets[row, slots] = vals[order]           # predicted at the key: the next token
        return tokens, targets


@dataclasses.dataclass(frozen=True)
class Context:
    seq_len: int
    context: int
    values: int
    noise: int = 8

    QUERY = 0

    def __post_init__(self):
        if not 2 <= self.context <= self.seq_len:
            raise HpcattnError(f"context task context={self.context} is invalid; expected "
                               f"2 <= context <= seq_len={self.seq_len}")
        if self.values < 2:
            raise HpcattnError(f"context task vocab={self.values} is invalid; expected >= 2 values")

    @property
    def vocab(self):
        return 1 + self.values + self.noise

    @property
    def chance(self):
        return 1.0 / self.values

    @property
    def ceiling(self):
        seen = (self.context - 1) / (self.seq_len - 1)  # D in 1..C-1 of 1..N-1: the value is seen
        return seen + (1 - seen) / self.values

    def batch(self, rng, size):
        n, c = self.seq_len, self.context
        tokens = rng.integers(1 + self.values, self.vocab, (size, n))      # noise
        dist = rng.integers(1, n, size)
        rows = np.arange(size)
        answer = rng.integers(0, self.values, size)
        tokens[rows, n - 1 - dist] = 1 + answer
        tokens[:, -1] = self.QUERY
        targets = np.full((size, c), -1, dtype=np.int64)
        targets[:, -1] = answer
        return tokens[:, n - c:].astype(np.int64), targets


@dataclasses.dataclass(frozen=True)
class Local:
    seq_len: int
    values: int

    @property
    def vocab(self):
        return self.values

    @property
    def chance(self):
        return 1.0 / self.values

    ceiling = 1.0

    def batch(self, rng, size):
        tokens = rng.integers(0, self.values, (size, self.seq_len))
        targets = np.full_like(tokens, -1)
        targets[:, 1:] = (tokens[:, 1:] + tokens[:, :-1]) % self.values
        return tokens, targets


def make_task(case: dict):
    """The task of a training case (keys as in ``hpcattn.train.job``)."""
    name, n = case["task"], case["seq_len"]
    if name == "mqar":
        return MQAR(n, case["vocab"], case["pairs"])
    if name == "context":
        return Context(n, case["context"] or n, case["vocab"])
    if name == "local":
        return Local(case["context"] or n, case["vocab"])
    raise HpcattnError(f"training task {name!r} is unknown; expected one of {', '.join(TASKS)}")
