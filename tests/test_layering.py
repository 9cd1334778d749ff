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


def _submodules() -> set[str]:
    """Names importable as ``from kvlens import <name>`` that are modules or packages, not the root's API."""
    return {p.stem for p in PACKAGE.glob("*.py")} | {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()}


def test_no_module_imports_the_package_root():
    """The root re-exports everything, so importing it from inside is an upward import (and a cycle)."""
    subs = _submodules()
    offenders = []
    for p in _modules():
        if _rel(p) == "__init__.py":
            continue
        for node in ast.walk(ast.parse(p.read_text(), filename=str(p))):
            if isinstance(node, ast.Import) and any(a.name == "kvlens" for a in node.names):
                offenders.append(f"{_rel(p)}:{node.lineno} import kvlens")
            elif isinstance(node, ast.ImportFrom) and node.module == "kvlens":
                offenders += [f"{_rel(p)}:{node.lineno} from kvlens import {a.name}"
                              for a in node.names if a.name not in subs]
    assert offenders == [], f"modules importing the package root: {offenders}"


#: Modules below everything (they import no other kvlens module but each other): any layer may use them.
LEAVES = {"kvlens.errors", "kvlens.fileio", "kvlens.version"}


def test_leaves_import_only_leaves():
    for name in LEAVES:
        tree = ast.parse((PACKAGE / f"{name.split('.')[1]}.py").read_text())
        used = {n.module for n in ast.walk(tree)
                if isinstance(n, ast.ImportFrom) and (n.module or "").startswith("kvlens")}
        assert used <= LEAVES, f"{name} imports {used - LEAVES}: it is no longer a leaf"


def test_models_import_nothing_above_them_at_module_level():
    """models/ sits at the bottom (ARCHITECTURE.md); validation reaches the seam only when it runs."""
    offenders = []
    for p in _modules():
        if not _rel(p).startswith("models/"):
            continue
        for node in ast.parse(p.read_text()).body:
            body = node.body if isinstance(node, ast.If) else [node]  # `if TYPE_CHECKING:` blocks count too
            for stmt in body:
                names = ([a.name for a in stmt.names] if isinstance(stmt, ast.Import)
                         else [stmt.module or ""] if isinstance(stmt, ast.ImportFrom) else [])
                offenders += [f"{_rel(p)}: {n}" for n in names
                              if n.startswith("kvlens") and not n.startswith("kvlens.models") and n not in LEAVES]
    assert offenders == [], f"models/ importing upward at module level: {offenders}"


# ---- every forward goes through the seam -------------------------------------------------------------
#: Calling a part of the model directly: ``model.layer(j)(h)``, ``model.mlp(l)(x)``, ...
_MODULE_GETTERS = {"layer", "mlp", "attn", "activation", "projection"}
#: Module properties of KVModel called on states: ``model.final_norm(h)``, ``model.embedding(ids)``.
_MODULE_PROPERTIES = {"embedding", "unembedding", "final_norm"}


def _direct_forwards(tree: ast.AST) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr in ("forward", "generate") and \
                isinstance(node.value, ast.Attribute) and node.value.attr == "hf":
            found.append((node.lineno, f".hf.{node.attr}"))  # also when stored and called later
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        if isinstance(f, ast.Attribute) and f.attr == "hf":
            found.append((node.lineno, "model.hf(...)"))
        elif isinstance(f, ast.Call) and isinstance(f.func, ast.Attribute) and f.func.attr in _MODULE_GETTERS:
            found.append((node.lineno, f"model.{f.func.attr}(...)(...)"))
        elif isinstance(f, ast.Attribute) and f.attr in _MODULE_PROPERTIES:
            found.append((node.lineno, f"model.{f.attr}(...)"))
        elif isinstance(f, ast.Attribute) and f.attr == "trace" and isinstance(f.value, ast.Attribute) and \
                f.value.attr == "nn":
            found.append((node.lineno, "model.nn.trace(...)"))
        elif isinstance(f, ast.Attribute) and f.attr in ("register_forward_hook", "register_forward_pre_hook"):
            found.append((node.lineno, f.attr))
    return sorted(found)


def _forward_offenders() -> dict[str, list[tuple[int, str]]]:
    out = {}
    for p in _modules():
        rel = _rel(p)
        if rel == "tracing.py" or rel.startswith("models/"):
            continue
        found = _direct_forwards(ast.parse(p.read_text(), filename=str(p)))
        if found:
            out[rel] = found
    return out


def test_forwards_only_through_the_seam():
    """No module outside kvlens/tracing.py and kvlens/models/ runs the model or a part of it, nor hooks
    into its forward (issue 14: one seam owns every forward)."""
    offenders = _forward_offenders()
    assert offenders == {}, f"forwards outside kvlens/tracing.py and kvlens/models/ (use the seam): {offenders}"


def test_the_forward_check_sees_each_pattern():
    """The detector itself: each way of calling the model directly is caught, seam calls are not."""
    code = """
out = model.hf(**batch.inputs())
gen = model.hf.generate
h = model.layer(j)(h)
y = model.mlp(l)(x)
logits = model.unembedding(model.final_norm(h))
with model.nn.trace(ids):
    pass
model.attn(0).register_forward_hook(hook)
states = tracing.run(model, batch, read=sites)
w = model.projection(l, "value").weight
"""
    kinds = sorted(what for _, what in _direct_forwards(ast.parse(code)))
    assert kinds == sorted(["model.hf(...)", ".hf.generate", "model.layer(...)(...)", "model.mlp(...)(...)",
                            "model.unembedding(...)", "model.final_norm(...)", "model.nn.trace(...)",
                            "register_forward_hook"])
