"""kvlens's widget apps in a live JupyterLab, driven from Chromium as a user drives them.

A notebook written into a temporary Lab root is run from Lab's menu (*Run → Run All Cells*); then
the test clicks EditStepper's Next / Back / Apply all / Revert all, a TraceExplorer heatmap cell and
a MemoryBrowser memory, and after each click reads what the page shows: every Plotly chart holds
traces with data, titles and numbers change after Next and come back after Back, a bad input
shows an error next to its control, and a checksum cell (re-run from the page) proves the weights
bit-identical. A second notebook breaks ``show_figure`` on purpose and proves the chart check
reports empty charts. The server and its kernels are stopped by PID.

Needs Chromium (``.ci/install-browser`` installs it; CI has it) and playwright: without them the
tests fail, unless ``KVLENS_SKIP_BROWSER=1`` is set. ``KVLENS_LIVE_BREAK_SHOW_FIGURE=1`` breaks
``show_figure`` in the main notebook too (then every chart test must fail: try it).
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import pytest

from tests import live_lab as ll

T = TypeVar("T")

#: Cell indices of the main notebook.
SETUP, STEPPER, EXPLORER, BROWSER, CHECKSUM, NEIGHBOURS = range(6)

#: Replaces ``show_figure`` in every loaded kvlens.views module by a no-op: the apps then draw nothing.
BREAK_SHOW_FIGURE = """
import sys
import kvlens.views.explorers, kvlens.views.stepper, kvlens.views.widgets
def _draw_nothing(target, fig):
    pass
for _module in list(sys.modules.values()):
    if getattr(_module, "__name__", "").startswith("kvlens.views") and hasattr(_module, "show_figure"):
        _module.show_figure = _draw_nothing
"""

SETUP_CELL = """
import hashlib
import warnings
warnings.simplefilter("ignore")
import torch
import kvlens as kv

model = kv.load()

def weight_checksum():
    h = hashlib.sha256()
    for p in model.hf.parameters():
        h.update(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:20]
"""

CELLS = [
    SETUP_CELL,
    """cases = kv.load_bundled()
picked = [cases[0], next(c for c in cases if c.prompt != cases[0].prompt)]
stepper = kv.EditStepper(model, picked, methods={"ROME (values)": lambda: kv.ROME(stats_tokens=2000)})
stepper""",
    "explorer = kv.TraceExplorer(model, samples=1)\nexplorer",
    "browser = kv.MemoryBrowser(model)\nbrowser",
    "print('weights', weight_checksum())",
    """first = cases[0]  # then a fact of its relation that has it as a neighbour
second = next(c for c in cases[1:] if any(first.subject in p for p in c.neighborhood_prompts))
neighbours = kv.EditStepper(model, [first, second], methods={"FT values": lambda: kv.ValueFT(steps=5)})
neighbours""",
]


#: The page under test, for failure reports (console errors and a screenshot).
_PAGES: list[ll.LivePage] = []


def wait_until(fn: Callable[[], T], what: str, timeout: float = 300.0, every: float = 0.25) -> T:
    """Poll ``fn`` until it returns something truthy; fail naming ``what`` after ``timeout`` s (with the
    page's console errors and a screenshot in out/test-artifacts/)."""
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if value:
            return value
        if time.monotonic() > deadline:
            extra = ""
            if _PAGES:
                shot = ll.snapshot(_PAGES[-1], re.sub(r"\W+", "-", what)[:40])
                extra = f"; console errors {_PAGES[-1].errors[-6:]}; screenshot {shot}"
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}{extra}")
        time.sleep(every)


@pytest.fixture(scope="module")
def executable() -> str:
    exe = ll.chromium()
    missing = None if exe else "Chromium is not installed (no `chromium` on PATH)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        missing = "playwright is not installed (pip install playwright)"
    if missing:
        if os.environ.get("KVLENS_SKIP_BROWSER") == "1":
            pytest.skip(f"{missing}; skipped because KVLENS_SKIP_BROWSER=1")
        pytest.fail(f"{missing}: run `bash .ci/install-browser` (CI has it), or set KVLENS_SKIP_BROWSER=1 "
                    "to skip the live-Lab tests explicitly", pytrace=False)
    assert exe is not None
    return exe


@pytest.fixture(scope="module")
def lab(executable: str) -> Iterator[ll.LabServer]:
    with ll.lab_server() as server:
        yield server


@pytest.fixture(scope="module")
def context(executable: str, lab: ll.LabServer) -> Iterator[Any]:
    with ll.browser_context(executable) as ctx:
        yield ctx


