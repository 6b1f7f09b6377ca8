"""Merging the results files of one job's parts (e.g. Slurm array tasks) into one master."""
from __future__ import annotations

import json
import os
import shutil

from .activations import add_virtual, missing_sources
from .format import (LIBVER, ResultsError, case_name, format_attrs, import_h5py, open_results,
                     publish, set_attrs, sidecar)

JOB_ATTRS = ("job_name", "job_kind", "job_text", "job_path", "n_cases")


def merge(out: str, parts: list[str]) -> dict:
    """Merge results files of one job (e.g. Slurm array tasks) into ``out``. An existing ``out``
    counts as one more part, so merging again after more tasks finished is safe. Activation files
    are hard-linked (copied across file systems) into ``out``'s directory. Returns a summary."""
    out = os.fspath(out)
    sources = [out] if os.path.exists(out) else []
    for p in parts:
        if os.path.abspath(p) != os.path.abspath(out) and p not in sources:
            sources.append(p)
    if not parts:
        raise ResultsError("merge needs at least one part file")
    cases, job_meta = _check_parts(sources)
    n_cases = job_meta.get("n_cases")
    out_dir = sidecar(out)
    os.makedirs(out_dir, exist_ok=True)
    tmp = out + ".tmp"
    prefix = os.path.basename(out_dir) + "/"
    with import_h5py().File(tmp, "w", libver=LIBVER, track_order=True) as fo:
        set_attrs(fo, {**format_attrs(), "merged_from": [os.path.abspath(p) for p in sources]})
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
    publish(tmp, out)
    return {"cases": len(cases), "parts": len(sources), "n_cases": n_cases,
            "missing": (sorted(set(range(int(n_cases))) - set(cases)) if n_cases is not None else [])}


def _check_parts(sources: list[str]) -> tuple[dict[int, tuple[str, str]], dict]:
    """(index -> (part path, params JSON), the job's attributes) of parts that belong together:
    one job, the same parameters for a case in every part, no missing activation files."""
    cases: dict[int, tuple[str, str]] = {}
    job_name, job_meta = None, {}
    for p in sources:
        with open_results(p) as f:
            name = f.attrs.get("job_name")
            if job_name is None:
                job_name = name
                job_meta = {k: f.attrs[k] for k in JOB_ATTRS if k in f.attrs}
            elif name != job_name:
                raise ResultsError(f"{p} holds job {name!r} but {sources[0]} holds {job_name!r}; "
                                   "expected parts of one job")
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
    return cases, job_meta


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
