"""``check.sampled_backward_check``: sampled rows of dq and sampled key rows of dk/dv against
float64, at any N, agree with the naive float64 reference and catch a wrong gradient.

Runs serially (1 rank) and under ``mpiexec -n P python -m pytest --with-mpi`` (see MPI_SIZES).
"""
import numpy as np
import pytest

from hpcattn import LAYOUTS, Distribution, ring_attention, ring_attention_backward, shard
from hpcattn.check import sampled_backward_check
from hpcattn.inputs import random_qkv, random_rows
from hpcattn.reference import naive_attention_backward

MPI_SIZES = (2, 3)

MPI = pytest.importorskip("mpi4py.MPI")

GRADS = ("dq", "dk", "dv")


def global_inputs(n, b=2, h=4, hkv=2, d=8, dtype="float64"):
    """q, k, v, dout: the deterministic rows of ``hpcattn.inputs`` (what ``--check`` runs on)."""
    pos = np.arange(n)
    return (*random_qkv(3, pos, b, h, hkv, d, dtype), random_rows(4, "q", pos, b, h, d, dtype))


def forward_shards(n, layout, causal, dtype="float64", **shape):
    """This rank's shards of q, k, v, dout and the ring forward's out, lse."""
    comm = MPI.COMM_WORLD
    q, k, v, dout = global_inputs(n, dtype=dtype, **shape)
    local = [shard(x, comm, layout) for x in (q, k, v, dout)]
    out, lse = ring_attention(*local[:3], comm, causal=causal, layout=layout)
    return (q, k, v, dout), dict(zip(("q", "k", "v", "dout"), local), out=out, lse=lse)


def check(arrays, grads, layout, causal, rows):
    comm = MPI.COMM_WORLD
    n = comm.allreduce(arrays["q"].shape[1])
    res = sampled_backward_check(arrays["q"], arrays["k"], arrays["v"], arrays["out"], arrays["lse"],
                                 arrays["dout"], *grads, comm, dist=Distribution(n, comm.size, layout),
                                 causal=causal, rows=rows)
    assert comm.allgather(res) == [res] * comm.size          # the same answer on every rank
    return res


def reference_shards(glob, layout, causal):
    """The naive float64 reference gradients, sharded: what a correct ring returns."""
    ref = naive_attention_backward(*glob, causal=causal)
    return [shard(g, MPI.COMM_WORLD, layout) for g in ref]


@pytest.mark.mpi
@pytest.mark.timeout(120)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("n, h, hkv", [(37, 4, 2), (64, 6, 1)])
def test_exact_gradients_pass_and_the_ring_agrees(layout, causal, n, h, hkv):
    glob, arrays = forward_shards(n, layout, causal, h=h, hkv=hkv)
    for rows in (n, 9):                                      # every row, and a sample
        res = check(arrays, reference_shards(glob, layout, causal), layout, causal, rows)
        assert res["rows"] == min(rows, n)
        assert max(res[f"max_{g}_rel_err"] for g in GRADS) < 1e-12, res
        ring = ring_attention_backward(*(arrays[x] for x in ("q", "k", "v", "out", "lse", "dout")),
                                       MPI.COMM_WORLD, causal=causal, layout=layout)
        res = check(arrays, ring, layout, causal, rows)
        assert max(res[f"max_{g}_rel_err"] for g in GRADS) < 1e-12, res


@pytest.mark.mpi
@pytest.mark.timeout(120)
@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
@pytest.mark.parametrize("which", [0, 1, 2])
def test_a_corrupted_gradient_row_is_detected(layout, which):
    """One entry of dq, dk or dv off by 1e-3 on the last rank: the check (every row sampled)
    reports that error for that gradient and nothing for the others."""
    comm = MPI.COMM_WORLD
    n = 29
    glob, arrays = forward_shards(n, layout, True)
    grads = reference_shards(glob, layout, True)
    if comm.rank == comm.size - 1:
        grads[which] = grads[which].copy()
        grads[which][1, -1, 0, 3] += 1e-3
    res = check(arrays, grads, layout, True, n)
    assert res[f"max_{GRADS[which]}_err"] == pytest.approx(1e-3, rel=1e-6)
    assert all(res[f"max_{g}_err"] < 1e-12 for g in GRADS if g != GRADS[which]), res


@pytest.mark.mpi
@pytest.mark.timeout(120)
@pytest.mark.parametrize("which", [0, 1, 2])
def test_a_gradient_wrong_everywhere_is_detected_by_a_few_rows(which):
    n = 200
    glob, arrays = forward_shards(n, "zigzag", False)
    grads = reference_shards(glob, "zigzag", False)
    grads[which] = grads[which] * (1 + 1e-4)
    res = check(arrays, grads, "zigzag", False, 8)
    assert 1e-5 < res[f"max_{GRADS[which]}_rel_err"] <= 1e-4 * (1 + 1e-9), res


@pytest.mark.mpi
@pytest.mark.timeout(120)
def test_float32_ring_passes_the_float32_tolerance():
    """The float32 ring backward at a longer N, checked on a sample (what ``--check`` runs)."""
    comm = MPI.COMM_WORLD
    _, arrays = forward_shards(1536, "zigzag", True, "float32", b=1, h=4, hkv=2, d=32)
    grads = ring_attention_backward(*(arrays[x] for x in ("q", "k", "v", "out", "lse", "dout")), comm,
                                    causal=True, layout="zigzag")
    res = check(arrays, grads, "zigzag", True, 16)
    assert res["rows"] == 16
    assert max(res[f"max_{g}_err"] for g in GRADS) <= 1e-5, res
