"""The README's main job: the `kvlens tour` command writes a self-contained report."""

from __future__ import annotations

import re

import pytest

from kvlens import cli
from kvlens.views.report import Report, Section


def test_tour_writes_an_offline_report(embedded, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cli, "load", lambda name=None: embedded)
    assert cli.main(["tour", "--out", str(tmp_path / "r.html"), "--layer", "5"]) == 0
    assert "wrote" in capsys.readouterr().out
    page = (tmp_path / "r.html").read_text()
    assert "Paris" in page and "Inspect: key activations at layer 5" in page and "SmolLM2" in page
    assert page.count("plotly.js v") <= 2  # the library inlined once (its banner)
    assert not re.search(r"<script[^>]+src=", page)  # nothing fetched at view time


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
