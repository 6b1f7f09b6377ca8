"""HDF5 results: one master file per job run, always consistent, plus per-case activation shards.

Layout (details in docs/hdf5-layout.md)::

    results/quickstart.h5            master: provenance, every completed case, virtual datasets
    results/quickstart.h5.d/         activation files, one directory per case
        case_0003/r0.h5 ...          serial h5py: one shard file per rank (its positions, local order)
        case_0003/all.h5             h5py with MPI: one file in global order, written collectively

Crash safety: files are only ever *replaced*, never edited in place. Shards are written under a
temporary name, flushed, fsync'ed and renamed; the master is updated by copying it, appending the
new cases to the copy and renaming the copy over it. A SIGKILL therefore leaves the previous
master (which h5py and h5dump open) and at most a stray ``*.tmp``; a case is in the master only
once its data is on disk, so the master's cases are exactly the completed ones.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import platform
import shutil
import socket
import sys

import numpy as np

from .errors import HpcattnError

FORMAT = "hpcattn-results"
FORMAT_VERSION = 1
ACTIVATIONS = ("q", "k", "v", "out", "lse")
SEQ_AXIS = {"q": 1, "k": 1, "v": 1, "out": 1, "lse": 2}
# results that change from run to run even on identical inputs
TIMING_KEYS = frozenset({"wall_s", "gflops", "compute_s", "wait_s", "peak_rss_bytes",
                         "peak_alloc_bytes", "elapsed_s"})
LIBVER = ("earliest", "v110")  # readable by HDF5 1.10 tools (h5dump in Debian 12)


class ResultsError(HpcattnError):
    """A results file that cannot be used (missing, corrupt, foreign, another job's)."""


def _h5py():
    import h5py

    return h5py


def have_mpio() -> bool:
    """True when h5py was built against a parallel HDF5 (then the ``mpio`` driver works)."""
    return bool(_h5py().get_config().mpi)


def sidecar(path: str) -> str:
    """Directory that holds the activation files of master ``path``."""
    return os.fspath(path) + ".d"


def case_name(index: int) -> str:
    return f"case_{index:04d}"


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


# --- opening ------------------------------------------------------------------------------------

def open_results(path, mode: str = "r"):
    """Open an hpcattn results file; a one-line :class:`ResultsError` for anything else."""
    h5py = _h5py()
    path = os.fspath(path)
    if not os.path.exists(path):
        raise ResultsError(f"results file {path} does not exist")
    try:
        f = h5py.File(path, mode)
    except OSError as exc:
        reason = str(exc).split("(")[0].strip().rstrip(":") or type(exc).__name__
        raise ResultsError(f"{path} is not a readable HDF5 file (truncated or corrupt?): {reason}") from None
    fmt = f.attrs.get("hpcattn_format")
    if fmt != FORMAT or "cases" not in f:
        f.close()
        raise ResultsError(f"{path} is an HDF5 file but not an hpcattn results file (no "
                           f"hpcattn_format={FORMAT!r} attribute); expected a file from 'hpcattn run'")
    version = int(f.attrs.get("hpcattn_format_version", 0))
    if version > FORMAT_VERSION:
        f.close()
        raise ResultsError(f"{path} has results format version {version}; this hpcattn reads up to "
                           f"{FORMAT_VERSION} (upgrade hpcattn)")
    return f


def completed(path) -> dict[int, str]:
    """Completed cases of master ``path``: index -> parameters (canonical JSON)."""
    with open_results(path) as f:
        return {int(g.attrs["index"]): str(g.attrs["params_json"]) for g in f["cases"].values()}


def params_json(params: dict) -> str:
    return json.dumps(params, sort_keys=True, default=_json_default)


def _json_default(x):
    if isinstance(x, np.generic):
        return x.item()
    raise TypeError(f"{type(x).__name__} is not JSON serialisable")


# --- provenance ---------------------------------------------------------------------------------

def provenance(comm=None, argv=None) -> dict:
    """Where and with what a run happens. Collective when ``comm`` is given (gathers host names)."""
    h5py = _h5py()
    from ._version import __version__

    host = socket.gethostname()
    hosts = sorted(set(comm.allgather(host))) if comm is not None else [host]
    info = {
        "hpcattn_version": __version__,
        "started": now(),
        "hosts": hosts,
        "ranks": comm.size if comm is not None else 1,
        "python_version": platform.python_version(),
        "numpy_version": np.__version__,
        "h5py_version": h5py.version.version,
        "hdf5_version": h5py.version.hdf5_version,
        "h5py_mpi": have_mpio(),
        "platform": platform.platform(),
        "command": " ".join(sys.argv if argv is None else argv),
    }
    try:
        from mpi4py import MPI

        # Open MPI pads the string with NULs, which HDF5 strings cannot hold
        info["mpi_library_version"] = MPI.Get_library_version().replace("\x00", "").strip().splitlines()[0]
        info["mpi_version"] = "%d.%d" % MPI.Get_version()
        info["mpi4py_version"] = __import__("mpi4py").__version__
    except Exception:  # noqa: BLE001 - provenance must never stop a run
        pass
    info.update(gpu_info())
    # under Slurm: which job (and array task) wrote this, to find its logs and script again
    info.update({var.lower(): os.environ[var] for var in SLURM_VARS if var in os.environ})
    return info


SLURM_VARS = ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_JOB_NAME",
              "SLURM_JOB_NODELIST", "SLURM_CLUSTER_NAME")


