"""Plotly figures of evaluation results: pure functions from :class:`~kvlens.evaluate.EditReport` s.

* :func:`metrics_bars` — one report: each metric before/after with 95 % CI error bars;
* :func:`method_comparison` — several reports (e.g. key-side vs value-side methods): grouped bars;
* :func:`scaling_curve` — a metric against the number of edits, per method, the unedited
  baseline dotted (MEMIT Fig. 5 style);
* :func:`case_shift` — per-case before vs after of one metric (which requests moved);
* :func:`comparison_figure` / :func:`scaling_figure` — the figures of :mod:`kvlens.experiments` results;
* :func:`difference_figure` — paired differences (e.g. key − value on the same requests) with CIs.

Every axis or legend names the metric's convention (counterfact / zsre / easyedit / generation).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import plotly.graph_objects as go
from plotly.colors import qualitative

from kvlens.errors import BadInput
from kvlens.evaluate import AGGREGATES, EditReport
from kvlens.metrics import Estimate

if TYPE_CHECKING:
    from kvlens.experiments import Comparison, Scaling

DEFAULT_METRICS = ("ES", "PS", "NS", "S")

#: What each metric name means, for every place that shows one (x100; CounterFact Eqs. 24-26).
GLOSSARY: dict[str, str] = {
    "ES": "efficacy success: % of cases whose edited prompt now gives the new object a higher "
          "probability than the true one",
    "PS": "paraphrase success: the same on the paraphrased prompts (generalisation)",
    "NS": "neighbourhood success: % of neighbouring facts (other subjects, same relation) whose true object "
          "still beats the new one (specificity: higher is better)",
    "S": "score: the harmonic mean of ES, PS and NS",
    "EM": "efficacy magnitude: mean p(new) − p(true) on the edited prompt",
    "PM": "paraphrase magnitude: mean p(new) − p(true) on the paraphrases",
    "NM": "neighbourhood magnitude: mean p(true) − p(new) on the neighbouring facts",
    "Efficacy": "zsRE efficacy: top-1 accuracy of the new target's tokens on the edited prompt",
    "Paraphrase": "zsRE paraphrase: the same on the paraphrases",
    "Specificity": "zsRE specificity: top-1 accuracy on the neighbouring prompts",
    "Score": "zsRE score: the harmonic mean of Efficacy, Paraphrase and Specificity",
    "Reliability": "EasyEdit reliability: token accuracy of the new target on the edited prompt",
    "Generalization": "EasyEdit generalisation: the same on the paraphrases",
    "Locality": "EasyEdit locality: % of neighbouring-prompt tokens whose top-1 is unchanged by the edit",
    "GE": "generation entropy: n-gram entropy of generated text (fluency, ROME Eq. 27)",
    "RS": "reference score: TF-IDF cosine of generated text with reference texts (consistency)",
    "CI": "95 % confidence interval over the cases (normal approximation; Wilson score interval for a rate "
          "whose every case is 0 or 1, so 10/10 reads [72, 100], not [100, 100]; bootstrap for the harmonic means)",
}


def explain(names: Sequence[str]) -> str:
    """``"ES = efficacy success: ...; PS = ..."`` for the names in :data:`GLOSSARY` (in order, once each)."""
    return "; ".join(f"{n} = {GLOSSARY[n]}" for n in dict.fromkeys(names) if n in GLOSSARY) + "."
_PER_CASE_KEY = {name: key for name, key, _ in AGGREGATES}


def _bar(name: str, estimates: Sequence[Estimate | None], metrics: Sequence[str], **kw: Any) -> go.Bar:
    ys = [None if e is None else e.mean for e in estimates]
    plus = [0 if e is None else e.high - e.mean for e in estimates]
    minus = [0 if e is None else e.mean - e.low for e in estimates]
    hover = [f"{m}: n/a" if e is None else f"{m} = {e} (n={e.n}, {e.convention})"
             for m, e in zip(metrics, estimates)]
    return go.Bar(name=name, x=list(metrics), y=ys, hovertext=hover, hoverinfo="text",
                  error_y=dict(type="data", symmetric=False, array=plus, arrayminus=minus), **kw)


def _convention_of(reports: Sequence[EditReport], metrics: Sequence[str]) -> dict[str, str]:
    """metric -> the convention its estimates were computed under, for the metrics the reports have."""
    seen: dict[str, str] = {}
    for r in reports:
        for state in r.aggregate.values():
            for m in metrics:
                if m in state:
                    seen.setdefault(m, state[m].convention)
    return seen


def _conventions(reports: Sequence[EditReport], metrics: Sequence[str]) -> str:
    return ", ".join(f"{m}: {c}" for m, c in _convention_of(reports, metrics).items())


def _check_metrics(metrics: Sequence[str]) -> None:
    if not metrics:
        raise ValueError("no metrics to plot: name at least one, e.g. ('ES', 'PS', 'NS', 'S')")


def metrics_bars(report: EditReport, metrics: Sequence[str] = DEFAULT_METRICS) -> go.Figure:
    """Each metric (x100) in every state of ``report`` with its 95 % CI."""
    _check_metrics(metrics)
    fig = go.Figure([_bar(state, [report.aggregate[state].get(m) for m in metrics], metrics)
                     for state in report.states])
    fig.update_layout(barmode="group", title=f"{report.method or 'unedited'} on {report.model} "
                      f"({len(report.cases)} cases)", yaxis_title="score (x100, 95% CI)",
                      xaxis_title=_conventions([report], metrics), legend_title="state")
    return fig


def method_comparison(reports: Mapping[str, EditReport], metrics: Sequence[str] = DEFAULT_METRICS,
                      state: str = "after", baseline: EditReport | None = None) -> go.Figure:
    """Grouped bars: one group per metric, one bar per method (``state`` of each report).

    ``baseline`` adds the unedited model's values (its ``before``/``current`` state) as a grey bar.
    """
    _check_metrics(metrics)
    if not reports:
        raise ValueError("no reports to compare: pass {method name: EditReport}")
    bars = []
    if baseline is not None:
        base_state = "before" if "before" in baseline.aggregate else baseline.states[0]
        bars.append(_bar("unedited", [baseline.aggregate[base_state].get(m) for m in metrics], metrics,
                         marker_color="lightgrey"))
    # Plotly's default cycle repeats after 10 colours; beyond that each method keeps a colour of its own
    palette = qualitative.Plotly if len(reports) <= len(qualitative.Plotly) else qualitative.Dark24
    for i, (name, r) in enumerate(reports.items()):
        s = state if state in r.aggregate else r.states[-1]
        bars.append(_bar(name, [r.aggregate[s].get(m) for m in metrics], metrics,
                         marker_color=palette[i % len(palette)]))
    fig = go.Figure(bars)
    fig.update_layout(barmode="group", title="Editing methods compared", yaxis_title="score (x100, 95% CI)",
                      xaxis_title=_conventions(list(reports.values()), metrics), legend_title="method")
    return fig


def scaling_curve(series: Mapping[str, Sequence[tuple[int, EditReport]]], metric: str = "ES",
                  state: str = "after", baseline: EditReport | None = None) -> go.Figure:
    """``metric`` against the number of edits n (log axis), one line per method, CI band as error bars.

    ``series[method]`` is a list of ``(n, report)``; ``baseline`` draws the unedited value dotted.
    """
    if not series:
        raise ValueError("no series to plot: pass {method: [(n_edits, EditReport), ...]}")
    fig = go.Figure()
    convention = ""
    for name, points in series.items():
        if not points:
            raise ValueError(f"series {name!r} has no points")
        pts = sorted(points, key=lambda p: p[0])
        ests = [r.metric(metric, state) for _, r in pts]
        convention = ests[0].convention
        fig.add_trace(go.Scatter(x=[n for n, _ in pts], y=[e.mean for e in ests], mode="lines+markers", name=name,
                                 error_y=dict(type="data", symmetric=False, array=[e.high - e.mean for e in ests],
                                              arrayminus=[e.mean - e.low for e in ests])))
    if baseline is not None:
        base_state = "before" if "before" in baseline.aggregate else baseline.states[0]
        value = baseline.aggregate[base_state][metric].mean
        fig.add_hline(y=value, line_dash="dot", line_color="grey", annotation_text="unedited")
    fig.update_layout(title=f"{metric} against the number of edits", xaxis_type="log",
                      xaxis_title="number of edits", yaxis_title=f"{metric} (x100, {convention}, 95% CI)",
                      legend_title="method")
    return fig


def case_shift(report: EditReport, metric: str = "EM") -> go.Figure:
    """Per case: ``metric`` before (x) vs after (y), one point per request, the diagonal dotted."""
    if not {"before", "after"} <= set(report.states):
        raise ValueError(f"case_shift needs a report with before and after states, got {report.states}")
    key = _PER_CASE_KEY.get(metric, metric)
    before = [row.get(key) for row in report.per_case["before"]]
    after = [row.get(key) for row in report.per_case["after"]]
    if any(v is None for v in before + after):
        raise ValueError(f"metric {metric!r} is not in every case; available: {sorted(report.per_case['after'][0])}")
    labels = [f"{c.subject} -> {c.target_new.strip()}" for c in report.cases]
    values = [v for v in before + after if v is not None]  # all of them (checked above)
    lo, hi = min(values), max(values)
    fig = go.Figure([go.Scatter(x=[lo, hi], y=[lo, hi], mode="lines", line=dict(dash="dot", color="grey"),
                                name="unchanged"),
                     go.Scatter(x=before, y=after, mode="markers", text=labels, name="case",
                                hovertemplate="%{text}<br>before %{x:.3f}<br>after %{y:.3f}")])
    fig.update_layout(title=f"{metric} per request, before vs after {report.method or 'the edit'}",
                      xaxis_title=f"{metric} before", yaxis_title=f"{metric} after")
    return fig


def comparison_figure(comparison: Comparison, columns: Sequence[str] = ("Score", "Efficacy", "Generalization",
                                                                          "Specificity")) -> go.Figure:
    """The keys-vs-values bar chart of a :class:`~kvlens.experiments.Comparison` (Qiu et al.'s columns).

    Fluency (GE, on another scale) is left out by default; pass ``("Fluency",)`` to plot it alone.
    """
    from kvlens.experiments import COLUMNS

    unknown = [c for c in columns if c not in COLUMNS]
    if unknown:
        raise ValueError(f"unknown columns {unknown}; choose from {list(COLUMNS)}")
    names = {f"{n} ({comparison.sides[n]})" if comparison.sides.get(n) else n: r
             for n, r in comparison.reports.items()}
    fig = method_comparison(names, [COLUMNS[c] for c in columns], baseline=comparison.baseline)
    conv = _convention_of([comparison.baseline, *comparison.reports.values()], [COLUMNS[c] for c in columns])
    kinds = set(conv.values())
    single = next(iter(kinds)) if len(kinds) == 1 else None  # one convention: named once, at the end
    named = [f"{c} = {COLUMNS[c]}" + ("" if single else f" ({conv.get(COLUMNS[c], 'n/a')})") for c in columns]
    fig.update_xaxes(ticktext=list(columns), tickvals=[COLUMNS[c] for c in columns],
                     title=", ".join(named) + (f" ({single} convention)" if single else ""))
    fig.update_layout(title=f"Keys vs values: {len(comparison.baseline.cases)} requests, {comparison.mode} edits")
    return fig


def scaling_figure(result: Scaling, metric: str = "ES") -> go.Figure:
    """The scaling curve of a :class:`~kvlens.experiments.Scaling` result, baseline dotted."""
    fig = scaling_curve(result.points, metric, baseline=result.baseline)
    fig.update_layout(title=f"{metric} against the number of {result.mode} edits")
    return fig


def _signed(e: Estimate) -> str:
    return f"{e.mean:+.1f} [{e.low:+.1f}, {e.high:+.1f}] (n={e.n}, {e.method})"


def difference_figure(differences: Mapping[str, Mapping[str, Estimate]], title: str = "key − value, same requests",
                      ) -> go.Figure:
    """Paired differences with their 95 % CIs, a marker per metric, one series per pair, zero marked.

    ``differences``: ``{pair name: {metric: Estimate}}``, e.g. from
    :func:`kvlens.experiments.paired_difference` (points x100). An interval that excludes 0 is a
    difference the sample decides; one that spans 0 is not.
    """
    if not differences or not any(differences.values()):
        raise BadInput("no differences to plot: pass {pair name: {metric: Estimate}}, "
                         "e.g. from kvlens.experiments.paired_difference")
    metrics = list(dict.fromkeys(m for d in differences.values() for m in d))
    traces = []
    for name, d in differences.items():
        est = [d.get(m) for m in metrics]
        traces.append(go.Scatter(
            name=name, y=metrics, x=[None if e is None else e.mean for e in est], mode="markers", orientation="h",
            error_x=dict(type="data", symmetric=False, array=[0 if e is None else e.high - e.mean for e in est],
                         arrayminus=[0 if e is None else e.mean - e.low for e in est]),
            hovertext=[f"{name}<br>{m}: " + ("n/a" if e is None else _signed(e)) for m, e in zip(metrics, est)],
            hoverinfo="text"))
    fig = go.Figure(traces)
    fig.add_vline(x=0, line_dash="dot", line_color="grey")
    fig.update_layout(title=title, xaxis_title="difference (points x100, paired bootstrap 95% CI)",
                      yaxis=dict(autorange="reversed"), legend_title="pair", scattermode="group",
                      height=max(320, 160 + 60 * len(metrics)))
    return fig
