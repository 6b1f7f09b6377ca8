"""One command for a person with a GPU: ``python -m hpcattn.gpu.check``.

Prints the GPU/MPI environment, checks every kernel entry point against the float64 reference
(hpcattn.gpu.accuracy), then measures forward TFLOP/s (``hpcattn.measure.attention_flops``:
4·b·N²·H·d per call, half for causal, FlashAttention's convention) and ends with one line
``VERDICT: PASS|FAIL|NO GPU``.
Exit status 0 on PASS, 1 on FAIL, 2 without a usable GPU.
"""
from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from ..devices import GPU_DTYPES, np_dtype
from ..measure import attention_flops
from . import kernels
from .accuracy import judge
from .environment import cupy_report, mpi_report

# (batch, n_q, n_k, heads, kv_heads, causal, zigzag positions): ragged, GQA, causal, n_q != n_k
CHECK_SHAPES = [
    (1, 1000, 1000, 4, 2, False, False),
    (2, 777, 777, 4, 4, True, False),
    (1, 640, 640, 8, 1, True, True),
    (1, 300, 1100, 2, 2, False, False),
]


def zigzag_positions(n: int):
    half = n // 2
    return np.concatenate([np.arange(half, n), np.arange(half)]).astype(np.int64)


def variants(dtype: str):
    return kernels.VARIANTS if dtype in kernels.MMA_DTYPES else ("simt",)


def run_checks(dtypes, head_dims, out=print) -> bool:
    import cupy

    from .attention import attention_gpu

    rng = np.random.default_rng(0)
    ok = True
    for dtype, variant in ((dt, var) for dt in dtypes for var in variants(dt)):
        dt = np_dtype(dtype)
        for d in head_dims:
            for b, nq, nk, h, hkv, causal, zigzag in CHECK_SHAPES:
                q = rng.standard_normal((b, nq, h, d), dtype=np.float32).astype(dt)
                k = rng.standard_normal((b, nk, hkv, d), dtype=np.float32).astype(dt)
                v = rng.standard_normal((b, nk, hkv, d), dtype=np.float32).astype(dt)
                q_pos = zigzag_positions(nq) if zigzag else np.arange(nq, dtype=np.int64)
                k_pos = zigzag_positions(nk) if zigzag else np.arange(nk, dtype=np.int64)
                o, lse = attention_gpu(cupy.asarray(q), cupy.asarray(k), cupy.asarray(v), causal=causal,
                                       q_pos=q_pos if causal else None, k_pos=k_pos if causal else None,
                                       variant=variant)
                verdict = judge(q, k, v, cupy.asnumpy(o), cupy.asnumpy(lse), causal=causal, q_pos=q_pos,
                                k_pos=k_pos)
                ok &= verdict.ok
                out(f"  {dtype:8s} {variant:4s} d={d:3d} b={b} q={nq:4d} k={nk:4d} h={h}/{hkv} "
                    f"{'causal' if causal else 'full  '}{' zigzag' if zigzag else '       '} {verdict}")
    return ok


def time_call(fn, repeats: int) -> float:
    """Median seconds of ``fn()`` measured with CUDA events, after one warm-up call."""
    import cupy

    fn()
    times = []
    for _ in range(repeats):
        start, stop = cupy.cuda.Event(), cupy.cuda.Event()
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(cupy.cuda.get_elapsed_time(start, stop) / 1e3)
    return float(np.median(times))


def run_bench(dtypes, head_dims, seqs, heads_list, repeats, out=print) -> list[dict]:
    import cupy

    from .attention import attention_gpu

    rows = []
    out(f"  {'dtype':8s} {'kern':4s} {'d':>4s} {'N':>6s} {'H':>3s} {'causal':>6s} {'ms':>9s} {'TFLOP/s':>8s}")
    for dtype, variant in ((dt, var) for dt in dtypes for var in variants(dt)):
        dt = cupy.dtype(np_dtype(dtype))
        for d in head_dims:
            for n in seqs:
                for h in heads_list:
                    q, k, v = (cupy.random.standard_normal((1, n, h, d), dtype=cupy.float32).astype(dt)
                               for _ in range(3))
                    for causal in (False, True):
                        t = time_call(lambda: attention_gpu(q, k, v, causal=causal, variant=variant), repeats)
                        tf = attention_flops(1, n, h, d, causal=causal) / t / 1e12
                        rows.append(dict(dtype=dtype, variant=variant, head_dim=d, seq=n, heads=h, causal=causal,
                                         seconds=t, tflops=tf))
                        out(f"  {dtype:8s} {variant:4s} {d:4d} {n:6d} {h:3d} {str(causal):>6s} {t * 1e3:9.3f} {tf:8.2f}")
                    del q, k, v
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m hpcattn.gpu.check", description=__doc__.split("\n\n")[0])
    p.add_argument("--dtypes", default=",".join(GPU_DTYPES))
    p.add_argument("--head-dims", default="64,128")
    p.add_argument("--seq", default="4096,8192,16384", help="benchmark sequence lengths")
    p.add_argument("--heads", default="8,16", help="benchmark head counts")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--no-bench", action="store_true", help="correctness checks only")
    p.add_argument("--json", help="also write the results to this file")
    a = p.parse_args(argv)
    dtypes = a.dtypes.split(",")
    head_dims = [int(x) for x in a.head_dims.split(",")]
    for d in head_dims:
        kernels.check_head_dim(d)

    env = cupy_report()
    mpi = mpi_report()
    print(f"CuPy {env['cupy']}, NVRTC {env.get('nvrtc')}, driver {env.get('driver')}")
    print(f"MPI: {mpi['library']}; CUDA-aware: {mpi.get('cuda_aware')} ({mpi.get('cuda_aware_reason')})")
    if not env["gpus"]:
        print(f"VERDICT: NO GPU ({env.get('gpus_reason')})")
        return 2
    for g in env["gpus"]:
        print(f"GPU {g['id']}: {g['name']} (sm_{g['sm']}, {g['memory_gib']} GiB)")
    print("Correctness (vs float64 reference):")
    ok = run_checks(dtypes, head_dims)
    rows = []
    if not a.no_bench:
        print("Forward throughput, batch 1 (median of CUDA-event timings):")
        rows = run_bench(dtypes, head_dims, [int(x) for x in a.seq.split(",")],
                         [int(x) for x in a.heads.split(",")], a.repeats)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"environment": env, "mpi": mpi, "correct": ok, "bench": rows}, f, indent=1)
    print(f"VERDICT: {'PASS' if ok else 'FAIL'} (kernels vs float64 reference"
          f"{', best ' + format(max(r['tflops'] for r in rows), '.1f') + ' TFLOP/s' if rows else ''})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
