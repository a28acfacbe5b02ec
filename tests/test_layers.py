"""No import circles in src/ntkselect, within a layer too.

The layers contract in pyproject.toml (``lint-imports`` in .ci/run) forbids an import from a lower
layer to a higher one, so no circle can cross layers; this checks the modules inside one layer
(``model/loading.py`` and ``model/runtime.py`` importing each other, say), on the import graph
import-linter builds (grimp), function-level imports included."""

from __future__ import annotations

import pytest


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
