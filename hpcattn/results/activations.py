"""Activation files of one case and the virtual datasets that show them in global order.

Serial h5py: each rank writes its own shard ``case_0003/r<rank>.h5`` (its positions, in the
layout's local order). h5py with MPI: the ranks write one ``case_0003/all.h5`` collectively, in
global order. Either way the master gets one virtual dataset per array (:func:`add_virtual`), so a
reader sees q/k/v/out/lse in global order without knowing which rank wrote what.
"""
from __future__ import annotations

import json
import os
import shutil

import numpy as np

from .. import exchange
from ..errors import HpcattnError
from . import cleaning, files
from .sink import h5_writer
from .format import LIBVER, ResultsError, case_name, have_mpio, import_h5py, sidecar

# the forward's arrays, then (cases with backward = true) the output gradient and the gradients
ACTIVATIONS = ("q", "k", "v", "out", "lse", "dout", "dq", "dk", "dv")
SEQ_AXIS = {"q": 1, "k": 1, "v": 1, "out": 1, "lse": 2, "dout": 1, "dq": 1, "dk": 1, "dv": 1}


def write_activations(path: str, index: int, local: dict, *, n: int, layout: str, comm,
                      compression: str = "none") -> dict:
    """Write this rank's q/k/v/out/lse of case ``index``; collective. Returns the virtual-dataset
    spec (the same on every rank) that :class:`~hpcattn.results.Master` turns into datasets in
    global order.

    ``local`` holds the rank's arrays (sequence axis as in :data:`SEQ_AXIS`, positions in the
    layout's local order). Serial h5py: one file per rank. Parallel h5py: one file, collectively.
    """
    from ..layouts import local_slices

    case_dir = os.path.join(sidecar(files.resolve_output(path)), case_name(index))
    size, rank = comm.size, comm.rank
    error = None
    if rank == 0:
        try:   # only names hpcattn writes are removed; a link is never followed
            files.own_dir(os.path.dirname(case_dir))
            cleaning.clean_case_dir(case_dir)
            files.own_dir(case_dir)
        except HpcattnError as exc:
            error = str(exc)
    errors = [e for e in exchange.allgather(comm, error, "preparing the activation folder") if e]
    if errors:
        raise HpcattnError(errors[0])
    names = [a for a in ACTIVATIONS if a in local]
    shapes = {a: _global_shape(local[a], SEQ_AXIS[a], n) for a in names}
    parallel = size > 1 and have_mpio()
    error, sums = None, {}
    try:
        files.check_space(case_dir, sum(int(np.asarray(local[a]).nbytes) for a in names))
        if parallel:
            _write_parallel(case_dir, local, names, shapes, n=n, layout=layout, comm=comm)
            if rank == 0:
                sums[f"{case_name(index)}/all.h5"] = files.checksum(os.path.join(case_dir, "all.h5"))
        else:
            shard = os.path.join(case_dir, f"r{rank}.h5")
            _write_shard(shard, local, names, compression)
            sums[f"{case_name(index)}/r{rank}.h5"] = files.checksum(shard)
    except Exception as exc:  # noqa: BLE001 - reported collectively below
        error = f"rank {rank}: {_why(exc, case_dir)}"
    gathered = exchange.allgather(comm, (error, sums), "writing activations")
    errors = [e for e, _ in gathered if e]
    if errors:
        raise HpcattnError(f"writing activations of {case_name(index)} failed: {errors[0]}")
    for _, part in gathered:
        sums.update(part)
    rel = case_name(index)
    spec = {}
    for a in names:
        axis = SEQ_AXIS[a]
        if parallel:
            sources = [{"file": f"{rel}/all.h5", "dset": a, "shape": shapes[a],
                        "maps": [[0, n, 1, 0, n]]}]
        else:
            sources = []
            for r in range(size):
                maps, off = [], 0
                for s in local_slices(n, size, r, layout):
                    count = len(range(*s.indices(n)))
                    if count:
                        start, stop, step = s.indices(n)
                        maps.append([start, stop, step, off, count])
                    off += count
                shape = list(shapes[a])
                shape[axis] = off
                sources.append({"file": f"{rel}/r{r}.h5", "dset": a, "shape": shape, "maps": maps})
        for src in sources:
            if sums.get(src["file"]):
                src["checksum"] = sums[src["file"]]
        spec[a] = {"shape": shapes[a], "dtype": np.dtype(local[a].dtype).str, "axis": axis,
                   "sources": sources}
    return spec


