"""A live JupyterLab driven by Chromium: what a user of kvlens's widget apps sees, read from the DOM.

Used by ``tests/test_live_lab.py`` and ``benchmarks/live_latency.py``:

* :func:`lab_server` starts ``jupyter lab`` on 127.0.0.1 (free port, token, temporary root and
  Jupyter config/data/runtime/settings folders, so no user configuration leaks in) and stops it
  and its kernels by PID;
* :func:`open_notebook` opens a notebook in Chromium (playwright), and :func:`run_all` runs every
  cell from Lab's menu (*Run → Run All Cells*), as a user does, and waits for the kernel;
* :func:`read_charts` reads every Plotly chart of a cell's output (traces, their x/y/z lengths,
  title) and :func:`chart_problems` says which are empty: the check a drawn page must pass.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nbformat

#: Chromium flags: no sandbox (containers), no GPU, nothing fetched in the background.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-background-timer-throttling",
                 "--disable-renderer-backgrounding", "--disable-backgrounding-occluded-windows"]
#: The worktree whose kvlens the kernels import.
TREE = Path(__file__).resolve().parent.parent
#: Lab settings that make the page deterministic: every cell stays in the DOM (no windowing), no
#: news or update checks.
LAB_SETTINGS = {
    "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none"},
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {"fetchNews": "false",
                                                                        "checkForUpdates": False},
}


def chromium() -> str | None:
    """The Chromium executable on PATH (``chromium``, else ``chromium-browser``), or None."""
    return shutil.which("chromium") or shutil.which("chromium-browser")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class LabServer:
    """A running ``jupyter lab``: its process, address, token and root folder."""

    proc: subprocess.Popen
    port: int
    token: str
    root: Path
    log: Path

    def url(self, path: str = "") -> str:
        return f"http://127.0.0.1:{self.port}/{path}"

    def lab_url(self, notebook: str) -> str:
        return self.url(f"lab/tree/{notebook}?reset&token={self.token}")

    def api(self, path: str) -> Any:
        with urllib.request.urlopen(self.url(f"api/{path}?token={self.token}"), timeout=10) as r:
            return json.loads(r.read())


def _isolated_env(home: Path) -> dict[str, str]:
    env = dict(os.environ)
    for name, sub in (("JUPYTER_CONFIG_DIR", "config"), ("JUPYTER_DATA_DIR", "data"),
                      ("JUPYTER_RUNTIME_DIR", "runtime"), ("JUPYTERLAB_SETTINGS_DIR", "settings"),
                      ("JUPYTERLAB_WORKSPACES_DIR", "workspaces"), ("IPYTHONDIR", "ipython")):
        (home / sub).mkdir(parents=True, exist_ok=True)
        env[name] = str(home / sub)
    for rel, value in LAB_SETTINGS.items():
        path = home / "settings" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(value), encoding="utf-8")
    # no keep-alive pings on the kernel websocket: on a loaded machine a late pong closes it, and the
    # replies of the cells queued by Run All are lost with it (those cells then stay unrun)
    (home / "config" / "jupyter_server_config.json").write_text(
        json.dumps({"ServerApp": {"tornado_settings": {"ws_ping_interval": 0}}}), encoding="utf-8")
    env.pop("JUPYTER_PATH", None)
    env.pop("JUPYTER_CONFIG_PATH", None)
    env["PYTHONPATH"] = os.pathsep.join([str(TREE), *filter(None, [os.environ.get("PYTHONPATH")])])
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def start_lab(root: Path, home: Path, *, timeout: float = 180.0) -> LabServer:
    """Start ``jupyter lab`` serving ``root``; return once its API answers (else raise with its log)."""
    port, token = free_port(), secrets.token_hex(16)
    log = home / "jupyter-lab.log"
    cmd = [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
           "--port-retries=0", f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}",
           "--ServerApp.open_browser=False", "--ServerApp.terminals_enabled=False"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:  # containers and CI run as root
        cmd.append("--allow-root")
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=_isolated_env(home), cwd=root)
    server = LabServer(proc, port, token, root, log)
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"jupyter lab exited with {proc.returncode}:\n{log.read_text(errors='replace')[-3000:]}")
        try:
            server.api("status")
            return server
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            if time.monotonic() > deadline:
                stop_lab(server)
                raise TimeoutError(f"jupyter lab did not answer within {timeout:.0f} s:\n"
                                   f"{log.read_text(errors='replace')[-3000:]}") from None
            time.sleep(0.5)


def stop_lab(server: LabServer) -> list[int]:
    """Stop the server and every process it started (its kernels), by PID. Returns the PIDs stopped."""
    import psutil

    try:
        parent = psutil.Process(server.proc.pid)
        children = parent.children(recursive=True)
    except psutil.NoSuchProcess:
        children = []
    procs = [*children]
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.terminate()
    server.proc.terminate()
    try:
        server.proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        server.proc.kill()
        server.proc.wait(timeout=10)
    _, alive = psutil.wait_procs(procs, timeout=10)
    for p in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    return [server.proc.pid, *(p.pid for p in procs)]


@contextlib.contextmanager
def lab_server() -> Iterator[LabServer]:
    """A Lab server in fresh temporary folders, stopped (with its kernels) and cleaned up on exit."""
    base = Path(tempfile.mkdtemp(prefix="kvlens-live-lab-"))
    root, home = base / "root", base / "home"
    root.mkdir()
    home.mkdir()
    server = start_lab(root, home)
    _log(f"jupyter lab (pid {server.proc.pid}) answers on port {server.port}")
    try:
        yield server
    finally:
        _log(f"stopped pids {stop_lab(server)}")
        shutil.rmtree(base, ignore_errors=True)


@contextlib.contextmanager
def browser_context(executable: str, *, width: int = 1400, height: int = 1000) -> Iterator[Any]:
    """A headless Chromium context (playwright) with ``executable``."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=executable, headless=True, args=CHROMIUM_ARGS)
        try:
            context = browser.new_context(viewport={"width": width, "height": height})
            yield context
        finally:
            _log("closing the browser")
            with contextlib.suppress(Exception):
                for page in context.pages:
                    page.close(run_before_unload=False)
                context.close()
            browser.close()
            _log("browser closed")