@pytest.fixture(scope="module")
def live(lab: ll.LabServer, context: Any) -> ll.LivePage:
    cells = list(CELLS)
    if os.environ.get("KVLENS_LIVE_BREAK_SHOW_FIGURE") == "1":
        cells[SETUP] = BREAK_SHOW_FIGURE + cells[SETUP]
    ll.write_notebook(lab.root / "live.ipynb", cells)
    page = ll.open_notebook(context, lab, "live.ipynb")
    _PAGES.append(page)
    ll.run_all(page, timeout=1200)
    return page


@pytest.fixture(scope="module")
def original_checksum(live: ll.LivePage) -> str:
    return checksum(live.cell_text(CHECKSUM))


def checksum(text: str) -> str:
    found = re.search(r"weights ([0-9a-f]{20})", text)
    assert found, f"the checksum cell shows no checksum: {text!r}"
    return found.group(1)


def charts(live: ll.LivePage, cell: int, *, visible_only: bool = False) -> list[dict[str, Any]]:
    found = ll.read_charts(live.output(cell))
    # a chart a user can look at: shown, and not collapsed to a sliver (kvlens hides unused ones so)
    return [c for c in found if c["visible"] and c["height"] >= 50] if visible_only else found


def position(live: ll.LivePage) -> str:
    found = re.search(r"(\d+) / (\d+)", " ".join(html_texts(live, STEPPER)))
    return found.group(0) if found else ""


def html_texts(live: ll.LivePage, cell: int) -> list[str]:
    return [str(t) for t in live.output(cell).locator(".widget-html-content").all_inner_texts()]


def test_run_all_draws_the_apps(live: ll.LivePage) -> None:
    """After *Run All Cells*, every app shows its charts with data (and no cell failed)."""
    assert ll.cell_errors(live) == []
    live.output(BROWSER).scroll_into_view_if_needed()
    # on a saturated machine the page can lag minutes behind the kernel (widget messages are handled in order)
    browser = wait_until(lambda: len([c for c in charts(live, BROWSER) if c["traces"]]) >= 2 and charts(live, BROWSER),
                         "the MemoryBrowser charts", 900)
    values, firing = browser[0], browser[1]
    assert ll.chart_problems([values, firing], what="MemoryBrowser chart") == []
    assert re.search(r"m\d+", values["title"]) and re.search(r"m\d+", firing["title"])
    live.output(EXPLORER).scroll_into_view_if_needed()
    explorer = wait_until(lambda: (len([c for c in charts(live, EXPLORER) if c["traces"]]) >= 2
                                   and charts(live, EXPLORER)),
                          "the trace charts", 600)
    assert ll.chart_problems(explorer, what="TraceExplorer chart") == []
    heat = explorer[0]
    assert [t["type"] for t in heat["traces"]] == ["heatmap"] * 3 and all(t["z"] > 0 for t in heat["traces"])
    assert position(live) == "0 / 2"
    assert not [e for e in live.errors if "anywidget" in e or "Failed to" in e], live.errors


def test_memory_pick_redraws_values_and_firing(live: ll.LivePage) -> None:
    out = live.output(BROWSER)
    before = charts(live, BROWSER)
    select = ll.widget_by_label(out, "dropdown", "strongest").locator("select")
    labels = select.locator("option").all_inner_texts()
    assert len(labels) >= 3, labels
    memory = re.search(r"m(\d+)", labels[2]).group(1)
    select.select_option(index=2)
    after = wait_until(lambda: (c := charts(live, BROWSER)) and f"m{memory}" in c[1]["title"] and c,
                       f"the firing chart of m{memory}", 300)
    assert f"m{memory}" in after[0]["title"] and after[0]["title"] != before[0]["title"]
    assert after[1]["title"] != before[1]["title"]
    assert ll.chart_problems(after[:2], what="MemoryBrowser chart") == []
    assert ll.chart_values(out, 0) != [] and ll.chart_values(out, 1)[0]  # numbers a user reads