def _why(exc: BaseException, where: str) -> str:
    """One line for a failed shard write; a full disk (OSError ENOSPC from HDF5, or its message)
    is named as such."""
    if isinstance(exc, ResultsError):
        return str(exc)
    if isinstance(exc, OSError) and (exc.errno in files.DISK_FULL or "No space left" in str(exc)):
        return str(files.write_error(OSError(files.DISK_FULL[0], "No space left on device"), where))
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


def shard_checksums(base: str, spec: dict) -> dict:
    """Fill in the checksum of every source file of ``spec`` (relative to ``base``, the master's
    ``.d``) that the writing ranks did not report."""
    for d in spec.values():
        for src in d["sources"]:
            if not src.get("checksum"):
                src["checksum"] = files.checksum(os.path.join(base, src["file"]))
                if src["checksum"] is None:
                    raise ResultsError(f"activation file {base}/{src['file']} is missing")
    return spec


def _global_shape(arr, axis: int, n: int) -> list[int]:
    shape = list(arr.shape)
    shape[axis] = n
    return shape


def _write_shard(final: str, local: dict, names, compression: str) -> None:
    opts = {} if compression == "none" else {"compression": compression}
    with h5_writer(final) as f:
        for a in names:
            arr = np.ascontiguousarray(_host(local[a]))
            f.create_dataset(a, data=arr, chunks=True if arr.size else None, **opts)
        if "positions" in local:
            f.create_dataset("positions", data=np.asarray(local["positions"], dtype=np.int64))


def _write_parallel(case_dir, local, names, shapes, *, n, layout, comm) -> None:
    """One file in global order, written collectively with the mpio driver (no compression:
    parallel HDF5 filters need collective chunk I/O, which is not worth the fragility here)."""
    from ..layouts import local_slices

    final = os.path.join(case_dir, "all.h5")
    made = None
    if comm.rank == 0:
        try:
            made = (files.private_dir_path(case_dir), None)
        except ResultsError as exc:
            made = (None, str(exc))
    tmpdir, err = exchange.bcast(comm, made, "making the activations' folder")
    if err:
        raise ResultsError(err)
    tmp = os.path.join(tmpdir, "all.h5")
    with import_h5py().File(tmp, "w", driver="mpio", comm=comm, libver=LIBVER) as f:
        dsets = {a: f.create_dataset(a, shape=tuple(shapes[a]), dtype=local[a].dtype) for a in names}
        for a in names:
            axis, arr, off = SEQ_AXIS[a], _host(local[a]), 0
            for s in local_slices(n, comm.size, comm.rank, layout):
                count = len(range(*s.indices(n)))
                if count:
                    g = [slice(None)] * arr.ndim
                    loc = [slice(None)] * arr.ndim
                    g[axis], loc[axis] = s, slice(off, off + count)
                    dsets[a][tuple(g)] = arr[tuple(loc)]
                off += count
    exchange.barrier(comm, "writing activations collectively")
    if comm.rank == 0:
        try:
            files.publish_file(tmp, final)
        finally:
            shutil.rmtree(tmpdir, ignore_errors=True)   # made by mkdtemp: ours alone
    exchange.barrier(comm, "publishing activations")


def _host(x):
    return x.get() if hasattr(x, "get") and not isinstance(x, np.ndarray) else np.asarray(x)


def add_virtual(group, spec: dict, prefix: str) -> None:
    """Create one virtual dataset per entry of ``spec``; source files are ``prefix + file``
    (relative to the master's directory, where HDF5 looks for them)."""
    h5py = import_h5py()
    act = group.require_group("activations")
    act.attrs["vds_json"] = json.dumps(spec)
    for name, d in spec.items():
        dtype = np.dtype(d["dtype"])
        layout = h5py.VirtualLayout(shape=tuple(d["shape"]), dtype=dtype)
        ndim, axis = len(d["shape"]), d["axis"]
        for src in d["sources"]:
            vsrc = h5py.VirtualSource(prefix + src["file"], src["dset"], shape=tuple(src["shape"]),
                                      dtype=dtype)
            for start, stop, step, off, count in src["maps"]:
                gsel = [slice(None)] * ndim
                lsel = [slice(None)] * ndim
                gsel[axis], lsel[axis] = slice(start, stop, step), slice(off, off + count)
                layout[tuple(gsel)] = vsrc[tuple(lsel)]
        fill = np.nan if dtype.kind == "f" else 0
        act.create_virtual_dataset(name, layout, fillvalue=fill)
