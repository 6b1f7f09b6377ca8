"""Error versus rank count: the float32 ring backward's max error against float64 at P = 1, 2,
4, 8 (oversubscribed on a small machine), in one table; P=8 stays within 2x of P=1.

The test launches this file itself under ``mpiexec -n P`` (each launch with a hard timeout);
as a script it is the worker, and rank 0 prints one ``BACKWARD_ERRORS {json}`` line.
"""
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

RANKS = (1, 2, 4, 8)
LAUNCH_TIMEOUT = 180
SHAPE = dict(n=1024, b=1, h=4, hkv=2, d=32)   # small: 8 ranks share 2 cores
LAYOUT, CAUSAL = "zigzag", True


def worker():
    from mpi4py import MPI

    from hpcattn import ring_attention, shard, unshard
    from hpcattn.reference import naive_attention_backward
    from hpcattn.ring_backward import ring_attention_backward

    comm = MPI.COMM_WORLD
    n, b, h, hkv, d = (SHAPE[key] for key in ("n", "b", "h", "hkv", "d"))
    rng = np.random.default_rng(2026)  # the same global inputs on every rank and at every P
    q, dout = (rng.standard_normal((b, n, h, d)).astype(np.float32) for _ in range(2))
    k, v = (rng.standard_normal((b, n, hkv, d)).astype(np.float32) for _ in range(2))
    lq, lk, lv, ldo = (shard(x, comm, LAYOUT) for x in (q, k, v, dout))
    out, lse = ring_attention(lq, lk, lv, comm, causal=CAUSAL, layout=LAYOUT)
    grads = ring_attention_backward(lq, lk, lv, out, lse, ldo, comm, causal=CAUSAL, layout=LAYOUT)
    grads = [unshard(g, comm, LAYOUT) for g in grads]
    if comm.rank == 0:
        ref = naive_attention_backward(q, k, v, dout, causal=CAUSAL)
        scale = max(float(np.abs(r).max()) for r in ref)
        errors = {name: float(np.abs(g - r).max()) / scale for name, g, r in zip(("dq", "dk", "dv"), grads, ref)}
        print("BACKWARD_ERRORS " + json.dumps(errors), flush=True)


def launch(mpiexec, size):
    cmd = [mpiexec, "-n", str(size), sys.executable, os.path.abspath(__file__)]
    # one BLAS thread per rank: 8 ranks on 2 cores are oversubscribed already
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT, env=env)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"{' '.join(cmd)} did not finish in {LAUNCH_TIMEOUT} s (hang?)\n{exc.stdout}")
    assert proc.returncode == 0, f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stderr[-4000:]}"
    found = re.search(r"^BACKWARD_ERRORS (\{.*\})$", proc.stdout, re.M)
    assert found, f"no errors printed by {' '.join(cmd)}:\n{proc.stdout[-2000:]}"
    return json.loads(found.group(1))


@pytest.mark.timeout(len(RANKS) * LAUNCH_TIMEOUT + 60)
def test_float32_error_is_flat_in_the_number_of_ranks(mpiexec):
    table = {size: launch(mpiexec, size) for size in RANKS}
    lines = [f"float32 ring backward, N={SHAPE['n']} heads={SHAPE['h']}/{SHAPE['hkv']} d={SHAPE['d']} "
             f"{LAYOUT} causal: max |error| / max |gradient| vs float64",
             f"{'P':>3} {'dq':>10} {'dk':>10} {'dv':>10}"]
    lines += [f"{p:>3} " + " ".join(f"{table[p][g]:10.2e}" for g in ("dq", "dk", "dv")) for p in RANKS]
    print("\n".join(lines))
    worst = {p: max(table[p].values()) for p in RANKS}
    assert worst[8] <= 2 * worst[1], "\n".join(lines)
    assert max(worst.values()) < 1e-5, "\n".join(lines)


if __name__ == "__main__":
    worker()
