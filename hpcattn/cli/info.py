"""``hpcattn info``: the machine, versions, the MPI library and whether it is CUDA-aware, GPUs,
kernel caches (from :mod:`hpcattn.machine` and, for the GPU path, :mod:`hpcattn.gpu.environment`)."""
from __future__ import annotations

import json
import sys

import click

from . import Command


def collect() -> dict:
    from .. import cpu_kernels
    from ..gpu.environment import cache_report, cupy_report, mpi_report
    from ..machine import describe

    return {**describe(), "mpi": mpi_report(), "gpu": cupy_report(), "kernels": cache_report(),
            "cpu_kernel": cpu_kernels.describe()}


def _cpu_kernel_lines(ck: dict) -> None:
    """The CPU kernel hpcattn uses (and how to change it), its workers, and the half types."""
    if "error" in ck:
        click.echo(f"CPU kernel: {ck['error']}")
        return
    torch = "" if ck["torch"] == "available" else f" ({ck['torch']})"
    on_torch = (f"torch-flash for {'/'.join(ck['torch_dtypes'])} calls it can express, "
                if ck["torch_dtypes"] else "")
    fused = "cpp-fused for float32 forwards, " if ck.get("fused") == "available" else ""
    click.echo(f"CPU kernel: {fused}{on_torch}numpy-blockwise otherwise{torch} "
               f"(HPCATTN_CPU_KERNEL={ck['requested']}: auto|numpy|torch|fused); "
               f"{ck['workers']} worker thread(s) per call (HPCATTN_KERNEL_THREADS)")
    if ck.get("fused") and ck["fused"] != "available":
        click.echo(f"  cpp-fused: {ck['fused']}")
    if "reuse_out" in ck:
        from .. import out_pool

        click.echo(f"  cpp-fused outs of >= {out_pool.MIN_BYTES >> 20} MiB: the last one freed is reused by the next call of "
                   f"its size: {'on' if ck['reuse_out'] else 'off'} (HPCATTN_REUSE_OUT=1|0)")
    for dt in ("bfloat16", "float16"):
        click.echo(f"  {dt} on CPU: {ck[dt]}")


@click.command(cls=Command)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def info(as_json):
    """Show the machine, versions, the MPI library (CUDA-aware or not), the GPUs seen and the
    kernel caches."""
    data = collect()
    if as_json:
        click.echo(json.dumps(data, indent=1))
        return
    v, mpi, gpu, ker = data["versions"], data["mpi"], data["gpu"], data["kernels"]
    click.echo("hpcattn " + v["hpcattn"] + " (Python " + v["python"] + ", " + sys.platform + ")")
    click.echo("  " + ", ".join(f"{k} {v[k] or 'not installed'}" for k in ("numpy", "mpi4py", "h5py", "click", "ml_dtypes")))
    threads = ", ".join(f"{k}={val}" for k, val in data["thread_vars"].items() if val) or "none set"
    click.echo(f"Machine: {', '.join(data['hosts'])}, {data['cpu']} ({data['cores']} cores), {data['platform']}")
    click.echo(f"  BLAS {data['blas']}; thread variables: {threads}")
    _cpu_kernel_lines(data["cpu_kernel"])
    if mpi.get("mpi4py") is None:  # the rest of the report stands; say what would make MPI work
        from ..launch import INSTALL_MPI

        click.echo(f"MPI: not usable: {mpi['library']}; {INSTALL_MPI}")
    else:
        click.echo(f"MPI: {mpi['library']}" + (f" (MPI {mpi['standard']})" if mpi.get("standard") else ""))
    if mpi.get("mpi4py"):
        click.echo(f"  CUDA-aware: {'yes' if mpi['cuda_aware'] else 'no'} ({mpi['cuda_aware_reason']}); "
                   "override with HPCATTN_CUDA_AWARE=0|1")
    if gpu["cupy"] is None:
        click.echo("CuPy: not installed (pip install '.[gpu]')")
    else:
        click.echo(f"CuPy {gpu['cupy']}, NVRTC {gpu.get('nvrtc')}"
                   + (f", CUDA driver {gpu['driver']}" if gpu.get("driver") else ""))
    if gpu["gpus"]:
        click.echo(f"GPUs: {len(gpu['gpus'])}")
        for g in gpu["gpus"]:
            click.echo(f"  {g['id']}: {g['name']} (sm_{g['sm']}, {g['memory_gib']} GiB)")
    else:
        click.echo(f"GPUs: none ({gpu.get('gpus_reason')})")
    click.echo(f"Kernels: {ker['kernel_dir']} ({', '.join(ker['kernel_sources'])}; digest {ker['kernel_digest']})")
    click.echo(f"Kernel compile cache: {ker['cupy_cache_dir']} ({ker['cupy_cache_cubins']} cubins, "
               f"{ker['cupy_cache_bytes'] / 2**20:.1f} MiB)")
