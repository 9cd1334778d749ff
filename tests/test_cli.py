"""The README's main job: the `kvlens tour` command writes a self-contained report."""

from __future__ import annotations

import html
import re

import pytest

from kvlens import cli
from kvlens.views.report import Report, Section


def test_tour_writes_an_offline_report(embedded, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cli, "load", lambda name=None: embedded)
    # the defaults (exact trace, 10 facts) take minutes; the same code path on fewer cells and facts
    args = ["tour", "--out", str(tmp_path / "r.html"), "--layer", "5", "--trace", "approx", "--cases", "2"]
    assert cli.main(args) == 0
    assert "wrote" in capsys.readouterr().out
    page = (tmp_path / "r.html").read_text()
    assert "Paris" in page and "Inspect: key activations at layer 5" in page and "SmolLM2" in page
    assert page.count("plotly.js v") <= 2  # the library inlined once (its banner)
    assert not re.search(r"<script[^>]+src=", page)  # nothing fetched at view time
    text = html.unescape(re.sub(r"<[^>]+>", " ", page))
    # like with like: the same fine-tuning on keys and on values, ROME labelled as the reference beside them
    assert "Edit: ft (key weights)" in text and "Edit: ft (value weights)" in text and "reference" in text
    assert "fine-tune keys [keys]" in page and "fine-tune values [values]" in page
    # every abbreviation explained where it appears, the scored prompts listed, the edit state said
    for name in ("ES = efficacy success", "PS = paraphrase success", "NS = neighbourhood success",
                 "S = score", "EM = efficacy magnitude", "NM = neighbourhood magnitude", "CI = 95 %"):
        assert name in text, name
    assert "Evaluate: the prompts scored" in text and "The Eiffel Tower" in text
    assert "paraphrase" in text and "neighbour" in text and "edits applied" in text
    assert "2 case(s)" in text and "Evaluate: keys vs values compared" in text


def test_tour_defaults_are_the_exact_trace_on_enough_facts():
    args = cli._parser().parse_args(["tour"])
    assert (args.trace, args.samples, args.cases) == ("exact", 3, 10)


def test_help_is_readable_and_shows_defaults(capsys):
    for argv in (["--help"], ["tour", "--help"]):
        with pytest.raises(SystemExit):
            cli.main(argv)
        out = capsys.readouterr().out
        assert "``" not in out and ":func:" not in out  # no raw reST markup
    assert "(default: exact)" in out and "(default: 3)" in out and "(default: 10)" in out
    assert "(default: out/kvlens-" in out


def test_cached_load_shows_no_loading_bar(embedded, capfd):
    import kvlens

    capfd.readouterr()
    kvlens.load()  # the cached safetensors copy (the fixture made it)
    err = capfd.readouterr().err
    assert "%|" not in err and "Loading" not in err, err


def test_report_escapes_user_text_and_refuses_empty_or_unwritable(tmp_path):
    r = Report("<b>title</b>").add(Section("s", text="<script>alert(1)</script>"))
    page = r.to_html()
    assert "<script>alert(1)" not in page and "&lt;script&gt;alert(1)" in page
    with pytest.raises(ValueError, match="no sections"):
        Report("empty").save(tmp_path / "x.html")
    (tmp_path / "file").write_text("")
    with pytest.raises(OSError, match="cannot write the report"):
        r.save(tmp_path / "file" / "sub" / "r.html")


def test_cli_reports_bad_input_without_traceback(embedded, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cli, "load", lambda name=None: embedded)
    assert cli.main(["tour", "--layer", "99", "--out", str(tmp_path / "r.html")]) == 2
    assert "layer 99 is out of range" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["tour", "--cases", "0"])
    assert "--cases: must be an integer >= 1, got 0" in capsys.readouterr().err


def test_the_tours_facts_are_no_neighbours_of_each_other():
    """Edited together, no fact's paraphrase or neighbour may name another edited subject."""
    from kvlens.datasets import load_bundled, names_subject
    from kvlens.views.tour import DEFAULT_CASE, DEFAULT_CASES, find_case, independent_cases

    pool = load_bundled()
    cases = independent_cases(find_case(DEFAULT_CASE), pool, DEFAULT_CASES)
    assert cases[0].case_id == DEFAULT_CASE and len({c.case_id for c in cases}) == DEFAULT_CASES
    for a in cases:
        prompts = (*a.paraphrase_prompts, *a.neighborhood_prompts)
        assert not any(names_subject(p, b.subject) for b in cases if b is not a for p in prompts), a.case_id
    assert len({c.prompt for c in cases}) == DEFAULT_CASES  # ten relations, not ten of one kind
    # the bundled order alone would not do: its first facts are one relation's neighbours
    naive = [cases[0], *pool[: DEFAULT_CASES - 1]]
    assert any(b.subject in p for a in naive for b in naive if b is not a for p in a.neighborhood_prompts)