def test_heatmap_click_shows_that_cell(live: ll.LivePage) -> None:
    out = live.output(EXPLORER)
    heat = out.locator(".js-plotly-plot").first
    heat.scroll_into_view_if_needed()
    drag = heat.locator("rect.nsewdrag").first
    box = drag.bounding_box()
    assert box and box["width"] > 50 and box["height"] > 50, box
    seen = []
    for fx, fy in ((0.2, 0.25), (0.75, 0.8)):
        x, y = box["x"] + fx * box["width"], box["y"] + fy * box["height"]
        # the cell under the pointer, from the chart's own axes
        expected = heat.evaluate("""(el, [px, py]) => { const fl = el._fullLayout, xa = fl.xaxis, ya = fl.yaxis;
            const r = el.getBoundingClientRect();
            const layer = Math.round(xa.p2c(px - r.left - xa._offset));
            const yi = Math.round(ya.p2c(py - r.top - ya._offset));
            const label = ya.type === 'category' ? ya._categories[yi] : String(yi);
            return [parseInt(String(label).split(':')[0]), layer]; }""", [x, y])
        before_title = charts(live, EXPLORER)[1]["title"]
        token, layer = expected
        shows = re.compile(rf"token {token} .*, layer {layer}\b")

        def detail_text(shows: re.Pattern[str] = shows) -> str | None:
            return next((t for t in html_texts(live, EXPLORER) if shows.search(t)), None)

        for _attempt in range(3):  # as a user would, click again if a click under load drew nothing
            live.page.mouse.move(x, y)
            live.page.mouse.click(x, y)
            ll.wait_kernel_idle(live.page, 120)
            deadline = time.monotonic() + 30
            while not detail_text() and time.monotonic() < deadline:
                time.sleep(0.25)
            if detail_text():
                break
        text = wait_until(detail_text, f"the detail of cell ({token}, {layer})", 60)
        detail = wait_until(lambda token=token, layer=layer: ((c := charts(live, EXPLORER))
                                                              and f"token {token}, layer {layer}" in c[1]["title"]
                                                              and c[1]),
                            "the cell's detail chart", 300)
        assert ll.chart_problems([detail], what="cell detail chart") == []
        seen.append((text, detail["title"], before_title))
    assert seen[0][1] != seen[1][1], "two different cells showed the same detail"


def stepper_state(live: ll.LivePage) -> dict[str, Any]:
    """What the stepper's probabilities tab shows: position, chart title and numbers."""
    out = live.output(STEPPER)
    out.locator(".lm-TabBar-tab", has_text="probabilities").first.click()
    c = charts(live, STEPPER)
    return {"position": position(live), "title": c[0]["title"] if c else "", "values": ll.chart_values(out, 0),
            "charts": c}


def click_and_wait(live: ll.LivePage, text: str, want_position: str, timeout: float = 600.0) -> dict[str, Any]:
    ll.button(live.output(STEPPER), text).click()
    wait_until(lambda: position(live) == want_position, f"'{want_position}' applied after {text}", timeout)
    ll.wait_kernel_idle(live.page, timeout)
    return stepper_state(live)


def check_every_tab(live: ll.LivePage) -> dict[str, list[str]]:
    """Click through the stepper's tabs; return each tab's chart problems (what a user would see empty)."""
    out = live.output(STEPPER)
    problems: dict[str, list[str]] = {}
    for tab in ("probabilities", "where the edit acts", "inside the edit", "weight norms", "re-trace"):
        out.locator(".lm-TabBar-tab", has_text=tab).first.click()
        if tab == "re-trace":
            ll.button(out, "Re-trace").click()
            wait_until(lambda: (c := charts(live, STEPPER, visible_only=True)) and c[0]["traces"], "the re-trace", 300)
        shown = wait_until(lambda: charts(live, STEPPER, visible_only=True), f"a chart in tab {tab!r}", 120)
        problems[tab] = ll.chart_problems(shown, what=f"{tab!r} chart")
    out.locator(".lm-TabBar-tab", has_text="metrics").first.click()
    tables = out.locator("table").filter(visible=True)
    problems["metrics"] = [] if tables.count() and "ES" in tables.first.inner_text() else ["no metric table shown"]
    return problems


def test_stepper_next_back_apply_revert(live: ll.LivePage, original_checksum: str) -> None:
    one = click_and_wait(live, "Next", "1 / 2")
    assert one["title"] and one["values"], one
    assert check_every_tab(live) == {k: [] for k in ("probabilities", "where the edit acts", "inside the edit",
                                                     "weight norms", "re-trace", "metrics")}
    two = click_and_wait(live, "Next", "2 / 2")
    assert two["title"] != one["title"] and two["values"] != one["values"]  # a new step is shown
    back = click_and_wait(live, "Back", "1 / 2")
    assert back["title"] == one["title"] and back["values"] == one["values"]  # step 1 again, exactly
    assert checksum(ll.run_cell(live, CHECKSUM)) != original_checksum  # step 1 is applied
    click_and_wait(live, "Revert all", "0 / 2")
    assert checksum(ll.run_cell(live, CHECKSUM)) == original_checksum  # bitwise the original weights
    again = click_and_wait(live, "Apply all", "2 / 2", timeout=120)  # both steps cached
    assert again["title"] == two["title"] and again["values"] == two["values"]
    assert ll.chart_problems(again["charts"][:1], what="probabilities chart") == []
    click_and_wait(live, "Revert all", "0 / 2")
    assert checksum(ll.run_cell(live, CHECKSUM)) == original_checksum


def test_stepper_shows_no_reverted_step(live: ll.LivePage) -> None:
    """After Revert all (0 / 2 applied) no tab may still present a step as applied."""
    assert position(live) == "0 / 2"
    shown = stepper_state(live)
    assert not re.search(r"\bStep [12]\b", shown["title"]), (
        f"after Revert all the probabilities tab still shows {shown['title']!r}")
    out = live.output(STEPPER)
    out.locator(".lm-TabBar-tab", has_text="metrics").first.click()
    tables = out.locator("table").filter(visible=True)
    assert not (tables.count() and "ES" in tables.first.inner_text()), \
        "after Revert all the metrics tab still shows the reverted step's metrics"


