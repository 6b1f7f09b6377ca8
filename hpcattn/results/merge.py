"""Merging the results files of one job's parts (e.g. Slurm array tasks) into one master.

The output is written like a run writes it: under the run's lock (keyed on the resolved output,
so a merge never writes a file a run is writing), through a temporary of its own. Parts must be
intact (every activation file matching its recorded checksum) and of one job (the same name,
kind, case count, sweep and activations setting; the same parameters for a case in every part).
"""
from __future__ import annotations

import json
import os
import shutil

import numpy as np

from . import cleaning, files
from .activations import add_virtual
from .format import (MAX_FILE_RESULT_BYTES, ResultsError, case_name, check_case_group, format_attrs,
                     image_bytes, int_attr, new_image, one_line, set_attrs, sidecar, text_attr)
from .master import Master
from .reading import open_results
from .verify import case_problem, sources

JOB_ATTRS = ("job_name", "job_kind", "job_text", "job_path", "n_cases", "sweep_json", "activations",
             "job_description")
# what makes two parts the same job (job_text and job_path may differ between two copies of it)
JOB_PARAMS = ("job_name", "job_kind", "n_cases", "activations")


def merge(out: str, parts: list[str]) -> dict:
    """Merge results files of one job (e.g. Slurm array tasks) into ``out``. An existing ``out``
    counts as one more part, so merging again after more tasks finished is safe. Activation files
    are hard-linked (copied across file systems) into ``out``'s directory. Returns a summary."""
    if not parts:
        raise ResultsError("merge needs at least one part file")
    master = Master(out)
    master.lock()
    try:
        real = master.real
        sources_ = [real] if os.path.lexists(real) else []
        if sources_:
            master.check_loadable()
        for p in parts:
            rp = os.path.realpath(p)
            if rp != real and rp not in sources_:
                sources_.append(rp)
        cases, job_meta = _check_parts(sources_)
        n_cases = job_meta.get("n_cases")
        data = _build(master, sources_, cases, job_meta)
        master.replace(data)
    finally:
        master.unlock()
    return {"cases": len(cases), "parts": len(sources_), "n_cases": n_cases,
            "missing": (sorted(set(range(int(n_cases))) - set(cases)) if n_cases is not None else [])}


def _build(master: Master, sources_: list[str], cases: dict, job_meta: dict) -> bytes:
    """The merged master, in memory; activation files linked into the output's ``.d`` first."""
    real, out_dir = master.real, master.dir
    with new_image(real, track_order=True) as fo:
        set_attrs(fo, {**format_attrs(), "merged_from": sources_})
        set_attrs(fo, job_meta)
        fo.create_group("cases", track_order=True)
        runs_out = fo.create_group("runs", track_order=True)
        run_map: dict[tuple[str, int], int] = {}
        for p in sources_:
            with open_results(p) as f:
                for key, val in f.attrs.items():
                    if key not in fo.attrs:
                        fo.attrs[key] = val
                for number, (rname, rg) in enumerate(f["runs"].items()):
                    new = len(runs_out)
                    run_map[(p, _run_number(rname, number))] = new
                    f.copy(rg, runs_out, name=f"run_{new:04d}")
        for idx in sorted(cases):
            p = cases[idx][0]
            name = case_name(idx)
            with open_results(p) as f:
                g = f["cases"][name]
                f.copy(g, fo["cases"], name=name, without_attrs=False)
                gn = fo["cases"][name]
                run = g.attrs.get("run", 0)
                gn.attrs["run"] = run_map.get((p, run if isinstance(run, (int, np.integer)) else 0), 0)
                if "activations" in g:
                    spec = json.loads(text_attr(g["activations"].attrs, "vds_json"))
                    del gn["activations"]
                    if p != real:
                        _link_case(sidecar(p), out_dir, name, sources(g, p))
                    add_virtual(gn, spec, master.prefix)
        return image_bytes(fo)


def _run_number(name: str, default: int) -> int:
    digits = name[4:] if name.startswith("run_") else ""
    return int(digits) if digits.isdigit() else default