def gpu_info() -> dict:
    """GPU names and driver/runtime versions when CuPy and a GPU are present, else nothing."""
    import importlib.util

    if importlib.util.find_spec("cupy") is None:
        return {}
    try:
        import cupy

        n = cupy.cuda.runtime.getDeviceCount()
        names = [cupy.cuda.runtime.getDeviceProperties(i)["name"].decode() for i in range(n)]
        return {"gpu_count": n, "gpu_names": names, "cupy_version": cupy.__version__,
                "cuda_runtime_version": cupy.cuda.runtime.runtimeGetVersion(),
                "cuda_driver_version": cupy.cuda.runtime.driverGetVersion()}
    except Exception:  # noqa: BLE001 - no usable GPU: record nothing
        return {}


# --- writing helpers ----------------------------------------------------------------------------

def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _publish(tmp: str, final: str) -> None:
    """Make ``tmp`` durable and atomically visible as ``final``."""
    _fsync(tmp)
    os.replace(tmp, final)
    with contextlib.suppress(OSError):
        _fsync(os.path.dirname(os.path.abspath(final)))


def set_attrs(obj, attrs: dict) -> None:
    for key, val in attrs.items():
        if val is None:
            continue
        if isinstance(val, (list, tuple)) and val and all(isinstance(v, str) for v in val):
            obj.attrs[key] = np.array(val, dtype=_h5py().string_dtype())
        else:
            obj.attrs[key] = val


def write_tree(group, data: dict) -> None:
    """Results as small datasets: numbers and lists of numbers -> datasets, strings -> attributes,
    dicts -> subgroups, None -> nothing."""
    for key, val in data.items():
        if val is None:
            continue
        if isinstance(val, dict):
            write_tree(group.require_group(key), val)
        elif isinstance(val, str):
            group.attrs[key] = val
        else:
            arr = np.asarray(val)
            if arr.dtype.kind in "biuf":
                group.create_dataset(key, data=arr)
            elif arr.dtype.kind in "UO" and all(isinstance(v, str) for v in arr.ravel()):
                group.create_dataset(key, data=arr.astype(object), dtype=_h5py().string_dtype())
            else:
                raise HpcattnError(f"result {key!r} of type {type(val).__name__} cannot be stored; "
                                   "expected numbers, strings, arrays or dicts of them")


