"""Removing what hpcattn wrote, and only that: shard files, case records, temporaries, the
checksum file. A link is unlinked as a link (its target untouched), never followed; a file or
folder anyone else put next to them stays."""
from __future__ import annotations

import contextlib
import os
import re

from .files import CASE_DIR, DIGEST_NAME, SHARD, TEMP, TMP_PREFIX, known, remove


def clean_case_dir(path: str) -> None:
    """Empty case folder ``path`` of what hpcattn wrote there (shards, temporaries); a link at
    ``path`` is removed as a link, a foreign file stays (and so does the folder)."""
    if os.path.islink(path) or os.path.isfile(path):
        remove(path)
        return
    if not os.path.isdir(path):
        return
    for name in os.listdir(path):
        full = os.path.join(path, name)
        if TEMP.fullmatch(name) and os.path.isdir(full) and not os.path.islink(full):
            clean_case_dir(full)
            with contextlib.suppress(OSError):
                os.rmdir(full)
        elif SHARD.fullmatch(name) or TEMP.fullmatch(name):
            if not os.path.isdir(full) or os.path.islink(full):
                remove(full)
    with contextlib.suppress(OSError):
        os.rmdir(path)


def clean_sidecar(path: str, keep=()) -> None:
    """Remove what hpcattn wrote in ``<master>.d`` (case folders' shards, records, temporaries,
    the checksum file), except the names in ``keep`` (the lock this run holds). Anything else
    stays, and so does the folder."""
    if not os.path.isdir(path) or os.path.islink(path):
        return
    for name in os.listdir(path):
        full = os.path.join(path, name)
        if name in keep:
            continue
        if CASE_DIR.fullmatch(name) or (TEMP.fullmatch(name) and os.path.isdir(full)):
            clean_case_dir(full)
        elif known(name) or name == DIGEST_NAME:
            if not os.path.isdir(full) or os.path.islink(full):
                remove(full)


def clean_temps(sidecar_dir: str, folder: str, base: str) -> None:
    """Remove temporaries a killed writer of master ``folder/base`` left: in its ``.d`` and next
    to it (only this master's; the caller holds its lock)."""
    mine = re.compile(re.escape(f"{TMP_PREFIX}{base}.") + r"\d+\.[0-9a-f]+\.tmp")
    for d, match in ((folder, mine.fullmatch), (sidecar_dir, TEMP.fullmatch)):
        try:
            names = os.listdir(d)
        except OSError:
            continue
        for name in names:
            full = os.path.join(d, name)
            if match(name) and (os.path.islink(full) or not os.path.isdir(full)):
                remove(full)
