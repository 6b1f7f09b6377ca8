"""``hpcattn run --device gpu``'s case runner on real GPUs (skipped without one, with the reason):
the ring on CuPy arrays, checked by sampled rows against float64, for every GPU dtype."""
import pytest

from hpcattn.cases import AttentionCase, run_attention_case
from hpcattn.devices import default_tolerance
from hpcattn.gpu.environment import no_gpu_reason

MPI_SIZES = (2,)

MPI = pytest.importorskip("mpi4py.MPI")
pytest.importorskip("cupy", reason="CuPy not installed; GPU tests need pip install '.[gpu]'")
NO_GPU = no_gpu_reason()
pytestmark = [pytest.mark.gpu, pytest.mark.timeout(300),
              pytest.mark.skipif(NO_GPU is not None, reason=f"no usable GPU: {NO_GPU}")]


@pytest.mark.mpi
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("layout, causal", [("zigzag", True), ("striped", True), ("contiguous", False)])
def test_gpu_case_passes_its_check(dtype, layout, causal):
    comm = MPI.COMM_WORLD
    case = AttentionCase(seq_len=3001, heads=4, kv_heads=2, head_dim=64, dtype=dtype, causal=causal,
                         layout=layout, check_rows=48, device="gpu", seed=3)
    res = run_attention_case(case, comm, keep_activations=True)
    assert res["max_abs_err"] <= default_tolerance(dtype), res["max_abs_err"]
    assert res["max_lse_err"] <= default_tolerance(dtype)
    assert type(res["local"]["out"]).__module__.startswith("numpy")  # host copies for the store