def read_tree(group) -> dict:
    """Inverse of :func:`write_tree` (virtual activation datasets are skipped)."""
    out = dict(group.attrs)
    for key, obj in group.items():
        if key == "activations":
            continue
        if isinstance(obj, _h5py().Group):
            out[key] = read_tree(obj)
        else:
            val = obj[()]
            out[key] = val.decode() if isinstance(val, bytes) else val
    return out


# --- activations --------------------------------------------------------------------------------

def write_activations(path: str, index: int, local: dict, *, n: int, layout: str, comm,
                      compression: str = "none") -> dict:
    """Write this rank's q/k/v/out/lse of case ``index``; collective. Returns the virtual-dataset
    spec (the same on every rank) that :class:`Master` turns into datasets in global order.

    ``local`` holds the rank's arrays (sequence axis as in :data:`SEQ_AXIS`, positions in the
    layout's local order). Serial h5py: one file per rank. Parallel h5py: one file, collectively.
    """
    from .layouts import local_slices

    case_dir = os.path.join(sidecar(path), case_name(index))
    size, rank = comm.size, comm.rank
    if rank == 0:
        shutil.rmtree(case_dir, ignore_errors=True)
        os.makedirs(case_dir)
    comm.Barrier()
    names = [a for a in ACTIVATIONS if a in local]
    shapes = {a: _global_shape(local[a], SEQ_AXIS[a], n) for a in names}
    parallel = size > 1 and have_mpio()
    error = None
    try:
        if parallel:
            _write_parallel(case_dir, local, names, shapes, n=n, layout=layout, comm=comm)
        else:
            _write_shard(os.path.join(case_dir, f"r{rank}.h5"), local, names, compression)
    except Exception as exc:  # noqa: BLE001 - reported collectively below
        error = f"rank {rank}: {type(exc).__name__}: {exc}"
    errors = [e for e in comm.allgather(error) if e]
    if errors:
        raise HpcattnError(f"writing activations of {case_name(index)} failed: {errors[0]}")
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
        spec[a] = {"shape": shapes[a], "dtype": np.dtype(local[a].dtype).str, "axis": axis,
                   "sources": sources}
    return spec


def _global_shape(arr, axis: int, n: int) -> list[int]:
    shape = list(arr.shape)
    shape[axis] = n
    return shape


def _write_shard(final: str, local: dict, names, compression: str) -> None:
    h5py = _h5py()
    tmp = final + ".tmp"
    opts = {} if compression == "none" else {"compression": compression}
    with h5py.File(tmp, "w", libver=LIBVER) as f:
        for a in names:
            arr = np.ascontiguousarray(_host(local[a]))
            f.create_dataset(a, data=arr, chunks=True if arr.size else None, **opts)
        if "positions" in local:
            f.create_dataset("positions", data=np.asarray(local["positions"], dtype=np.int64))
    _publish(tmp, final)


def _write_parallel(case_dir, local, names, shapes, *, n, layout, comm) -> None:
    """One file in global order, written collectively with the mpio driver (no compression:
    parallel HDF5 filters need collective chunk I/O, which is not worth the fragility here)."""
    h5py = _h5py()
    from .layouts import local_slices

    final = os.path.join(case_dir, "all.h5")
    tmp = final + ".tmp"
    with h5py.File(tmp, "w", driver="mpio", comm=comm, libver=LIBVER) as f:
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
    comm.Barrier()
    if comm.rank == 0:
        _publish(tmp, final)
    comm.Barrier()


def _host(x):
    return x.get() if hasattr(x, "get") and not isinstance(x, np.ndarray) else np.asarray(x)


def add_virtual(group, spec: dict, prefix: str) -> None:
    """Create one virtual dataset per entry of ``spec``; source files are ``prefix + file``
    (relative to the master's directory, where HDF5 looks for them)."""
    h5py = _h5py()
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


def missing_sources(path: str, group) -> list[str]:
    """Activation source files a case of master ``path`` refers to that do not exist."""
    if "activations" not in group:
        return []
    spec = json.loads(group["activations"].attrs["vds_json"])
    files = {src["file"] for d in spec.values() for src in d["sources"]}
    base = sidecar(path)
    return sorted(f for f in files if not os.path.exists(os.path.join(base, f)))


