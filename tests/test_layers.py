"""The layers hold: every module of src/ntkselect sits in a layer, and there are no import
circles, within a layer too.

The layers contract in pyproject.toml (``lint-imports`` in .ci/run) forbids an import from a lower
layer to a higher one, so no circle can cross layers, but it says nothing of a module it does not
list; these check that every module is listed and that the modules inside one layer
(``model/loading.py`` and ``model/runtime.py`` importing each other, say) form no circle, on the
import graph import-linter builds (grimp), function-level imports included."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

#: modules outside the layers: the package's own __init__ (the public API re-exports every layer),
#: ``python -m ntkselect``, and packages whose __init__ imports nothing
UNLAYERED = {"ntkselect", "ntkselect.__main__", "ntkselect.evaluation", "ntkselect.runs"}


def _circles(graph) -> list[list[str]]:
    """Each circle once, as the imports that make it: "a -> b (l.12)"."""
    seen, out = set(), []
    for importer in sorted(graph.modules):
        for imported in sorted(graph.find_modules_directly_imported_by(importer)):
            back = graph.find_shortest_chain(importer=imported, imported=importer)
            if not back:
                continue
            loop = (importer, *back)  # importer -> imported -> ... -> importer
            key = frozenset(loop)
            if key in seen:
                continue
            seen.add(key)
            steps = []
            for a, b in zip(loop, loop[1:]):
                lines = ", ".join(f"l.{d['line_number']}" for d in graph.get_import_details(importer=a, imported=b))
                steps.append(f"{a} -> {b} ({lines})")
            out.append(steps)
    return out


def test_no_module_imports_itself_through_others():
    grimp = pytest.importorskip("grimp")  # with import-linter, in the test extra
    circles = _circles(grimp.build_graph("ntkselect", cache_dir=None))
    assert not circles, "import circles:\n" + "\n".join("  " + "; ".join(c) for c in circles)


def test_every_module_sits_in_a_layer():
    grimp = pytest.importorskip("grimp")
    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    (contract,) = [c for c in pyproject["tool"]["importlinter"]["contracts"] if c["type"] == "layers"]
    layers = [m.strip() for layer in contract["layers"] for m in layer.replace(":", "|").split("|")]
    graph = grimp.build_graph("ntkselect", cache_dir=None)
    outside = sorted(m for m in graph.modules if m not in UNLAYERED and not any(m == la or m.startswith(la + ".") for la in layers))
    assert not outside, f"modules in no layer of the [tool.importlinter] contract (add each to its layer there and in docs/ARCHITECTURE.md): {outside}"
    assert all(not graph.find_modules_directly_imported_by(m) for m in UNLAYERED - {"ntkselect", "ntkselect.__main__"})
