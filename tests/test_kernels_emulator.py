"""The CPU emulation harness itself: barriers, warp shuffles, shared memory, half/bfloat16
conversions, and the checks that make a wrong kernel fail instead of passing."""
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from hpcattn import emulation
from hpcattn.errors import HpcattnError
from hpcattn.gpu.kernels import Arg, Launch

pytestmark = pytest.mark.timeout(120)

PROBES = textwrap.dedent(r"""
    #include <cuda_fp16.h>
    #include <cuda_bf16.h>
    extern "C" __global__ void rotate(int* out, int with_barrier) {
        extern __shared__ int smem[];
        const int t = threadIdx.x, n = blockDim.x;
        smem[t] = t + 1000 * blockIdx.x;
        if (with_barrier) __syncthreads();
        out[blockIdx.x * n + t] = smem[(t + 1) % n];
    }
    extern "C" __global__ void shuffle(int* out, int lane_mask) {
        const int t = threadIdx.x + blockDim.x * threadIdx.y;
        out[t] = __shfl_xor_sync(0xffffffffu, t, lane_mask);
        out[t] += 100 * __shfl_xor_sync(0xffffffffu, out[t], 1);
    }
    extern "C" __global__ void diverge(int* out) {
        if (threadIdx.x < 16) __syncthreads();
        out[threadIdx.x] = 1;
    }
    extern "C" __global__ void half_shuffle(int* out) {
        if (threadIdx.x < 40) out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1, 1);
    }
    extern "C" __global__ void convert(const float* x, float* h, float* b, int n) {
        const int i = blockIdx.x * blockDim.x + threadIdx.x;
        if (i < n) {
            h[i] = __half2float(__float2half_rn(x[i]));
            b[i] = __bfloat162float(__float2bfloat16_rn(x[i]));
        }
    }
    extern "C" __global__ void overrun(int* out, int index) {
        extern __shared__ int smem[];
        smem[index] = 1;
        out[0] = smem[index];
    }
""")
SPEC = {
    "rotate": (Arg("out", "ptr"), Arg("with_barrier", "int32")),
    "shuffle": (Arg("out", "ptr"), Arg("lane_mask", "int32")),
    "diverge": (Arg("out", "ptr"),),
    "half_shuffle": (Arg("out", "ptr"),),
    "convert": (Arg("x", "ptr"), Arg("h", "ptr"), Arg("b", "ptr"), Arg("n", "int32")),
    "overrun": (Arg("out", "ptr"), Arg("index", "int32")),
}


@pytest.fixture(scope="module")
def probes(tmp_path_factory):
    d = tmp_path_factory.mktemp("probes")
    (d / "probes.cu").write_text(PROBES)
    return d, emulation.build(d, "probes.cu", SPEC)


def run(lib, kernel, grid, block, smem=0, **values):
    emulation.launch(Launch(kernel, grid, block, smem, values, None, None), lib=lib, spec=SPEC)


def test_syncthreads_is_a_block_barrier_and_a_missing_one_shows(probes):
    _, lib = probes
    out = np.zeros(2 * 64, np.int32)
    run(lib, "rotate", (2, 1, 1), (64, 1, 1), smem=256, out=out, with_barrier=1)
    t = np.arange(64)
    want = np.concatenate([(t + 1) % 64, (t + 1) % 64 + 1000])
    assert np.array_equal(out, want)
    # without the barrier a thread reads a neighbour's slot before it is written: poison (-1)
    run(lib, "rotate", (2, 1, 1), (64, 1, 1), smem=256, out=out, with_barrier=0)
    assert (out == -1).any()


@pytest.mark.parametrize("lane_mask", [1, 5, 16, 31])
def test_shfl_xor_exchanges_within_each_warp(probes, lane_mask):
    _, lib = probes
    out = np.zeros(64, np.int32)
    run(lib, "shuffle", (1, 1, 1), (32, 2, 1), out=out, lane_mask=lane_mask)
    t = np.arange(64)
    first = t ^ lane_mask
    assert np.array_equal(out, first + 100 * (first ^ 1))


