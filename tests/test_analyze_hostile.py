"""``hpcattn analyze`` and ``hpcattn merge`` on crafted results files: a one-line error naming the
file and what is wrong (never a traceback), no raw control characters on the terminal, and
bounded memory (an 8 GiB fill-value dataset stored in a few KiB is never read).

Each crafted file starts as a real results file of a tiny job and is then changed with h5py."""
import json
import os
import resource
import shutil
import subprocess
import sys

import h5py
import numpy as np
import pytest
from mpi4py import MPI

from hpcattn import runner
from hpcattn.jobs import load_job

from jobfiles import TINY, write_job

RSS_BOUND_KIB = 600 * 1024          # a normal analyze peaks near 100-150 MiB
CONTROL = {chr(c) for c in range(32) if chr(c) not in "\n\t"} | {"\x7f", "\x9b"}
ESC_TEXT = "\x1b]0;pwned\x07\x1b[2J\x1b[31mred\rover\x08\x9b"


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hostile")
    job = write_job(tmp / "h.toml", name="h", sweep={"seq_len": [16, 32], **TINY}, output=tmp / "h.h5")
    runner.run_job(load_job(job), MPI.COMM_SELF)
    return tmp / "h.h5"


def run_cli(*args, limit_gib=3):
    """(exit status, stdout, stderr, peak RSS KiB) of ``hpcattn ARGS`` in a child process (an
    address-space limit keeps a regression from taking the machine down)."""
    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (limit_gib * 2 ** 30, limit_gib * 2 ** 30))
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "HPCATTN_NUM_THREADS": "1"}
    with open(os.devnull, "rb") as stdin:
        proc = subprocess.Popen([sys.executable, "-m", "hpcattn", *map(os.fspath, args)], stdin=stdin,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                                preexec_fn=limit)
        out, err = proc.communicate(timeout=120)
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return proc.returncode, out.decode("utf-8", "replace"), err.decode("utf-8", "replace"), usage.ru_maxrss


def crafted(base, tmp_path, name, change):
    path = tmp_path / name
    shutil.copy(base, path)
    with h5py.File(path, "r+") as f:
        change(f, f["cases"]["case_0000"])
    return path


def _set(key, value):
    def change(f, g):
        g.attrs[key] = value
    return change


def _replace(name, **create):
    def change(f, g):
        if name in g:
            del g[name]
        g.create_dataset(name, **create)
    return change


def _external_link(f, g):
    g["peek"] = h5py.ExternalLink("/etc/passwd", "/x")


def _external_case(f, g):
    f["cases"]["case_0007"] = h5py.ExternalLink("elsewhere.h5", "/cases/case_0000")


def _soft_link(f, g):
    g["again"] = h5py.SoftLink("/cases/case_0001/wall_s")


def _virtual_missing(f, g):
    layout = h5py.VirtualLayout(shape=(4,), dtype="f8")
    layout[:] = h5py.VirtualSource("no-such-file.h5", "x", shape=(4,))
    g.create_virtual_dataset("wall_again", layout, fillvalue=np.nan)


def _external_storage(f, g):
    g.create_dataset("raw", shape=(8,), dtype="u1", external=[("/etc/hostname", 0, 8)])


def _huge_fill(f, g):
    g.create_dataset("huge", shape=(2 ** 30,), dtype="f8", fillvalue=1.0)


def _huge_chunked(f, g):
    g.create_dataset("wall_s_all", shape=(2 ** 31,), dtype="f4", chunks=(2 ** 20,), compression="gzip",
                     fillvalue=3.0)


# crafted file -> words the one-line error must contain (besides the file's name)
BROKEN = {
    "bad_json.h5": (_set("params_json", "{not json"), "params_json"),
    "json_list.h5": (_set("params_json", "[1, 2, 3]"), "params_json"),
    "reserved_key.h5": (_set("params_json", json.dumps({"file": "x", "_data": 1})), "'file'"),
    "index_text.h5": (_set("index", "zero"), "index"),
    "index_array.h5": (_set("index", np.arange(3)), "index"),
    "external_link.h5": (_external_link, "ExternalLink"),
    "external_case.h5": (_external_case, "ExternalLink"),
    "soft_link.h5": (_soft_link, "SoftLink"),
    "virtual_missing.h5": (_virtual_missing, "virtual"),
    "external_storage.h5": (_external_storage, "external"),
    "huge_fill.h5": (_huge_fill, "huge"),
    "huge_chunked.h5": (_huge_chunked, "wall_s_all"),
}


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_analyze_refuses_a_crafted_file_in_one_line(base, tmp_path, name):
    change, words = BROKEN[name]
    path = crafted(base, tmp_path, name, change)
    status, out, err, rss = run_cli("analyze", path)
    lines = err.strip().splitlines()
    assert status != 0 and len(lines) == 1, (status, out, err)
    assert "hpcattn: error:" in lines[0] and name in lines[0] and words in lines[0], lines[0]
    assert "Traceback" not in out + err
    assert rss < RSS_BOUND_KIB, f"peak RSS {rss // 1024} MiB"
    assert os.path.getsize(path) < 2 ** 20


