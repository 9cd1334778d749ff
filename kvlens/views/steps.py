"""The steps of :class:`~kvlens.views.stepper.EditStepper`: the method menu, a computed step and what it
shows (rows of the probability chart, the step's figures, drawn once), and the kernel check that picks
background computation.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import plotly.graph_objects as go

from kvlens.datasets import EvalCase
from kvlens.editing import MEMIT, ROME, KeyFT, LoRAKeys, LoRAValues, ValueFT
from kvlens.editing.base import EditMethod
from kvlens.editing.delta import WeightDelta
from kvlens.evaluate import EditReport
from kvlens.memory.activations import KeyActivations
from kvlens.memory.readout import LayerReadout


def default_methods() -> dict[str, Callable[[], EditMethod]]:
    """The method menu: value-side and key-side methods with their presets for the model."""
    return {"ROME (values)": ROME, "MEMIT (values)": MEMIT, "fine-tune values": ValueFT,
            "fine-tune keys": KeyFT, "LoRA values": LoRAValues, "LoRA keys": LoRAKeys}


def in_kernel() -> bool:
    """True inside a running IPython kernel (where button callbacks must not block)."""
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and getattr(shell, "kernel", None) is not None


#: How the stepper's metrics score a target of several tokens.
EDIT_SCORE = "its probability is the geometric mean over them"


def probability_rows(report: EditReport) -> list[dict[str, Any]]:
    """Rows for :func:`~kvlens.views.edit_figures.target_probability_bars` from a before/after report."""
    before, after = report.raw["before"][0], report.raw["after"][0]
    rows: list[dict[str, Any]] = []
    groups = (("edited", "rewrite_new", "rewrite_true"), ("paraphrase", "paraphrase_new", "paraphrase_true"),
              ("neighbour", "neighborhood_new", "neighborhood_expected"))
    for group, new_key, true_key in groups:
        for i, score in enumerate(after[new_key] or after[true_key]):
            row: dict[str, Any] = {"group": group, "prompt": score.prompt}
            for state, raw in (("before", before), ("after", after)):
                row[f"p_new_{state}"] = raw[new_key][i].prob if raw[new_key] else None
                row[f"p_true_{state}"] = raw[true_key][i].prob if raw[true_key] else None
            rows.append(row)
    return rows


@dataclass
class Step:
    """One computed step: the delta, its before/after report, key activations and layer read-outs
    before and after (the ``*_after`` ones are read with the edit applied)."""

    label: str
    case: EvalCase
    delta: WeightDelta
    report: EditReport
    keys_before: KeyActivations
    readout_before: LayerReadout
    keys_after: KeyActivations | None = None
    readout_after: LayerReadout | None = None
    figures: dict[str, go.Figure | None] = field(default_factory=dict)  # drawn once, redrawn from here

    def figure(self, name: str, make: Callable[[], go.Figure | None]) -> go.Figure | None:
        """The step's figure ``name``, built by ``make`` the first time (a step's figures never change)."""
        if name not in self.figures:
            self.figures[name] = make()
        return self.figures[name]

    @property
    def key_side(self) -> bool:
        """True when the edit changes keys or gates (so the key activations themselves move)."""
        return any(role in ("key", "gate") for role in self.delta.roles)


def empty_figure(title: str, height: int = 160) -> go.Figure:
    """A blank chart titled ``title`` (a tab with nothing to show says so)."""
    fig = go.Figure()
    fig.update_layout(title=title, height=height, xaxis_visible=False, yaxis_visible=False)
    return fig


NO_EDIT_HTML = "<p><i>No edit is applied: press Next ▶ to compute and apply the first one.</i></p>"
