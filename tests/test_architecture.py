"""The layers of docs/ARCHITECTURE.md, checked on the source: who may import whom, optional imports only
through winq.errors.require, every third-party import declared in pyproject.toml."""

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
          "runtime": ROOT / "runtime", "cli": ROOT / "cli"}
# what each layer may import of winq (besides itself)
ALLOWED = {"core": {"core"}, "formats": {"core"}, "exporters": {"core", "formats"}, "runtime": {"core", "formats"},
           "cli": {"core", "formats", "exporters", "runtime", "benchmarks"}}


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
    base = {"core": "winq", "formats": "winq.formats", "exporters": "winq.exporters", "runtime": "winq.runtime",
            "cli": "winq.cli"}[layer]
    return ".".join((base, *rel))


@pytest.mark.parametrize("layer", list(LAYERS))
def test_layers_import_only_what_is_below_them(layer):
    bad = []
    for f in sources(layer):
        for mod in imports(f, package_of(layer, f)):
            other = layer_of(mod)
            if other is not None and other != layer and other not in ALLOWED[layer]:
                bad.append(f"{f.relative_to(ROOT)} imports {mod}")
    assert not bad, bad


@pytest.mark.parametrize("layer,forbidden", [("exporters", "runtime"), ("runtime", "exporters")])
def test_no_import_by_name_either(layer, forbidden):
    """importlib strings count too: no "winq.runtime" in the exporters' source, no "winq.exporters" in the runtime's."""
    hits = [f"{f.relative_to(ROOT)}:{i}" for f in sources(layer) for i, line in enumerate(f.read_text().splitlines(), 1)
            if f"winq.{forbidden}" in line]
    assert not hits, hits


def test_optional_imports_go_through_require():
    """A missing extra is reported one way (winq.errors.require): no module writes its own ImportError guard."""
    guards = [f"{f.relative_to(ROOT)}:{i}" for layer in LAYERS for f in sources(layer)
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
    so that `winq bench --kernels` runs benchmarks/kernels.py from an installed wheel."""
    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    pkgs = set(tool["packages"])
    found = {"winq." + ".".join(p.relative_to(ROOT / "winq").parent.parts)
             for p in (ROOT / "winq").rglob("__init__.py")}
    assert {"winq.formats", "winq.exporters", "winq.runtime", "winq.runtime.kernels", "winq.cli",
            "winq.benchmarks"} <= pkgs
    assert {p.rstrip(".") for p in found} <= pkgs
    assert tool["package-dir"]["winq.benchmarks"] == "benchmarks" and (ROOT / "benchmarks" / "kernels.py").is_file()
