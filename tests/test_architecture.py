"""The layers of docs/ARCHITECTURE.md, checked on the source: who may import whom, no import circle between any
two modules, optional imports only through winq.errors.require, every third-party import declared in
pyproject.toml."""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest

from winq.errors import PACKAGE_NAMES

ROOT = Path(__file__).resolve().parents[1]
# layer -> source folder (import name winq.<layer>, or winq itself for the core)
LAYERS = {"core": ROOT / "winq", "formats": ROOT / "winq" / "formats", "exporters": ROOT / "exporters",
          "runtime": ROOT / "runtime", "cli": ROOT / "cli", "benchmarks": ROOT / "benchmarks"}
PACKAGES = {"core": "winq", "formats": "winq.formats", "exporters": "winq.exporters", "runtime": "winq.runtime",
            "cli": "winq.cli", "benchmarks": "winq.benchmarks"}
# what each layer may import of winq (besides itself); the CLI reaches the benchmarks by module name (importlib)
ALLOWED = {"core": {"core"}, "formats": {"core"}, "exporters": {"core", "formats"}, "runtime": {"core", "formats"},
           "benchmarks": {"core", "formats", "exporters", "runtime"},
           "cli": {"core", "formats", "exporters", "runtime", "benchmarks"}}
# the one import across the layers' order, inside a function: `act_quant="llamacpp"` is llama.cpp's scheme for the
# type the GGUF exporter picks, so the core asks winq.formats.gguf for that choice (winq.actplan.llamacpp_quant)
EXCEPTIONS = {("winq/actplan.py", "winq.formats.gguf")}


def sources(layer: str) -> list[Path]:
    files = sorted(LAYERS[layer].rglob("*.py"))
    return [f for f in files if layer != "core" or "formats" not in f.relative_to(ROOT / "winq").parts]


