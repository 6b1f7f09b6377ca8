"""Case records: how a completed case becomes durable at a constant cost, whatever the size of
the master.

When a case completes, its group (attributes, results, activation checksums) is written as a
small file of its own, ``<master>.d/case_0003-<blake2b of the file>.h5`` (a temporary of the
writer's own, fsync'ed, renamed): the case is complete from that moment. The master is a
snapshot that takes in the records now and then (:class:`~hpcattn.results.Master` decides
when, so that rewriting it costs a bounded share of the run), at the end of every run, and when
a run resumes; records it has taken in are deleted. A reader (:func:`~hpcattn.results.open_results`)
sees the snapshot plus any record not yet in it, so every completed case is visible at any
moment, also after a SIGKILL. The name carries the record's checksum: a damaged record is seen as
damaged, and a record is never mistaken for another.
"""
from __future__ import annotations

import json
import os

from . import files
from .activations import add_virtual
from .format import (FORMAT_VERSION, ResultsError, case_name, check_results, image_bytes,
                     new_image, open_image, params_json, set_attrs, text_attr)
from .tree import write_tree

RECORD_FORMAT = "hpcattn-case-record"


def write_case(cases, rec: dict, run_index, record: str | None, prefix: str | None):
    """Case group ``rec['index']`` in ``cases`` (replacing one there). With ``prefix`` the
    activations become virtual datasets (sources ``prefix + file``); without, only their spec."""
    name = case_name(rec["index"])
    if name in cases:
        del cases[name]
    g = cases.create_group(name)
    params = rec["params"]
    set_attrs(g, {"index": rec["index"], "kind": rec["kind"], "run": run_index,
                  "completed_at": rec["completed_at"], "params_json": params_json(params),
                  "record": record})
    set_attrs(g, {f"param_{k}": v for k, v in params.items()})
    write_tree(g, rec["results"])
    if rec.get("elapsed_s") is not None:
        g.create_dataset("elapsed_s", data=rec["elapsed_s"])
    if rec.get("activations"):
        if prefix is None:
            g.create_group("activations").attrs["vds_json"] = json.dumps(rec["activations"])
        else:
            add_virtual(g, rec["activations"], prefix)
    return g


def write_record(base: str, rec: dict, run_index) -> str:
    """Make case ``rec`` durable as a record in folder ``base``; its file name."""
    with new_image(os.path.join(base, "record.h5")) as f:
        set_attrs(f, {"hpcattn_format": RECORD_FORMAT, "hpcattn_format_version": FORMAT_VERSION})
        write_case(f, rec, run_index, None, None)
        data = image_bytes(f)
    name = f"{case_name(rec['index'])}-{files.checksum_bytes(data)['blake2b']}.h5"
    files.write_bytes(os.path.join(base, name), data)
    return name


def scan(base: str) -> dict[int, list[str]]:
    """Record files in folder ``base`` by case index, newest first."""
    found: dict[int, list[tuple[int, str]]] = {}
    try:
        names = os.listdir(base) if not os.path.islink(base) else []
    except OSError:
        return {}
    for name in names:
        m = files.RECORD.fullmatch(name)
        if m:
            try:
                mtime = os.lstat(os.path.join(base, name)).st_mtime_ns
            except OSError:
                continue
            found.setdefault(int(m.group(1)[5:]), []).append((mtime, name))
    return {i: [n for _, n in sorted(v, reverse=True)] for i, v in found.items()}


def unpublished(f, found: dict[int, list[str]]) -> dict[int, str]:
    """Of the records ``found``, the newest per case that snapshot ``f`` has not taken in."""
    cases = f["cases"]
    out = {}
    for index, names in found.items():
        g = cases.get(case_name(index))
        if g is None or text_attr(g.attrs, "record") != names[0]:
            out[index] = names[0]
    return out


def read_record(base: str, name: str, near: str):
    """Record ``name`` opened in memory; ResultsError when it is damaged (its bytes do not match
    the checksum in its name, or it is not a record); FileNotFoundError when it is gone."""
    path = os.path.join(base, name)
    try:
        data = files.read_bytes(path, 1 << 30)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise ResultsError(f"record {os.path.basename(base)}/{name} cannot be read: "
                           f"{exc.strerror or exc}") from None
    if files.checksum_bytes(data)["blake2b"] != files.RECORD.fullmatch(name).group(2):
        raise ResultsError(f"record {os.path.basename(base)}/{name} does not match the checksum "
                           "in its name (damaged)")
    try:
        f = open_image(data, near)
    except OSError:
        raise ResultsError(f"record {os.path.basename(base)}/{name} is not an HDF5 file") from None
    if text_attr(f.attrs, "hpcattn_format") != RECORD_FORMAT:
        f.close()
        raise ResultsError(f"record {os.path.basename(base)}/{name} is not an hpcattn case record")
    return f


def stitch(f, base: str, names: dict[int, str], prefix: str, near: str) -> dict[int, str]:
    """Take records ``names`` (index -> file in ``base``) into snapshot ``f`` (replacing the
    case groups there). Returns index -> why, for the records that could not be taken in."""
    bad = {}
    for index, name in sorted(names.items()):
        try:
            rf = read_record(base, name, near)
        except ResultsError as exc:
            bad[index] = str(exc)
            continue
        with rf:
            src = rf.get(case_name(index))
            if src is None:
                bad[index] = f"record {name} holds no {case_name(index)}"
                continue
            cname = case_name(index)
            if cname in f["cases"]:
                del f["cases"][cname]
            rf.copy(src, f["cases"], name=cname)
            g = f["cases"][cname]
            g.attrs["record"] = name
            if "activations" in g:
                spec = json.loads(text_attr(g["activations"].attrs, "vds_json"))
                del g["activations"]
                add_virtual(g, spec, prefix)
    return bad


def stitched(path: str, real: str, todo: dict[int, str]):
    """Master ``real`` plus records ``todo`` it has not taken in yet, as an h5py file in memory
    (for reading). FileNotFoundError when a record went away meanwhile (taken in by the writer:
    open the master again)."""
    from .format import sidecar

    base = sidecar(real)
    mem = open_image(files.read_bytes(real), real, write=True)
    try:
        bad = stitch(mem, base, todo, os.path.basename(base) + "/", real)
        check_results(mem, path)
    except BaseException:
        mem.close()
        raise
    del bad   # a damaged record is a case not completed: a reader does not show it
    return mem
