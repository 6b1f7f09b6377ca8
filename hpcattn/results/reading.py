"""Reading a results file as hpcattn sees it: the master plus the case records a running (or
killed) writer has not yet taken into it (:mod:`.records`)."""
from __future__ import annotations

import os

from . import records
from .format import ResultsError, check_results, h5_reason, import_h5py, sidecar, text_attr


def open_results(path, mode: str = "r"):
    """Open an hpcattn results file (a symlink opens its target, so activation sources resolve
    next to it); a one-line :class:`ResultsError` for anything else: missing, not HDF5,
    truncated, foreign, damaged attributes, links to other files.

    Read-only, it shows every completed case: the master plus the case records a running (or
    killed) writer has not yet taken into it (:mod:`hpcattn.results.records`), then in memory."""
    path = os.fspath(path)
    for _ in range(10):
        if not os.path.exists(path):
            raise ResultsError(f"results file {path} does not exist")
        real = os.path.realpath(path)
        found = records.scan(sidecar(real)) if mode == "r" else {}   # before the master opens
        try:
            f = import_h5py().File(real, mode)
        except OSError as exc:
            raise ResultsError(f"{path} is not a readable HDF5 file (truncated or corrupt?): "
                               f"{h5_reason(exc)}") from None
        try:
            check_results(f, path)
            todo = records.unpublished(f, found) if found else {}
        except BaseException:
            f.close()
            raise
        if not todo:
            return f
        f.close()
        try:
            return records.stitched(path, real, todo)
        except FileNotFoundError:
            continue   # the writer took a record in meanwhile: the master has it now
    raise ResultsError(f"{path} changed while it was being read, ten times; try again")


def completed(path) -> dict[int, str]:
    """Completed cases of master ``path``: index -> parameters (canonical JSON)."""
    with open_results(path) as f:
        return {int(g.attrs["index"]): str(text_attr(g.attrs, "params_json"))
                for g in f["cases"].values()}
