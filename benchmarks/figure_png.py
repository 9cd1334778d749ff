"""Recorded Plotly figures (benchmarks/results/*.json) as PNG images for the README, drawn by Chromium.

    .venv/bin/python benchmarks/figure_png.py benchmarks/results/keys_vs_values_independent_figure.json ...

Each figure is written as a self-contained HTML page (plotly.js inlined, as kvlens's exports are),
opened in headless Chromium (tests/live_lab.py's context), checked the way the browser tests check
charts (drawn SVG, every trace with data, no console error or page error), and its chart element is
screenshotted to docs/figures/<name>.png. A figure that does not draw stops the script with what is
wrong, so no image is written of a chart a reader would not see.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import plotly.io as pio

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tests import live_lab as ll  # noqa: E402

OUT = ROOT / "docs" / "figures"


def render(context, figure_json: Path, out_dir: Path, width: int, height: int) -> Path:
    """``figure_json`` drawn in a page of ``context`` and saved as ``out_dir/<stem>.png``."""
    fig = pio.from_json(figure_json.read_text())
    fig.update_layout(width=width, height=height)
    page_path = Path(tempfile.mkdtemp(prefix="kvlens-fig-")) / f"{figure_json.stem}.html"
    page_path.write_text(fig.to_html(include_plotlyjs=True, full_html=True))
    page = context.new_page()
    console: list[str] = []
    page.on("console", lambda m: console.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: console.append(str(e)))
    page.goto(page_path.as_uri())
    page.wait_for_selector(".js-plotly-plot svg.main-svg")
    problems = ll.chart_problems(ll.read_charts(page.locator("body")), what=figure_json.name) + console
    if problems:
        raise SystemExit(f"{figure_json}: " + "; ".join(problems))
    out = out_dir / f"{figure_json.stem}.png"
    page.locator(".js-plotly-plot").first.screenshot(path=str(out))
    page.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("figures", nargs="+", type=Path)
    ap.add_argument("--width", type=int, default=1000)
    ap.add_argument("--height", type=int, default=520)
    args = ap.parse_args()
    exe = ll.chromium()
    if exe is None:
        sys.exit("no chromium on PATH: run `bash .ci/install-browser`")
    OUT.mkdir(parents=True, exist_ok=True)
    with ll.browser_context(exe) as context:
        for path in args.figures:
            print(render(context, path, OUT, args.width, args.height).relative_to(ROOT))


if __name__ == "__main__":
    main()
