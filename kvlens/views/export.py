"""Export a notebook, widget state included, to one HTML file that opens offline and shows what the user saw.

nbconvert's HTML loads require.js, the Jupyter widget manager and MathJax from CDNs, and the
widget manager fetches third-party widget code (anywidget, which Plotly's ``FigureWidget``
uses) from a CDN too: offline, widgets do not render. :func:`export_notebook` inlines all of
it, so the page makes no network request:

* ``require.js`` and ``@jupyter-widgets/html-manager``'s ``embed-amd.js`` come from a folder
  where npm installed them (``npm install requirejs@2 @jupyter-widgets/html-manager@1``);
* anywidget's AMD module comes from the ``anywidget`` Python package;
* plotly.js is inlined once, before require.js (so it defines the global ``Plotly``);
* every script is carried once (nbconvert's widget loader names the widget manager twice);
* MathJax is left out (LaTeX in markdown cells is shown as typed).

Plotly charts are kept in the state the user last saw, whatever renderer drew them:

* ordinary figures: JupyterLab's default renderer emits only Plotly's JSON, which nbconvert's
  HTML does not draw; each such output gets an HTML rendering that uses the shared plotly.js
  (no :func:`~kvlens.views.widgets.notebook_mode` call needed; the copy of plotly.js that
  ``notebook_mode`` adds to a notebook is dropped);
* ``FigureWidget`` s (bare, or inside kvlens's apps): a widget's saved state holds the figure it
  was *created* with — later redraws travel as messages that no saved state keeps — and its
  module carries its own 5 MB copy of plotly.js. With ``execute=True`` the figures are read from
  the kernel after the last cell (what the apps show then); each figure widget's module is
  replaced by a few lines that draw its figure with the shared plotly.js.

Save notebooks run in JupyterLab with widget state (*Settings → Save Widget State
Automatically*) or use ``execute=True`` (nbclient, ``store_widget_state``); only the latter reads
redrawn figures from the kernel. Python callbacks do not run in a static page: the widgets show
the state they were saved in.
"""

from __future__ import annotations

import base64
import json
import tempfile
from importlib import resources
from pathlib import Path
from typing import Any

from kvlens.views.report import write_page

#: Files taken from the npm folder, relative to its ``node_modules``.
REQUIRE_JS = Path("requirejs/require.js")
EMBED_AMD = Path("@jupyter-widgets/html-manager/dist/embed-amd.js")
#: Where a notebook keeps its widget state.
WIDGET_STATE = "application/vnd.jupyter.widget-state+json"
#: Plotly's figure mimetype (what JupyterLab's default renderer emits).
PLOTLY_MIME = "application/vnd.plotly.v1+json"
#: The mimetype of the figures read from the kernel after execution (never saved in the page).
FIGURES_MIME = "application/x-kvlens-figure-widgets+json"

_TEMPLATE = """{%- extends 'lab/index.html.j2' -%}
{%- block html_head_js_requirejs -%}
{{ resources.kvlens_plotlyjs }}
{{ super() }}
<script>require.config({paths: {anywidget: "ANYWIDGET_URL"}});</script>
{%- endblock html_head_js_requirejs -%}
{%- block html_head_js_mathjax -%}{%- endblock html_head_js_mathjax -%}
{%- block jupyter_widgets -%}
{%- if "widgets" in nb.metadata -%}
{%- if resources.kvlens_widget_renderer -%}
<script type="text/x-kvlens-widget-renderer" id="kvlens-widget-renderer">{{ resources.kvlens_widget_renderer }}</script>
{%- endif -%}
<script>
document.addEventListener("DOMContentLoaded", function () {
  var inline = document.getElementById("kvlens-widget-renderer");
  var script = document.createElement("script");
  {% if resources.kvlens_widget_renderer -%}
  script.src = URL.createObjectURL(new Blob([inline.textContent], {type: "text/javascript"}));
  {%- else -%}
  script.src = "{{ resources.widget_renderer_url }}";
  {%- endif %}
  document.body.appendChild(script);
});
</script>
{%- endif -%}
{%- endblock jupyter_widgets -%}
"""