def test_divergent_barrier_and_partial_warp_are_errors(probes):
    _, lib = probes
    out = np.zeros(64, np.int32)
    with pytest.raises(HpcattnError, match="__syncthreads"):
        run(lib, "diverge", (1, 1, 1), (64, 1, 1), out=out)
    with pytest.raises(HpcattnError, match="warp collective"):
        run(lib, "half_shuffle", (1, 1, 1), (64, 1, 1), out=out)
    with pytest.raises(HpcattnError, match="multiple of 32"):
        run(lib, "diverge", (1, 1, 1), (48, 1, 1), out=out)


def test_half_and_bfloat16_round_to_nearest_even_like_numpy(probes):
    ml_dtypes = pytest.importorskip("ml_dtypes", reason="bfloat16 reference needs ml_dtypes")
    _, lib = probes
    rng = np.random.default_rng(0)
    special = np.array([0.0, -0.0, 1.0, 65504, 65519.9, 65520, 1e6, 2.0**-24, 2.0**-25, 3 * 2.0**-26,
                        2.0**-14, 2.0**-14 * 1.0009765625, 1 + 2.0**-11, 1 + 3 * 2.0**-11,
                        np.inf, -np.inf, 1 + 2.0**-8, 1 + 3 * 2.0**-8, 3.4e38, 1e-40], np.float32)
    wide = rng.standard_normal(1000) * 10.0 ** rng.integers(-8, 6, 1000)
    x = np.concatenate([special, -special, wide, [np.nan]]).astype(np.float32)
    h, b = np.empty_like(x), np.empty_like(x)
    run(lib, "convert", (-(-len(x) // 64), 1, 1), (64, 1, 1), x=x, h=h, b=b, n=len(x))
    with np.errstate(over="ignore"):
        want_h = x.astype(np.float16).astype(np.float32)
    want_b = x.astype(ml_dtypes.bfloat16).astype(np.float32)
    assert np.array_equal(h, want_h, equal_nan=True)
    assert np.array_equal(b, want_b, equal_nan=True)


def test_shared_memory_overrun_faults(probes):
    """Pages past the launch's shared-memory size are inaccessible: the process dies."""
    d, _ = probes
    code = textwrap.dedent(f"""
        import numpy as np, sys
        sys.path[:0] = {sys.path!r}
        from hpcattn import emulation
        from hpcattn.gpu.kernels import Launch
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_kernels_emulator import SPEC
        lib = emulation.build({str(d)!r}, "probes.cu", SPEC)
        out = np.zeros(1, np.int32)
        index = int(sys.argv[1])
        emulation.launch(Launch("overrun", (1, 1, 1), (32, 1, 1), 4096, dict(out=out, index=index), None, None),
                         lib=lib, spec=SPEC)
        print("value", out[0])
    """)
    ok = subprocess.run([sys.executable, "-c", code, "1023"], capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0 and "value 1" in ok.stdout, ok.stderr
    bad = subprocess.run([sys.executable, "-c", code, "1024"], capture_output=True, text=True, timeout=60)
    assert bad.returncode < 0, f"write past 4096 bytes of shared memory did not fault: {bad.stdout}{bad.stderr}"


def test_static_shared_memory_is_refused(tmp_path):
    (tmp_path / "k.cu").write_text('extern "C" __global__ void f(float* x) { __shared__ float s[32]; x[0] = s[0]; }')
    with pytest.raises(HpcattnError, match="static __shared__"):
        emulation.build(tmp_path, "k.cu", {"f": (Arg("x", "ptr"),)})


def test_argument_list_mismatch_fails_to_build(tmp_path):
    (tmp_path / "k.cu").write_text('extern "C" __global__ void f(float* x, int n) { x[0] = n; }')
    with pytest.raises(HpcattnError, match="C parameters differ"):
        emulation.build(tmp_path, "k.cu", {"f": (Arg("x", "ptr"), Arg("n", "float32"))})
