"""The master file of one output path: provenance, every completed case, virtual datasets.

The master is built in memory and written under a temporary name of this writer's own, fsync'ed
and renamed (:func:`~hpcattn.results.files.write_bytes`); a case enters it only once its data is
on disk, so the master's cases are exactly the completed ones, even after a SIGKILL. The size and
BLAKE2b of every master hpcattn writes are kept in ``<master>.d/.master.sum``, so a master changed
behind hpcattn's back (bytes overwritten, truncated) is refused instead of resumed into.

An output path that is a symlink is written *through*: the file it points to is the master (the
link stays), and the lock and the ``.d`` folder belong to that file, so two runs through two
names of one file cannot both write it.
"""
from __future__ import annotations

import json
import os
import time

from . import cleaning, files, lock, records
from .activations import shard_checksums
from .format import (FORMAT, ResultsError, case_name, check_results, format_attrs, h5_reason,
                     image_bytes, import_h5py, new_image, now, open_image, set_attrs, sidecar,
                     text_attr)
from .reading import open_results
from .verify import case_problem

HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
PUBLISH_SHARE = 16    # take records in once 1/16 of the master's cases wait ...
PUBLISH_PAUSE = 20    # ... or once 20 times the last rewrite's duration has passed


class Master:
    """The master file of one output path. Used by one process (rank 0) only."""

    def __init__(self, path):
        self.path = os.fspath(path)
        self.real = None          # the resolved file, once locked or prepared
        self.run_index = None
        self.rerun: list[tuple[int, str]] = []   # (case, why it runs again) found by prepare
        self._lock = None
        self._image = None        # bytes of the master as hpcattn last wrote (or will write) it
        self._disk_sum = None     # checksum of the master on disk, when known
        self._pending: dict[int, tuple[str, dict]] = {}   # records not yet in the master
        self._cases = 0           # cases in the master
        self._published_at, self._publish_s = 0.0, 0.0

    @property
    def dir(self) -> str:
        return sidecar(self._resolve())

    @property
    def prefix(self) -> str:
        return os.path.basename(self.dir) + "/"

    def _resolve(self) -> str:
        if self.real is None:
            self.real = files.resolve_output(self.path)
        return self.real

    # --- locking: keeps two writers (runs, merges) off one master; keyed on the resolved file,
    # best effort where the file system has no flock
    def lock(self) -> None:
        if self._lock is None:
            real = self._resolve()
            os.makedirs(os.path.dirname(real), exist_ok=True)
            self._lock = lock.acquire(self.dir, self.path)

    def unlock(self) -> None:
        """Take waiting records into the master, then let go of the lock."""
        try:
            self.flush()
        finally:
            self._release()

    def _release(self) -> None:
        if self._lock is not None:
            fd, made = self._lock
            lock.release(fd, self.dir, made)
            self._lock = None

    # --- opening and creating ------------------------------------------------------------------
    def prepare(self, meta: dict, prov: dict, *, force: bool = False) -> dict[int, str]:
        """Create the master (or check an existing one) and record this run. Returns completed
        cases (index -> params JSON); empty with ``force``. Writers call :meth:`lock` first.

        A completed case whose activation files are missing or no longer match the checksums
        recorded when it completed is not returned (it runs again); :attr:`rerun` says which and
        why. A master that is damaged, foreign, or changed since hpcattn wrote it is refused with
        a one-line ResultsError, and nothing is written."""
        real = self._resolve()
        os.makedirs(os.path.dirname(real), exist_ok=True)
        files.own_dir(self.dir)
        done: dict[int, str] = {}
        if force or not os.path.lexists(real):
            if force:
                self._check_replaceable(meta)
            cleaning.clean_sidecar(self.dir, keep={files.LOCK_NAME})
            with new_image(real, track_order=True) as f:
                set_attrs(f, format_attrs())
                f.create_group("cases", track_order=True)
                f.create_group("runs", track_order=True)
                self._image = image_bytes(f)
        else:
            self._image = self._load()
            with open_image(self._image, real) as f:
                old = text_attr(f.attrs, "job_name")
                if old is not None and old != meta["job_name"]:
                    raise ResultsError(f"{self.path} holds results of job {old!r}, not "
                                       f"{meta['job_name']!r}; choose another --output or use --force")
        found = records.scan(self.dir)

        def record(f):
            # take in the records a killed run left, then keep only cases with their data intact
            bad = records.stitch(f, self.dir, records.unpublished(f, found), self.prefix, real)
            for g in list(f["cases"].values()):
                index = int(g.attrs["index"])
                why = case_problem(self.path, g)
                if why:
                    self.rerun.append((index, why))
                    del f["cases"][case_name(index)]
                else:
                    done[index] = text_attr(g.attrs, "params_json")
            self.rerun += [(i, why) for i, why in bad.items() if i not in done]
            self.rerun.sort()
            runs = f.require_group("runs")
            self.run_index = len(runs)
            set_attrs(runs.create_group(f"run_{self.run_index:04d}"), prov)
            set_attrs(f, meta)
            set_attrs(f, prov)
        self._update(record)
        self._forget(n for names in found.values() for n in names)
        cleaning.clean_temps(self.dir, os.path.dirname(real), os.path.basename(real))
        return done

    def _load(self) -> bytes:
        """The master's bytes, checked: a usable results file, and the file hpcattn last wrote."""
        try:   # a foreign file is refused before it is read into memory (it may be huge)
            with import_h5py().File(self.real, "r") as f:
                if text_attr(f.attrs, "hpcattn_format") != FORMAT:
                    check_results(f, self.path)
        except OSError as exc:
            raise ResultsError(f"{self.path} is not a readable HDF5 file (truncated or corrupt?): "
                               f"{h5_reason(exc)}") from None
        except ResultsError:
            raise
        except Exception:  # noqa: BLE001 - damaged attributes: the full check below names them
            pass
        try:
            data = files.read_bytes(self.real)
        except OSError as exc:
            raise ResultsError(f"{self.path} cannot be read: {exc.strerror or exc}") from None
        try:
            f = open_image(data, self.real)
        except OSError as exc:
            raise ResultsError(f"{self.path} is not a readable HDF5 file (truncated or corrupt?): "
                               f"{h5_reason(exc)}") from None
        with f:
            sums = self._sums()
            self._disk_sum = files.checksum_bytes(data)
            if sums and self._disk_sum not in sums:
                raise ResultsError(f"{self.path} is not the file hpcattn last wrote there (size or "
                                   f"checksum differs from {files.DIGEST_NAME}: changed or "
                                   "corrupted); nothing was written; restore it, or start over "
                                   "with --force")
            check_results(f, self.path)
        return data

    def check_loadable(self) -> None:
        """Raise the one-line ResultsError that resuming into this master would raise."""
        self._resolve()
        self._image = self._load()

    def changed(self) -> str | None:
        """Why the master on disk is not the file hpcattn last wrote there (None when it is, or
        when no checksum was kept). Reads only; takes no lock."""
        if not os.path.exists(self.path):
            return None   # for the reader to report
        sums = self._sums()
        try:
            data = files.read_bytes(self._resolve())
        except OSError as exc:
            return f"{self.path} cannot be read: {exc.strerror or exc}"
        if sums and files.checksum_bytes(data) not in sums:
            return (f"{self.path} is not the file hpcattn last wrote there (size or checksum "
                    f"differs from {files.DIGEST_NAME}: changed or corrupted)")
        return None

    def replace(self, data: bytes) -> None:
        """Publish ``data`` (a whole master built elsewhere, e.g. by merge) as this master."""
        self._publish(data)

    def _sums(self) -> list[dict]:
        """Checksums of the last masters written here (the current one and the one before)."""
        try:
            sums = json.loads(files.read_bytes(os.path.join(self.dir, files.DIGEST_NAME), 1 << 16))
            return [s for s in sums if isinstance(s, dict)]
        except (OSError, ValueError, TypeError):
            return []

    def _check_replaceable(self, meta: dict) -> None:
        """--force replaces only a results file (or a damaged one hpcattn wrote); anything else
        at the output path is refused."""
        real = self.real
        if not os.path.lexists(real):
            return
        job = meta.get("job_path")
        if job and os.path.exists(job) and os.path.samefile(job, real):
            raise ResultsError(f"{self.path} is the job file itself; choose another --output")
        if not os.path.isfile(real) or os.path.islink(real):
            raise ResultsError(f"{self.path} is not a regular file; --force replaces only hpcattn "
                               "results files (move it away or choose another --output)")
        head = files.read_head(real, 1 << 20)
        ours = head.startswith(HDF5_SIGNATURE) and (self._sums() or b"hpcattn-results" in head)
        if not ours:
            try:
                with import_h5py().File(real, "r") as f:
                    check_results(f, self.path)
                    ours = True
            except (OSError, ResultsError):
                ours = False
        if not ours:
            raise ResultsError(f"{self.path} is not an hpcattn results file; --force replaces only "
                               "results files hpcattn wrote (move it away or choose another --output)")

    # --- adding cases --------------------------------------------------------------------------
    def add_cases(self, recs: list[dict]) -> None:
        """Record completed cases: each has index, kind, params, results, and optionally
        ``activations`` (a spec from :func:`~hpcattn.results.write_activations`) and
        ``elapsed_s``. Each case is durable (a record file) when this returns; the master takes
        it in at once while that is cheap, else soon (:meth:`flush`; readers see it either way)."""
        for rec in recs:
            rec = dict(rec, completed_at=now())
            if rec.get("activations"):
                shard_checksums(self.dir, rec["activations"])
            name = records.write_record(self.dir, rec, self.run_index)
            old = self._pending.pop(rec["index"], None)
            self._pending[rec["index"]] = (name, rec)
            if old:
                self._forget([old[0]])
        if self._due():
            self.flush()

    def _due(self) -> bool:
        """Take records in when at least 1/16 of the master's cases wait (so rewriting the master
        costs a constant per case), or when the last rewrite took under 1/20 of the time since."""
        waiting = len(self._pending)
        if not waiting:
            return False
        if waiting * PUBLISH_SHARE >= self._cases:
            return True
        return time.monotonic() - self._published_at >= PUBLISH_PAUSE * self._publish_s

    def flush(self) -> None:
        """Take every waiting record into the master (then delete those records)."""
        if not self._pending:
            return
        pending = dict(self._pending)

        def take_in(f):   # copying a record's group costs far less than building it again
            bad = records.stitch(f, self.dir, {i: name for i, (name, _) in pending.items()},
                                 self.prefix, self.real)
            for index, why in bad.items():
                raise ResultsError(f"{self.path}: {case_name(index)}: {why}")
        self._update(take_in)
        self._pending.clear()
        self._forget(name for name, _ in pending.values())

    def _forget(self, names) -> None:
        """Delete records the master has taken in (a kill before this only leaves duplicates,
        which the master already names)."""
        for name in names:
            files.remove(os.path.join(self.dir, name))

    def _update(self, change) -> None:
        """Change a copy of the master in memory and publish it: the master on disk is always
        whole, and a failed change leaves it (and this object) as they were."""
        if self._image is None:
            self._resolve()
            self._image = self._load()
        t0 = time.monotonic()
        with open_image(self._image, self.real, write=True) as f:
            change(f)
            self._cases = len(f["cases"])
            data = image_bytes(f)
        self._publish(data)
        self._published_at = time.monotonic()
        self._publish_s = self._published_at - t0

    def _publish(self, data: bytes) -> None:
        files.own_dir(self.dir)
        new = files.checksum_bytes(data)
        # the checksum file first: a kill between the two writes leaves the old master, which the
        # file still accepts
        files.write_bytes(os.path.join(self.dir, files.DIGEST_NAME),
                          json.dumps([new] + ([self._disk_sum] if self._disk_sum else [])).encode())
        files.write_bytes(self.real, data)
        self._image, self._disk_sum = data, new


def verify(path) -> list[tuple[int | None, str]]:
    """Problems of results file ``path``, one line each: ``(case index, reason)`` for a completed
    case whose activation files are missing or do not match the checksums recorded when it
    completed, ``(None, reason)`` for the master itself (changed since hpcattn wrote it). Empty
    when everything is intact. A file that cannot be used at all raises ResultsError."""
    path = os.fspath(path)
    problems: list[tuple[int | None, str]] = []
    why = Master(path).changed()
    if why:
        problems.append((None, why))
    with open_results(path) as f:
        for g in f["cases"].values():
            why = case_problem(path, g)
            if why:
                problems.append((int(g.attrs["index"]), why))
    return problems
