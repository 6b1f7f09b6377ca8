"""hpcattn.torch across ranks: a tiny model whose sequence is sharded over the ranks, trained with
the ring adapter, has the same loss curve and parameter gradients as the same model with torch's
own scaled_dot_product_attention on one process (every rank computes that reference itself).

Runs under ``mpiexec -n P python -m pytest --with-mpi`` via tests/test_mpi_launch.py.
"""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
MPI = pytest.importorskip("mpi4py.MPI")

import hpcattn.torch as ht  # noqa: E402
from hpcattn import LAYOUTS, shard  # noqa: E402
from test_torch_adapter import TinyModel, sdpa  # noqa: E402

MPI_SIZES = (2, 3)
STEPS = 4


def _curves(model, tokens, targets, comm=None, layout=None):
    """Loss per Adam step and the first step's parameter gradients; sharded when ``comm``."""
    if comm is not None:
        tokens, targets = (torch.from_numpy(shard(t.numpy(), comm, layout)) for t in (tokens, targets))
    total = targets.numel() if comm is None else comm.allreduce(targets.numel())
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    losses, first = [], None
    for _ in range(STEPS):
        opt.zero_grad()
        local = torch.nn.functional.cross_entropy(model(tokens).flatten(0, 1), targets.flatten(),
                                                  reduction="sum") / total
        local.backward()
        loss = local.item()
        if comm is not None:  # data parallel over the sequence: sum the ranks' shares
            loss = comm.allreduce(loss)
            for p in model.parameters():
                p.grad.copy_(torch.from_numpy(comm.allreduce(p.grad.numpy())))
        if first is None:
            first = [p.grad.clone() for p in model.parameters()]
        opt.step()
        losses.append(loss)
    return losses, first


@pytest.mark.mpi
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("kv_pieces", [1, 3])
def test_ring_adapter_trains_like_sdpa_on_one_process(layout, kv_pieces):
    comm = MPI.COMM_WORLD
    gen = torch.Generator().manual_seed(2)
    tokens = torch.randint(0, 11, (2, 61), generator=gen)   # 61: uneven over 2 and 3 ranks
    targets = torch.roll(tokens, 1, dims=1)
    ours, ours_grads = _curves(TinyModel(ht.RingAttention(comm, causal=True, layout=layout,
                                                             kv_pieces=kv_pieces)),
                               tokens, targets, comm, layout)
    ref, ref_grads = _curves(TinyModel(lambda q, k, v: sdpa(q, k, v, True)), tokens, targets)
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-11)
    for a, b in zip(ours_grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-11)
    assert ours[-1] < ours[0]
