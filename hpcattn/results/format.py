"""What makes a file an hpcattn results file, opening one, and HDF5 files built in memory.

Files are only ever *replaced*, never edited in place: hpcattn builds a master or a case record
in memory (:func:`new_image`, :func:`open_image`), then writes the bytes itself under a temporary
name of its own, fsyncs and renames them (:func:`hpcattn.results.files.write_bytes`). HDF5 thus
never writes to disk for them (a full disk is a clean OSError, never a crash inside HDF5), and a
SIGKILL leaves the previous file, which h5py and h5dump open.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import secrets

import numpy as np

from ..errors import HpcattnError

FORMAT = "hpcattn-results"
FORMAT_VERSION = 1
# results that change from run to run even on identical inputs
TIMING_KEYS = frozenset({"wall_s", "gflops", "compute_s", "wait_s", "peak_rss_bytes",
                         "peak_alloc_bytes", "elapsed_s"})
LIBVER = ("earliest", "v110")  # readable by HDF5 1.10 tools (h5dump in Debian 12)


class ResultsError(HpcattnError):
    """A results file that cannot be used (missing, corrupt, foreign, another job's)."""


def import_h5py():
    """The h5py module, imported when a file is first touched (``import hpcattn`` stays light)."""
    import h5py as _h5py

    return _h5py


def have_mpio() -> bool:
    """True when h5py was built against a parallel HDF5 (then the ``mpio`` driver works)."""
    return bool(import_h5py().get_config().mpi)


def sidecar(path: str) -> str:
    """Directory that holds the activation files of master ``path``."""
    return os.fspath(path) + ".d"


def case_name(index: int) -> str:
    return f"case_{index:04d}"


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def format_attrs() -> dict:
    """The root attributes every new results file starts with."""
    return {"hpcattn_format": FORMAT, "hpcattn_format_version": FORMAT_VERSION, "created": now()}


# --- opening (open_results itself is in reading.py: it shows records too) ------------------------

def h5_reason(exc: BaseException) -> str:
    return one_line(str(exc).split("(")[0].strip().rstrip(":") or type(exc).__name__)


def one_line(text) -> str:
    """``text`` with control characters escaped (messages stay one line, terminals untouched)."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(text))[:300]


def text_attr(attrs, key):
    """A string attribute as str (None when absent or not a string)."""
    val = attrs.get(key)
    if isinstance(val, bytes):
        val = val.decode("utf-8", "replace")
    return val if isinstance(val, str) else None


def int_attr(attrs, key, where: str, default=None) -> int:
    val = attrs.get(key, default)
    if isinstance(val, (bool, np.bool_)) or not isinstance(val, (int, np.integer)):
        raise ResultsError(f"{where}: attribute {key} is {one_line(repr(val))}; expected an integer")
    return int(val)


def json_attr(attrs, key, where: str, kind=dict):
    text = text_attr(attrs, key)
    try:
        val = json.loads(text) if text is not None else None
    except ValueError:
        val = None
    if not isinstance(val, kind):
        raise ResultsError(f"{where}: attribute {key} is {one_line(repr(attrs.get(key)))[:80]}; "
                           f"expected JSON ({kind.__name__})")
    return val


def hard_children(group, where: str):
    """(name, object) of ``group``'s members; a soft or external link is refused (a results file
    has none: following one would read, or copy, another file)."""
    h5py = import_h5py()
    for name in group:
        link = group.get(name, getlink=True)
        if not isinstance(link, h5py.HardLink):
            target = getattr(link, "filename", None) or getattr(link, "path", "")
            raise ResultsError(f"{where}: {group.name.rstrip('/')}/{one_line(name)} is a "
                               f"{type(link).__name__} to {one_line(target)}; an hpcattn results "
                               "file has no links")
        yield name, group[name]


def check_results(f, path) -> None:
    """A one-line ResultsError unless ``f`` is a usable results file."""
    h5py = import_h5py()
    try:
        if text_attr(f.attrs, "hpcattn_format") != FORMAT or "cases" not in f.keys():
            raise ResultsError(f"{path} is an HDF5 file but not an hpcattn results file (no "
                               f"hpcattn_format={FORMAT!r} attribute); expected a file from 'hpcattn run'")
        version = int_attr(f.attrs, "hpcattn_format_version", str(path), 0)
        if version > FORMAT_VERSION:
            raise ResultsError(f"{path} has results format version {version}; this hpcattn reads up "
                               f"to {FORMAT_VERSION} (upgrade hpcattn)")
        top = dict(hard_children(f, str(path)))
        if not isinstance(top["cases"], h5py.Group) or not isinstance(top.get("runs", f), h5py.Group):
            raise ResultsError(f"{path}: /cases and /runs must be groups")
        for name, g in hard_children(f["cases"], str(path)):
            where = f"{path}: /cases/{one_line(name)}"
            if not isinstance(g, h5py.Group):
                raise ResultsError(f"{where} is not a group")
            index = int_attr(g.attrs, "index", where)
            if name != case_name(index):
                raise ResultsError(f"{where} has index {index}; expected {case_name(index)}")
            json_attr(g.attrs, "params_json", where)
            for _, sub in hard_children(g, where):
                if isinstance(sub, h5py.Group):
                    list(hard_children(sub, where))
    except ResultsError:
        raise
    except Exception as exc:  # noqa: BLE001 - h5py raises many kinds on damaged metadata
        raise ResultsError(f"{path} is damaged (truncated or corrupt?): {type(exc).__name__}: "
                           f"{h5_reason(exc)}") from None


def params_json(params: dict) -> str:
    return json.dumps(params, sort_keys=True, default=_json_default)


def _json_default(x):
    if isinstance(x, np.generic):
        return x.item()
    raise TypeError(f"{type(x).__name__} is not JSON serialisable")


# --- writing ------------------------------------------------------------------------------------

def set_attrs(obj, attrs: dict) -> None:
    """Attributes from a dict: None is skipped, lists of strings become HDF5 string arrays."""
    for key, val in attrs.items():
        if val is None:
            continue
        if isinstance(val, (list, tuple)) and val and all(isinstance(v, str) for v in val):
            obj.attrs[key] = np.array(val, dtype=import_h5py().string_dtype())
        else:
            obj.attrs[key] = val


def image_name(near: str) -> str:
    """A name for an HDF5 file that lives only in memory, in the directory of ``near`` (HDF5
    resolves relative virtual-dataset sources from it); nothing is ever created under it."""
    folder = os.path.dirname(os.path.abspath(near))
    return os.path.join(folder, f".hpcattn-image-{os.getpid()}-{secrets.token_hex(6)}.h5")


def new_image(near: str, **kw):
    """An empty HDF5 file in memory (write it out with ``image_bytes``)."""
    return import_h5py().File(image_name(near), "w", driver="core", backing_store=False,
                              libver=LIBVER, **kw)


def open_image(data: bytes, near: str, *, write: bool = False):
    """The HDF5 file whose bytes are ``data``, opened in memory (changes stay in memory);
    OSError when the bytes are not an HDF5 file."""
    h5py = import_h5py()
    if not data:
        raise OSError("empty file")
    fapl = h5py.h5p.create(h5py.h5p.FILE_ACCESS)
    fapl.set_fapl_core(backing_store=False)
    fapl.set_file_image(data)
    fapl.set_libver_bounds(h5py.h5f.LIBVER_EARLIEST, h5py.h5f.LIBVER_V110)  # as LIBVER
    flags = h5py.h5f.ACC_RDWR if write else h5py.h5f.ACC_RDONLY
    return h5py.File(h5py.h5f.open(image_name(near).encode(), flags, fapl=fapl))


def image_bytes(f) -> bytes:
    f.flush()
    return f.id.get_file_image()


# --- results a case may hold ----------------------------------------------------------------------

MAX_RESULT_BYTES = 16 * 2 ** 20         # one result dataset of a case
MAX_FILE_RESULT_BYTES = 256 * 2 ** 20   # all result datasets of one file together


def check_result_dataset(obj, key: str, where: str, budget: list) -> int:
    """Bytes of result dataset ``obj`` after checking that reading it is what it claims: stored in
    this file (not virtual, not external raw data) and within the bounds; ``budget[0]`` (bytes
    left for the file) is charged. ResultsError (one line) otherwise: a crafted 8 KiB file must
    not make a reader allocate gigabytes."""
    name = one_line(key)
    if obj.is_virtual or obj.external:
        kind = "a virtual dataset" if obj.is_virtual else "stored in external files"
        raise ResultsError(f"{where}/{name} is {kind}; hpcattn results are stored in the file "
                           "itself (only activations are virtual)")
    nbytes = int(obj.size or 0) * obj.dtype.itemsize
    if nbytes > MAX_RESULT_BYTES or nbytes > budget[0]:
        raise ResultsError(f"{where}/{name} holds {obj.shape} {obj.dtype} ({nbytes / 2 ** 20:,.0f} "
                           f"MiB); results are at most {MAX_RESULT_BYTES // 2 ** 20} MiB each and "
                           f"{MAX_FILE_RESULT_BYTES // 2 ** 20} MiB per file; not read")
    budget[0] -= nbytes
    return nbytes


def check_case_group(group, where: str, budget: list) -> None:
    """Every member of a case group other than its activations: a hard link to a result dataset
    (or a group of them) that :func:`check_result_dataset` accepts."""
    for key in group:
        link = group.get(key, getlink=True)
        if type(link).__name__ != "HardLink":
            raise ResultsError(f"{where}/{one_line(key)} is a {type(link).__name__}; an hpcattn "
                               "results file has no links")
        if key == "activations":
            continue
        obj = group[key]
        if hasattr(obj, "shape"):
            check_result_dataset(obj, key, where, budget)
        else:
            check_case_group(obj, f"{where}/{one_line(key)}", budget)