def _log(text: str) -> None:
    if os.environ.get("KVLENS_LIVE_DEBUG") == "1":
        print(f"[live-lab {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def write_notebook(path: Path, cells: list[str]) -> Path:
    """A notebook of code ``cells`` with the python3 kernel, at ``path``."""
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in cells])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"}
    nbformat.write(nb, path)
    return path


@dataclass
class LivePage:
    """A notebook open in Lab: the playwright page and the messages its console showed."""

    page: Any
    errors: list[str]

    def cell(self, index: int) -> Any:
        """The ``index``-th code cell of the notebook (a playwright locator)."""
        return self.page.locator(".jp-Notebook .jp-Cell.jp-CodeCell").nth(index)

    def output(self, index: int) -> Any:
        return self.cell(index).locator(".jp-OutputArea")

    def cell_text(self, index: int) -> str:
        return str(self.output(index).inner_text())

    def execution_count(self, index: int) -> int | None:
        text = self.cell(index).locator(".jp-InputPrompt").inner_text()
        digits = "".join(ch for ch in text if ch.isdigit())
        return int(digits) if digits and "*" not in text else None


def open_notebook(context: Any, server: LabServer, name: str, *, timeout: float = 180.0) -> LivePage:
    """Open notebook ``name`` in Lab and wait until its kernel is connected and idle."""
    page = context.new_page()
    errors: list[str] = []
    page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(server.lab_url(name), wait_until="domcontentloaded", timeout=timeout * 1000)
    page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=timeout * 1000)
    deadline = time.monotonic() + timeout
    while not _kernel_connected(server, name):
        if time.monotonic() > deadline:
            raise TimeoutError(f"the kernel of {name} did not connect within {timeout:.0f} s")
        time.sleep(0.5)
    wait_kernel_idle(page, timeout)
    return LivePage(page, errors)


def _kernel_connected(server: LabServer, name: str) -> bool:
    """Whether notebook ``name``'s kernel has a client connected and is idle (the API can answer 500 meanwhile)."""
    try:
        sessions = server.api("sessions")
    except (urllib.error.URLError, OSError):
        return False
    return any(s.get("path") == name and (s.get("kernel") or {}).get("connections", 0) >= 1
               and (s.get("kernel") or {}).get("execution_state") == "idle" for s in sessions)


