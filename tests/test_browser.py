"""A saved report opened in a real headless browser (Debian's Chromium driven by playwright).

Every Plotly figure renders to SVG, the console stays free of errors, nothing is fetched from
the network, and a subject containing ``<script>`` does not execute. The screenshot is kept
as a test artifact (in pytest's tmp dir and in ``out/test-artifacts/``).
"""

from __future__ import annotations

import os
import re
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
from tests.live_lab import READ_CHARTS_JS, chart_problems, chromium

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]
#: User text that must be shown, never run: a script tag, and the classic ``onerror`` payloads.
ALERT = "<img src=x onerror=alert(1)>"
EVIL = "<script>window.__pwned = 1</script><img src=x onerror='window.__pwned = 2'>" + ALERT
ARTIFACTS = Path(__file__).resolve().parent.parent / "out" / "test-artifacts"


def missing_browser(what: str) -> None:
    """Fail (or, with ``KVLENS_SKIP_BROWSER=1``, skip) because ``what`` is missing."""
    if os.environ.get("KVLENS_SKIP_BROWSER") == "1":
        pytest.skip(f"{what}; skipped because KVLENS_SKIP_BROWSER=1")
    pytest.fail(f"{what}: run `bash .ci/install-browser` (CI has it), or set KVLENS_SKIP_BROWSER=1 to skip "
                "the browser tests explicitly", pytrace=False)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    exe = chromium()
    if exe is None:
        missing_browser("Chromium is not installed (no `chromium` on PATH)")
    try:
        from playwright import sync_api
    except ImportError:
        missing_browser("playwright is not installed (pip install playwright)")
    profile = tempfile.mkdtemp(prefix="kvlens-chromium-")
    with sync_api.sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(profile, executable_path=exe, headless=True,
                                                        args=FLAGS, viewport={"width": 1200, "height": 900})
        try:
            yield context
        finally:
            context.close()
            shutil.rmtree(profile, ignore_errors=True)


def open_page(browser: Any, path: Path) -> tuple[Any, list[str], list[str]]:
    """Open ``path``; return the page, console errors (page errors and dialogs too), and requested URLs.

    A JavaScript dialog (``alert``) is recorded as an error: user text must never open one.
    """
    page = browser.new_page()
    errors: list[str] = []
    requests: list[str] = []
    page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("request", lambda req: requests.append(req.url))

    def dialog(d: Any) -> None:
        errors.append(f"a {d.type} dialog opened: {d.message!r}")
        d.dismiss()
    page.on("dialog", dialog)
    page.goto(path.as_uri(), wait_until="load")
    return page, errors, requests


def hover_everything(page: Any) -> int:
    """Move the pointer over every drawn chart's plot area (hover labels render user text). Returns how many."""
    areas = page.locator("rect.nsewdrag")
    n = areas.count()
    for i in range(n):
        box = areas.nth(i).bounding_box()
        if box:
            for fx in (0.1, 0.3, 0.5, 0.7, 0.9):
                page.mouse.move(box["x"] + fx * box["width"], box["y"] + box["height"] * 0.9)
                page.wait_for_timeout(30)
    return n


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
    fig = go.Figure(go.Bar(x=[EVIL, "b"], y=[1, 2], hovertext=[EVIL, ALERT], name=ALERT),
                    layout=dict(title=EVIL, xaxis_title=ALERT, yaxis=dict(tickvals=[1, 2], ticktext=[ALERT, EVIL])))
    report = Report("Report of " + EVIL).add(
        Section(EVIL, text=EVIL, table=[{"subject": EVIL}], params={"subject": EVIL}), acts, fig)
    path = report.save(tmp_path / "report.html")

    page, errors, requests = open_page(browser, path)
    total, drawn = rendered_figures(page, 2)
    assert total == 2 and drawn == total
    assert hover_everything(page) >= 2
    assert page.evaluate("() => window.__pwned === undefined")
    assert page.locator("img").count() == 0  # no user <img> became an element
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
    import plotly.offline

    from kvlens.views.export import export_notebook

    js_dir = widget_js()
    nbformat = pytest.importorskip("nbformat")
    cells = [("from kvlens.views.widgets import App, figure_widget, notebook_mode\nnotebook_mode()\n"
              "import plotly.graph_objects as go\ngo.Figure(go.Bar(y=[1, 3, 2]))"),
             ("fw = figure_widget(go.Figure(go.Scatter(y=[2, 1, 3])))\napp = App([fw])\n"
              "app.guard(lambda: 1 / 0, 'dividing')\napp")]
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in cells])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, tmp_path / "widgets.ipynb")
    path = export_notebook(tmp_path / "widgets.ipynb", tmp_path / "widgets.html", js_dir=js_dir, execute=True)
    assert path.stat().st_size < len(plotly.offline.get_plotlyjs()) + 5_000_000  # notebook_mode's copy dropped

    page, errors, requests = open_page(browser, path)
    page.wait_for_selector("text=ZeroDivisionError", timeout=30_000)  # the app's message line, drawn
    total, drawn = rendered_figures(page, 2)
    assert total == 2 and drawn == 2  # the static figure and the FigureWidget
    assert "ZeroDivisionError: division by zero" in page.inner_text("body")
    assert errors == [] and all(u.startswith(("file:", "blob:", "data:")) for u in requests), requests
    page.screenshot(path=str(tmp_path / "widgets.png"), full_page=True)
    shutil.copy(tmp_path / "widgets.png", ARTIFACTS / "exported-notebook.png")
    page.close()


