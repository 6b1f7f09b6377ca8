"""Training: every trainable mixer's gradient against finite differences (float64, tiny shapes),
the same code on NumPy and torch, a tiny run that provably learns and is deterministic, train
job files checked before anything runs, and resume. Skipped without PyTorch (the train extra)."""
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="training needs PyTorch: pip install 'hpcattn[train]'")

from mpi4py import MPI  # noqa: E402

from hpcattn import results, runner  # noqa: E402
from hpcattn.jobs import JobFileError, load_job  # noqa: E402
from hpcattn.train import EXACT, trainable_mixers  # noqa: E402
from hpcattn.train.job import check_train_case, run_train_case  # noqa: E402
from hpcattn.train.tasks import make_task  # noqa: E402

from jobfiles import write_job  # noqa: E402

# small enough to chunk 7 tokens into 3s and keep gradcheck to milliseconds
SMALL = {"mamba": {"chunk": 3}, "gla": {"chunk": 3}, "deltanet": {"chunk": 3},
         "hyena": {"features": 4, "hidden": 4}, "synth_dense": {"hidden": 4}}
B, N, H, D = 1, 7, 2, 3


def _inputs(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, N, D, dtype=torch.float64, generator=gen, requires_grad=True)
            for _ in range(3)]


@pytest.mark.parametrize("name", [m for m in trainable_mixers() if m != EXACT])
def test_gradients_match_finite_differences_and_numpy(name):
    from hpcattn.train.model import make_mixer

    mixer = make_mixer(name, SMALL.get(name, {}), N, seed=1)
    init = mixer.initial_weights(H, D, N)
    names = sorted(init)
    weights = [torch.tensor(init[k], dtype=torch.float64, requires_grad=True) for k in names]
    q, k, v = _inputs()

    def forward(q, k, v, *w):
        mixer.bind(dict(zip(names, w)))
        return mixer._apply(torch, q, k, v, True)

    # torch's FFT backward costs ~0.1 s a call on CPU: the FFT mixers get gradcheck's fast mode
    # (the finite difference along random directions), the others the full Jacobian
    fast = name in ("long_conv", "hyena")
    assert torch.autograd.gradcheck(forward, (q, k, v, *weights), eps=1e-6, atol=1e-6, fast_mode=fast)
    # the torch run is the NumPy-tested code: same numbers as apply on arrays
    y = forward(q, k, v, *weights).detach().numpy()
    mixer.bind(None)
    arrays = [x.detach().numpy().transpose(0, 2, 1, 3) for x in (q, k, v)]
    np.testing.assert_allclose(y.transpose(0, 2, 1, 3), mixer.apply(*arrays, causal=True), rtol=1e-12,
                               atol=1e-12)


def test_exact_attention_trains_on_hpcattns_own_backward():
    import hpcattn.torch as ht

    q, k, v = (x.transpose(1, 2).detach().requires_grad_() for x in _inputs(1))
    assert torch.autograd.gradcheck(lambda a, b, c: ht.attention(a, b, c, causal=True), (q, k, v),
                                    eps=1e-6, atol=1e-6)


TINY = {"task": "local", "mixer": "long_conv", "seq_len": 16, "vocab": 4, "width": 16, "steps": 60,
        "batch": 16, "lr": 1e-2, "eval_size": 64, "log_every": 10}


def test_a_tiny_model_learns_a_local_task_deterministically():
    first, again = run_train_case(TINY), run_train_case(TINY)
    assert first["status"] == "ok"
    assert first["final_loss"] < 0.3 and first["accuracy"] > 0.95 > first["chance"]
    assert first["loss_curve"][-1] < first["loss_curve"][0] / 3
    np.testing.assert_array_equal(first["loss_curve"], again["loss_curve"])
    assert first["accuracy"] == again["accuracy"] and first["params"] > 0 and first["flops"] > 0


def test_context_ceiling_is_what_the_window_can_see():
    task = make_task({"task": "context", "seq_len": 64, "context": 16, "vocab": 8})
    tokens, targets = task.batch(np.random.default_rng(0), 4000)
    asked = targets[:, -1]
    seen = (tokens[:, :-1] == asked[:, None] + 1).any(axis=1)  # the value token is in the window
    assert seen.mean() == pytest.approx(15 / 63, abs=0.02)
    assert task.ceiling == pytest.approx(15 / 63 + (48 / 63) / 8)
    mqar = make_task({"task": "mqar", "seq_len": 32, "vocab": 16, "pairs": 4})
    tokens, targets = mqar.batch(np.random.default_rng(0), 8)
    for row, want in zip(tokens, targets):
        pairs = dict(zip(row[0:8:2], row[1:8:2]))
        assert all(pairs[row[i]] == want[i] for i in np.flatnonzero(want >= 0))


@pytest.mark.parametrize("case,match", [
    ({"tsk": "mqar"}, "key 'tsk' is unknown"),
    ({"task": "sorting"}, "task='sorting' is unknown"),
    ({"mixer": "local"}, "mixer='local' has no training form"),
    ({"lr": 0.0}, "lr=0.0 is invalid"),
    ({"task": "mqar", "pairs": 40}, "pairs=40 needs more keys"),
    ({"task": "context", "context": 99}, "context=99 exceeds seq_len=64"),
    ({"mixer": "mamba", "chunk": 0}, "chunk=0 is too small")])
def test_bad_cases_are_refused_in_one_line(case, match):
    with pytest.raises(Exception, match=match) as info:
        check_train_case(case)
    assert "\n" not in str(info.value)


def test_train_job_file_names_the_bad_key(tmp_path):
    path = write_job(tmp_path / "bad.toml", kind="train", sweep={"mixer": "exact", "widht": 8})
    with pytest.raises(JobFileError, match=r"bad.toml:\d+: sweep.widht is not a known key") as info:
        load_job(path)
    assert "\n" not in str(info.value)
    path = write_job(tmp_path / "bad2.toml", kind="train", sweep={"mixer": "exact", "steps": "ten"})
    with pytest.raises(JobFileError, match="sweep.steps = 'ten' has type string"):
        load_job(path)


def test_train_job_runs_records_and_resumes(tmp_path):
    sweep = {**TINY, "steps": 5, "mixer": ["long_conv", "exact"]}
    path = write_job(tmp_path / "t.toml", kind="train", sweep=sweep, output=tmp_path / "t.h5")
    job = load_job(path)
    first = runner.run_job(job, MPI.COMM_SELF)
    assert first["ran"] == 2 and first["skipped"] == 0
    again = runner.run_job(job, MPI.COMM_SELF)
    assert again["ran"] == 0 and again["skipped"] == 2
    with results.open_results(tmp_path / "t.h5") as f:
        case = f["cases"]["case_0001"]
        assert case.attrs["kind"] == "train" and "loss_curve" in case
    from hpcattn import analysis as an

    rows = an.load_rows([str(tmp_path / "t.h5")])
    text = an.table(rows, an.columns(rows))
    assert "accuracy vs context window C, task local" in text and "ceiling (best achievable)" in text
    drawn = an.plot(rows, str(tmp_path / "t.png"))
    assert "accuracy (local)" in drawn and any(k.startswith("loss") for k in drawn)
