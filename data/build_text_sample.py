"""Build data/text/enwiki_sample.jsonl.gz: plain text of the English Wikipedia excerpt in gensim's tests.

Source: ``gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2``
inside the gensim wheel on PyPI (a shortened 2016 English Wikipedia dump; text CC BY-SA 3.0).

    pip download --no-deps gensim -d /tmp/g
    python data/build_text_sample.py /tmp/g/gensim-*.whl

Articles in namespace 0 that are not redirects are kept; wiki markup (templates, tables, references,
files, categories, formatting) is stripped with regular expressions, headings become their own lines,
and one JSON line ``{"title": ..., "text": ...}`` is written per article. The output is deterministic
(gzip mtime 0), so rebuilding it gives the same bytes.
"""

from __future__ import annotations

import bz2
import gzip
import html
import io
import json
import re
import sys
import xml.etree.ElementTree as ET
import zipfile
from collections.abc import Iterator
from pathlib import Path

MEMBER = "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
OUT = Path(__file__).parent / "text" / "enwiki_sample.jsonl.gz"
MIN_CHARS = 200

_DROP_LINKS = re.compile(
    r"\[\[(?:File|Image|Category|Media|[a-z]{2,3}(?:-[a-z]+)?):[^\[\]]*(?:\[\[[^\]]*\]\][^\[\]]*)*\]\]",
    re.IGNORECASE)
_LINK = re.compile(r"\[\[(?:[^|\]]*\|)?([^\]]*)\]\]")
_EXTLINK = re.compile(r"\[(?:https?|ftp)://[^\s\]]+\s*([^\]]*)\]")
_REF = re.compile(r"<ref[^>/]*/>|<ref[^>]*>.*?</ref>", re.DOTALL | re.IGNORECASE)
_COMMENT = re.compile(r"<!--.*?-->", re.DOTALL)
_TAG_BLOCK = re.compile(r"<(math|gallery|timeline|code|source|syntaxhighlight|score)[^>]*>.*?</\1>",
                        re.DOTALL | re.IGNORECASE)
_TAG = re.compile(r"</?[a-zA-Z][^>]*>")
_HEADING = re.compile(r"^(=+)\s*(.*?)\s*\1\s*$", re.MULTILINE)
_QUOTES = re.compile(r"'{2,}")
_SPACES = re.compile(r"[ \t]+")


def _strip_nested(text: str, open_: str, close: str) -> str:
    """Remove every (possibly nested) ``open_ ... close`` span."""
    out, depth, i = [], 0, 0
    while i < len(text):
        if text.startswith(open_, i):
            depth, i = depth + 1, i + len(open_)
        elif depth and text.startswith(close, i):
            depth, i = depth - 1, i + len(close)
        else:
            if not depth:
                out.append(text[i])
            i += 1
    return "".join(out)


_FILE_START = re.compile(r"\[\[(?:File|Image|Media):", re.IGNORECASE)


def _strip_file_links(text: str) -> str:
    """Remove ``[[File:...]]`` links whose captions may hold nested ``[[...]]`` and stray brackets."""
    while (m := _FILE_START.search(text)) is not None:
        depth, i = 0, m.start()
        while i < len(text):
            if text.startswith("[[", i):
                depth, i = depth + 1, i + 2
            elif text.startswith("]]", i):
                depth, i = depth - 1, i + 2
                if depth == 0:
                    break
            else:
                i += 1
        text = text[: m.start()] + text[i:]
    return text


def clean(wikitext: str) -> str:
    """Plain prose from wiki markup."""
    text = _COMMENT.sub("", wikitext)
    text = _REF.sub("", text)
    text = _TAG_BLOCK.sub("", text)
    text = _strip_nested(text, "{{", "}}")
    text = _strip_nested(text, "{|", "|}")
    text = _DROP_LINKS.sub("", _strip_file_links(text))
    text = _LINK.sub(r"\1", _LINK.sub(r"\1", text))
    text = _EXTLINK.sub(r"\1", text)
    text = _TAG.sub("", html.unescape(text))
    text = _HEADING.sub(r"\2", _QUOTES.sub("", text))
    lines = []
    for line in text.splitlines():
        line = _SPACES.sub(" ", line).strip()
        if not line or line[0] in "*#:;|!" and len(line) < 3:
            continue
        lines.append(line.lstrip("*#:; ").strip())
    return "\n".join(l for l in lines if l)


def articles(xml_bytes: bytes) -> Iterator[tuple[str, str]]:
    """``(title, wikitext)`` of every non-redirect article in namespace 0."""
    for _, elem in ET.iterparse(io.BytesIO(xml_bytes)):
        if not elem.tag.endswith("}page"):
            continue
        ns = elem.findtext("{*}ns")
        title = elem.findtext("{*}title") or ""
        text = elem.findtext("{*}revision/{*}text") or ""
        redirect = elem.find("{*}redirect") is not None
        if ns == "0" and not redirect and not text.lstrip().upper().startswith("#REDIRECT"):
            yield title, text
        elem.clear()


def main(wheel: str) -> None:
    with zipfile.ZipFile(wheel) as zf:
        xml_bytes = bz2.decompress(zf.read(MEMBER))
    OUT.parent.mkdir(parents=True, exist_ok=True)
    n, chars = 0, 0
    with open(OUT, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="") as gz:
        for title, wikitext in articles(xml_bytes):
            text = clean(wikitext)
            if len(text) < MIN_CHARS:
                continue
            gz.write((json.dumps({"title": title, "text": text}, ensure_ascii=False) + "\n").encode())
            n, chars = n + 1, chars + len(text)
    print(f"wrote {OUT}: {n} articles, {chars} characters, {OUT.stat().st_size} bytes")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python data/build_text_sample.py path/to/gensim-*.whl")
    main(sys.argv[1])
