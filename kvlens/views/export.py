"""Export a notebook, widget state included, to one HTML file that opens offline.

nbconvert's HTML loads require.js, the Jupyter widget manager and MathJax from CDNs, and the
widget manager fetches third-party widget code (anywidget, which Plotly's ``FigureWidget``
uses) from a CDN too: offline, widgets do not render. :func:`export_notebook` inlines all of
it as ``data:`` URLs, so the page makes no network request:

* ``require.js`` and ``@jupyter-widgets/html-manager``'s ``embed-amd.js`` come from a folder
  where npm installed them (``npm install requirejs@2 @jupyter-widgets/html-manager@1``);
* anywidget's AMD module comes from the ``anywidget`` Python package;
* MathJax is left out (LaTeX in markdown cells is shown as typed).

Run the notebook with ``kvlens.views.widgets.notebook_mode()`` first (static Plotly figures
then carry their HTML) and save it with widget state (JupyterLab: *Settings → Save Widget State
Automatically*; headless: ``execute=True`` runs it with nbclient's ``store_widget_state``).
Python callbacks do not run in a static page: the widgets show the state they were saved in.
"""

from __future__ import annotations

import base64
import tempfile
from importlib import resources
from pathlib import Path

from kvlens.views.report import write_page

#: Files taken from the npm folder, relative to its ``node_modules``.
REQUIRE_JS = Path("requirejs/require.js")
EMBED_AMD = Path("@jupyter-widgets/html-manager/dist/embed-amd.js")

_TEMPLATE = """{%- extends 'lab/index.html.j2' -%}
{%- block html_head_js_requirejs -%}
{{ super() }}
<script>require.config({paths: {anywidget: "ANYWIDGET_URL"}});</script>
{%- endblock html_head_js_requirejs -%}
{%- block html_head_js_mathjax -%}{%- endblock html_head_js_mathjax -%}
"""


def data_url(path: Path) -> str:
    """``path`` as a ``data:text/javascript;base64,...`` URL."""
    return "data:text/javascript;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


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


def export_notebook(notebook: str | Path, out: str | Path, *, js_dir: str | Path, execute: bool = False,
                    timeout: int = 600, kernel_name: str = "python3") -> Path:
    """Write ``notebook`` as one self-contained HTML file at ``out``; returns its absolute path.

    Args:
        notebook: the ``.ipynb`` file (saved with widget state, unless ``execute``).
        out: the HTML file to write (folders are created).
        js_dir: the folder where npm installed ``requirejs`` and ``@jupyter-widgets/html-manager``.
        execute: run the notebook first (nbclient, widget state stored), in its own folder.
        timeout: seconds per cell when executing; kernel_name: the kernel to execute with.
    """
    import nbformat
    from nbconvert import HTMLExporter

    modules = node_modules(js_dir)
    source = Path(notebook).expanduser()
    nb = nbformat.read(source, as_version=4)
    if execute:
        from nbclient import NotebookClient

        NotebookClient(nb, kernel_name=kernel_name, timeout=timeout, store_widget_state=True,
                       resources={"metadata": {"path": str(source.parent.resolve())}}).execute()
    with tempfile.TemporaryDirectory(prefix="kvlens-export-") as tmp:
        template = Path(tmp) / "kvlens_offline.html.j2"
        template.write_text(_TEMPLATE.replace("ANYWIDGET_URL", data_url(anywidget_module())), encoding="utf-8")
        exporter = HTMLExporter(template_name="lab", template_file=str(template),
                                extra_template_basedirs=[tmp], require_js_url=data_url(modules / REQUIRE_JS),
                                widget_renderer_url=data_url(modules / EMBED_AMD))
        body, _ = exporter.from_notebook_node(nb, resources={"metadata": {"name": source.stem}})
    return write_page(out, body, "the exported notebook")