#: Whether Lab's kernel indicator reads idle (the status bar's "| Idle" and the toolbar's indicator).
_IDLE_JS = r"""() => { const el = document.querySelector('.jp-Notebook-ExecutionIndicator');
                     const bar = document.querySelector('#jp-main-statusbar');
                     return !!el && el.getAttribute('data-status') === 'idle'
                            && !!bar && /\|\s*Idle/.test(bar.textContent); }"""


def wait_kernel_idle(page: Any, timeout: float, settle: float = 1.0) -> None:
    """Wait until the notebook's kernel reads idle in the page and stays so for ``settle`` seconds."""
    deadline = time.monotonic() + timeout
    since = None
    while True:
        if page.evaluate(_IDLE_JS):
            since = since or time.monotonic()
            if time.monotonic() - since >= settle:
                return
        else:
            since = None
        if time.monotonic() > deadline:
            raise TimeoutError(f"the kernel did not become idle within {timeout:.0f} s")
        time.sleep(0.2)


def menu(page: Any, top: str, command: str) -> None:
    """Click menu ``top`` of Lab's menu bar, then the item running ``command`` (its data-command)."""
    page.locator(".lm-MenuBar-item", has_text=top).first.click()
    page.locator(f".lm-Menu-item[data-command='{command}']").first.click()


_ALL_RAN_JS = """() => { const cells = [...document.querySelectorAll('.jp-Notebook .jp-CodeCell .jp-InputPrompt')];
                          return cells.length > 0 && cells.every(p => /\\[\\d+\\]/.test(p.textContent)); }"""
_STARTED_JS = """() => [...document.querySelectorAll('.jp-Notebook .jp-CodeCell .jp-InputPrompt')]
                          .some(p => /\\[(\\*|\\d+)\\]/.test(p.textContent))"""


def run_all(live: LivePage, *, timeout: float = 600.0) -> None:
    """*Run → Run All Cells* from Lab's menu; wait until every code cell has run and the kernel is idle.

    If no cell started within 20 s (the kernel was still connecting), the menu is used once more.
    """
    for attempt in range(2):
        menu(live.page, "Run", "runmenu:run-all")
        try:
            live.page.wait_for_function(_STARTED_JS, timeout=20_000, polling=250)
            break
        except Exception:  # noqa: BLE001 - playwright's TimeoutError; retried once
            if attempt:
                raise
    deadline = time.monotonic() + timeout
    idle_since = None
    while not live.page.evaluate(_ALL_RAN_JS):
        idle = live.page.evaluate(_IDLE_JS)
        idle_since = (idle_since or time.monotonic()) if idle else None
        failed = idle and cell_errors(live)
        stuck = idle_since is not None and time.monotonic() - idle_since > 60  # idle, yet cells left unrun
        if failed or stuck or time.monotonic() > deadline:
            why = "a cell failed" if failed else "the kernel is idle with cells unrun" if stuck else "timed out"
            prompts = live.page.locator(".jp-Notebook .jp-CodeCell .jp-InputPrompt").all_inner_texts()
            shot = snapshot(live, "run-all")
            raise RuntimeError(f"Run All did not finish ({why}); prompts {prompts}; errors {cell_errors(live)}; "
                               f"console {live.errors[-5:]}; screenshot {shot}")
        time.sleep(0.5)
    wait_kernel_idle(live.page, timeout)


def snapshot(live: LivePage, name: str) -> Path:
    """A full-page screenshot in out/test-artifacts/live-lab-``name``.png (for a failure's report)."""
    path = TREE / "out" / "test-artifacts" / f"live-lab-{name}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(Exception):
        live.page.screenshot(path=str(path), full_page=True)
    return path


def run_cell(live: LivePage, index: int, *, timeout: float = 120.0) -> str:
    """Run code cell ``index`` again (select it, Ctrl+Enter, as a user does); return its output text."""
    before = live.execution_count(index) or 0
    live.cell(index).locator(".jp-InputPrompt").click()
    live.page.keyboard.press("Control+Enter")
    deadline = time.monotonic() + timeout
    while (live.execution_count(index) or 0) <= before:
        if time.monotonic() > deadline:
            raise TimeoutError(f"cell {index} did not run again within {timeout:.0f} s")
        time.sleep(0.2)
    wait_kernel_idle(live.page, timeout)
    return live.cell_text(index)