def bad_input(live: ll.LivePage, cell: int, fields: dict[str, str], press: str, mentions: str) -> tuple[Any, Any]:
    """Type ``fields``, press ``press``; return (the new message mentioning ``mentions``, the button)."""
    out = live.output(cell)
    before = set(html_texts(live, cell))
    for label, value in fields.items():
        ll.widget_by_label(out, "text", label).locator("input").fill(value)
    control = ll.button(out, press)
    shown_before = any(mentions in t for t in before)  # the same bad input again: the same message
    control.click()
    if shown_before:
        ll.wait_kernel_idle(live.page, 300)
    wait_until(lambda: any(mentions in t and (shown_before or t not in before) for t in html_texts(live, cell)),
               f"an error mentioning {mentions!r} after {press}", 300)
    ll.wait_kernel_idle(live.page, 60)
    message = out.locator(".widget-html-content").filter(has_text=mentions).filter(visible=True).last
    return message, control


def test_bad_input_error_leaves_the_model_bit_identical(live: ll.LivePage, original_checksum: str) -> None:
    message, _ = bad_input(live, STEPPER, {"prompt": "{} is located in the city of", "subject": "",
                                           "target_new": " Rome"}, "Add request", "subject")
    assert "empty" in message.inner_text()
    assert position(live) == "0 / 2"  # nothing was added
    assert checksum(ll.run_cell(live, CHECKSUM)) == original_checksum
    message, _ = bad_input(live, EXPLORER, {"subject": ""}, "Trace", "subject")
    assert checksum(ll.run_cell(live, CHECKSUM)) == original_checksum


@pytest.mark.parametrize("cell, fields, press", [
    (STEPPER, {"prompt": "{} is located in the city of", "subject": "", "target_new": " Rome"}, "Add request"),
    (EXPLORER, {"subject": ""}, "Trace"),
])
def test_bad_input_error_is_next_to_its_control(live: ll.LivePage, cell: int, fields: dict[str, str],
                                                press: str) -> None:
    message, control = bad_input(live, cell, fields, press, "subject")
    gap = ll.vertical_gap(message.bounding_box(), control.bounding_box())
    assert gap <= 60, f"the error is {gap:.0f} px away from the {press!r} button that caused it"


def test_stepper_says_which_neighbours_it_leaves_out(live: ll.LivePage, original_checksum: str) -> None:
    """Step 2's fact has step 1's subject among its neighbours: NS leaves that prompt out, and says so."""
    out = live.output(NEIGHBOURS)

    def steps_to(want: str) -> None:
        wait_until(lambda: want in " ".join(html_texts(live, NEIGHBOURS)), f"'{want}' in the neighbours stepper", 300)
        ll.wait_kernel_idle(live.page, 300)

    ll.button(out, "Next").click()
    steps_to("1 / 2")
    ll.button(out, "Next").click()
    steps_to("2 / 2")
    out.locator(".lm-TabBar-tab", has_text="metrics").first.click()
    note = wait_until(lambda: [t for t in out.locator(".widget-html-content").filter(visible=True).all_inner_texts()
                               if "left out of NS" in t], "the left-out note in the metrics tab", 60)
    assert "1 neighbour prompt(s) name a subject edited in this or an earlier step" in note[0]
    ll.button(out, "Revert all").click()
    steps_to("0 / 2")
    assert checksum(ll.run_cell(live, CHECKSUM)) == original_checksum


def test_empty_charts_fail_the_check(lab: ll.LabServer, context: Any) -> None:
    """The chart check trips on a page whose apps draw nothing (``show_figure`` broken in the kernel)."""
    ll.write_notebook(lab.root / "broken.ipynb", [BREAK_SHOW_FIGURE + SETUP_CELL, "kv.MemoryBrowser(model)"])
    page = ll.open_notebook(context, lab, "broken.ipynb")
    _PAGES.append(page)
    try:
        ll.run_all(page)
        assert ll.cell_errors(page) == []
        out = page.output(1)
        wait_until(lambda: "reading the prompt" in " ".join(html_texts(page, 1)), "the app's status line", 120)
        shown = wait_until(lambda: len(ll.read_charts(out)) >= 2 and ll.read_charts(out), "the empty charts", 60)
        problems = ll.chart_problems(shown[:2], what="MemoryBrowser chart")
        assert len(problems) == 2 and all("no traces" in p for p in problems), problems
        assert ll.chart_problems([]) == ["no chart was drawn (no .js-plotly-plot element)"]
    finally:
        page.page.close()
        _PAGES.remove(page)
