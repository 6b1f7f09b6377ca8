"""``hpcattn bench`` plumbing: the quick run prints every table and writes a results file.
No timing is asserted (benchmarks report, they do not pass or fail on speed)."""
import numpy as np
import pytest
from click.testing import CliRunner

from hpcattn.bench import BenchConfig, shard_footprint, vanilla_mha
from hpcattn.cli.bench import bench
from hpcattn.reference import naive_attention


@pytest.mark.timeout(120)
def test_quick_prints_tables_and_writes_results(tmp_path):
    pytest.importorskip("mpi4py")
    h5py = pytest.importorskip("h5py")
    out = tmp_path / "bench.h5"
    res = CliRunner().invoke(bench, ["--quick", "--no-torch", "--output", str(out)])
    assert res.exit_code == 0, res.output
    text = res.output
    for needle in ("machine", "numpy", "threads", "GEMM", "hpcattn blockwise", "vanilla NumPy MHA",
                   "ring attention", "wall/compute", "longest sequence", "ring / vanilla",
                   "forward + backward", "hpcattn forward+backward", "ring forward + backward",
                   "2.5 x forward", "context-parallel strategies", "MiB sent/rank (max) measured"):
        assert needle in text, needle
    assert "torch SDPA forward" not in text and "skipped (--no-torch)" in text
    lines = [ln.split() for ln in text.splitlines() if ln.strip()[:2] in ("1 ", "2 ")]
    assert [ln[0] for ln in lines] == ["1", "2"]          # one ring row per rank count
    ring_bwd = [ln.split() for ln in text.splitlines() if ln.strip().startswith("P=")]
    assert [ln[0] for ln in ring_bwd] == ["P=1", "P=2"]   # one ring forward+backward row per rank count
    with h5py.File(out) as f:
        kinds = sorted(g.attrs["kind"] for g in f["cases"].values())
        assert kinds == ["bench_backward", "bench_maxn", "bench_ring", "bench_serial", "bench_strategies"]
        bwd = f["cases/case_0003/backward"]
        serial = bwd["serial"]
        assert serial["hpcattn_fwd_bwd/median_s"][()] > serial["hpcattn_fwd/median_s"][()] > 0
        assert serial["flops_bwd"][()] == 2.5 * serial["flops_fwd"][()]
        for p in ("1", "2"):
            ring = bwd["ring"][p]
            assert ring["ranks"][()] == int(p) and len(ring["bwd_compute_s"][()]) == int(p)
            assert min(ring["bwd_wall_s"][()]) > 0
        maxn = f["cases/case_0002/maxn"]
        ring = maxn["ring"]
        assert ring["n"][()] == ring["predicted_n"][()] > 0  # a real run at the predicted maximum
        assert ring["peak_array_bytes"][()] <= ring["budget_bytes"][()] * 1.05
        assert ring["max_abs_err"][()] < 1e-5
        for key in ("all_heads", "per_head"):
            van = maxn["vanilla"][key]
            assert van["n"][()] == van["predicted_n"][()] > 0
            assert van["peak_array_bytes"][()] <= maxn["vanilla/budget_bytes"][()] * 1.05
        assert ring["n"][()] > maxn["vanilla/per_head/n"][()]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("at_once", [False, True])
def test_vanilla_baseline_is_exact(causal, at_once):
    rng = np.random.default_rng(0)
    q = rng.standard_normal((2, 33, 4, 8))
    k, v = rng.standard_normal((2, 2, 33, 2, 8))          # GQA: 2 kv heads for 4 query heads
    ref, _ = naive_attention(q, k, v, causal=causal)
    assert np.abs(vanilla_mha(q, k, v, causal=causal, heads_at_once=at_once) - ref).max() < 1e-12


def test_bad_options_are_one_line_errors():
    for args, word in ((["--ranks", "1,x"], "1,x"), (["--ranks", "0"], "0"),
                       (["--parts", "serial,gpu"], "gpu"), (["--quick", "-N", "1", "--ranks", "2"], "--seq-len")):
        res = CliRunner().invoke(bench, args)
        assert res.exit_code == 2 and word in res.output, res.output


