"""The master file of one output path: provenance, every completed case, virtual datasets.

The master is updated by copying it, changing the copy and renaming the copy over it
(:func:`~hpcattn.results.format.publish`), and a case enters it only once its data is on disk, so
the master's cases are exactly the completed ones, even after a SIGKILL.
"""
from __future__ import annotations

import os
import shutil

from .activations import add_virtual
from .format import (LIBVER, ResultsError, case_name, completed, format_attrs, import_h5py,
                     now, open_results, params_json, publish, set_attrs, sidecar)
from .tree import write_tree


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
        done: dict[int, str] = {}
        if force or not os.path.exists(self.path):
            if force:
                shutil.rmtree(sidecar(self.path), ignore_errors=True)
                self.unlock()
                self.lock()
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
            tmp = self.path + ".tmp"
            with import_h5py().File(tmp, "w", libver=LIBVER, track_order=True) as f:
                set_attrs(f, format_attrs())
                f.create_group("cases", track_order=True)
                f.create_group("runs", track_order=True)
            publish(tmp, self.path)
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
        ``activations`` (a spec from :func:`~hpcattn.results.write_activations`) and ``elapsed_s``."""
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
        tmp = self.path + ".tmp"
        shutil.copyfile(self.path, tmp)
        with import_h5py().File(tmp, "a", libver=LIBVER) as f:
            change(f)
        publish(tmp, self.path)
