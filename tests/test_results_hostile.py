"""The results writer against a hostile but fair user: planted symlinks, --force on files that are
not ours, symlinked outputs, corrupted shards and masters, merges into a running job, a full
disk, and the per-case cost of a long sweep. Each test names the class of defect it guards."""
import os

import h5py
import numpy as np
import pytest
from mpi4py import MPI

from hpcattn import results, runner
from hpcattn.errors import HpcattnError
from hpcattn.jobs import load_job
from hpcattn.results import Master, ResultsError

from jobfiles import TINY, write_job

COMM = MPI.COMM_SELF


def tiny_job(tmp_path, out, n=2, activations=True, name="t", **sweep):
    path = write_job(tmp_path / f"{name}.toml", name=name, output=out, activations=activations,
                     sweep={"seq_len": [16 + 8 * i for i in range(n)], **TINY, **sweep})
    return load_job(path)


def one_line_error(exc_info, *words):
    msg = str(exc_info.value)
    assert "\n" not in msg, msg
    for w in words:
        assert w in msg, msg
    return msg


# --- files outside the results: symlinks ---------------------------------------------------------

def test_planted_lock_symlink_is_not_followed(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    out = tmp_path / "r.h5"
    os.mkdir(f"{out}.d")
    os.symlink(victim, f"{out}.d/.lock")
    with pytest.raises(HpcattnError) as info:
        runner.run_job(tiny_job(tmp_path, out), COMM)
    one_line_error(info, ".lock is a symlink")
    assert victim.read_text() == "precious"


def test_planted_tmp_names_are_never_written(tmp_path):
    """Temporaries are unique per writer: a planted `<path>.tmp` (link or file) is left alone."""
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    out = tmp_path / "r.h5"
    os.symlink(victim, f"{out}.tmp")
    (tmp_path / "other.h5.tmp").write_text("someone's")
    job = tiny_job(tmp_path, out)
    runner.run_job(job, COMM)
    os.makedirs(f"{out}.d/case_0000", exist_ok=True)
    os.symlink(victim, f"{out}.d/case_0000/r0.h5.tmp")
    runner.run_job(job, COMM, force=True)
    assert victim.read_text() == "precious" and os.path.islink(f"{out}.tmp")
    assert len(results.completed(out)) == 2


def test_symlinked_sidecar_is_refused(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "case_0000").mkdir(parents=True)
    (elsewhere / "case_0000" / "r0.h5").write_text("not yours")
    (elsewhere / "notes.txt").write_text("mine")
    out = tmp_path / "r.h5"
    os.symlink(elsewhere, f"{out}.d")
    for force in (False, True):
        with pytest.raises(HpcattnError) as info:
            runner.run_job(tiny_job(tmp_path, out), COMM, force=force)
        one_line_error(info, "r.h5.d is a symlink")
    assert (elsewhere / "case_0000" / "r0.h5").read_text() == "not yours"
    assert (elsewhere / "notes.txt").read_text() == "mine" and not out.exists()


def test_symlinked_case_folder_is_not_followed(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "r0.h5").write_text("not yours")
    out = tmp_path / "r.h5"
    os.mkdir(f"{out}.d")
    os.symlink(elsewhere, f"{out}.d/case_0000")
    runner.run_job(tiny_job(tmp_path, out), COMM)
    assert (elsewhere / "r0.h5").read_text() == "not yours"
    assert not os.path.islink(f"{out}.d/case_0000") and len(results.completed(out)) == 2
    assert results.verify(out) == []


# --- files outside the results: --force ----------------------------------------------------------

@pytest.mark.parametrize("kind", ["text", "foreign_hdf5", "job_file"])
def test_force_replaces_only_results_files(tmp_path, kind):
    out = tmp_path / "mydata.h5"
    if kind == "text":
        out.write_text("my thesis")
    elif kind == "foreign_hdf5":
        with h5py.File(out, "w") as f:
            f["data"] = np.arange(3)
    job = tiny_job(tmp_path, out)
    if kind == "job_file":
        out = job.path
    before = open(out, "rb").read()
    with pytest.raises(HpcattnError) as info:
        runner.run_job(job, COMM, output=str(out), force=True)
    one_line_error(info, "is not an hpcattn results file" if kind != "job_file" else "is the job file")
    assert open(out, "rb").read() == before


def test_force_keeps_foreign_files_in_the_sidecar(tmp_path):
    out = tmp_path / "mydata.h5"
    job = tiny_job(tmp_path, out)
    runner.run_job(job, COMM)
    (tmp_path / "mydata.h5.d" / "important.txt").write_text("keep me")
    (tmp_path / "mydata.h5.d" / "case_0000" / "notes.txt").write_text("and me")
    assert runner.run_job(job, COMM, force=True)["ran"] == 2
    assert (tmp_path / "mydata.h5.d" / "important.txt").read_text() == "keep me"
    assert (tmp_path / "mydata.h5.d" / "case_0000" / "notes.txt").read_text() == "and me"
    assert results.verify(out) == []


# --- files outside the results: an output that is a symlink --------------------------------------

def test_output_symlink_writes_through_and_locks_the_target(tmp_path):
    real = tmp_path / "data" / "real.h5"
    real.parent.mkdir()
    job = tiny_job(tmp_path, real)
    runner.run_job(job, COMM, output=str(real))
    alias = tmp_path / "alias.h5"
    os.symlink(real, alias)
    held = Master(str(alias))
    held.lock()
    with pytest.raises(HpcattnError) as info:
        runner.run_job(job, COMM, output=str(real), force=True)
    one_line_error(info, "lock held")
    held.unlock()
    s = runner.run_job(tiny_job(tmp_path, real, n=3), COMM, output=str(alias))
    assert (s["ran"], s["skipped"]) == (1, 2)
    assert os.path.islink(alias) and os.path.realpath(alias) == str(real)
    assert len(results.completed(real)) == 3 and not os.path.exists(f"{alias}.d")
    with results.open_results(alias) as f:           # activations resolve next to the target
        assert not np.isnan(f["cases/case_0002/activations/q"][()]).any()


def test_dangling_output_symlink_is_refused(tmp_path):
    alias = tmp_path / "alias.h5"
    os.symlink(tmp_path / "nowhere" / "x.h5", alias)
    with pytest.raises(HpcattnError) as info:
        runner.run_job(tiny_job(tmp_path, alias), COMM)
    one_line_error(info, "is a symlink to", "not a file")
    assert not os.path.exists(tmp_path / "nowhere")


# --- merge and a running job ---------------------------------------------------------------------

def test_merge_takes_the_run_lock(tmp_path):
    part = tmp_path / "p.h5"
    job = tiny_job(tmp_path, part)
    runner.run_job(job, COMM)
    out = tmp_path / "out.h5"
    running = Master(str(out))
    running.lock()                              # a run writing OUT
    with pytest.raises(ResultsError) as info:
        results.merge(str(out), [str(part)])
    one_line_error(info, "lock held")
    running.unlock()
    assert results.merge(str(out), [str(part)])["cases"] == 2


# --- silent corruption: activation shards --------------------------------------------------------

def damage_shards(out):
    """Case 0's shard removed, case 1's truncated, case 2's overwritten (same size)."""
    d = f"{out}.d"
    os.remove(f"{d}/case_0000/r0.h5")
    data = open(f"{d}/case_0001/r0.h5", "rb").read()
    open(f"{d}/case_0001/r0.h5", "wb").write(data[: len(data) // 2])
    data = bytearray(open(f"{d}/case_0002/r0.h5", "rb").read())
    data[-64:] = bytes(b ^ 0xFF for b in data[-64:])
    open(f"{d}/case_0002/r0.h5", "wb").write(bytes(data))


def test_damaged_shards_are_found_and_rerun(tmp_path):
    from click.testing import CliRunner

    from hpcattn.cli.run import run as run_cmd
    from jobfiles import assert_same_results, comparable

    out = tmp_path / "r.h5"
    job = tiny_job(tmp_path, out, n=4)
    runner.run_job(job, COMM)
    ref = comparable(out)
    damage_shards(out)
    problems = results.verify(out)
    assert [c for c, _ in problems] == [0, 1, 2], problems
    assert "is missing" in problems[0][1] and "bytes, recorded" in problems[1][1]
    assert "does not match its recorded checksum" in problems[2][1]
    assert all("\n" not in why for _, why in problems)
    res = CliRunner().invoke(run_cmd, [job.path])
    assert res.exit_code == 0, res.output
    again = [ln for ln in res.output.splitlines() if "running it again" in ln]
    assert [ln.split(": ")[2] for ln in again] == ["case_0000", "case_0001", "case_0002"], res.output
    assert "3 run now, 1 already done" in res.output
    assert results.verify(out) == []
    assert_same_results(comparable(out), ref)


def test_merge_refuses_damaged_parts(tmp_path):
    part = tmp_path / "p.h5"
    runner.run_job(tiny_job(tmp_path, part, n=4), COMM)
    damage_shards(part)
    with pytest.raises(ResultsError) as info:
        results.merge(str(tmp_path / "o.h5"), [str(part)])
    one_line_error(info, str(part), "case_0000", "refers to missing activation file")
    os.remove(f"{part}.d/case_0001/r0.h5")
    runner.run_job(tiny_job(tmp_path, part, n=4), COMM)      # resume repairs the part
    assert results.merge(str(tmp_path / "o.h5"), [str(part)])["cases"] == 4
    assert results.verify(tmp_path / "o.h5") == []


# --- silent corruption: the master ---------------------------------------------------------------

def craft(path, kind):
    """A master damaged (or crafted) in one way."""
    data = bytearray(open(path, "rb").read())
    if kind == "middle":
        mid = len(data) // 2
        data[mid:mid + 64] = np.random.default_rng(1).bytes(64)
        open(path, "wb").write(bytes(data))
    elif kind == "truncated":
        open(path, "wb").write(bytes(data[: len(data) // 3]))
    elif kind == "not_hdf5":
        open(path, "wb").write(b"hello\n" * 100)
    else:
        os.remove(f"{path}.d/.master.sum")      # as if written by hand: no checksum to compare
        with h5py.File(path, "a") as f:
            g = f["cases/case_0000"]
            if kind == "wrong_format":
                f.attrs["hpcattn_format"] = "something-else"
            elif kind == "bad_json":
                g.attrs["params_json"] = "{not json"
            elif kind == "wrong_type":
                g.attrs["index"] = "zero"
            elif kind == "wrong_version_type":
                f.attrs["hpcattn_format_version"] = np.array([1, 2])
            elif kind == "external_link":
                with h5py.File(path.parent / "secret.h5", "w") as s:
                    s.create_group("g").attrs["index"] = 1
                del f["cases/case_0001"]
                f["cases/case_0001"] = h5py.ExternalLink("secret.h5", "/g")
            elif kind == "soft_link":
                del f["cases/case_0001"]
                f["cases/case_0001"] = h5py.SoftLink("/cases/case_0000")
            elif kind == "escape":
                g.attrs["index"] = np.array([1, 2])
                f.attrs["hpcattn_format"] = "\x1b]0;pwned\x07"


MASTER_DAMAGE = {"middle": "is not the file hpcattn last wrote there",
                 "truncated": "is not a readable HDF5 file",
                 "not_hdf5": "is not a readable HDF5 file",
                 "wrong_format": "not an hpcattn results file",
                 "bad_json": "attribute params_json is '{not json'; expected JSON",
                 "wrong_type": "attribute index is 'zero'; expected an integer",
                 "wrong_version_type": "attribute hpcattn_format_version is array",
                 "external_link": "/cases/case_0001 is a ExternalLink to secret.h5",
                 "soft_link": "/cases/case_0001 is a SoftLink to /cases/case_0000",
                 "escape": "not an hpcattn results file"}


@pytest.mark.parametrize("kind", sorted(MASTER_DAMAGE))
def test_damaged_master_is_refused_and_never_written(tmp_path, kind):
    from click.testing import CliRunner

    from hpcattn.cli.run import run as run_cmd

    out = tmp_path / "r.h5"
    job = tiny_job(tmp_path, out, n=2)
    runner.run_job(job, COMM)
    craft(out, kind)
    before = open(out, "rb").read()
    listing = sorted(os.listdir(tmp_path))
    with pytest.raises(ResultsError) as info:
        Master(str(out)).prepare({"job_name": "t"}, results.provenance())
    msg = one_line_error(info, str(out))
    # bytes overwritten in the middle: HDF5 may or may not notice; the checksum always does
    wants = [MASTER_DAMAGE[kind]] + (["is not a readable HDF5 file"] if kind == "middle" else [])
    assert any(w in msg for w in wants) and "\x1b" not in msg, msg
    res = CliRunner().invoke(run_cmd, [job.path])
    assert res.exit_code == 2 and any(w in res.output for w in wants), res.output
    assert len([ln for ln in res.output.splitlines() if ln.strip()]) == 1, res.output
    assert sorted(os.listdir(tmp_path)) == listing
    with pytest.raises(ResultsError):
        results.merge(str(tmp_path / "o.h5"), [str(out)])
    if kind != "middle":     # readers refuse it too (the checksum is the writer's check)
        with pytest.raises(ResultsError):
            results.open_results(out)
    else:                    # verify names the master, or cannot read it at all
        try:
            assert results.verify(out)[0][0] is None
        except ResultsError as exc:
            assert "\n" not in str(exc)
    assert open(out, "rb").read() == before


def test_merge_compares_the_whole_job_not_its_name(tmp_path):
    """Two job files both named 't' but sweeping different values are not parts of one job."""
    a, b = tmp_path / "a" / "p.h5", tmp_path / "b" / "p.h5"
    a.parent.mkdir()
    b.parent.mkdir()
    runner.run_job(tiny_job(a.parent, a, n=2), COMM, array_task=0, array_tasks=2, output=str(a))
    runner.run_job(tiny_job(b.parent, b, n=2, causal=True), COMM, array_task=1, array_tasks=2,
                   output=str(b))
    with pytest.raises(ResultsError) as info:
        results.merge(str(tmp_path / "o.h5"), [str(a), str(b)])
    one_line_error(info, "hold different jobs named 't'", "sweep.causal is [True] there but")
    assert not os.path.exists(tmp_path / "o.h5")


# --- a full disk ---------------------------------------------------------------------------------

def leftovers(root):
    """Temporaries anywhere below ``root`` (a writer that failed must leave none)."""
    return [os.path.join(d, n) for d, dirs, names in os.walk(root) for n in names + dirs
            if n.endswith(".tmp") or n.startswith(".hpcattn-")]


@pytest.fixture
def disk_of(monkeypatch):
    """``disk_of(root, budget)``: writes below ``root`` fail with ENOSPC once ``budget`` bytes
    have been written there (os.write and os.pwrite: every byte hpcattn writes goes through
    them). Returns a function that gives the disk back."""
    import errno

    real = {"write": os.write, "pwrite": os.pwrite}

    def install(root, budget):
        left = [budget]

        def guarded(name):
            def call(fd, data, *rest):
                try:
                    target = os.readlink(f"/proc/self/fd/{fd}")
                except OSError:
                    target = ""
                if target.startswith(str(root)):
                    if len(data) > left[0]:
                        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                    left[0] -= len(data)
                return real[name](fd, data, *rest)
            return call
        monkeypatch.setattr(os, "write", guarded("write"))
        monkeypatch.setattr(os, "pwrite", guarded("pwrite"))
        return lambda: (monkeypatch.setattr(os, "write", real["write"]),
                        monkeypatch.setattr(os, "pwrite", real["pwrite"]))
    return install


@pytest.mark.parametrize("budget", [0, 3_000, 20_000, 60_000, 120_000, 250_000])
def test_disk_full_is_one_line_and_leaves_the_master_whole(tmp_path, disk_of, capfd, budget):
    from jobfiles import assert_same_results, comparable

    out = tmp_path / "r.h5"
    job = tiny_job(tmp_path, out, n=4, seq_len=[64, 128, 256, 512])
    reference = tmp_path / "ref" / "r.h5"
    reference.parent.mkdir()
    runner.run_job(job, COMM, output=str(reference))
    capfd.readouterr()
    give_back = disk_of(tmp_path / "r.h5", budget)
    with pytest.raises(HpcattnError) as info:
        runner.run_job(job, COMM)
    give_back()
    one_line_error(info, "disk full", "free some space and rerun the same command")
    assert capfd.readouterr().err == ""             # no 'Exception ignored', no HDF5 noise
    assert leftovers(tmp_path) == []
    if out.exists():
        results.completed(out)                      # the master is whole
    assert runner.run_job(job, COMM)["stopped"] == 0
    assert results.verify(out) == []
    assert_same_results(comparable(out), comparable(reference))


def test_disk_full_on_a_real_file_system(tmp_path):
    """A small tmpfs filled to several levels (root only): never a crash, one line, no temporary."""
    import subprocess
    import sys

    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)],
                      capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        job = tiny_job(tmp_path, mnt / "r.h5", n=3, seq_len=[256, 512, 1024])
        for free_kb in (40, 200, 300, 700):
            for name in os.listdir(mnt):
                subprocess.run(["rm", "-rf", str(mnt / name)], check=True)
            st = os.statvfs(mnt)
            with open(mnt / "fill", "wb") as fh:
                fh.write(b"\0" * max(0, st.f_bavail * st.f_frsize - free_kb * 1024))
            proc = subprocess.run([sys.executable, "-m", "hpcattn", "run", job.path],
                                  capture_output=True, text=True, timeout=120)
            assert proc.returncode in (0, 2), (free_kb, proc.returncode, proc.stderr)
            if proc.returncode:
                lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
                assert len(lines) == 1 and "disk full" in lines[0], (free_kb, proc.stderr)
            assert leftovers(mnt) == [], free_kb
            if (mnt / "r.h5").exists():
                results.completed(mnt / "r.h5")
    finally:
        subprocess.run(["umount", str(mnt)])


# --- constant per-case cost ----------------------------------------------------------------------

def tiny_record(i):
    return {"index": i, "kind": "attention", "params": {"seq_len": 16, "seed": i},
            "results": {"wall_s": [0.001, 0.002], "gflops": 1.0, "counts": [16]}, "elapsed_s": 0.01}


def test_master_rewrites_are_amortised_and_readers_see_every_case(tmp_path, monkeypatch):
    """Today every case rewrote the whole master (bytes written grow with n^2); now each case
    writes one small record and the master is rewritten a bounded share of the time, while
    readers see every completed case at any moment."""
    import hpcattn.results.master as master_mod

    monkeypatch.setattr(master_mod, "PUBLISH_PAUSE", float("inf"))   # only the count rule
    path = str(tmp_path / "m.h5")
    written = []
    real_write = master_mod.files.write_bytes

    def counting(final, data):
        if final == path:
            written.append(len(data))
        return real_write(final, data)

    monkeypatch.setattr(master_mod.files, "write_bytes", counting)
    m = Master(path)
    m.lock()
    m.prepare({"job_name": "t", "n_cases": 200}, results.provenance())
    n = 200
    for i in range(n):
        m.add_cases([tiny_record(i)])
        if i % 37 == 0 or i == n - 1:
            assert sorted(results.completed(path)) == list(range(i + 1))
            with h5py.File(path) as f:               # the snapshot: a prefix of the cases
                assert sorted(f["cases"]) == [results.case_name(c) for c in range(len(f["cases"]))]
    m.unlock()
    with h5py.File(path) as f:
        assert len(f["cases"]) == n
    final = os.path.getsize(path)
    assert len(written) < 16 + 16 * np.log(n / 16) + 3, len(written)
    assert sum(written) < 30 * final, (sum(written), final)       # was ~n/2 * final
    assert not [x for x in os.listdir(f"{path}.d") if x.startswith("case_")]   # records taken in


def test_records_of_a_killed_writer_are_seen_and_taken_in(tmp_path, monkeypatch):
    import hpcattn.results.master as master_mod

    monkeypatch.setattr(master_mod, "PUBLISH_PAUSE", float("inf"))
    path = str(tmp_path / "m.h5")
    m = Master(path)
    m.lock()
    m.prepare({"job_name": "t", "n_cases": 40}, results.provenance())
    for i in range(40):
        m.add_cases([tiny_record(i)])
    m._release()                                      # as a SIGKILL would: no final rewrite
    with h5py.File(path) as f:
        in_snapshot = len(f["cases"])
    assert in_snapshot < 40
    assert sorted(results.completed(path)) == list(range(40))
    with results.open_results(path) as f:
        assert f["cases/case_0039/wall_s"][()].tolist() == [0.001, 0.002]
    # a damaged record is not a completed case
    rec = [x for x in os.listdir(f"{path}.d") if x.startswith("case_0039-")][0]
    data = bytearray(open(f"{path}.d/{rec}", "rb").read())
    data[-10:] = bytes(10)
    open(f"{path}.d/{rec}", "wb").write(bytes(data))
    assert sorted(results.completed(path)) == list(range(39))
    m2 = Master(path)
    m2.lock()
    done = m2.prepare({"job_name": "t", "n_cases": 40}, results.provenance())
    m2.unlock()
    assert sorted(done) == list(range(39))
    assert m2.rerun == [(39, f"record {os.path.basename(path)}.d/{rec} does not match the checksum "
                              "in its name (damaged)")]
    with h5py.File(path) as f:
        assert len(f["cases"]) == 39
    assert not [x for x in os.listdir(f"{path}.d") if x.startswith("case_")]


def test_a_refused_writer_leaves_nothing_behind(tmp_path):
    """A merge of a missing part, or a run refused by a foreign file, does not litter a `.d`."""
    with pytest.raises(ResultsError, match="does not exist"):
        results.merge(str(tmp_path / "o.h5"), [str(tmp_path / "absent.h5")])
    (tmp_path / "mydata.h5").write_text("not ours")
    with pytest.raises(HpcattnError, match="not a readable HDF5 file"):
        runner.run_job(tiny_job(tmp_path, tmp_path / "mydata.h5"), COMM)
    assert sorted(os.listdir(tmp_path)) == ["mydata.h5", "t.toml"]
