"""What makes a file an hpcattn results file, opening one, and replacing files crash-safely.

Files are only ever *replaced*, never edited in place: written under a temporary name, flushed,
fsync'ed and renamed (:func:`publish`). A SIGKILL therefore leaves the previous file (which h5py
and h5dump open) and at most a stray ``*.tmp``.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os

import numpy as np

from ..errors import HpcattnError

FORMAT = "hpcattn-results"
FORMAT_VERSION = 1
# results that change from run to run even on identical inputs
TIMING_KEYS = frozenset({"wall_s", "gflops", "compute_s", "wait_s", "peak_rss_bytes",
                         "peak_alloc_bytes", "elapsed_s"})
LIBVER = ("earliest", "v110")  # readable by HDF5 1.10 tools (h5dump in Debian 12)


class ResultsError(HpcattnError):
    """A results file that cannot be used (missing, corrupt, foreign, another job's)."""


def import_h5py():
    """The h5py module, imported when a file is first touched (``import hpcattn`` stays light)."""
    import h5py as _h5py

    return _h5py


def have_mpio() -> bool:
    """True when h5py was built against a parallel HDF5 (then the ``mpio`` driver works)."""
    return bool(import_h5py().get_config().mpi)


def sidecar(path: str) -> str:
    """Directory that holds the activation files of master ``path``."""
    return os.fspath(path) + ".d"


def case_name(index: int) -> str:
    return f"case_{index:04d}"


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def format_attrs() -> dict:
    """The root attributes every new results file starts with."""
    return {"hpcattn_format": FORMAT, "hpcattn_format_version": FORMAT_VERSION, "created": now()}


# --- opening ------------------------------------------------------------------------------------

def open_results(path, mode: str = "r"):
    """Open an hpcattn results file; a one-line :class:`ResultsError` for anything else."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise ResultsError(f"results file {path} does not exist")
    try:
        f = import_h5py().File(path, mode)
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


# --- writing ------------------------------------------------------------------------------------

def set_attrs(obj, attrs: dict) -> None:
    """Attributes from a dict: None is skipped, lists of strings become HDF5 string arrays."""
    for key, val in attrs.items():
        if val is None:
            continue
        if isinstance(val, (list, tuple)) and val and all(isinstance(v, str) for v in val):
            obj.attrs[key] = np.array(val, dtype=import_h5py().string_dtype())
        else:
            obj.attrs[key] = val


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish(tmp: str, final: str) -> None:
    """Make ``tmp`` durable and atomically visible as ``final``."""
    _fsync(tmp)
    os.replace(tmp, final)
    with contextlib.suppress(OSError):
        _fsync(os.path.dirname(os.path.abspath(final)))
