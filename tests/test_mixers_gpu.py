"""Every mixer on CuPy arrays equals the NumPy run (skipped without CuPy and a GPU)."""
import numpy as np
import pytest

from hpcattn.mixers import REGISTRY, get_mixer

cp = pytest.importorskip("cupy")
try:
    HAVE_GPU = cp.cuda.runtime.getDeviceCount() > 0
except Exception:  # noqa: BLE001 - no driver / no device
    HAVE_GPU = False
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not HAVE_GPU, reason="no CUDA GPU")]

SMALL = {"local": {"window": 5}, "bigbird": {"block": 4, "random_blocks": 2},
         "reformer": {"chunk": 4, "rounds": 3}, "nystrom": {"landmarks": 6}, "linformer": {"rank": 8},
         "performer": {"features": 16}}
CASES = [(n, c) for n, cls in REGISTRY.items() for c in cls.causal_modes]


@pytest.mark.parametrize("dtype,tol", [("float32", 2e-5), ("float64", 1e-12)])
@pytest.mark.parametrize("name,causal", CASES)
def test_cupy_equals_numpy(name, causal, dtype, tol):
    if name == "exact_blockwise" and dtype == "float64":
        pytest.skip("the GPU attention kernels take float32/16 only")
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((2, 37, 2, 64)).astype(dtype) for _ in range(3))
    mixer = get_mixer(name, **SMALL.get(name, {}))
    y = mixer.apply(*(cp.asarray(x) for x in (q, k, v)), causal=causal)
    assert isinstance(y, cp.ndarray) and y.dtype == np.dtype(dtype)
    ref = mixer.apply(q, k, v, causal=causal)
    assert float(np.abs(cp.asnumpy(y) - ref).max() / np.abs(ref).max()) < tol
    p = mixer.matrix(cp.asarray(q), cp.asarray(k), causal=causal)
    assert isinstance(p, cp.ndarray)
