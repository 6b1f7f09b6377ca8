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
                   "ring attention", "wall/compute", "longest sequence", "ring / vanilla"):
        assert needle in text, needle
    lines = [ln.split() for ln in text.splitlines() if ln.strip()[:2] in ("1 ", "2 ")]
    assert [ln[0] for ln in lines] == ["1", "2"]          # one ring row per rank count
    with h5py.File(out) as f:
        kinds = sorted(g.attrs["kind"] for g in f["cases"].values())
        assert kinds == ["bench_maxn", "bench_ring", "bench_serial"]
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
