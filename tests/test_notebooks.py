"""Every notebook in notebooks/ runs top to bottom on the embedded model, and is stored stripped.

Notebooks are executed with nbclient in a kernel running this interpreter (the project's
virtual environment), in a temporary working directory, with widget state stored as in an
export; any error in any cell fails the test.
"""

from __future__ import annotations

import ast
import sys
import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("*.ipynb"))
ALLOWED_IMPORTS = {"kvlens"}  # and the standard library: no other third-party package


def _imports(source: str) -> set[str]:
    tree = ast.parse(source)
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_there_are_notebooks():
    assert NOTEBOOKS, "notebooks/ holds no notebook"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_is_stripped_and_imports_only_kvlens(path):
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and "kvlens" in code[0].source and "load(" in code[0].source, "first cell must name the model"
    for cell in code:
        assert cell.outputs == [] and cell.execution_count is None, f"{path.name}: outputs not stripped"
        third_party = _imports(cell.source) - set(sys.stdlib_module_names)
        assert third_party <= ALLOWED_IMPORTS, f"{path.name} imports {third_party}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_top_to_bottom(path, tmp_path):
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(nb, kernel_name="python3", timeout=1800, store_widget_state=True,
                                     resources={"metadata": {"path": str(tmp_path)}})
    start = time.perf_counter()
    client.execute()  # raises CellExecutionError on the first failing cell
    seconds = time.perf_counter() - start
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert errors == []
    print(f"{path.name}: executed in {seconds:.1f} s")
    nbformat.write(nb, tmp_path / path.name)  # the executed copy, for inspection
