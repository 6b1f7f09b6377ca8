"""The package's import graph: no cycle, and every import points down the layers of
docs/architecture.md. Imports inside functions count too (they are how a back-arrow hides).

Run alone: ``python -m pytest tests/test_structure_unit.py -q``; on failure it names the cycle or
the offending import with its file and line.
"""
from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

import hpcattn

PKG = Path(hpcattn.__file__).resolve().parent

# Layers, lowest first. A module may import only modules of its own layer or lower ones (a
# module that is in no layer is a test failure: say where it belongs).
LAYERS = [
    # 0: facts and small helpers everything may use
    ("base", ["hpcattn._version", "hpcattn._threads", "hpcattn.errors", "hpcattn.devices",
              "hpcattn.measure", "hpcattn.reference",
              "hpcattn.machine", "hpcattn.footprint"]),
    # 1: how data is laid out and moved; input checks
    ("layout", ["hpcattn.layouts", "hpcattn.masks", "hpcattn.validate", "hpcattn.exchange", "hpcattn.inputs",
                "hpcattn.merge", "hpcattn.traffic"]),
    # 2: per-rank kernels: NumPy (blockwise) and CUDA (gpu/, which never sees the ring)
    ("kernels", ["hpcattn.blockwise", "hpcattn.blockwise_backward", "hpcattn.gpu",
                 "hpcattn.cpu_kernels", "hpcattn.cpu_fused", "hpcattn.cpu_pool", "hpcattn.cpu_short",
                 "hpcattn.mask_plan", "hpcattn.emulation", "hpcattn.out_pool"]),
    # 3: the seam that picks NumPy or CUDA once
    ("backend", ["hpcattn.backend"]),
    # 4: distributed algorithms and the mixer zoo (no files, no command lines, no Slurm)
    ("algorithms", ["hpcattn.ring", "hpcattn.ring_backward", "hpcattn.ulysses",
                    "hpcattn.context", "hpcattn.check", "hpcattn.mixers", "hpcattn.torch",
                    "hpcattn.train"]),
    # 5: the public API package and what runs cases and stores their results
    ("api", ["hpcattn"]),
    ("jobs", ["hpcattn.jobs", "hpcattn.results", "hpcattn.cases",
              "hpcattn.launch"]),
    ("runs", ["hpcattn.runner", "hpcattn.analysis", "hpcattn.bench", "hpcattn.slurm"]),
    # top: the command line
    ("cli", ["hpcattn.cli", "hpcattn.__main__"]),
]

# Modules that must not import these third-party packages at all (low layers stay free of the
# command line; nothing but the CUDA side imports CuPy at module level).
NO_CLICK_BELOW = "jobs"   # click only in layers above this one


def _module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PKG.rglob("*.py"))}


MODULES = _modules()


