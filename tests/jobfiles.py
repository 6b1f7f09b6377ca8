"""Helpers shared by the job/store/runner/analyze tests: write small job files, compare results."""
import json
import os

import numpy as np

from hpcattn import results as store

# parameters of a case small enough for a unit test (milliseconds per case)
TINY = {"heads": 2, "head_dim": 8, "dtype": "float64", "check_rows": 8}


def toml_value(v) -> str:
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    return json.dumps(v)  # strings, numbers and booleans are spelled the same in TOML and JSON


def write_job(path, *, sweep, name="t", kind="attention", output=None, activations=False,
              compression="none", extra="") -> str:
    lines = ["[job]", f'name = "{name}"', f'kind = "{kind}"', "", "[sweep]"]
    lines += [f"{k} = {toml_value(v)}" for k, v in sweep.items()]
    lines += ["", "[output]", f"activations = {toml_value(activations)}",
              f'compression = "{compression}"']
    if output is not None:
        lines.append(f"path = {json.dumps(os.fspath(output))}")
    path = os.fspath(path)
    with open(path, "w") as fh:
        fh.write("\n".join(lines) + "\n" + extra)
    return path


def comparable(path) -> dict:
    """Everything in a results file that does not depend on timing: case parameters, results
    other than timings and memory, and the stitched activations. Keyed 'case_0003/name'."""
    out = {}
    with store.open_results(path) as f:
        for name, g in f["cases"].items():
            out[f"{name}/params"] = g.attrs["params_json"]
            for key, obj in g.items():
                if key in store.TIMING_KEYS or key == "activations":
                    continue
                out[f"{name}/{key}"] = obj[()]
            if "activations" in g:
                for key, ds in g["activations"].items():
                    out[f"{name}/activations/{key}"] = ds[()]
    return out


def assert_same_results(a: dict, b: dict, rtol=0.0, atol=0.0) -> None:
    assert sorted(a) == sorted(b)
    for key in a:
        x, y = a[key], b[key]
        if isinstance(x, np.ndarray) and x.dtype.kind == "f":
            assert not np.isnan(x).any(), key
            np.testing.assert_allclose(x, y, rtol=rtol, atol=atol, err_msg=key)
        elif key.endswith(("/max_abs_err", "/max_lse_err", "/max_rel_err")):
            assert abs(float(x) - float(y)) <= atol, key   # summation order differs across P
        else:
            assert np.array_equal(x, y) if isinstance(x, np.ndarray) else x == y, key
