"""Latency a user feels in a live JupyterLab: click -> chart updated, for kvlens's widget apps.

    .venv/bin/python benchmarks/live_latency.py [--repeats 3]

Starts ``jupyter lab`` (tests/live_lab.py: temporary root and Jupyter folders, token, 127.0.0.1),
opens a notebook with an ``EditStepper`` (two bundled facts, ROME with 2000-token statistics) and
a ``MemoryBrowser`` in Chromium, runs it from Lab's menu, then times in the page (``performance.now()``
from the click to the first animation frame at which the chart shows the new state, polled every
frame):

* the first drawn chart after a new step is computed (uncached Next: compute + evaluate + draw),
  and the kernel's own compute time from the app's status line, so the drawing share is known;
* cached Back (2 -> 1), Next (1 -> 2), Revert all (2 -> 0: until the position reads 0 / 2 and the
  probabilities chart says no edit is applied) and Apply all (0 -> 2, both steps cached);
* a memory pick in the MemoryBrowser (the firing chart shows the picked memory).

Writes benchmarks/results/live_latency.json. The goal for cached steps and memory picks is < 1 s on
2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests import live_lab as ll  # noqa: E402

CELLS = [
    "import warnings\nwarnings.simplefilter('ignore')\nimport kvlens as kv\nmodel = kv.load()",
    """cases = kv.load_bundled()
