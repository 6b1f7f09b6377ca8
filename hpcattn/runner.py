"""Run the cases of a job under MPI, writing results as it goes; resumable and stoppable.

* Attention cases use every rank together (one ring per case).
* Mixer cases are single-process references: the ranks take them one case each at a time, so
  P ranks finish a mixer sweep about P times sooner, with the same file as one rank.
* A case is complete once it is in the master file (:mod:`hpcattn.results`), which only happens
  after its data is on disk. A rerun skips complete cases and redoes the rest; ``force`` starts over.
* SIGTERM, SIGINT and SIGUSR1 ask the ranks to stop after the current case (ranks agree on it
  after every case); a second signal ends the process at once. Either way the master stays whole.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import time

from . import exchange, results
from .errors import CollectiveError, HpcattnError
from .jobs import array_task_path

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


class StopFlag:
    """Remembers the first stop signal; restores default handling so a second one acts at once."""

    def __init__(self):
        self.signum = 0
        self._old = {}

    def _handler(self, signum, frame):
        self.signum = self.signum or signum
        signal.signal(signum, self._old.get(signum, signal.SIG_DFL))

    def __enter__(self):
        for sig in STOP_SIGNALS:
            self._old[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)

    def agreed(self, comm) -> int:
        """Collective: the signal any rank received (0 for none)."""
        from mpi4py import MPI

        return exchange.allreduce(comm, self.signum, "agreeing on stop signals", op=MPI.MAX)


class Progress:
    """``[####----] 3/12 cases  elapsed 0:05  ETA 0:15  <label>`` on a terminal; silent otherwise."""

    def __init__(self, total: int, done: int, enabled: bool, stream=None):
        self.stream = stream or sys.stderr
        self.total, self.done, self.enabled = total, done, enabled
        self.ran = 0
        self.t0 = time.monotonic()
        self.width = 0

    def show(self, label: str = "") -> None:
        if not self.enabled:
            return
        elapsed = time.monotonic() - self.t0
        remaining = self.total - self.done
        eta = _clock(elapsed / self.ran * remaining) if self.ran else "?"
        frac = self.done / self.total if self.total else 1.0
        bar = "#" * int(20 * frac) + "-" * (20 - int(20 * frac))
        line = (f"[{bar}] {self.done}/{self.total} cases  elapsed {_clock(elapsed)}  ETA {eta}  "
                f"{label}")[:160]
        self.stream.write("\r" + line.ljust(self.width))
        self.stream.flush()
        self.width = len(line)

    def step(self, n: int = 1, label: str = "") -> None:
        self.done += n
        self.ran += n
        self.show(label)

    def close(self) -> None:
        if self.enabled and self.width:
            self.stream.write("\n")
            self.stream.flush()


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    return f"{h}:{rem // 60:02d}:{rem % 60:02d}" if h else f"{rem // 60}:{rem % 60:02d}"


def output_path(job, output: str | None, array_task: int | None, array_tasks: int | None) -> str:
    """``--output``, else the job's path; an array task without ``--output`` writes its own
    ``<stem>.task<I>.h5`` (two writers must never share one master)."""
    if output:
        return output
    if array_tasks:
        return array_task_path(job.output, array_task)
    return job.output


def select(n_cases: int, array_task: int | None, array_tasks: int | None) -> list[int]:
    """Case indices this run owns: all, or ``c % array_tasks == array_task``."""
    if array_tasks is None:
        return list(range(n_cases))
    return [c for c in range(n_cases) if c % array_tasks == array_task]


def label(params: dict, axes) -> str:
    return " ".join(f"{k}={params[k]}" for k in axes if k in params)


# --- preparing ----------------------------------------------------------------------------------

def prepare_cases(job, size: int) -> list[dict]:
    """Resolved parameters of every case of ``job``; checks them all before anything runs.
    Collective-safe: every rank computes the same and raises the same CollectiveError."""
    cases = job.cases()
    resolved = []
    for i, params in enumerate(cases):
        try:
            if job.kind == "attention":
                from .cases import attention_case, resolved_params

                case, tol = attention_case(params)
                case.validate(size)
                resolved.append(resolved_params(case, tol))
            else:
                check = _single_process(job.kind)[0]
                resolved.append(dict(check(params) or params) if check else dict(params))
        except HpcattnError as exc:
            raise CollectiveError(f"{job.path}: case {i} ({label(params, job.axes)}): {exc}") from None
    return resolved


def _mixer_cases():
    from .mixers import cases

    return cases


def _single_process(kind):
    """(check, run) of one-rank cases: mixer cases, or training cases (``hpcattn.train.job``)."""
    if kind == "train":
        from .train import job

        return job.check_train_case, job.run_train_case
    cases = _mixer_cases()
    return getattr(cases, "check_mixer_case", None), cases.run_mixer_case


# --- running ------------------------------------------------------------------------------------

def run_job(job, comm, *, output: str | None = None, array_task: int | None = None,
            array_tasks: int | None = None, force: bool = False, progress: bool | None = None,
            argv=None) -> dict:
    """Run the cases of ``job`` this run owns on ``comm``; collective. Returns (on every rank) a
    summary: path, total, selected, skipped, ran, failed_checks, stopped (signal number or 0)."""
    size, rank = comm.size, comm.rank
    path = output_path(job, output, array_task, array_tasks)
    params = prepare_cases(job, size)
    mine = select(len(params), array_task, array_tasks)
    if job.kind == "attention":   # a case that cannot fit is refused before any case runs
        from .cases import preflight

        preflight({c: params[c] for c in mine}, comm)
    prov = results.provenance(comm, argv)
    master = results.Master(path) if rank == 0 else None
    status = None
    if rank == 0:
        meta = {"job_name": job.name, "job_kind": job.kind, "job_path": os.path.abspath(job.path),
                "job_text": job.text, "job_description": job.description, "n_cases": len(params),
                "sweep_json": json.dumps(job.sweep), "activations": job.activations,
                "array_task": array_task if array_tasks else None, "array_tasks": array_tasks}
        try:
            master.lock()
            done = master.prepare(meta, prov, force=force)
            for c in mine:
                if c in done and done[c] != results.params_json(params[c]):
                    raise results.ResultsError(
                        f"{path}: {results.case_name(c)} was computed with other parameters "
                        f"({_diff(json.loads(done[c]), params[c])}); rerun with --force or "
                        "choose another --output")
            status = ("ok", [c for c in mine if c not in done])
            for c, why in master.rerun:
                if c in mine:
                    sys.stderr.write(f"hpcattn run: {path}: {results.case_name(c)}: {why}; "
                                     "running it again\n")
        except HpcattnError as exc:
            master.unlock()
            status = ("error", str(exc))
    status = exchange.bcast(comm, status, "opening the results file")
    if status[0] == "error":
        raise CollectiveError(status[1])
    pending = status[1]
    if progress is None:
        progress = sys.stderr.isatty()
    bar = Progress(len(mine), len(mine) - len(pending), progress and rank == 0)
    summary = {"path": path, "total": len(params), "selected": len(mine),
               "skipped": len(mine) - len(pending), "ran": 0, "failed_checks": [], "stopped": 0}
    try:
        with StopFlag() as stop:
            bar.show()
            runner = _run_attention if job.kind == "attention" else _run_mixers
            runner(job, comm, params, pending, master, bar, stop, summary)
    finally:
        bar.close()
        if master is not None:
            master.unlock()
    return exchange.bcast(comm, summary, "the job's summary")


def _diff(old: dict, new: dict) -> str:
    """'repeats=1, now 2; ...' for the keys whose values differ."""
    keys = sorted(set(old) | set(new), key=lambda k: (k not in new, k))
    return "; ".join(f"{k}={old.get(k, '(unset)')!r}, now {new.get(k, '(unset)')!r}"
                     for k in keys if old.get(k) != new.get(k))


def _run_attention(job, comm, params, pending, master, bar, stop, summary) -> None:
    from .cases import attention_case, run_attention_case

    for c in pending:
        summary["stopped"] = stop.agreed(comm)
        if summary["stopped"]:
            return
        t0 = time.perf_counter()
        case, tol = attention_case(params[c])
        res = run_attention_case(case, comm, keep_activations=job.activations)
        local = res.pop("local", None)
        if "max_abs_err" in res:
            res["tolerance"] = params[c]["tolerance"]
            res["check_passed"] = bool(res["max_abs_err"] <= res["tolerance"])
            if not res["check_passed"]:
                summary["failed_checks"].append(c)
        spec = None
        if local is not None:
            spec = results.write_activations(summary["path"], c, local, n=case.seq_len,
                                             layout=case.layout, comm=comm,
                                             compression=job.compression)
        error = None
        if master is not None:
            try:
                master.add_cases([{"index": c, "kind": "attention", "params": params[c],
                                   "results": res, "activations": spec,
                                   "elapsed_s": time.perf_counter() - t0}])
            except HpcattnError as exc:   # e.g. a full disk: every rank stops with the message
                error = str(exc)
        # the case is in the master before any rank moves on (or stops)
        error = exchange.bcast(comm, error, "recording the case")
        if error:
            raise CollectiveError(error)
        summary["ran"] += 1
        bar.step(label=f"{results.case_name(c)} {label(params[c], job.axes)}")
    summary["stopped"] = stop.agreed(comm)


def _run_mixers(job, comm, params, pending, master, bar, stop, summary) -> None:
    """Rounds of one case per rank; rank 0 records each round's results."""
    run_mixer_case = _single_process(job.kind)[1]
    size, rank = comm.size, comm.rank
    for start in range(0, len(pending), size):
        summary["stopped"] = stop.agreed(comm)
        if summary["stopped"]:
            return
        item = None
        if start + rank < len(pending):
            c = pending[start + rank]
            t0 = time.perf_counter()
            try:
                item = (c, run_mixer_case(dict(params[c])), time.perf_counter() - t0, None)
            except Exception as exc:  # noqa: BLE001 - reported collectively below
                item = (c, None, 0.0, f"{type(exc).__name__}: {exc}")
        items = [it for it in exchange.gather(comm, item, "collecting mixer cases") or []
                 if it is not None]
        error = None
        if master is not None:
            ok = [it for it in items if it[3] is None]
            bad = [it for it in items if it[3] is not None]
            try:
                if ok:
                    master.add_cases([{"index": c, "kind": job.kind, "params": params[c],
                                       "results": res, "elapsed_s": el} for c, res, el, _ in ok])
            except HpcattnError as exc:
                error, bad = str(exc), []
            if bad:
                c = bad[0][0]
                error = f"{results.case_name(c)} ({label(params[c], job.axes)}) failed: {bad[0][3]}"
            summary["ran"] += len(ok)
            bar.step(len(ok), label=" | ".join(label(params[it[0]], job.axes) for it in ok))
        error = exchange.bcast(comm, error, "recording the case")
        if error:
            raise CollectiveError(error)
    summary["stopped"] = stop.agreed(comm)
