"""The associative-recall probe's qualitative outcomes on fixed seeds, and the case contract the
job runner calls (run_mixer_case / check_mixer_case / MIXER_CASE_KEYS)."""
import numpy as np
import pytest

from hpcattn.errors import HpcattnError
from hpcattn.mixers import REGISTRY, get_mixer
from hpcattn.mixers.cases import CASE_DEFAULTS, MIXER_CASE_KEYS, check_mixer_case, run_mixer_case
from hpcattn.mixers.recall import recall_accuracy, recall_inputs

N = 256
PROBE = {"batch": 8, "queries": 32, "head_dim": 32, "seed": 0}


@pytest.mark.parametrize("name", ["exact_blockwise", "exact_naive"])
@pytest.mark.parametrize("causal", [False, True])
def test_exact_attention_recalls_at_every_distance(name, causal):
    for dist in (1, 7, 31, 100, 200, 255):
        acc = recall_accuracy(get_mixer(name), N, dist, causal=causal, **PROBE)["recall_accuracy"]
        assert acc >= 0.99, (dist, acc)


def test_local_window_recalls_inside_its_width_and_is_at_chance_beyond():
    mixer = get_mixer("local", window=16)
    for dist in (1, 8, 16):
        assert recall_accuracy(mixer, N, dist, causal=True, **PROBE)["recall_accuracy"] >= 0.99
    far = [recall_accuracy(mixer, N, dist, causal=True, **PROBE) for dist in (17, 40, 90)]
    chance = far[0]["chance"]
    assert chance == 1 / 16 and far[0]["queries"] == 8 * 32
    assert all(abs(r["recall_accuracy"] - chance) < 0.08 for r in far), far


@pytest.mark.parametrize("name", ["fnet", "s4d"])
def test_mixers_without_queries_cannot_look_up_content(name):
    mixer = get_mixer(name)
    causal = max(REGISTRY[name].causal_modes)
    accs = [recall_accuracy(mixer, N, d, causal=causal, **PROBE)["recall_accuracy"] for d in (5, 50, 150)]
    assert max(accs) < 0.2, accs


def test_probe_inputs_put_the_target_where_asked():
    q, k, v, pos, targets, book = recall_inputs(64, 5, batch=2, heads=2, head_dim=16, queries=8, seed=1)
    assert pos.shape == (2, 8) and targets.shape == (2, 8, 2)
    rows = np.arange(2)[:, None]
    np.testing.assert_allclose(k[rows, pos], k[rows, pos - 5])              # query repeats the key
    assert (v[rows, pos] == 0).all()
    codes = np.einsum("bqhd,hcd->bqhc", v[rows, pos - 5], book).argmax(-1)
    np.testing.assert_array_equal(codes, targets)
    for b in range(2):
        assert not set(pos[b]) & set(pos[b] - 5)                             # no query is a target
    with pytest.raises(HpcattnError, match="distance 64 does not fit"):
        recall_inputs(64, 64)


# --- the case contract -------------------------------------------------------------------------

def case(**kw):
    return {"task": "scaling", "mixer": "local", "seq_len": 128, "heads": 1, "head_dim": 16,
            "repeats": 2, **kw}


def test_case_keys_have_types_and_defaults():
    assert set(CASE_DEFAULTS) <= set(MIXER_CASE_KEYS)
    assert MIXER_CASE_KEYS["seq_len"] is int and MIXER_CASE_KEYS["causal"] is bool
    assert MIXER_CASE_KEYS["memory_budget_mb"] is float and MIXER_CASE_KEYS["window"] is int
    for cls in REGISTRY.values():                      # every mixer parameter can be set from a job
        assert set(cls.params) <= set(MIXER_CASE_KEYS)
    full = check_mixer_case({"mixer": "fnet", "task": "error"})
    assert full["seq_len"] == CASE_DEFAULTS["seq_len"] and full["mixer"] == "fnet"


@pytest.mark.parametrize("bad,match", [
    ({"task": "speed"}, "task='speed' is unknown; expected one of scaling, recall, error"),
    ({"mixer": "nope"}, "mixer='nope' is unknown"),
    ({"seq_len": 0}, "seq_len=0 is invalid"),
    ({"seq_len": "8"}, "seq_len='8' has type str; expected int"),
    ({"causal": 1}, "causal=1 has type int; expected bool"),
    ({"windw": 3}, "key 'windw' is unknown"),
    ({"window": -2}, "window=-2 is too small"),
    ({"dtype": "float16"}, "dtype='float16' is unknown"),
])
def test_bad_cases_name_the_key(bad, match):
    with pytest.raises(HpcattnError, match=match):
        check_mixer_case(case(**bad))


def test_scaling_case_times_and_measures():
    res = run_mixer_case(case(window=8))
    assert res["status"] == "ok" and len(res["wall_s"]) == 2 and (res["wall_s"] > 0).all()
    assert 0 < res["peak_alloc_bytes"] < 3 * res["predicted_bytes"]
    assert '"window": 8' in res["mixer_params"] and res["time_complexity"] == "O(N w d)"


def test_flat_parameters_apply_only_to_mixers_that_have_them():
    res = run_mixer_case(case(mixer="linear", window=8, causal=True))
    assert res["status"] == "ok" and "window" not in res["mixer_params"]


def test_statuses_instead_of_crashes():
    assert run_mixer_case(case(mixer="fnet", causal=True))["status"] == "unsupported"
    over = run_mixer_case(case(mixer="exact_naive", seq_len=4096, memory_budget_mb=16.0))
    assert over["status"] == "over_budget" and "wall_s" not in over and "predicted" in over["reason"]
    assert run_mixer_case(case(mixer="exact_blockwise", seq_len=4096, memory_budget_mb=16.0,
                               repeats=1))["status"] == "ok"
    na = run_mixer_case(case(task="recall", distance=128))
    assert na["status"] == "not_applicable"


def test_error_case_exact_is_zero_and_approximations_are_not():
    exact = run_mixer_case(case(task="error", mixer="exact_naive", dtype="float64", causal=True))
    assert exact["rel_err"] < 1e-13 and "wall_s" not in exact
    approx = run_mixer_case(case(task="error", mixer="nystrom", landmarks=8))
    assert 1e-3 < approx["rel_err"] < 10


def test_recall_case_matches_the_probe():
    res = run_mixer_case(case(task="recall", mixer="exact_blockwise", distance=50, causal=True))
    assert res["status"] == "ok" and res["recall_accuracy"] >= 0.99 and res["chance"] == 1 / 16
