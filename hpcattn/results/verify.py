"""Checking that a results file's completed cases still have the data they were recorded with:
every activation file present and matching the size and BLAKE2b recorded when the case completed.

``verify(path)`` is what ``hpcattn analyze`` calls; resuming and merging use :func:`case_problem`.
"""
from __future__ import annotations

import json
import os
import re

from .format import ResultsError, one_line, open_results, sidecar, text_attr

SOURCE = re.compile(r"case_\d{4,}/(r\d+|all)\.h5")


def sources(group, where: str) -> dict[str, dict | None]:
    """Activation files a case group refers to (relative to the master's ``.d``) -> recorded
    checksum (None for files written before checksums were recorded)."""
    if "activations" not in group:
        return {}
    try:
        spec = json.loads(text_attr(group["activations"].attrs, "vds_json") or "")
        files = {}
        for d in spec.values():
            for src in d["sources"]:
                name = src["file"]
                if not isinstance(name, str) or not SOURCE.fullmatch(name):
                    raise ResultsError(f"{where}: activation source {one_line(repr(name))} is not a "
                                       "file hpcattn writes (case_NNNN/rK.h5)")
                files[name] = src.get("checksum") if isinstance(src.get("checksum"), dict) else None
        return files
    except ResultsError:
        raise
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise ResultsError(f"{where}: attribute activations/vds_json is damaged "
                           f"({type(exc).__name__}); expected the JSON hpcattn writes") from None


def case_problem(path: str, group) -> str | None:
    """Why case ``group`` of master ``path`` is not intact (None when it is): an activation file
    missing, or not matching its recorded size and checksum."""
    from . import files as _files

    where = f"{path}: {group.name.rsplit('/', 1)[-1]}"
    base = sidecar(_files.resolve_output(path))
    for name, want in sources(group, where).items():
        full = os.path.join(base, name)
        if want is None:
            why = None if os.path.isfile(full) and not os.path.islink(full) else "is missing"
        else:
            why = _files.mismatch(full, want)
        if why:
            return f"activation file {os.path.basename(base)}/{name} {why}"
    return None


def verify(path) -> list[tuple[int | None, str]]:
    """Problems of results file ``path``, one line each: ``(case index, reason)`` for a completed
    case whose activation files are missing or do not match the checksums recorded when it
    completed, ``(None, reason)`` for the master itself (changed since hpcattn wrote it). Empty
    when everything is intact. A file that cannot be used at all raises ResultsError."""
    from .master import Master

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