# --- the master file ----------------------------------------------------------------------------

class Master:
    """The master file of one output path. Used by one process (rank 0) only."""

    def __init__(self, path):
        self.path = os.fspath(path)
        self.prefix = os.path.basename(sidecar(self.path)) + "/"
        self.run_index = None
        self._lock = None

    # locking keeps two runs from writing the same master (lost updates); best effort where the
    # file system has no flock
    def lock(self) -> None:
        import fcntl

        os.makedirs(sidecar(self.path), exist_ok=True)
        fh = open(os.path.join(sidecar(self.path), ".lock"), "w")
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.close()
            raise ResultsError(f"another hpcattn run is writing {self.path} (lock held); wait for it "
                               "or choose another --output") from None
        except OSError:
            pass  # no flock here (some network file systems): go on unlocked
        self._lock = fh

    def unlock(self) -> None:
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def prepare(self, meta: dict, prov: dict, *, force: bool = False) -> dict[int, str]:
        """Create the master (or check an existing one) and record this run. Returns completed
        cases (index -> params JSON); empty with ``force``."""
        h5py = _h5py()
        done: dict[int, str] = {}
        if force or not os.path.exists(self.path):
            if force:
                shutil.rmtree(sidecar(self.path), ignore_errors=True)
                self.unlock()
                self.lock()
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
            tmp = self.path + ".tmp"
            with h5py.File(tmp, "w", libver=LIBVER, track_order=True) as f:
                set_attrs(f, {"hpcattn_format": FORMAT, "hpcattn_format_version": FORMAT_VERSION,
                              "created": now()})
                f.create_group("cases", track_order=True)
                f.create_group("runs", track_order=True)
            _publish(tmp, self.path)
        else:
            with open_results(self.path) as f:
                old = f.attrs.get("job_name")
                if old is not None and old != meta["job_name"]:
                    raise ResultsError(f"{self.path} holds results of job {old!r}, not "
                                       f"{meta['job_name']!r}; choose another --output or use --force")
            done = completed(self.path)

        def record(f):
            runs = f.require_group("runs")
            self.run_index = len(runs)
            set_attrs(runs.create_group(f"run_{self.run_index:04d}"), prov)
            set_attrs(f, meta)
            set_attrs(f, prov)
        self._update(record)
        return done

    def add_cases(self, records: list[dict]) -> None:
        """Append completed cases: each record has index, kind, params, results, and optionally
        ``activations`` (a spec from :func:`write_activations`) and ``elapsed_s``."""
        def add(f):
            cases = f["cases"]
            for rec in records:
                name = case_name(rec["index"])
                if name in cases:
                    del cases[name]
                g = cases.create_group(name)
                params = rec["params"]
                set_attrs(g, {"index": rec["index"], "kind": rec["kind"], "run": self.run_index,
                              "completed_at": now(), "params_json": params_json(params)})
                set_attrs(g, {f"param_{k}": v for k, v in params.items()})
                write_tree(g, rec["results"])
                if rec.get("elapsed_s") is not None:
                    g.create_dataset("elapsed_s", data=rec["elapsed_s"])
                if rec.get("activations"):
                    add_virtual(g, rec["activations"], self.prefix)
        self._update(add)

    def _update(self, change) -> None:
        """Copy the master, change the copy, publish it: the master on disk is always whole."""
        h5py = _h5py()
        tmp = self.path + ".tmp"
        shutil.copyfile(self.path, tmp)
        with h5py.File(tmp, "a", libver=LIBVER) as f:
            change(f)
        _publish(tmp, self.path)


# --- merging ------------------------------------------------------------------------------------

