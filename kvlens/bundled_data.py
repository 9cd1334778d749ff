"""Where the data shipped with kvlens lives: ``data/`` of a source checkout, or its installed copy.

A wheel installs ``data/`` (facts, reference texts, the Wikipedia sample) as
``<prefix>/share/kvlens/data`` (``[tool.setuptools.data-files]`` in pyproject.toml); an editable
install or a checkout reads ``data/`` next to the package.
"""

from __future__ import annotations

import site
import sys
from pathlib import Path

_MARKER = "counterfact_mini.json"


def candidates() -> list[Path]:
    """The folders searched, in order: the checkout, the prefix kvlens is installed under
    (``<prefix>/lib/pythonX.Y/site-packages/kvlens``), the environment's prefix, the user's base."""
    here = Path(__file__).resolve()
    out = [here.parent.parent / "data"]
    if len(here.parents) > 4:
        out.append(here.parents[4] / "share" / "kvlens" / "data")
    out.append(Path(sys.prefix) / "share" / "kvlens" / "data")
    if site.USER_BASE:
        out.append(Path(site.USER_BASE) / "share" / "kvlens" / "data")
    return list(dict.fromkeys(out))


def data_dir() -> Path:
    """The first folder of :func:`candidates` that holds the bundled facts; a clear error if none does."""
    for folder in candidates():
        if (folder / _MARKER).is_file():
            return folder
    raise FileNotFoundError(
        "kvlens's bundled data (data/counterfact_mini.json, ...) was not found in "
        + ", ".join(str(c) for c in candidates())
        + ": reinstall kvlens (its wheel installs share/kvlens/data) or work from a source checkout")
