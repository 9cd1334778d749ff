"""Versions, read once from the installed package metadata (``importlib.metadata``), in one place.

``kvlens.__version__``, delta files (:mod:`kvlens.editing.files`) and reports
(:mod:`kvlens.views.report`) all take them from here; nothing imports the package root for it.
"""

from __future__ import annotations

import platform
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version

#: Packages whose versions every report records.
VERSIONED = ("kvlens", "torch", "transformers", "nnsight", "plotly", "numpy")


def package_version(name: str, default: str = "not installed") -> str:
    """The installed version of distribution ``name`` (``default`` when it is not installed)."""
    try:
        return version(name)
    except PackageNotFoundError:
        return default


def versions(names: Sequence[str] = VERSIONED) -> dict[str, str]:
    """Python's version and each named package's."""
    return {"python": platform.python_version(), **{name: package_version(name) for name in names}}
