"""Job files: the shipped jobs load, sweeps expand in a stable order, and every kind of mistake
gets its own message naming the file, the line and the key."""
import os
import re

import pytest

from hpcattn.jobs import JobFileError, Job, key_line, load_job

from conftest import ROOT

GOOD = """\
# a comment
[job]
name = "demo"
kind = "attention"
description = "two axes"

[sweep]
seq_len = [256, 512]      # axis
causal = [false, true]    # axis
heads = 2
layout = "zigzag"

[output]
path = "out/demo.h5"
activations = true
compression = "gzip"

[slurm]
nodes = 2
anything_goes = "submit checks this table"
"""


def write(tmp_path, text, name="job.toml"):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def load_err(tmp_path, text) -> str:
    path = write(tmp_path, text)
    with pytest.raises(JobFileError) as info:
        load_job(path)
    msg = str(info.value)
    assert "\n" not in msg
    return msg


@pytest.mark.parametrize("name", ["quickstart.toml", "ring-scaling.toml"])
def test_shipped_jobs_load(name):
    job = load_job(os.path.join(ROOT, "jobs", name))
    assert job.kind == "attention" and job.cases()
    assert job.output == f"results/{job.name}.h5"
    assert job.slurm["nodes"] >= 1


def test_sweep_is_cross_product_in_file_order(tmp_path):
    job = load_job(write(tmp_path, GOOD))
    assert (job.name, job.kind, job.output, job.activations, job.compression) == \
        ("demo", "attention", "out/demo.h5", True, "gzip")
    assert job.axes == ["seq_len", "causal"]
    assert [(c["seq_len"], c["causal"]) for c in job.cases()] == \
        [(256, False), (256, True), (512, False), (512, True)]
    assert all(c["heads"] == 2 and c["layout"] == "zigzag" for c in job.cases())
    assert job.slurm == {"nodes": 2, "anything_goes": "submit checks this table"}
    assert job.text == GOOD


def test_defaults(tmp_path):
    job = load_job(write(tmp_path, '[job]\nname = "bare"\n'))
    assert (job.kind, job.output, job.activations, job.compression, job.cases()) == \
        ("attention", os.path.join("results", "bare.h5"), False, "none", [{}])


def test_overrides_fix_an_axis(tmp_path):
    job = load_job(write(tmp_path, GOOD)).with_overrides({"seq_len": 128, "dtype": "float64"})
    assert [c["seq_len"] for c in job.cases()] == [128, 128]
    assert all(c["dtype"] == "float64" for c in job.cases())
    with pytest.raises(JobFileError, match="'mixer' does not apply to attention jobs"):
        job.with_overrides({"mixer": "fnet"})


# --- each kind of mistake ------------------------------------------------------------------------

def test_unknown_key_names_file_line_key(tmp_path):
    msg = load_err(tmp_path, GOOD.replace("heads = 2", "hedas = 2"))
    assert re.match(r".*job\.toml:10: sweep\.hedas is not a known key; expected one of seq_len, ", msg)


def test_unknown_key_in_job_table(tmp_path):
    msg = load_err(tmp_path, GOOD.replace('kind = "attention"', 'knd = "attention"'))
    assert msg.endswith("job.toml:4: job.knd is not a known key; expected one of name, kind, description")


def test_unknown_table(tmp_path):
    msg = load_err(tmp_path, GOOD + "\n[outptu]\npath = 'x'\n")
    assert "job.toml:22: [outptu] is not a known table" in msg


def test_wrong_type_scalar(tmp_path):
    msg = load_err(tmp_path, GOOD.replace("heads = 2", 'heads = "2"'))
    assert msg.endswith("job.toml:10: sweep.heads = '2' has type string; expected an integer or a "
                        "list of integers")


def test_wrong_type_inside_list(tmp_path):
    msg = load_err(tmp_path, GOOD.replace("[256, 512]", "[256, 512.0]"))
    assert "job.toml:8: sweep.seq_len = 512.0 has type float; expected an integer" in msg


def test_bool_is_not_an_integer(tmp_path):
    msg = load_err(tmp_path, GOOD.replace("heads = 2", "heads = true"))
    assert "sweep.heads = True has type boolean; expected an integer" in msg


def test_wrong_type_unsweepable(tmp_path):
    msg = load_err(tmp_path, GOOD.replace("activations = true", "activations = [true, false]"))
    assert "job.toml:15: output.activations = [True, False] is a list; expected true or false " \
           "(it cannot be swept)" in msg


