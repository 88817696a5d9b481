"""The package's layers: a module imports from below it, never from a sibling's internals. The
service reads what training writes (the run layout in fluxray.track.local, the queue in
fluxray.cluster.admission) and never imports the training loop; the parts below both import neither."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "fluxray"

#: Part -> the fluxray parts it must never import (at module level or inside a function).
FORBIDDEN = {
    "serve": {"train"},
    "train": {"serve"},
    "cluster": {"train", "serve", "model", "data"},
    "track": {"train", "serve"},
    "model": {"train", "serve", "track"},
    "data": {"train", "serve", "track"},
    "advise": {"train", "serve"},
}


def imported_parts(path: Path) -> set[tuple[str, int]]:
    """(part, line) of every `fluxray.<part>` the file imports."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        for name in names:
            parts = name.split(".")
            if parts[0] == "fluxray" and len(parts) > 1:
                out.add((parts[1], node.lineno))
    return out


@pytest.mark.parametrize("part", sorted(FORBIDDEN))
def test_a_part_imports_only_from_below_it(part):
    bad = [f"{path.relative_to(PACKAGE.parent)}:{line} imports fluxray.{other}"
           for path in sorted((PACKAGE / part).rglob("*.py"))
           for other, line in sorted(imported_parts(path)) if other in FORBIDDEN[part]]
    assert not bad, bad


def test_the_check_sees_an_import_inside_a_function(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("def f():\n    from fluxray.train.loop import LoraRecipe\n")
    assert imported_parts(f) == {("train", 2)}