def layer_of(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "winq":
        return None
    if len(parts) == 1:
        return "core"
    return {"formats": "formats", "exporters": "exporters", "runtime": "runtime", "cli": "cli",
            "benchmarks": "benchmarks"}.get(parts[1], "core")


def imports(path: Path, package: str) -> list[str]:
    """Every module imported by a file (absolute names; relative imports resolved against `package`)."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                mod = f"{base}.{node.module}" if node.module else base
                out += [f"{mod}.{a.name}" if not node.module else mod for a in node.names]
            else:
                out.append(node.module)
    return out


def package_of(layer: str, path: Path) -> str:
    rel = path.relative_to(LAYERS[layer]).parent.parts
    return ".".join((PACKAGES[layer], *rel))


def module_of(layer: str, path: Path) -> str:
    """The import name of a source file: winq/formats/gguf.py -> winq.formats.gguf, runtime/__init__.py ->
    winq.runtime."""
    package = package_of(layer, path)
    return package if path.name == "__init__.py" else f"{package}.{path.stem}"


@pytest.mark.parametrize("layer", list(LAYERS))
def test_layers_import_only_what_is_below_them(layer):
    bad = []
    for f in sources(layer):
        for mod in imports(f, package_of(layer, f)):
            other = layer_of(mod)
            if (other is not None and other != layer and other not in ALLOWED[layer]
                    and (f.relative_to(ROOT).as_posix(), mod) not in EXCEPTIONS):
                bad.append(f"{f.relative_to(ROOT)} imports {mod}")
    assert not bad, bad


def import_graph(root: Path = ROOT) -> dict[str, dict[str, str]]:
    """{module: {module it imports: "file:line"}} over every layer's source, imports inside functions included,
    relative imports resolved. `from pkg import name` is an edge to pkg.name where that is a module, else to pkg;
    an import of a.b.c is an edge to the longest of a.b.c, a.b, a that is a module (the parent packages Python
    runs first are not edges: they import their children only by name, through importlib, if at all)."""
    files = {}
    for layer, folder in LAYERS.items():
        for f in sorted((root / folder.relative_to(ROOT)).rglob("*.py")):
            if layer == "core" and "formats" in f.relative_to(root / "winq").parts:
                continue
            files[module_of(layer, ROOT / f.relative_to(root))] = (f, layer)

    def known(name: str) -> str | None:
        while name and name not in files:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for mod, (f, layer) in files.items():
        package = package_of(layer, ROOT / f.relative_to(root))
        edges = {}
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                    base = f"{up}.{node.module}" if node.module else up
                names = [f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names]
            else:
                continue
            for name in names:
                target = known(name)
                if target is not None and target != mod:
                    edges.setdefault(target, f"{f.relative_to(root)}:{node.lineno}")
        graph[mod] = edges
    return graph


def import_circles(graph: dict[str, dict[str, str]]) -> list[list[str]]:
    """Every strongly connected group of modules that import each other (Tarjan), each as one circle through it:
    [a, b, ..., a] with the file:line of each import (and the whole group where it holds more modules)."""
    index, low, stack, on, groups = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(set(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    circles = []
    for group in groups:  # a shortest way back to the group's first module, for the message
        start = min(group)
        paths, seen = [[start]], {start}
        while paths:
            path = paths.pop(0)
            nxt = sorted(w for w in graph[path[-1]] if w in group)
            if start in nxt:
                path = path + [start]
                break
            for w in nxt:
                if w not in seen:
                    seen.add(w)
                    paths.append(path + [w])
        circle = [f"{a} ({graph[a][b]})" for a, b in zip(path, path[1:])] + [path[-1]]
        circles.append(circle + ([f"(the group: {', '.join(sorted(group))})"] if len(group) > len(path) - 1 else []))
    return circles


def test_no_import_circles():
    """No two modules import each other, directly or through others, at module level or inside a function: a
    circle is a module that cannot be read (or loaded) without the one that needs it."""
    graph = import_graph()
    assert {"winq", "winq.formats.gguf", "winq.exporters", "winq.runtime.backends", "winq.cli.main",
            "winq.benchmarks.edge"} <= set(graph)  # the walk found every layer
    circles = import_circles(graph)
    assert not circles, "\n".join(" -> ".join(c) for c in circles)


def test_the_circle_check_sees_a_circle():
    graph = {"a": {"b": "a.py:1"}, "b": {"c": "b.py:3"}, "c": {"a": "c.py:2"}, "d": {"a": "d.py:1"}}
    assert import_circles(graph) == [["a (a.py:1)", "b (b.py:3)", "c (c.py:2)", "a"]]
    assert import_circles({"a": {"b": "a.py:1"}, "b": {}}) == []


@pytest.mark.parametrize("layer,forbidden", [("exporters", "runtime"), ("runtime", "exporters")])
def test_no_import_by_name_either(layer, forbidden):
    """importlib strings count too: no "winq.runtime" in the exporters' source, no "winq.exporters" in the runtime's."""
    hits = [f"{f.relative_to(ROOT)}:{i}" for f in sources(layer) for i, line in enumerate(f.read_text().splitlines(), 1)
            if f"winq.{forbidden}" in line]
    assert not hits, hits


MAX_FUNCTION_LINES = 80


def _is_cli_command(node) -> bool:
    """A typer command (`@app.command(...)`): its signature is the option declarations, so its body is measured."""
    return any(isinstance(d, ast.Call) and isinstance(d.func, ast.Attribute) and d.func.attr == "command"
               for d in node.decorator_list)


def test_no_function_is_longer_than_80_lines():
    """A function fits on a screen or two (decorators and docstring included; a typer command from its docstring
    on, its signature being the option declarations); the Triton kernels in runtime/kernels/ are exempt."""
    long = []
    for layer in LAYERS:
        for f in sources(layer):
            rel = f.relative_to(ROOT).as_posix()
            if rel.startswith("runtime/kernels/"):
                continue
            for node in ast.walk(ast.parse(f.read_text())):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    first = node.body[0].lineno if _is_cli_command(node) else min(
                        [node.lineno] + [d.lineno for d in node.decorator_list])
                    if node.end_lineno - first + 1 > MAX_FUNCTION_LINES:
                        long.append(f"{rel}:{node.lineno} {node.name} ({node.end_lineno - first + 1} lines)")
    assert not long, long


def test_optional_imports_go_through_require():
    """A missing extra is reported one way (winq.errors.require): no module writes its own ImportError guard. The
    benchmark scripts are exempt: benchmarks/unpack_gemm.py runs from a bare checkout on a GPU machine (without winq
    installed), and a missing plotting or llama_cpp package only leaves a figure or a version line out."""
    guards = [f"{f.relative_to(ROOT)}:{i}" for layer in LAYERS if layer != "benchmarks" for f in sources(layer)
              for i, line in enumerate(f.read_text().splitlines(), 1)
              if re.search(r"except\s*\(?[\w, ]*ImportError", line) and f.name != "errors.py"]
    assert not guards, guards


def test_every_third_party_import_is_declared():
    """Everything the package imports is a dependency or belongs to an extra (psutil, gguf, ... included)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = {re.split(r"[<>=\[ ;]", d, maxsplit=1)[0].lower().replace("_", "-")
                for d in project["dependencies"] + [d for ds in project["optional-dependencies"].values() for d in ds]}
    dists = packages_distributions()
    missing = set()
    for layer in LAYERS:
        for f in sources(layer):
            for mod in imports(f, package_of(layer, f)):
                top = mod.split(".")[0]
                if top in sys.stdlib_module_names or top in ("winq", "__future__"):
                    continue
                names = {d.lower().replace("_", "-") for d in dists.get(top, [PACKAGE_NAMES.get(top, top)])}
                if not names & declared:
                    missing.add(f"{top} ({f.relative_to(ROOT)})")
    assert not missing, sorted(missing)


def test_the_wheel_holds_every_layer_and_the_kernel_benchmark():
    """pyproject lists each package (a wheel has no other way to find them): winq.formats, and winq.benchmarks
    so that `winq bench --kernels` runs benchmarks/unpack_gemm.py from an installed wheel."""
    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    pkgs = set(tool["packages"])
    found = {".".join([name, *p.relative_to(ROOT / folder).parent.parts])
             for name, folder in tool["package-dir"].items() for p in (ROOT / folder).rglob("__init__.py")}
    assert {"winq.formats", "winq.exporters", "winq.runtime", "winq.runtime.bench", "winq.runtime.kernels", "winq.cli",
            "winq.benchmarks"} <= pkgs
    assert found <= pkgs, sorted(found - pkgs)
    assert tool["package-dir"]["winq.benchmarks"] == "benchmarks" and (ROOT / "benchmarks" / "unpack_gemm.py").is_file()


def test_no_benchmark_script_shadows_an_installed_module():
    """`python benchmarks/x.py` puts benchmarks/ first on sys.path, so a script named like an installed top-level
    module replaces it for everything the script imports (a benchmarks/kernels.py broke transformers, which imports
    the PyPI package `kernels` when it is installed)."""
    import importlib.metadata

    installed = set(importlib.metadata.packages_distributions()) | set(sys.stdlib_module_names)
    scripts = {p.stem for p in (ROOT / "benchmarks").glob("*.py")} - {"__init__"}
    assert scripts and not scripts & installed, sorted(scripts & installed)