def test_shard_footprint_counts_qkv_out_lse_and_two_buffers():
    cfg = BenchConfig(batch=3, heads=2, head_dim=4, dtype="float32")
    n_local = 10
    token_rows = np.empty((3, n_local, 2, 4), dtype=np.float32)     # (B, n, H, d)
    lse = np.empty((3, 2, n_local), dtype=np.float32)               # (B, H, n)
    # q, k, v, out, and two ring buffers that each hold a K and a V block
    held = [token_rows] * 4 + [token_rows] * 2 * 2 + [lse]
    assert shard_footprint(cfg, n_local) == sum(a.nbytes for a in held) == 7920


@pytest.mark.timeout(120)
def test_backward_section_is_skipped_when_not_asked_and_runs_alone():
    pytest.importorskip("mpi4py")
    without = CliRunner().invoke(bench, ["--quick", "--no-torch", "--no-output", "--parts", "serial"])
    assert without.exit_code == 0, without.output
    assert "per-rank attention" in without.output and "backward" not in without.output
    alone = CliRunner().invoke(bench, ["--quick", "--no-output", "--parts", "backward", "--ranks", "2"])
    assert alone.exit_code == 0, alone.output
    text = alone.output
    assert "per-rank attention" not in text and "longest sequence" not in text
    assert "ring attention (" not in text                  # the forward-only ring table is its own part
    assert [ln.split()[0] for ln in text.splitlines() if ln.strip().startswith("P=")] == ["P=2"]
    names = ("hpcattn forward", "hpcattn forward+backward", "hpcattn backward (difference)")
    rows = {name: ln for ln in text.splitlines() for name in names if ln.strip().startswith(name + " ")}
    assert set(rows) == set(names)
    if pytest.importorskip("torch", reason="torch SDPA rows need PyTorch"):
        for name in ("torch SDPA forward", "torch SDPA forward+backward", "torch SDPA backward (difference)"):
            assert any(ln.strip().startswith(name + " ") for ln in text.splitlines()), name
        # hpcattn's rows carry a ratio to torch's: median s, GFLOP/s range, GFLOP/s, vs torch
        assert len(rows["hpcattn forward+backward"].split()) == len(names[1].split()) + 4


def test_interleaved_runs_each_in_turn_after_one_warm_up_round():
    from hpcattn.bench.backward import interleaved

    calls = []
    walls = interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, 3)
    assert calls == ["a", "b"] * 4                         # one untimed round, then 3 timed
    assert {k: len(v) for k, v in walls.items()} == {"a": 3, "b": 3}


def test_interleaved_times_calls_with_the_cyclic_collector_off():
    import gc

    from hpcattn.bench.backward import interleaved

    seen = []
    interleaved({"a": lambda: seen.append(gc.isenabled())}, 2)
    assert seen == [True, False, False]                    # warm-up as is; timed calls: off
    assert gc.isenabled()
    gc.disable()
    try:
        interleaved({"a": lambda: None}, 1)
        assert not gc.isenabled()                          # a caller's setting is kept
    finally:
        gc.enable()


@pytest.mark.timeout(120)
def test_serial_part_shows_kernels_cores_half_and_decode_lines(monkeypatch):
    """The serial table names the kernel hpcattn chose beside both kernels, and prints the
    1-core vs C-core figure (or why not), the bfloat16 line (or its reason), decode shapes,
    whether outs were reused there and the GEMM rate timed with them."""
    monkeypatch.delenv("HPCATTN_REUSE_OUT", raising=False)
    res = CliRunner().invoke(bench, ["--quick", "--parts", "serial", "--no-output", "-N", "256"])
    assert res.exit_code == 0, res.output
    text = res.output
    for needle in ("hpcattn attention [", "hpcattn blockwise (numpy-blockwise kernel)",
                   "one process on 1 core vs", "bfloat16", "decode-like shapes", "4,096 x 16",
                   "16 x 4,096", "64 x 4,096", "reuse the last one freed: on (HPCATTN_REUSE_OUT=1)",
                   "timed with these rows: "):
        assert needle in text, needle
