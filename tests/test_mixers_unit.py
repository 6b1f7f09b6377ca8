"""Every registered mixer: its efficient apply equals its explicit matrix, its other forms agree,
exact mixers equal the float64 reference, causal mixers are lower-triangular. Parametrised over
the registry, so a new mixer is tested the moment it is registered."""
import numpy as np
import pytest

from hpcattn.errors import HpcattnError
from hpcattn.mixers import REGISTRY, get_mixer
from hpcattn.measure import traced_peak
from hpcattn.reference import naive_attention

# parameters small enough that at N = 37 every pattern is really sparse / low-rank / chunked
SMALL = {"exact_blockwise": {"block_q": 8, "block_k": 16}, "local": {"window": 5},
         "bigbird": {"block": 4, "random_blocks": 2}, "linear": {"chunk": 7},
         "performer": {"features": 16, "chunk": 7}, "linformer": {"rank": 8},
         "nystrom": {"landmarks": 6}, "reformer": {"chunk": 4, "rounds": 3}, "s4d": {"state": 8},
         "retnet": {"chunk": 7}, "long_conv": {"max_len": 64}, "synth_dense": {"max_len": 64},
         "synth_random": {"max_len": 64}, "mlp_mixer": {"max_len": 64}, "mamba": {"chunk": 7},
         "gla": {"chunk": 7}, "deltanet": {"chunk": 7}}
N = 37
CASES = [(name, causal) for name, cls in REGISTRY.items() for causal in cls.causal_modes]
IDS = [f"{n}-{'causal' if c else 'full'}" for n, c in CASES]


def small(name):
    return get_mixer(name, **SMALL.get(name, {}))


def qkv(seed=0, n=N, b=2, h=3, d=8, dtype=np.float64, kv_heads=None):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((b, n, h, d)).astype(dtype),
            rng.standard_normal((b, n, kv_heads or h, d)).astype(dtype),
            rng.standard_normal((b, n, kv_heads or h, d)).astype(dtype))


def rel(a, b):
    return float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())


@pytest.mark.parametrize("name,causal", CASES, ids=IDS)
def test_apply_equals_matrix_times_v(name, causal):
    mixer = small(name)
    q, k, v = qkv()
    y = mixer.apply(q, k, v, causal=causal)
    p = mixer.matrix(q, k, causal=causal)
    assert y.shape == v.shape and y.dtype == np.float64 and p.shape == (2, 3, N, N)
    assert np.isfinite(y).all()
    assert rel(y, mixer.from_matrix(p, v)) < 1e-11


@pytest.mark.parametrize("name", [n for n, c in REGISTRY.items() if c.forms])
def test_other_forms_agree_with_apply(name):
    mixer = small(name)
    q, k, v = qkv(1)
    y = mixer.apply(q, k, v, causal=True)
    for form in REGISTRY[name].forms:
        assert rel(mixer.form(form, q, k, v, causal=True), y) < 1e-11, form


@pytest.mark.parametrize("name,causal", [c for c in CASES if REGISTRY[c[0]].exact])
def test_exact_mixers_equal_float64_reference(name, causal):
    q, k, v = qkv(2)
    ref = naive_attention(q, k, v, causal=causal)[0]
    assert rel(small(name).apply(q, k, v, causal=causal), ref) < 1e-12
    assert rel(get_mixer(name).apply(q, k, v, causal=causal), ref) < 1e-12


@pytest.mark.parametrize("name", [n for n, c in REGISTRY.items() if True in c.causal_modes])
def test_causal_mixers_are_lower_triangular_and_ignore_the_future(name):
    mixer = small(name)
    q, k, v = qkv(3)
    p = np.abs(np.asarray(mixer.matrix(q, k, causal=True)))
    assert p[..., np.triu_indices(N, 1)[0], np.triu_indices(N, 1)[1]].max() == 0
    assert p[..., np.arange(N), np.arange(N)].max() > 0
    if name == "reformer":
        return  # its chunks are cut from the hash-sorted sequence, so a later token's bucket moves
        #         earlier tokens' chunk boundaries (their visible set), as in the published method
    # changing the last token changes nothing before it
    q2, k2, v2 = (x.copy() for x in (q, k, v))
    for x in (q2, k2, v2):
        x[:, -1] += 5.0
    y, y2 = mixer.apply(q, k, v, causal=True), mixer.apply(q2, k2, v2, causal=True)
    np.testing.assert_allclose(y2[:, :-1], y[:, :-1], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name,causal", [c for c in CASES if not REGISTRY[c[0]].exact
                                         and REGISTRY[c[0]].inputs != "v"], ids=str)
def test_approximations_are_not_exact_at_test_sizes(name, causal):
    """Guards the tests above from passing trivially (a pattern that happens to be dense)."""
    q, k, v = qkv(4)
    assert rel(small(name).apply(q, k, v, causal=causal), naive_attention(q, k, v, causal=causal)[0]) > 1e-3