def _value(val):
    if isinstance(val, bytes):
        return val.decode("utf-8", "replace")
    return val.item() if isinstance(val, np.generic) else val


def _job_params(f) -> dict:
    """The parameters that make a job: name, kind, case count, activations, and every sweep key
    (``sweep.<key>``) after command-line overrides."""
    params = {k: _value(f.attrs[k]) for k in JOB_PARAMS if k in f.attrs}
    try:
        sweep = json.loads(text_attr(f.attrs, "sweep_json") or "{}")
    except ValueError:
        sweep = {"(sweep_json)": text_attr(f.attrs, "sweep_json")}
    params.update({f"sweep.{k}": v for k, v in (sweep.items() if isinstance(sweep, dict) else [])})
    return params


def _first_difference(a: dict, b: dict) -> str | None:
    for key in list(a) + [k for k in b if k not in a]:
        if a.get(key, "(unset)") != b.get(key, "(unset)"):
            return key
    return None


def _check_parts(sources_: list[str]) -> tuple[dict[int, tuple[str, str]], dict]:
    """(index -> (part path, params JSON), the job's attributes) of parts that belong together:
    one job, the same parameters for a case in every part, every activation file intact."""
    cases: dict[int, tuple[str, str]] = {}
    first, first_params, job_meta = None, None, {}
    for p in sources_:
        why = Master(p).changed()
        if why:
            raise ResultsError(f"{why}; expected an intact part (rerun its array task)")
        with open_results(p) as f:
            params = _job_params(f)
            if first is None:
                first, first_params = p, params
                job_meta = {k: f.attrs[k] for k in JOB_ATTRS if k in f.attrs}
                if "n_cases" in job_meta:
                    int_attr(f.attrs, "n_cases", p)
            elif params.get("job_name") != first_params.get("job_name"):
                raise ResultsError(f"{p} holds job {params.get('job_name')!r} but {first} holds "
                                   f"{first_params.get('job_name')!r}; expected parts of one job")
            else:
                key = _first_difference(first_params, params)
                if key:
                    raise ResultsError(
                        f"{p} and {first} hold different jobs named {params.get('job_name')!r}: "
                        f"{key} is {one_line(repr(params.get(key, '(unset)')))[:120]} there but "
                        f"{one_line(repr(first_params.get(key, '(unset)')))[:120]} in {first}; "
                        "expected parts of one job")
            budget = [MAX_FILE_RESULT_BYTES]
            for name, g in f["cases"].items():
                # what merge copies must be what it claims: no links, nothing virtual or
                # external, bounded sizes (a crafted part must not make it copy gigabytes)
                check_case_group(g, f"{p}: cases/{one_line(name)}", budget)
                idx, pj = int(g.attrs["index"]), text_attr(g.attrs, "params_json")
                if idx in cases and cases[idx][1] != pj:
                    raise ResultsError(f"{case_name(idx)} has different parameters in {cases[idx][0]} "
                                       f"and {p}; expected parts of one job")
                why = case_problem(p, g)
                if why:
                    word = "refers to missing" if why.endswith("is missing") else "has a damaged"
                    raise ResultsError(f"{p}: {case_name(idx)} {word} activation file: {why}; "
                                       "rerun that part (its array task) and merge again")
                cases.setdefault(idx, (p, pj))
    return cases, job_meta


def _link_case(src_base: str, out_base: str, name: str, wanted: dict) -> None:
    """Hard-link (or copy) case ``name``'s activation files into ``out_base``; only the files the
    case refers to, only into folders hpcattn made."""
    dst = os.path.join(files.own_dir(out_base), name)
    cleaning.clean_case_dir(dst)
    files.own_dir(dst)
    for rel in wanted:
        src, target = os.path.join(src_base, rel), os.path.join(out_base, rel)
        try:
            os.link(src, target, follow_symlinks=False)
        except OSError:
            try:
                with files.private_dir(dst) as tmpdir:
                    tmp = os.path.join(tmpdir, os.path.basename(rel))
                    shutil.copyfile(src, tmp, follow_symlinks=False)
                    files.publish_file(tmp, target)
            except OSError as exc:
                raise files.write_error(exc, target) from None