def test_bad_value_choice(tmp_path):
    msg = load_err(tmp_path, GOOD.replace('layout = "zigzag"', 'layout = "diagonal"'))
    assert msg.endswith("job.toml:11: sweep.layout = 'diagonal' is not one of contiguous, zigzag, striped")


def test_bad_value_range(tmp_path):
    msg = load_err(tmp_path, GOOD.replace("[256, 512]", "[0, 512]"))
    assert msg.endswith("job.toml:8: sweep.seq_len = 0 must be positive")


def test_bad_value_kind(tmp_path):
    msg = load_err(tmp_path, GOOD.replace('kind = "attention"', 'kind = "training"'))
    assert msg.endswith("job.toml:4: job.kind = 'training' is not one of attention, mixer, train")


def test_empty_and_repeated_axes(tmp_path):
    assert "sweep.seq_len = [] is empty" in load_err(tmp_path, GOOD.replace("[256, 512]", "[]"))
    assert "repeats a value" in load_err(tmp_path, GOOD.replace("[256, 512]", "[256, 256]"))


def test_bad_name(tmp_path):
    msg = load_err(tmp_path, GOOD.replace('name = "demo"', 'name = "../demo"'))
    assert "job.toml:3: job.name = '../demo' is not usable as a file name" in msg
    # Python's "$" matches before a final newline: the check must be a full match
    msg = load_err(tmp_path, GOOD.replace('name = "demo"', 'name = "demo\\n"'))
    assert "job.name = 'demo\\n' is not usable as a file name" in msg


def test_missing_job_table_and_name(tmp_path):
    assert "the [job] table is missing" in load_err(tmp_path, "[sweep]\nheads = 2\n")
    assert "job.toml:1: [job] has no name" in load_err(tmp_path, '[job]\nkind = "attention"\n')


def test_missing_file(tmp_path):
    missing = tmp_path / "nope.toml"
    with pytest.raises(JobFileError, match=r"job file .*nope\.toml does not exist"):
        load_job(missing)


def test_toml_syntax_error_has_line(tmp_path):
    msg = load_err(tmp_path, GOOD.replace("heads = 2", "heads = = 2"))
    assert re.match(r".*job\.toml:10: TOML syntax error: ", msg), msg
    assert "at line" not in msg  # tomllib's position moved to the front, not repeated


def test_not_utf8(tmp_path):
    p = tmp_path / "job.toml"
    p.write_bytes(b'[job]\nname = "\xff"\n')
    with pytest.raises(JobFileError, match="not UTF-8"):
        load_job(p)


def test_mixer_job_without_mixers_module_is_clear(tmp_path, monkeypatch):
    import sys

    # None in sys.modules makes the import itself fail, as a broken or missing module would
    monkeypatch.setitem(sys.modules, "hpcattn.mixers.cases", None)
    msg = load_err(tmp_path, '[job]\nname = "m"\nkind = "mixer"\n[sweep]\nmixer = "fnet"\n')
    assert msg.startswith("mixer jobs need hpcattn.mixers.cases, which cannot be imported: ")


def test_mixer_keys_from_mixer_module(tmp_path, monkeypatch):
    import hpcattn.jobs as jobs

    monkeypatch.setattr(jobs, "mixer_keys", lambda: {"mixer": jobs.Spec(str), "seq_len": jobs.POSITIVE,
                                                     "window": None})
    job = load_job(write(tmp_path, '[job]\nname = "m"\nkind = "mixer"\n[sweep]\n'
                                   'mixer = ["fnet", "local"]\nseq_len = 64\nwindow = [4, "x"]\n'))
    assert len(job.cases()) == 4  # 'window' values are left to the mixer code
    msg = load_err(tmp_path, '[job]\nname = "m"\nkind = "mixer"\n[sweep]\nmixer = "a"\nlayout = "zigzag"\n')
    assert "job.toml:6: sweep.layout is not a known key; expected one of mixer, seq_len, window" in msg
    assert "has no mixer" in load_err(tmp_path, '[job]\nname = "m"\nkind = "mixer"\n[sweep]\nseq_len = 64\n')


def test_key_line_variants():
    text = '[job]\nname = "x"\n\n[ sweep ]  # c\n"seq_len" = 1\nsweep.heads = 2\n'
    assert key_line(text, "job", "name") == 2
    assert key_line(text, "sweep", "seq_len") == 5
    assert key_line(text, "sweep", None) == 4
    assert key_line(text, "sweep", "missing") is None
    assert key_line('sweep.heads = 2\n', "sweep", "heads") == 1


def test_job_is_picklable_for_bcast(tmp_path):
    import pickle

    job = load_job(write(tmp_path, GOOD))
    assert isinstance(pickle.loads(pickle.dumps(job)), Job)
