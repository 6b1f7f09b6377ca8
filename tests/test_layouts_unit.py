"""Layouts are pure functions: check every small case exhaustively, and shard exactly."""
import numpy as np
import pytest

from hpcattn import layouts
from hpcattn.layouts import LAYOUTS, blockdist, global_order, local_count, owner, positions


class FakeComm:
    """Enough of a communicator for ``shard`` (which moves no data)."""

    def __init__(self, size, rank):
        self.size, self.rank = size, rank


def hash_fill(b, n, h, d):
    """Every element encodes (batch, position, head, dim): a wrong re-layout cannot hide."""
    bb, nn, hh, dd = np.meshgrid(np.arange(b), np.arange(n), np.arange(h), np.arange(d), indexing="ij")
    return (((bb * 1_000_003 + nn) * 1009 + hh) * 101 + dd).astype(np.int64)


@pytest.mark.parametrize("size", range(1, 8))
def test_blockdist_partitions(size):
    for n in range(0, 50):
        parts = [blockdist(n, size, r) for r in range(size)]
        assert sum(c for c, _ in parts) == n
        starts = [s for _, s in parts]
        assert starts[0] == 0 and all(s + c == nxt for (c, s), nxt in zip(parts, starts[1:] + [n]))
        assert max(c for c, _ in parts) - min(c for c, _ in parts) <= 1


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("size", range(1, 8))
def test_positions_partition_and_owner_inverts(layout, size):
    for n in range(size, 70):
        order = global_order(n, size, layout)
        assert np.array_equal(np.sort(order), np.arange(n)), (n, size)
        rank, local = owner(n, size, layout, np.arange(n))
        for r in range(size):
            p = positions(n, size, r, layout)
            assert len(p) == local_count(n, size, r, layout) >= 1
            assert np.all(np.diff(p) > 0)            # increasing within a rank
            assert np.all(rank[p] == r)
            assert np.array_equal(local[p], np.arange(len(p)))


def test_zigzag_pairs_early_and_late_blocks():
    # 16 positions on 4 ranks: 8 blocks of 2; rank r holds blocks r and 7-r
    assert positions(16, 4, 0, "zigzag").tolist() == [0, 1, 14, 15]
    assert positions(16, 4, 3, "zigzag").tolist() == [6, 7, 8, 9]
    assert positions(10, 4, 1, "striped").tolist() == [1, 5, 9]
    assert positions(10, 4, 3, "contiguous").tolist() == [8, 9]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("size", [1, 2, 3, 4])
@pytest.mark.parametrize("axis", [1, 2])
def test_shard_takes_exactly_the_layout_rows(layout, size, axis):
    x = hash_fill(2, 23, 3, 4)
    x = np.moveaxis(x, 1, axis)
    pieces = []
    for r in range(size):
        local = layouts.shard(x, FakeComm(size, r), layout, axis=axis)
        expect = np.take(x, positions(23, size, r, layout), axis=axis)
        assert np.array_equal(local, expect)
        pieces.append(local)
    glued = np.concatenate(pieces, axis=axis)
    restored = np.empty_like(glued)
    idx = [slice(None)] * x.ndim
    idx[axis] = global_order(23, size, layout)
    restored[tuple(idx)] = glued
    assert np.array_equal(restored, x)


def test_bad_layout_and_short_sequence_are_one_line_errors():
    with pytest.raises(ValueError, match="layout 'diagonal' is unknown; expected one of contiguous"):
        positions(10, 2, 0, "diagonal")
    with pytest.raises(ValueError, match="N=3 is smaller than the number of ranks P=4"):
        layouts.shard(np.zeros((1, 3, 1, 1)), FakeComm(4, 0), "zigzag")


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("size", range(1, 6))
def test_distribution_holds_what_the_pure_functions_compute(layout, size):
    for n in range(size, 40):
        dist = layouts.Distribution(n, size, layout)
        assert dist.counts == tuple(local_count(n, size, r, layout) for r in range(size))
        for r in range(size):
            assert dist.count(r) == dist.counts[r]
            assert np.array_equal(dist.positions(r), positions(n, size, r, layout))
            assert np.array_equal(np.concatenate([np.arange(n)[s] for s in dist.slices(r)]),
                                  dist.positions(r))
        assert np.array_equal(dist.global_order, global_order(n, size, layout))
        rank, local = dist.owner(np.arange(n))
        for r in range(size):
            assert np.all(rank[dist.positions(r)] == r)
            assert np.array_equal(local[dist.positions(r)], np.arange(dist.count(r)))
        assert dist.mismatch(dist.counts) is None


def test_distribution_is_an_immutable_value():
    import dataclasses

    dist = layouts.Distribution(10, 3, "zigzag")
    assert dist == layouts.Distribution(10, 3, "zigzag") != layouts.Distribution(10, 3, "striped")
    assert len({dist, layouts.Distribution(10, 3, "zigzag")}) == 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        dist.n = 11
    with pytest.raises(ValueError):
        dist.positions(1)[0] = 5           # shared by every caller: read-only
    assert dist.counts == (3, 3, 4) and dist.positions(1).tolist() == [2, 3, 8]
    assert dist.mismatch([3, 4, 3]) == ("ranks hold [3, 4, 3] positions but layout 'zigzag' with "
                                        "N=10 on P=3 ranks assigns [3, 3, 4]")


def test_distribution_refuses_an_unknown_layout_and_no_ranks():
    with pytest.raises(ValueError, match="layout 'spiral' is unknown; expected one of contiguous"):
        layouts.Distribution(10, 2, "spiral")
    with pytest.raises(ValueError, match="size=0 ranks"):
        layouts.Distribution(10, 0)
