"""The dependency direction of ARCHITECTURE.md, enforced: only kvlens/models and
kvlens/tracing.py import nnsight; the core never imports kvlens.views; module-path strings of
model families live only in the registry."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "kvlens"


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def _modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def _rel(path: Path) -> str:
    return path.relative_to(PACKAGE).as_posix()


def test_only_models_and_tracing_import_nnsight():
    offenders = [_rel(p) for p in _modules()
                 if any(n == "nnsight" or n.startswith("nnsight.") for n in _imports(p))
                 and not (_rel(p).startswith("models/") or _rel(p) == "tracing.py")]
    assert offenders == [], f"nnsight imported outside the seam: {offenders}"


def test_core_never_imports_views():
    shows = ("views/", "cli.py")
    offenders = [_rel(p) for p in _modules() if not _rel(p).startswith(shows)
                 and any(n == "kvlens.views" or n.startswith("kvlens.views.") for n in _imports(p))]
    offenders = [o for o in offenders if o != "__init__.py"]  # the public API re-exports views
    assert offenders == [], f"core modules importing views: {offenders}"


def test_family_module_paths_appear_only_in_the_registry():
    paths = ('"transformer.h"', '"model.layers"', '"gpt_neox.layers"', '"down_proj"', '"c_proj"',
             '"dense_4h_to_h"', '"fc_out"')
    offenders = [(_rel(p), s) for p in _modules() if _rel(p) != "models/registry.py"
                 for s in paths if s in p.read_text()]
    assert offenders == [], f"module paths outside the registry: {offenders}"