# crafted file -> what the table must still show (the file is odd but usable)
ODD = {
    "kind_array.h5": _set("kind", np.arange(3)),
    "string_wall.h5": _replace("wall_s", data="fast"),
    "compound_result.h5": _replace("extra", data=np.zeros(2, dtype=[("a", "i4"), ("b", "f8")])),
    "nested_params.h5": _set("params_json", json.dumps({"seq_len": 16, "layout": {"a": [1, 2]},
                                                        "heads": [2, 2]})),
    "bytes_status.h5": _set("status", np.bytes_(b"ok\xff\xfe")),
}


@pytest.mark.parametrize("name", sorted(ODD))
def test_analyze_shows_an_odd_but_usable_file(base, tmp_path, name):
    path = crafted(base, tmp_path, name, ODD[name])
    status, out, err, _ = run_cli("analyze", path)
    assert status == 0 and "Traceback" not in err, (status, out, err)
    assert len(out.strip().splitlines()) == 3, out     # header and both cases
    status, out, err, _ = run_cli("analyze", path, "--group-by", "layout", "--sort-by", "heads")
    assert status == 0 and "Traceback" not in err, (status, out, err)


def _escapes(f, g):
    g.attrs["params_json"] = json.dumps({**json.loads(g.attrs["params_json"]), "layout": ESC_TEXT,
                                         "note" + ESC_TEXT: 1})
    g.attrs["status"] = ESC_TEXT
    g.attrs["reason"] = ESC_TEXT
    g.create_dataset("msg" + ESC_TEXT, data=ESC_TEXT)
    f.attrs["job_name"] = ESC_TEXT


def test_control_characters_never_reach_the_terminal_raw(base, tmp_path):
    path = crafted(base, tmp_path, "esc\x1b[2J.h5", _escapes)
    # (CSV keeps the data: see test_csv_file_keeps_the_data)
    for extra in ((), ("--group-by", "layout"), ("--sort-by", "status"), ("--json",),
                  ("--where", "status=nothing")):
        status, out, err, _ = run_cli("analyze", path, *extra)
        assert "Traceback" not in err, err
        raw = sorted({c for c in out + err if c in CONTROL})
        assert not raw, (extra, raw, out, err)
        if extra[:1] not in (("--where",),):
            assert status == 0, (extra, err)
            assert "\\x1b]0;pwned\\x07" in out or "\\u001b]0;pwned\\u0007" in out, out


def test_csv_file_keeps_the_data(base, tmp_path):
    import csv

    path = crafted(base, tmp_path, "esc.h5", _escapes)
    status, _, err, _ = run_cli("analyze", path, "--csv", tmp_path / "out.csv")
    assert status == 0, err
    with open(tmp_path / "out.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert ESC_TEXT in {r["layout"] for r in rows} and ESC_TEXT in {r["status"] for r in rows}


# --- merge ----------------------------------------------------------------------------------------



# hpcattn merge (hpcattn/results/merge.py) still accepts these parts with exit 0: left for the
# results code; strict, so the marks go once merge refuses them


@pytest.mark.parametrize("name", sorted(set(BROKEN) - {"reserved_key.h5"}))  # a parameter name only analyze minds
def test_merge_refuses_a_crafted_part_in_one_line(base, tmp_path, name):
    change, _ = BROKEN[name]
    part = crafted(base, tmp_path, name, change)
    status, out, err, rss = run_cli("merge", tmp_path / "merged.h5", part)
    lines = err.strip().splitlines()
    assert status != 0 and len(lines) == 1, (status, out, err)
    assert "hpcattn: error:" in lines[0] and name in lines[0], lines[0]
    assert "Traceback" not in out + err
    assert rss < RSS_BOUND_KIB, f"peak RSS {rss // 1024} MiB"
    assert not (tmp_path / "merged.h5").exists()


def test_merge_never_prints_control_characters_raw(base, tmp_path):
    part = crafted(base, tmp_path, "esc\x1b[2J.h5", _escapes)
    status, out, err, _ = run_cli("merge", tmp_path / "merged.h5", part)
    assert "Traceback" not in err and not {c for c in out + err if c in CONTROL}, (status, out, err)


# --- activation files that went missing or changed after the case completed ------------------

def test_damaged_activation_files_are_reported_per_case(tmp_path):
    from hpcattn import analysis as an

    job = write_job(tmp_path / "d.toml", name="d", sweep={"seq_len": [16, 32, 64], **TINY},
                    output=tmp_path / "d.h5", activations=True)
    runner.run_job(load_job(job), MPI.COMM_SELF)
    shards = tmp_path / "d.h5.d"
    os.remove(shards / "case_0001" / "r0.h5")
    with open(shards / "case_0002" / "r0.h5", "r+b") as fh:
        fh.seek(-64, os.SEEK_END)
        fh.write(b"\0" * 64)
    rows = an.load_rows([tmp_path / "d.h5"])
    assert [bool(r.get("damaged")) for r in rows] == [False, True, True]
    assert "case_0001/r0.h5 is missing" in rows[1]["damaged"]
    report = an.damage_report(rows)
    assert len(report) == 2 and report[0].startswith("d: case_0001: activation file ")
    status, out, err, _ = run_cli("analyze", tmp_path / "d.h5")
    assert "Traceback" not in err
    header, *lines = out.strip().splitlines()
    assert header.split()[-1] == "damaged" and "is missing" in lines[1] and "is missing" not in lines[0]