def test_sparse_patterns_have_the_stated_support():
    q, k, _ = qkv(5)
    i = np.arange(N)
    band = np.abs(i[:, None] - i[None, :]) <= 5
    p = small("local").matrix(q, k, causal=False)
    assert (p[..., ~band] == 0).all() and (p[..., band] > 0).all()
    p = small("bigbird").matrix(q, k)
    nonzero = (p > 0).mean()
    assert 0.3 < nonzero < 1.0
    assert (p[..., :, :4] > 0).all() and (p[..., :4, :] > 0).all()   # the global block


@pytest.mark.parametrize("name", ["exact_naive", "local", "linear", "performer", "reformer", "retnet"])
def test_float32_stays_close_to_float64(name):
    mixer = small(name)
    causal = max(REGISTRY[name].causal_modes)
    q, k, v = qkv(6)
    y32 = mixer.apply(*(x.astype(np.float32) for x in (q, k, v)), causal=causal)
    assert y32.dtype == np.float32
    assert rel(y32, mixer.apply(q, k, v, causal=causal)) < 1e-4


@pytest.mark.parametrize("name", ["exact_blockwise", "local", "performer", "nystrom", "retnet"])
def test_grouped_kv_heads_equal_repeated_heads(name):
    mixer = small(name)
    causal = max(REGISTRY[name].causal_modes)
    q, k, v = qkv(7, h=4, kv_heads=2)
    y = mixer.apply(q, k, v, causal=causal)
    full = mixer.apply(q, np.repeat(k, 2, axis=2), np.repeat(v, 2, axis=2), causal=causal)
    assert rel(y, full) < 1e-12


@pytest.mark.parametrize("name", [n for n, c in REGISTRY.items() if "seed" in c.params])
def test_randomness_is_seeded(name):
    q, k, v = qkv(8)
    causal = max(REGISTRY[name].causal_modes)
    params = SMALL.get(name, {})
    a = get_mixer(name, seed=3, **params).apply(q, k, v, causal=causal)
    np.testing.assert_array_equal(a, get_mixer(name, seed=3, **params).apply(q, k, v, causal=causal))
    assert rel(a, get_mixer(name, seed=4, **params).apply(q, k, v, causal=causal)) > 1e-6


def test_reformer_rounds_overlap_and_are_counted_once():
    """With 3 rounds many keys are seen in several rounds; apply == matrix (the union softmax)
    only holds because each key's weight is divided by its round count."""
    mixer = small("reformer")
    q, _, v = qkv(9)
    p1 = get_mixer("reformer", chunk=4, rounds=1).matrix(q, q)
    p3 = mixer.matrix(q, q)
    assert (p3 > 0).sum() > (p1 > 0).sum()
    np.testing.assert_allclose(p3.sum(-1), 1.0, rtol=1e-12)


def test_rotary_retention_differs_and_gammas_decay():
    q, k, v = qkv(10)
    on, off = get_mixer("retnet"), get_mixer("retnet", rotary=False)
    assert rel(on.apply(q, k, v, causal=True), off.apply(q, k, v, causal=True)) > 1e-3
    g = on.gammas(4)
    assert (np.diff(g) > 0).all() and g[0] == pytest.approx(1 - 1 / 32)


def test_errors_name_the_bad_thing():
    q, k, v = qkv()
    with pytest.raises(HpcattnError, match="unknown mixer 'nope'.*expected one of"):
        get_mixer("nope")
    with pytest.raises(HpcattnError, match="no parameter 'windw'"):
        get_mixer("local", windw=3)
    with pytest.raises(HpcattnError, match="window=-1 is too small"):
        get_mixer("local", window=-1)
    with pytest.raises(HpcattnError, match="features=2.5 has type float"):
        get_mixer("performer", features=2.5)
    with pytest.raises(HpcattnError, match="does not support causal=true"):
        get_mixer("fnet").apply(q, k, v, causal=True)
    with pytest.raises(HpcattnError, match="does not support causal=false"):
        get_mixer("retnet").apply(q, k, v)
    with pytest.raises(HpcattnError, match="buckets=3 is odd"):
        get_mixer("reformer", buckets=3).apply(q, k, v)
    with pytest.raises(HpcattnError, match="dtype int64"):
        get_mixer("linear").apply(*(x.astype(np.int64) for x in (q, k, v)))


def test_naive_memory_grows_quadratically_and_blockwise_linearly():
    """tracemalloc peaks are deterministic: 4x the sequence, ~16x (naive) vs ~4x (blockwise)."""
    def peak(name, n):
        q, k, v = qkv(n=n, b=1, h=1, d=32, dtype=np.float32)
        return traced_peak(lambda: get_mixer(name).apply(q, k, v))[1]

    naive = peak("exact_naive", 2048) / peak("exact_naive", 512)
    block = peak("exact_blockwise", 2048) / peak("exact_blockwise", 512)
    assert 10 < naive < 20 and block < 5


@pytest.mark.parametrize("name", list(REGISTRY))
def test_predicted_memory_is_within_3x_of_measured(name):
    mixer = get_mixer(name)
    causal = max(REGISTRY[name].causal_modes)
    q, k, v = qkv(n=1024, b=1, h=2, d=32, dtype=np.float32)
    measured = traced_peak(lambda: mixer.apply(q, k, v, causal=causal))[1]
    predicted = mixer.memory_bytes(1024, 1, 2, 32, 4)
    assert measured / 3 < predicted < 3 * measured
