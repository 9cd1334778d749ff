"""A saved report opened in a real headless browser (Debian's Chromium driven by playwright).

Every Plotly figure renders to SVG, the console stays free of errors, nothing is fetched from
the network, and a subject containing ``<script>`` does not execute. The screenshot is kept
as a test artifact (in pytest's tmp dir and in ``out/test-artifacts/``).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import plotly.graph_objects as go
import pytest

import kvlens
from kvlens.views.report import Report, Section
from tests.conftest import tiny

CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]
EVIL = "<script>window.__pwned = 1</script><img src=x onerror='window.__pwned = 2'>"
ARTIFACTS = Path(__file__).resolve().parent.parent / "out" / "test-artifacts"

if not Path(CHROMIUM).is_file():
    pytest.skip(f"no browser: {CHROMIUM} is absent (run .ci/install-browser to install Debian's chromium)",
                allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    profile = tempfile.mkdtemp(prefix="kvlens-chromium-")
    with sync_api.sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(profile, executable_path=CHROMIUM, headless=True,
                                                        args=FLAGS, viewport={"width": 1200, "height": 900})
        try:
            yield context
        finally:
            context.close()
            shutil.rmtree(profile, ignore_errors=True)


def open_page(browser: Any, path: Path) -> tuple[Any, list[str], list[str]]:
    """Open ``path``; return the page, console errors (and page errors), and requested URLs."""
    page = browser.new_page()
    errors: list[str] = []
    requests: list[str] = []
    page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("request", lambda req: requests.append(req.url))
    page.goto(path.as_uri(), wait_until="load")
    return page, errors, requests


def rendered_figures(page: Any, expected: int) -> tuple[int, int]:
    """(plotly figures on the page, those that drew an SVG), after waiting for ``expected`` to draw.

    Static figures are ``.plotly-graph-div``; widget figures get ``.js-plotly-plot`` once drawn.
    """
    count = """() => [...document.querySelectorAll('.plotly-graph-div, .js-plotly-plot')]
                    .filter(d => d.querySelector('svg.main-svg')).length"""
    page.wait_for_function(f"() => ({count})() >= {expected}", timeout=30_000)
    return page.evaluate("""() => {
        const d = [...new Set(document.querySelectorAll('.plotly-graph-div, .js-plotly-plot'))];
        return [d.length, d.filter(x => x.querySelector('svg.main-svg')).length]; }""")


def test_saved_report_renders_offline_and_escapes_script(browser, tmp_path):
    model = tiny("llama")  # rotary positions: no length limit for the long subject
    acts = kvlens.keys(model, ["The subject " + EVIL], layers=[1])
    fig = go.Figure(go.Bar(x=[EVIL, "b"], y=[1, 2]), layout=dict(title=EVIL))
    report = Report("Report of " + EVIL).add(
        Section(EVIL, text=EVIL, table=[{"subject": EVIL}], params={"subject": EVIL}), acts, fig)
    path = report.save(tmp_path / "report.html")

    page, errors, requests = open_page(browser, path)
    total, drawn = rendered_figures(page, 2)
    assert total == 2 and drawn == total
    assert page.evaluate("() => window.__pwned === undefined")
    assert EVIL in page.inner_text("body")  # shown as text, not run
    assert errors == []
    assert requests == [path.as_uri()], f"the report fetched {requests[1:]}"

    shot = tmp_path / "report.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shutil.copy(shot, ARTIFACTS / "report.png")
    page.close()


WIDGET_JS = Path(os.environ.get("KVLENS_WIDGET_JS", ARTIFACTS.parent / "widget-js"))


def test_exported_notebook_with_widget_state_renders_offline(browser, tmp_path):
    from kvlens.views.export import export_notebook, node_modules

    try:
        node_modules(WIDGET_JS)
    except FileNotFoundError as exc:
        pytest.skip(f"no widget JavaScript: {exc} (.ci/install-browser installs it)")
    nbformat = pytest.importorskip("nbformat")
    cells = [("from kvlens.views.widgets import App, figure_widget, notebook_mode\nnotebook_mode()\n"
              "import plotly.graph_objects as go\ngo.Figure(go.Bar(y=[1, 3, 2]))"),
             ("fw = figure_widget(go.Figure(go.Scatter(y=[2, 1, 3])))\napp = App([fw])\n"
              "app.guard(lambda: 1 / 0, 'dividing')\napp")]
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in cells])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, tmp_path / "widgets.ipynb")
    path = export_notebook(tmp_path / "widgets.ipynb", tmp_path / "widgets.html", js_dir=WIDGET_JS, execute=True)

    page, errors, requests = open_page(browser, path)
    page.wait_for_selector(".widget-html-content", timeout=30_000)
    total, drawn = rendered_figures(page, 2)
    assert total == 2 and drawn == 2  # the static figure and the FigureWidget
    assert "ZeroDivisionError: division by zero" in page.inner_text("body")
    assert errors == [] and all(u.startswith(("file:", "blob:", "data:")) for u in requests), requests
    page.screenshot(path=str(tmp_path / "widgets.png"), full_page=True)
    shutil.copy(tmp_path / "widgets.png", ARTIFACTS / "exported-notebook.png")
    page.close()


def test_tour_report_renders_offline(browser, embedded, tmp_path):
    """The README's main-job report (locate, inspect, a key-side and a value-side edit with metrics)."""
    from kvlens.editing import KeyFT
    from kvlens.views.tour import tour

    quick = {"fine-tune keys (2 steps)": lambda: KeyFT(steps=2)}  # test_cli runs the full tour
    report = tour(embedded, methods=quick)
    titles = [s.title for s in report.sections]
    assert "Locate: causal trace of 'The Eiffel Tower'" in titles and "Edit: keys vs values compared" in titles
    assert titles.count("Evaluation: fine-tune keys (2 steps)") == 1
    path = report.save(tmp_path / "tour.html")
    page, errors, requests = open_page(browser, path)
    expected = sum(len(s.all_figures()) for s in report.sections)
    total, drawn = rendered_figures(page, expected)
    assert total == drawn == expected and errors == [] and requests == [path.as_uri()]
    page.screenshot(path=str(tmp_path / "tour.png"), full_page=True)
    shutil.copy(tmp_path / "tour.png", ARTIFACTS / "tour.png")
    print(f"tour report: {path.stat().st_size / 1e6:.1f} MB, {len(report.sections)} sections, {expected} figures")
    page.close()
