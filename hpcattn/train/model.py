"""The trained model: token embedding + learned absolute positions, ``layers`` blocks of
[pre-norm mixer + pre-norm MLP] with residuals, a final norm and a linear readout.

The mixer is a registry mixer run by its own ``_apply`` on torch tensors (the trainable mixers
are written once against an array namespace, ``hpcattn/mixers/portable.py``): its learned
weights become ``torch.nn.Parameter``s bound into it, and autograd differentiates the same code
the NumPy tests check against the explicit P. ``exact`` runs ``hpcattn.torch.attention``:
hpcattn's blockwise forward and its own backward (no N x N matrix, forward or backward).
"""
from __future__ import annotations

import numpy as np
import torch

from .. import torch as hpcattn_torch
from ..errors import HpcattnError
from ..mixers import REGISTRY, get_mixer
from . import EXACT, trainable_mixers


def make_mixer(name: str, params: dict, seq_len: int, seed: int):
    """The registry mixer ``name`` with ``params``; position-indexed weights sized to ``seq_len``."""
    if name not in trainable_mixers():
        raise HpcattnError(f"mixer {name!r} has no training form; expected one of "
                           f"{', '.join(trainable_mixers())}")
    if name == EXACT:
        return None
    cls = REGISTRY[name]
    extra = {"max_len": seq_len} if "max_len" in cls.params else {}
    return get_mixer(name, **params, **extra, seed=seed)


class MixerLayer(torch.nn.Module):
    """Projections to heads, the mixer (causal), the output projection."""

    def __init__(self, name, params, width, heads, seq_len, seed):
        super().__init__()
        if width % heads:
            raise HpcattnError(f"width={width} is not a multiple of heads={heads}; expected "
                               "width = heads * head_dim")
        self.heads, self.head_dim = heads, width // heads
        self.mixer = make_mixer(name, params, seq_len, seed)
        self.projected = {"qkv": 3, "qv": 2, "v": 1}[self.mixer.inputs] if self.mixer else 3
        self.proj = torch.nn.Linear(width, self.projected * width)
        self.out = torch.nn.Linear(width, width)
        self.weights = torch.nn.ParameterDict()
        if self.mixer is not None:
            init = self.mixer.initial_weights(heads, self.head_dim, seq_len)
            for key, val in init.items():
                self.weights[key] = torch.nn.Parameter(torch.as_tensor(np.asarray(val, dtype=np.float64),
                                                                       dtype=torch.get_default_dtype()))

    def forward(self, x):
        b, n, _ = x.shape
        parts = self.proj(x).view(b, n, self.projected, self.heads, self.head_dim).unbind(2)
        v = parts[-1]
        q = parts[0] if self.projected > 1 else v
        k = parts[1] if self.projected == 3 else q
        if self.mixer is None:
            y = hpcattn_torch.attention(q.contiguous(), k.contiguous(), v.contiguous(), causal=True)
        else:
            self.mixer.bind(dict(self.weights))
            heads_major = [t.transpose(1, 2) for t in (q, k, v)]
            y = self.mixer._apply(torch, *heads_major, True).transpose(1, 2)
        return self.out(y.reshape(b, n, -1))


class Block(torch.nn.Module):
    def __init__(self, name, params, width, heads, seq_len, seed):
        super().__init__()
        self.norm1, self.norm2 = torch.nn.LayerNorm(width), torch.nn.LayerNorm(width)
        self.mix = MixerLayer(name, params, width, heads, seq_len, seed)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(width, 2 * width), torch.nn.GELU(),
                                       torch.nn.Linear(2 * width, width))

    def forward(self, x):
        x = x + self.mix(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class Model(torch.nn.Module):
    def __init__(self, mixer, params, *, vocab, seq_len, width, heads, layers, seed):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, width)
        self.position = torch.nn.Parameter(0.02 * torch.randn(seq_len, width))
        self.blocks = torch.nn.ModuleList(Block(mixer, params, width, heads, seq_len, seed + i)
                                          for i in range(layers))
        self.norm = torch.nn.LayerNorm(width)
        self.readout = torch.nn.Linear(width, vocab)

    def forward(self, tokens):
        x = self.embed(tokens) + self.position[:tokens.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.readout(self.norm(x))


def loss_and_accuracy(logits, targets):
    """Cross-entropy and accuracy over the positions with an answer (target >= 0)."""
    asked = targets >= 0
    chosen, wanted = logits[asked], targets[asked]
    loss = torch.nn.functional.cross_entropy(chosen, wanted)
    return loss, (chosen.argmax(-1) == wanted).double().mean()