def widget_js() -> Path:
    from kvlens.views.export import node_modules

    try:
        node_modules(WIDGET_JS)
    except FileNotFoundError as exc:
        missing_browser(f"no widget JavaScript: {exc}")
    return WIDGET_JS


THREE_APPS = [
    # an ordinary figure, no notebook_mode(): user text in its title, tick labels and hover text
    ("import json\nimport plotly.graph_objects as go\nimport kvlens as kv\nmodel = kv.load()\n"
     f"EVIL = {EVIL!r}\n"
     "go.Figure(go.Bar(x=['a ' + EVIL, 'b'], y=[1, 3], hovertext=[EVIL, EVIL]), layout=dict(title=EVIL))"),
    # an app whose charts are redrawn after creation (the prompt's tokens become tick labels)
    "browser = kv.MemoryBrowser(model, prompt='The Eiffel Tower ' + EVIL + ' is in the city of')\nbrowser",
    "fw = go.FigureWidget(go.Scatter(y=[2, 1, 3]), layout=dict(title='bare ' + EVIL))\nfw",
    ("shown = [browser.values_fig, browser.firing_fig, browser.triggers_fig, fw]\n"
     "print('EXPECTED', json.dumps([[len(f.data), f.layout.title.text or ''] for f in shown]))"),
]


def test_export_keeps_every_app_chart_offline(browser, tmp_path):
    """An ordinary figure, a MemoryBrowser and a bare FigureWidget, exported after execution: every
    chart drawn in its last state (the traces the kernel had), plotly.js carried once, no error, no
    request, and the user text in titles / ticks / hover shown, not run."""
    import json

    import plotly.offline

    from kvlens.views.export import export_notebook

    nbformat = pytest.importorskip("nbformat")
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in THREE_APPS])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, tmp_path / "three.ipynb")
    path = export_notebook(tmp_path / "three.ipynb", tmp_path / "three.html", js_dir=widget_js(), execute=True)
    size, plotly_js = path.stat().st_size, len(plotly.offline.get_plotlyjs())
    assert size < plotly_js + 5_000_000, f"the export is {size / 1e6:.1f} MB: plotly.js is carried more than once"

    page, errors, requests = open_page(browser, path)
    expected = json.loads(re.findall(r"^EXPECTED (\[.*\])$", page.inner_text("body"), re.M)[-1])
    page.wait_for_function("() => document.querySelectorAll('.js-plotly-plot').length >= 5", timeout=60_000)
    charts = page.evaluate(READ_CHARTS_JS.replace("(root) =>", "() =>").replace("root.querySelectorAll",
                                                                                   "document.querySelectorAll"))
    assert len(charts) == 5, [c["title"] for c in charts]
    ordinary, apps = charts[0], charts[1:]
    assert chart_problems([ordinary], what="ordinary figure") == [] and EVIL in ordinary["title"]
    assert [len(c["traces"]) for c in apps] == [n for n, _ in expected]  # every chart in its last state
    assert [c["title"] for c in apps] == [t for _, t in expected]
    drawn = [c for c, (n, _) in zip(apps, expected) if n]
    assert len(drawn) == 3 and chart_problems(drawn, what="widget chart") == []  # values, firing, bare widget
    assert hover_everything(page) >= 5
    assert page.evaluate("() => window.__pwned === undefined") and page.locator("img").count() == 0
    assert errors == [], errors  # no "[anywidget] Failed to initialize model.", no dialog
    assert all(u.startswith(("file:", "blob:", "data:")) for u in requests), requests
    page.screenshot(path=str(tmp_path / "three.png"), full_page=True)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shutil.copy(tmp_path / "three.png", ARTIFACTS / "exported-apps.png")
    print(f"export of three apps: {size / 1e6:.1f} MB (plotly.js {plotly_js / 1e6:.1f} MB)")
    page.close()


def test_tour_report_renders_offline(browser, embedded, tmp_path):
    """The README's main-job report (locate, inspect, a key-side and a value-side edit with metrics)."""
    from kvlens.editing import KeyFT
    from kvlens.views.tour import tour

    quick = {"fine-tune keys (2 steps)": (lambda: KeyFT(steps=2), "key")}  # test_cli runs the full tour
    report = tour(embedded, methods=quick, n_cases=2)
    titles = [s.title for s in report.sections]
    assert "Locate: causal trace of 'The Eiffel Tower'" in titles and "Evaluate: keys vs values compared" in titles
    assert titles.count("Evaluate: fine-tune keys (2 steps)") == 1
    path = report.save(tmp_path / "tour.html")
    page, errors, requests = open_page(browser, path)
    expected = sum(len(s.all_figures()) for s in report.sections)
    total, drawn = rendered_figures(page, expected)
    assert total == drawn == expected and errors == [] and requests == [path.as_uri()]
    page.screenshot(path=str(tmp_path / "tour.png"), full_page=True)
    shutil.copy(tmp_path / "tour.png", ARTIFACTS / "tour.png")
    print(f"tour report: {path.stat().st_size / 1e6:.1f} MB, {len(report.sections)} sections, {expected} figures")
    page.close()