#: The module every exported ``FigureWidget`` gets instead of plotly's 5 MB bundle: it draws the
#: saved figure with the page's one plotly.js.
STATIC_FIGURE_ESM = """
function render({ model, el }) {
  const Plotly = globalThis.Plotly;
  if (!Plotly) { el.textContent = "kvlens export: plotly.js is missing from this page"; return; }
  const copy = (v) => JSON.parse(JSON.stringify(v ?? null));
  Plotly.newPlot(el, copy(model.get("_widget_data")) || [], copy(model.get("_widget_layout")) || {},
                 Object.assign({ displaylogo: false, responsive: true }, copy(model.get("_config")) || {}));
  return () => Plotly.purge(el);
}
export default { render };
"""

#: Run in the kernel after the notebook's last cell: every live FigureWidget's current figure.
_READ_FIGURES = f"""
def _kvlens_read_figure_widgets():
    import json
    import plotly.graph_objects as go
    import plotly.io as pio
    from IPython.display import display
    try:
        from ipywidgets.widgets.widget import _instances
    except ImportError:  # older ipywidgets
        from ipywidgets import Widget
        _instances = Widget.widgets
    figs = {{mid: json.loads(pio.to_json(w, validate=False)) for mid, w in list(_instances.items())
            if isinstance(w, go.FigureWidget)}}
    display({{{FIGURES_MIME!r}: figs}}, raw=True)
_kvlens_read_figure_widgets()
del _kvlens_read_figure_widgets
"""


def data_url(path: Path) -> str:
    """``path`` as a ``data:text/javascript;base64,...`` URL."""
    return "data:text/javascript;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def inline_script(path: Path) -> str:
    """``path``'s text if it can sit inside an HTML ``<script>`` element as is, else "" (then a data URL is used)."""
    text = path.read_text(encoding="utf-8")
    lowered = text.lower()
    return "" if "</script" in lowered or "<!--" in lowered else text


