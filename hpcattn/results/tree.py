"""Nested results dicts <-> HDF5 groups: the codec every case's results go through."""
from __future__ import annotations

import numpy as np

from ..errors import HpcattnError
from .format import import_h5py


def write_tree(group, data: dict) -> None:
    """Results as small datasets: numbers and lists of numbers -> datasets, strings -> attributes,
    dicts -> subgroups, None -> nothing."""
    for key, val in data.items():
        if val is None:
            continue
        if isinstance(val, dict):
            write_tree(group.require_group(key), val)
        elif isinstance(val, str):
            group.attrs[key] = val
        else:
            arr = np.asarray(val)
            if arr.dtype.kind in "biuf":
                group.create_dataset(key, data=arr)
            elif arr.dtype.kind in "UO" and all(isinstance(v, str) for v in arr.ravel()):
                group.create_dataset(key, data=arr.astype(object), dtype=import_h5py().string_dtype())
            else:
                raise HpcattnError(f"result {key!r} of type {type(val).__name__} cannot be stored; "
                                   "expected numbers, strings, arrays or dicts of them")


def read_tree(group) -> dict:
    """Inverse of :func:`write_tree` (virtual activation datasets are skipped)."""
    out = dict(group.attrs)
    for key, obj in group.items():
        if key == "activations":
            continue
        if isinstance(obj, import_h5py().Group):
            out[key] = read_tree(obj)
        else:
            val = obj[()]
            out[key] = val.decode() if isinstance(val, bytes) else val
    return out