picked = [cases[0], next(c for c in cases if c.prompt != cases[0].prompt)]
stepper = kv.EditStepper(model, picked, methods={"ROME (values)": lambda: kv.ROME(stats_tokens=2000)})
stepper""",
    "browser = kv.MemoryBrowser(model)\nbrowser",
]
STEPPER, BROWSER = 1, 2
NO_EDIT = "Probabilities: no edit is applied"  # the stepper's first chart when no edit is applied

#: Click (or pick) in cell ``cell`` and poll every animation frame until ``until`` holds; returns ms.
#: ``until`` sees ``{charts, texts}``: the cell's Plotly charts (title) and its HTML widgets' texts.
TIMED_JS = """async ([cell, action, until, timeoutMs]) => {
  const root = document.querySelectorAll('.jp-Notebook .jp-CodeCell')[cell].querySelector('.jp-OutputArea');
  const title = (el) => { const t = (el.layout || {}).title;
                          return t && typeof t === 'object' ? (t.text || '') : (t || ''); };
  const view = () => ({charts: [...root.querySelectorAll('.js-plotly-plot')].map(el => ({
                         title: title(el), traces: (el.data || []).length})),
                       texts: [...root.querySelectorAll('.widget-html-content')].map(e => e.textContent)});
  const check = new Function('v', 'return (' + until + ')(v);');
  const t0 = performance.now();
  if (action.button) {
    [...root.querySelectorAll('button.jupyter-button')].find(b => b.textContent.includes(action.button)).click();
  } else {
    const sel = [...root.querySelectorAll('.widget-dropdown')].find(d => d.textContent.includes(action.dropdown))
                .querySelector('select');
    sel.selectedIndex = action.index;
    sel.dispatchEvent(new Event('change', {bubbles: true}));
  }
  while (!check(view())) {
    if (performance.now() - t0 > timeoutMs) return -1;
    await new Promise(r => requestAnimationFrame(r));
  }
  return performance.now() - t0;
}"""


def timed(live: ll.LivePage, cell: int, action: dict[str, Any], until: str, timeout_s: float = 900) -> float:
    ms = float(live.page.evaluate(TIMED_JS, [cell, action, until, timeout_s * 1000]))
    if ms < 0:
        raise TimeoutError(f"{action} in cell {cell}: {until} did not hold within {timeout_s:.0f} s")
    ll.wait_kernel_idle(live.page, timeout_s)
    return ms / 1000


def position_is(n: int) -> str:
    return f"(v => v.texts.some(t => /\\b{n} \\/ 2\\b/.test(t)))"


def title_is(title: str, n: int) -> str:
    return f"v => v.charts.length > 0 && v.charts[0].title === {json.dumps(title)} && {position_is(n)}(v)"


def probs_title(live: ll.LivePage) -> str:
    return str(ll.read_charts(live.output(STEPPER))[0]["title"])


def compute_seconds(live: ll.LivePage) -> float | None:
    """The kernel's compute time of the last step, from the app's status line ('... done in X s')."""
    texts = " ".join(live.output(STEPPER).locator(".widget-html-content").all_inner_texts())
    found = re.findall(r"computing .*?done in ([0-9.]+) s", texts) or re.findall(r"done in ([0-9.]+) s", texts)
    return float(found[-1]) if found else None


def summary(values: list[float]) -> dict[str, Any]:
    return {"seconds": [round(v, 3) for v in values], "median_s": round(statistics.median(values), 3),
            "max_s": round(max(values), 3), "under_1s": all(v < 1.0 for v in values)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "live_latency.json"))
    args = ap.parse_args()
    exe = ll.chromium()
    if exe is None:
        sys.exit("no chromium on PATH: run `bash .ci/install-browser`")
    load_before = os.getloadavg()
    result: dict[str, Any] = {"machine": platform.machine(), "cpus": os.cpu_count(), "load_before": load_before}
    started = time.perf_counter()
    with ll.lab_server() as lab, ll.browser_context(exe) as context:
        ll.write_notebook(lab.root / "latency.ipynb", CELLS)
        live = ll.open_notebook(context, lab, "latency.ipynb")
        t = time.perf_counter()
        ll.run_all(live)
        result["run_all_s"] = round(time.perf_counter() - t, 2)
        first = []
        for n in (1, 2):
            before = probs_title(live) if n == 2 else ""
            s = timed(live, STEPPER, {"button": "Next"},
                      f"v => v.charts.length > 0 && v.charts[0].title !== {json.dumps(before)} "
                      f"&& v.charts[0].traces > 0 && {position_is(n)}(v)")
            first.append({"step": n, "click_to_first_chart_s": round(s, 3), "kernel_compute_s": compute_seconds(live)})
        result["uncached_next"] = first
        two = probs_title(live)
        timed(live, STEPPER, {"button": "Back"}, position_is(1))  # a warm-up pair that learns step 1's title
        one = probs_title(live)
        timed(live, STEPPER, {"button": "Next"}, title_is(two, 2))
        cleared = f"v => v.charts.length > 0 && v.charts[0].title === {json.dumps(NO_EDIT)} && {position_is(0)}(v)"
        cached: dict[str, list[float]] = {"back": [], "next": [], "revert_all": [], "apply_all": []}
        for _ in range(args.repeats):  # each round starts and ends with both steps applied
            cached["back"].append(timed(live, STEPPER, {"button": "Back"}, title_is(one, 1)))
            cached["next"].append(timed(live, STEPPER, {"button": "Next"}, title_is(two, 2)))
            cached["revert_all"].append(timed(live, STEPPER, {"button": "Revert all"}, cleared))
            cached["apply_all"].append(timed(live, STEPPER, {"button": "Apply all"}, title_is(two, 2)))
        result["cached"] = {k: summary(v) for k, v in cached.items()}
        picks = []
        options = live.output(BROWSER).locator(".widget-dropdown select option").all_inner_texts()
        for i in list(range(1, len(options)))[: 2 * args.repeats]:
            memory = re.search(r"m(\d+)", options[i]).group(1)
            picks.append(timed(live, BROWSER, {"dropdown": "strongest", "index": i},
                               f"v => v.charts.length > 1 && v.charts[1].title.includes('m{memory} ') "
                               f"&& v.charts[0].title.includes('m{memory} ')"))
        result["memory_pick"] = summary(picks)
        live.page.close()
    result["total_s"] = round(time.perf_counter() - started, 1)
    result["load_after"] = os.getloadavg()
    result["note"] = ("in-page timing (performance.now() from the click to the first animation frame showing "
                      "the new chart state), JupyterLab 4 + Chromium headless on the same machine as the kernel; "
                      "load averages before and after are recorded above")
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