def node_modules(js_dir: str | Path) -> Path:
    """The ``node_modules`` folder in (or at) ``js_dir``, with a clear error naming what is missing."""
    root = Path(js_dir).expanduser()
    folder = root if root.name == "node_modules" else root / "node_modules"
    missing = [str(f) for f in (REQUIRE_JS, EMBED_AMD) if not (folder / f).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{folder} lacks {', '.join(missing)}: run `npm install --prefix {root} requirejs@2 "
            f"@jupyter-widgets/html-manager@1` once (the packages are then used offline)")
    return folder


def anywidget_module() -> Path:
    """anywidget's AMD module, shipped inside the ``anywidget`` Python package."""
    path = Path(str(resources.files("anywidget"))) / "nbextension" / "index.js"
    if not path.is_file():
        raise FileNotFoundError(f"anywidget's AMD module is not at {path}: reinstall anywidget")
    return path


def execute_reading_figures(nb: Any, path: Path, *, timeout: int, kernel_name: str) -> dict[str, Any]:
    """Run ``nb`` in place (widget state stored); return ``{model_id: figure}`` of its live FigureWidgets.

    One extra cell, removed again, reads the figures after the last cell.
    """
    import nbformat
    from nbclient import NotebookClient

    nb.cells.append(nbformat.v4.new_code_cell(_READ_FIGURES))
    try:
        NotebookClient(nb, kernel_name=kernel_name, timeout=timeout, store_widget_state=True,
                       resources={"metadata": {"path": str(path.parent.resolve())}}).execute()
    finally:
        reader = nb.cells.pop()
    for output in reader.get("outputs", []):
        if FIGURES_MIME in output.get("data", {}):
            figs = output["data"][FIGURES_MIME]
            return json.loads(figs) if isinstance(figs, str) else dict(figs)
    raise RuntimeError("the kernel did not report its FigureWidgets after the last cell: "
                       f"{[o.get('text', o.get('ename')) for o in reader.get('outputs', [])]}")


def is_figure_widget(entry: dict[str, Any]) -> bool:
    """Whether a widget-state entry is a Plotly ``FigureWidget`` (an anywidget with plotly's traits)."""
    state = entry.get("state", {})
    return entry.get("model_module") == "anywidget" and "_widget_data" in state and "_esm" in state


def freeze_figure_widgets(nb: Any, figures: dict[str, Any]) -> int:
    """Make every ``FigureWidget`` of ``nb``'s widget state draw ``figures[model_id]`` (else its saved
    figure) with the page's shared plotly.js. Returns how many there were."""
    state = nb.metadata.get("widgets", {}).get(WIDGET_STATE, {}).get("state", {})
    count = 0
    for model_id, entry in state.items():
        if not is_figure_widget(entry):
            continue
        st = entry["state"]
        fig = figures.get(model_id)
        replaced = {"_widget_data", "_widget_layout", "_esm"} | {k for k in st if k.startswith(("_py2js_", "_js2py_"))}
        if fig is not None:
            st["_widget_data"], st["_widget_layout"] = fig.get("data", []), fig.get("layout", {})
        st["_esm"] = STATIC_FIGURE_ESM
        for key in replaced - {"_widget_data", "_widget_layout", "_esm"}:
            st[key] = None
        if "buffers" in entry:  # binary parts of the replaced traits would overwrite them on load
            kept = [b for b in entry["buffers"] if not b.get("path") or b["path"][0] not in replaced]
            if kept:
                entry["buffers"] = kept
            else:
                del entry["buffers"]
        count += 1
    return count


def _is_plotlyjs_bundle(html_text: str) -> bool:
    """Whether an HTML output is the copy of plotly.js that Plotly's notebook renderers display once."""
    return len(html_text) > 1_000_000 and "window.PlotlyConfig" in html_text and "plotly.js" in html_text[:20_000]


def render_static_figures(nb: Any) -> int:
    """Give every Plotly JSON output of ``nb`` an HTML rendering that uses the page's plotly.js, and drop
    the plotly.js copies Plotly's notebook renderers put in outputs. Returns how many figures."""
    import plotly.io as pio

    count = 0
    for cell in nb.cells:
        if cell.get("cell_type") != "code":
            continue
        kept = []
        for output in cell.get("outputs", []):
            data = output.get("data", {})
            if PLOTLY_MIME in data:
                fig = data[PLOTLY_MIME]
                fig = json.loads(fig) if isinstance(fig, str) else fig
                data["text/html"] = pio.to_html(fig, include_plotlyjs=False, include_mathjax=False, full_html=False,
                                                validate=False, config={"displaylogo": False, "responsive": True})
                count += 1
            elif _is_plotlyjs_bundle("".join(data.get("text/html", ""))):
                continue
            kept.append(output)
        cell["outputs"] = kept
    return count


def export_notebook(notebook: str | Path, out: str | Path, *, js_dir: str | Path, execute: bool = False,
                    timeout: int = 600, kernel_name: str = "python3") -> Path:
    """Write ``notebook`` as one self-contained HTML file at ``out``; returns its absolute path.

    Every Plotly chart is drawn with one inlined plotly.js: ordinary figures, and ``FigureWidget`` s
    (bare or in kvlens's apps) in their last state when ``execute`` (else as saved).

    Args:
        notebook: the ``.ipynb`` file (saved with widget state, unless ``execute``).
        out: the HTML file to write (folders are created).
        js_dir: the folder where npm installed ``requirejs`` and ``@jupyter-widgets/html-manager``.
        execute: run the notebook first (nbclient, widget state stored), in its own folder.
        timeout: seconds per cell when executing; kernel_name: the kernel to execute with.
    """
    import nbformat
    import plotly.offline
    from nbconvert import HTMLExporter

    modules = node_modules(js_dir)
    source = Path(notebook).expanduser()
    if not source.is_file():
        raise FileNotFoundError(f"no notebook at {source}: pass the path of an .ipynb file")
    nb = nbformat.read(source, as_version=4)
    figures = execute_reading_figures(nb, source, timeout=timeout, kernel_name=kernel_name) if execute else {}
    n_plots = freeze_figure_widgets(nb, figures) + render_static_figures(nb)
    plotlyjs = f"<script>{plotly.offline.get_plotlyjs()}</script>" if n_plots else ""
    with tempfile.TemporaryDirectory(prefix="kvlens-export-") as tmp:
        template = Path(tmp) / "kvlens_offline.html.j2"
        template.write_text(_TEMPLATE.replace("ANYWIDGET_URL", data_url(anywidget_module())), encoding="utf-8")
        exporter = HTMLExporter(template_name="lab", template_file=str(template),
                                extra_template_basedirs=[tmp], require_js_url=data_url(modules / REQUIRE_JS),
                                widget_renderer_url=data_url(modules / EMBED_AMD))
        nb_resources = {"metadata": {"name": source.stem}, "kvlens_plotlyjs": plotlyjs,
                        "kvlens_widget_renderer": inline_script(modules / EMBED_AMD)}
        body, _ = exporter.from_notebook_node(nb, resources=nb_resources)
    return write_page(out, body, "the exported notebook")