def cell_errors(live: LivePage) -> list[str]:
    """Tracebacks shown in the notebook's outputs."""
    return [str(t) for t in live.page.locator(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.error']")
            .all_inner_texts()]


#: Reads every Plotly chart under a root element: title, visibility, and per trace the type and the
#: lengths of x / y / z (from the data the user gave, else plotly's decoded copy).
READ_CHARTS_JS = """(root) => [...root.querySelectorAll('.js-plotly-plot')].map(el => {
  const layout = el.layout || {}, full = el._fullData || [];
  const title = layout.title && typeof layout.title === 'object' ? (layout.title.text || '') : (layout.title || '');
  const size = (v) => v == null ? 0 : (typeof v.length === 'number' ? v.length : -1);
  const traces = (el.data || []).map((t, i) => {
    const f = full[i] || {};
    const n = (k) => { const a = size(t[k]); return a >= 0 ? a : size(f[k]); };
    const z = n('z');
    return {type: t.type || 'scatter', x: n('x'), y: n('y'), z: z,
            zrows: z > 0 && t.z && t.z[0] && typeof t.z[0].length === 'number' ? t.z[0].length : 0};
  });
  const box = el.getBoundingClientRect();
  return {title: String(title), traces: traces, visible: el.offsetParent !== null && box.width > 0 && box.height > 0,
          drawn: !!el.querySelector('svg.main-svg'), width: box.width, height: box.height};
})"""


def read_charts(root: Any) -> list[dict[str, Any]]:
    """Every Plotly chart under the playwright locator ``root`` (see :data:`READ_CHARTS_JS`)."""
    return list(root.evaluate(READ_CHARTS_JS))


def chart_problems(charts: list[dict[str, Any]], *, what: str = "chart") -> list[str]:
    """What is wrong with ``charts`` as a user sees them: none drawn, no traces, or traces without data."""
    if not charts:
        return [f"no {what} was drawn (no .js-plotly-plot element)"]
    problems = []
    for i, c in enumerate(charts):
        name = f"{what} {i} ({c['title'] or 'untitled'})"
        if not c["drawn"]:
            problems.append(f"{name}: no SVG drawn")
        if not c["traces"]:
            problems.append(f"{name}: no traces (empty axes)")
        for j, t in enumerate(c["traces"]):
            if max(t["x"], t["y"], t["z"]) <= 0:
                problems.append(f"{name}: trace {j} ({t['type']}) has no x/y/z data")
            if t["type"] == "heatmap" and t["z"] <= 0:
                problems.append(f"{name}: heatmap {j} has an empty z")
    return problems


def chart_values(root: Any, index: int) -> list[list[Any]]:
    """The y (else z) values of every trace of chart ``index`` under ``root`` (numbers a user reads)."""
    return list(root.evaluate("""(root, i) => {
        const el = root.querySelectorAll('.js-plotly-plot')[i];
        return (el.data || []).map((t, j) => { const f = (el._fullData || [])[j] || {};
            const v = (t.y && t.y.length !== undefined) ? t.y : (f.y || f.z || t.z || []);
            return Array.from(v, x => (typeof x === 'number' ? Math.round(x * 1e6) / 1e6 : x)); }); }""", index))


def widget_by_label(root: Any, kind: str, label: str) -> Any:
    """The ipywidgets control of class ``widget-{kind}`` whose description is ``label`` (a locator)."""
    return root.locator(f".widget-{kind}").filter(has=root.page.locator(".widget-label", has_text=label)).first


def button(root: Any, text: str) -> Any:
    """The button under ``root`` whose text contains ``text``."""
    return root.locator("button.jupyter-button", has_text=text).first


def vertical_gap(a: dict[str, float], b: dict[str, float]) -> float:
    """The vertical distance between two bounding boxes (0 when they overlap vertically)."""
    top, bottom = max(a["y"], b["y"]), min(a["y"] + a["height"], b["y"] + b["height"])
    return max(0.0, top - bottom)
