"""The child-process end of ``hpcattn bench``: ``python -m hpcattn.bench PART JSON`` runs one part
and prints its figures as one JSON line (rank 0 only under mpiexec)."""
from __future__ import annotations

import json

from .config import BenchConfig
from .parts import ring_part, serial_part, vanilla_max_n


def main(part: str, payload: str) -> None:
    args = json.loads(payload)
    cfg = BenchConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in args["cfg"].items()})
    if part == "ring":
        from mpi4py import MPI

        res = ring_part(cfg, MPI.COMM_WORLD, args["maxn"])
        if MPI.COMM_WORLD.rank != 0:
            return
    elif part == "strategies":
        from mpi4py import MPI

        from .strategies import strategies_part

        res = strategies_part(cfg, MPI.COMM_WORLD)
        if MPI.COMM_WORLD.rank != 0:
            return
    elif part == "serial":
        res = serial_part(cfg)
    elif part == "maxn":
        res = vanilla_max_n(cfg)
    elif part == "backward":
        from .backward import serial_backward_part

        res = serial_backward_part(cfg)
    else:
        raise SystemExit(f"unknown bench part {part!r}")
    print(json.dumps(res, default=float), flush=True)

