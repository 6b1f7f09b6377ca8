"""Checking that a results file's completed cases still have the data they were recorded with:
every activation file present and matching the size and BLAKE2b recorded when the case completed.

``verify(path)`` is what ``hpcattn analyze`` calls; resuming and merging use :func:`case_problem`.
"""
from __future__ import annotations

import json
import os
import re

from . import files as _files
from .format import ResultsError, one_line, sidecar, text_attr

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


def missing_sources(path: str, group) -> list[str]:
    """Activation source files a case of master ``path`` refers to that do not exist."""
    base = sidecar(_files.resolve_output(path))
    return sorted(f for f in sources(group, str(path)) if not os.path.isfile(os.path.join(base, f)))