def merge(out: str, parts: list[str]) -> dict:
    """Merge results files of one job (e.g. Slurm array tasks) into ``out``. An existing ``out``
    counts as one more part, so merging again after more tasks finished is safe. Activation files
    are hard-linked (copied across file systems) into ``out``'s directory. Returns a summary."""
    h5py = _h5py()
    out = os.fspath(out)
    sources = [p for p in dict.fromkeys([out] if os.path.exists(out) else []) ]
    for p in parts:
        if os.path.abspath(p) != os.path.abspath(out) and p not in sources:
            sources.append(p)
    if not parts:
        raise ResultsError("merge needs at least one part file")
    cases: dict[int, tuple[str, str]] = {}     # index -> (part path, params json)
    job_name, job_meta, n_cases = None, {}, None
    for p in sources:
        with open_results(p) as f:
            name = f.attrs.get("job_name")
            if job_name is None:
                job_name = name
                job_meta = {k: f.attrs[k] for k in ("job_name", "job_kind", "job_text", "job_path",
                                                    "n_cases") if k in f.attrs}
            elif name != job_name:
                raise ResultsError(f"{p} holds job {name!r} but {sources[0]} holds {job_name!r}; "
                                   "expected parts of one job")
            n_cases = job_meta.get("n_cases")
            for g in f["cases"].values():
                idx, pj = int(g.attrs["index"]), str(g.attrs["params_json"])
                if idx in cases and cases[idx][1] != pj:
                    raise ResultsError(f"{case_name(idx)} has different parameters in {cases[idx][0]} "
                                       f"and {p}; expected parts of one job")
                cases.setdefault(idx, (p, pj))
                missing = missing_sources(p, g)
                if missing:
                    raise ResultsError(f"{p}: {case_name(idx)} refers to missing activation file "
                                       f"{sidecar(p)}/{missing[0]}")
    out_dir = sidecar(out)
    os.makedirs(out_dir, exist_ok=True)
    tmp = out + ".tmp"
    prefix = os.path.basename(out_dir) + "/"
    with h5py.File(tmp, "w", libver=LIBVER, track_order=True) as fo:
        set_attrs(fo, {"hpcattn_format": FORMAT, "hpcattn_format_version": FORMAT_VERSION,
                       "created": now(), "merged_from": [os.path.abspath(p) for p in sources]})
        set_attrs(fo, job_meta)
        fo.create_group("cases", track_order=True)
        runs_out = fo.create_group("runs", track_order=True)
        run_map: dict[tuple[str, int], int] = {}
        for p in sources:
            with open_results(p) as f:
                for key, val in f.attrs.items():
                    if key not in fo.attrs:
                        fo.attrs[key] = val
                for rname, rg in f["runs"].items():
                    new = len(runs_out)
                    run_map[(p, int(rname.split("_")[1]))] = new
                    f.copy(rg, runs_out, name=f"run_{new:04d}")
        for idx in sorted(cases):
            p = cases[idx][0]
            name = case_name(idx)
            with open_results(p) as f:
                g = f["cases"][name]
                f.copy(g, fo["cases"], name=name, without_attrs=False)
                gn = fo["cases"][name]
                gn.attrs["run"] = run_map.get((p, int(g.attrs.get("run", 0))), 0)
                if "activations" in g:
                    spec = json.loads(g["activations"].attrs["vds_json"])
                    del gn["activations"]
                    if os.path.abspath(p) != os.path.abspath(out):
                        _link_tree(os.path.join(sidecar(p), name), os.path.join(out_dir, name))
                    add_virtual(gn, spec, prefix)
    _publish(tmp, out)
    return {"cases": len(cases), "parts": len(sources), "n_cases": n_cases,
            "missing": (sorted(set(range(int(n_cases))) - set(cases)) if n_cases is not None else [])}


def _link_tree(src: str, dst: str) -> None:
    shutil.rmtree(dst, ignore_errors=True)
    os.makedirs(dst)
    for name in os.listdir(src):
        if name.endswith(".tmp"):
            continue
        try:
            os.link(os.path.join(src, name), os.path.join(dst, name))
        except OSError:
            shutil.copy2(os.path.join(src, name), os.path.join(dst, name))