def _resolve(name: str) -> str | None:
    """The hpcattn module (or package) that ``name`` refers to, or None for outside imports."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _imports(mod: str, path: Path):
    """(target module, line, imported third-party top-level name or None) for every import."""
    tree = ast.parse(path.read_text(), str(path))
    is_pkg = path.name == "__init__.py"
    here = mod if is_pkg else mod.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                target = _resolve(alias.name) if alias.name.startswith("hpcattn") else None
                yield target, node.lineno, None if target else alias.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here
                for _ in range(node.level - 1):
                    base = base.rpartition(".")[0]
                full = f"{base}.{node.module}" if node.module else base
            else:
                full = node.module or ""
            if not full.startswith("hpcattn"):
                yield None, node.lineno, full.split(".")[0]
                continue
            for alias in node.names:  # "from . import store" names a module
                sub = _resolve(f"{full}.{alias.name}")
                yield (sub if sub and sub.startswith(full + ".") else _resolve(full)), node.lineno, None


def _layer_of(mod: str) -> int | None:
    best = None
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if mod == p or mod.startswith(p + "."):
                if best is None or len(p) > best[1]:
                    best = (i, len(p))
    return None if best is None else best[0]


def _edges():
    for mod, path in MODULES.items():
        for target, line, outside in _imports(mod, path):
            yield mod, path, line, target, outside


def test_every_module_has_a_layer():
    missing = sorted(m for m in MODULES if _layer_of(m) is None)
    assert not missing, f"modules in no layer of {__file__}: {missing}; add each where it belongs"


def test_imports_point_down_the_layers():
    bad = []
    for mod, path, line, target, _ in _edges():
        if target is None or target == mod:
            continue
        src, dst = _layer_of(mod), _layer_of(target)
        if src is None or dst is None:
            continue
        # a package may import its own submodules; a submodule its package's siblings
        same_package = target.startswith(mod + ".") or mod.startswith(target + ".")
        if dst > src and not same_package and target != "hpcattn":
            bad.append(f"{path.relative_to(PKG.parent)}:{line}: {mod} ({LAYERS[src][0]}) imports "
                       f"{target} ({LAYERS[dst][0]})")
        if target == "hpcattn" and src < _layer_of("hpcattn"):
            bad.append(f"{path.relative_to(PKG.parent)}:{line}: {mod} imports the top-level package")
    assert not bad, "imports that point up:\n" + "\n".join(bad)


def test_no_import_cycle():
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    where: dict[tuple[str, str], str] = {}
    for mod, path, line, target, _ in _edges():
        if target and target != mod and not mod.startswith(target + "."):
            # a submodule importing its own package's __init__ is Python's normal order, not a cycle
            graph[mod].add(target)
            where.setdefault((mod, target), f"{path.relative_to(PKG.parent)}:{line}")
    # packages re-export their submodules: importing the package means importing them
    colour: dict[str, int] = {}
    stack: list[str] = []

    def visit(m):
        colour[m] = 1
        stack.append(m)
        for t in sorted(graph[m]):
            if colour.get(t) == 1:
                cyc = stack[stack.index(t):] + [t]
                steps = [f"{a} -> {b} ({where[(a, b)]})" for a, b in zip(cyc, cyc[1:])]
                pytest.fail("import cycle:\n" + "\n".join(steps))
            if colour.get(t) is None:
                visit(t)
        stack.pop()
        colour[m] = 2

    for m in sorted(graph):
        if colour.get(m) is None:
            visit(m)


def test_low_layers_do_not_import_click():
    limit = next(i for i, (name, _) in enumerate(LAYERS) if name == NO_CLICK_BELOW)
    bad = [f"{path.relative_to(PKG.parent)}:{line}: {mod} imports click"
           for mod, path, line, _, outside in _edges()
           if outside == "click" and (_layer_of(mod) or 0) < limit]
    assert not bad, "\n".join(bad)


def test_only_the_cuda_side_imports_the_gpu_package():
    bad = [f"{path.relative_to(PKG.parent)}:{line}: {mod} imports {target}"
           for mod, path, line, target, _ in _edges()
           if target and target.startswith("hpcattn.gpu") and not mod.startswith("hpcattn.gpu")
           and _layer_of(mod) <= _layer_of("hpcattn.backend")
           and not mod.startswith("hpcattn.emulation") and not mod.startswith("hpcattn.backend")]
    assert not bad, "below the backend only the CUDA backend may import hpcattn.gpu:\n" + "\n".join(bad)


def test_gpu_never_imports_the_ring():
    bad = [f"{path.relative_to(PKG.parent)}:{line}: {mod} imports {target}"
           for mod, path, line, target, _ in _edges()
           if mod.startswith("hpcattn.gpu") and target
           and _layer_of(target) is not None and _layer_of(target) >= _layer_of("hpcattn.ring")]
    assert not bad, "\n".join(bad)


def test_importing_hpcattn_loads_no_optional_stack():
    """``import hpcattn`` must work on a laptop without CuPy, a GPU or the CLI's packages."""
    code = ("import sys, hpcattn; bad = [m for m in ('cupy', 'click', 'h5py', 'torch', 'hpcattn.gpu',"
            " 'hpcattn.cli', 'matplotlib') if m in sys.modules]; print(','.join(bad))")
    env = dict(os.environ)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=120, check=True).stdout.strip()
    assert out == "", f"import hpcattn also imported: {out}"
