"""Every notebook in notebooks/ runs top to bottom on the embedded model, and is stored stripped.

Notebooks are executed with nbclient in a kernel running this interpreter (the project's
virtual environment), in a temporary working directory, with widget state stored as in an
export; any error in any cell fails the test.
"""

from __future__ import annotations

import ast
import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
psutil = pytest.importorskip("psutil")
from nbclient.exceptions import CellExecutionError, CellTimeoutError, DeadKernelError  # noqa: E402

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


class KernelWatch:
    """Which cell a notebook's kernel is running, and the kernel's peak resident memory.

    nbclient's ``on_cell_execute`` hook names the cell; a daemon thread samples the kernel
    process's high-water mark (``VmHWM`` in ``/proc``, else psutil's RSS) twice a second, so the
    peak is known even after the kernel has died.
    """

    def __init__(self) -> None:
        self.client = None  # the NotebookClient, whose kernel manager knows the kernel's PID
        self.cell: tuple[int, str] | None = None
        self.peak_mib = 0.0
        self.seconds = 0.0
        self.pid: int | None = None
        self.process = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def on_cell_execute(self, cell, cell_index, **_):
        self.cell = (cell_index, cell.source.strip().splitlines()[0] if cell.source.strip() else "")
        if self.pid is None and self.client is not None:  # the kernel is up: start sampling it
            self.process = self.client.km.provisioner.process  # its Popen keeps the exit status
            self.pid = self.process.pid
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=2)

    def _sample(self) -> None:
        while not self._stop.wait(0.5):
            self.peak_mib = max(self.peak_mib, _peak_rss_mib(self.pid))

    def where(self) -> str:
        cell = "before the first cell" if self.cell is None else f"in cell {self.cell[0]} ({self.cell[1]!r})"
        return f"{cell}; kernel peak memory {self.peak_mib:.0f} MiB"


def _exit_status(process) -> str:
    """How the kernel process (a ``Popen``) ended: its exit code, or the signal that killed it."""
    code = None if process is None else process.poll()
    if code is None:
        return "exit status unknown"
    if code < 0:
        return f"killed by {signal.Signals(-code).name}"
    return f"exit code {code}"


def _peak_rss_mib(pid: int | None) -> float:
    """The high-water resident memory of process ``pid`` in MiB (0 once it is gone)."""
    if pid is None:
        return 0.0
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    try:
        return psutil.Process(pid).memory_info().rss / 2**20
    except psutil.Error:
        return 0.0


def execute(nb, name: str, workdir: Path) -> KernelWatch:
    """Run ``nb`` top to bottom in a fresh kernel in ``workdir``; fail naming the cell if anything breaks."""
    watch = KernelWatch()
    client = nbclient.NotebookClient(nb, kernel_name="python3", timeout=1800, store_widget_state=True,
                                     resources={"metadata": {"path": str(workdir)}},
                                     on_cell_execute=watch.on_cell_execute)
    watch.client = client
    start = time.perf_counter()
    try:
        client.execute()  # raises CellExecutionError on the first failing cell
    except DeadKernelError as err:
        pytest.fail(f"{name}: the kernel died {watch.where()} after {time.perf_counter() - start:.0f} s, "
                    f"{_exit_status(watch.process)} ({err}); SIGKILL with a peak near the machine's memory means the "
                    "kernel was killed for memory")
    except CellTimeoutError as err:
        pytest.fail(f"{name}: a cell ran past the {client.timeout} s limit {watch.where()} (is the machine "
                    f"loaded? compare the load average {os.getloadavg()[0]:.1f} with its cores):\n{err}")
    except CellExecutionError as err:
        pytest.fail(f"{name}: a cell failed {watch.where()}:\n{err}")
    finally:
        watch.stop()
    watch.seconds = time.perf_counter() - start
    return watch


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_top_to_bottom(path, tmp_path):
    nb = nbformat.read(path, as_version=4)
    watch = execute(nb, path.name, tmp_path)
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert errors == []
    print(f"{path.name}: executed in {watch.seconds:.1f} s, kernel peak memory {watch.peak_mib:.0f} MiB")
    nbformat.write(nb, tmp_path / path.name)  # the executed copy, for inspection


def test_a_dying_kernel_is_reported_with_its_cell_and_peak_memory(tmp_path):
    nb = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_code_cell("import time\nblock = bytearray(300 * 2**20)\ntime.sleep(2)"),
        nbformat.v4.new_code_cell("import os, signal\nos.kill(os.getpid(), signal.SIGKILL)"),
    ])
    with pytest.raises(pytest.fail.Exception) as failure:
        execute(nb, "dying.ipynb", tmp_path)
    message = str(failure.value)
    assert "dying.ipynb: the kernel died in cell 1 ('import os, signal')" in message
    assert "killed by SIGKILL" in message
    peak = float(message.split("kernel peak memory ")[1].split(" MiB")[0])
    assert peak >= 300, message
