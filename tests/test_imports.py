"""The package's import graph: no cycles, and no arrow from a lower layer up to a higher one.
Read from the source (every import, those inside functions too), so it runs without importing
anything: ``pytest tests/test_imports.py``."""

from __future__ import annotations

import ast
from pathlib import Path

from .conftest import ROOT

PACKAGE = ROOT / "sae_lightning"

# Layers, lowest first: a module may import from its own layer and the layers below it. A module
# is placed by its longest matching prefix (dotted names under sae_lightning).
LAYERS: list[tuple[str, ...]] = [
    # foundations: no torch module, no config
    (
        "errors",
        "registry",
        "spec",
        "atomic",
        "checkpoint_file",
        "cli",
        "progress",
        "tb",
        "zipf",
        "compare",
        "resume",
        "glibc_malloc",
        "provenance",
    ),
    # tensors and the SAE's parts
    (
        "sparse",
        "selection",
        "blockwise",
        "rescore",
        "collective",
        "sae",
        "gradient_ranking",
        "stats",
        "metrics",
        "description_length",
        "paired",
        "plots",
    ),
    # what a run is built from
    ("data", "allocators", "losses"),
    ("config",),
    ("module",),
    ("rules", "callbacks", "sweep.pruning", "sweep.space", "sweep.pareto", "sweep.settings", "sweep.study"),
    ("runs",),
    # entry points
    ("train", "evaluate", "browser", "interop", "help", "debian_docs", "sweep.sweeper", "sweep.report", "sweep"),
]


def module_names() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def imports_of(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The package modules ``name`` imports (``from . import tb`` is the module tb, not the package)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            subs = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in known]
            found.update(subs if subs else [target])
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return {m for m in found if m in known and m != name}


def graph() -> dict[str, set[str]]:
    known = module_names()
    return {name: imports_of(name, path, known) for name, path in known.items()}


def layer(name: str) -> int | None:
    rel = name.removeprefix("sae_lightning").removeprefix(".")
    best: tuple[int, int] | None = None
    for i, prefixes in enumerate(LAYERS):
        for p in prefixes:
            if rel == p or rel.startswith(p + "."):
                if best is None or len(p) > best[1]:
                    best = (i, len(p))
    return None if best is None else best[0]


def test_every_module_has_a_layer():
    unplaced = [n for n in graph() if n != "sae_lightning" and layer(n) is None]
    assert not unplaced, f"place these in LAYERS: {unplaced}"


def test_no_import_goes_up_a_layer():
    g = graph()
    upward = [
        f"{a} (layer {layer(a)}) imports {b} (layer {layer(b)})"
        for a, deps in g.items()
        if a != "sae_lightning"
        for b in deps
        if b != "sae_lightning" and layer(b) > layer(a)  # type: ignore[operator]
    ]
    assert not upward, "\n".join(upward)


def test_no_import_cycles():
    g = graph()
    cycles, index, low, stack, on, counter = [], {}, {}, [], set(), [0]

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in g[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in g:
        if v not in index:
            visit(v)
    assert not cycles, cycles


def test_the_checker_sees_an_upward_import_and_a_cycle(tmp_path):
    """The rules can fail: a data module importing a callback is caught."""
    assert layer("sae_lightning.data.activations") < layer("sae_lightning.callbacks.downstream")  # type: ignore[operator]
    known = {"sae_lightning.data.x": tmp_path / "x.py", "sae_lightning.callbacks.y": tmp_path / "y.py"}
    (tmp_path / "x.py").write_text("from ..callbacks import y\n")
    assert imports_of("sae_lightning.data.x", known["sae_lightning.data.x"], known) == {"sae_lightning.callbacks.y"}


def test_test_modules_share_helpers_not_each_other():
    """What tests share lives in tests/helpers (or conftest): no test module imports another."""
    offenders = []
    for path in (ROOT / "tests").rglob("test_*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[-1].startswith("test_"):
                offenders.append(f"{path.relative_to(ROOT)} imports {node.module}")
    assert not offenders, offenders
