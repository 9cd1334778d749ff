"""Corpora: bundled sample, local files, datasets, token windows."""

from __future__ import annotations

import gzip
import json

import pytest
import torch

from kvlens import corpus as kc
from tests.conftest import tiny


def test_bundled_sample_is_stable_english_text():
    c = kc.bundled()
    docs = list(c.texts())
    assert len(docs) == 106
    assert docs[0].startswith("Anarchism is a political philosophy")
    assert all("{{" not in d and "[[" not in d for d in docs)
    assert kc.bundled().id == c.id and c.id.startswith("bundled_enwiki_sample")
    assert sum(len(d) for d in docs) > 1_000_000


def test_head_cuts_documents_and_changes_id():
    c = kc.bundled()
    h = c.head(3)
    assert h.count() == 3 and list(h.texts()) == list(c.texts())[:3]
    assert h.id != c.id and h.id == c.head(3).id
    with pytest.raises(ValueError, match="max_documents must be positive"):
        c.head(0)


def test_from_files_plain_jsonl_gz_and_directory(tmp_path):
    (tmp_path / "b.txt").write_text("second file text")
    (tmp_path / "a.txt").write_text("first file text")
    lines = [json.dumps({"text": "json one"}), "", json.dumps({"text": "json two"})]
    (tmp_path / "c.jsonl").write_text("\n".join(lines))
    with gzip.open(tmp_path / "d.txt.gz", "wt") as f:
        f.write("gzipped text")
    c = kc.from_files(tmp_path)
    assert list(c.texts()) == ["first file text", "second file text", "json one", "json two", "gzipped text"]
    assert kc.from_files([tmp_path / "a.txt"]).name.startswith("files:a:")


def test_from_files_id_follows_content(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("one version")
    before = kc.from_files(f).id
    assert kc.from_files(f).id == before
    f.write_text("another version")
    assert kc.from_files(f).id != before


def test_from_files_bad_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        kc.from_files(tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match="empty"):
        kc.from_files(tmp_path / "empty.txt")
    (tmp_path / "blank.txt").write_text("  \n\n ")
    with pytest.raises(ValueError, match="only whitespace"):
        kc.from_files(tmp_path / "blank.txt")
    (tmp_path / "sub").mkdir()
    with pytest.raises(ValueError, match="is empty"):
        kc.from_files(tmp_path / "sub")
    with pytest.raises(ValueError, match="at least one path"):
        kc.from_files([])


def test_from_datasets_local_builder_and_column_check(tmp_path):
    data = tmp_path / "rows.jsonl"
    data.write_text("\n".join(json.dumps({"text": t, "n": i}) for i, t in enumerate(["alpha", "beta"])))
    c = kc.from_datasets("json", data_files=str(data), cache_dir=str(tmp_path / "cache"))
    assert list(c.texts()) == ["alpha", "beta"] and c.name.startswith("hf:json::train:text:")
    with pytest.raises(ValueError, match="no column 'body'.*columns are"):
        kc.from_datasets("json", data_files=str(data), column="body", cache_dir=str(tmp_path / "cache"))


def test_from_datasets_fails_fast_without_hub(monkeypatch):
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    with pytest.raises(ConnectionError, match="cannot reach the Hugging Face hub.*bundled"):
        kc.from_datasets("someone/some-dataset")


def test_token_windows_cover_each_document_in_order(tmp_path):
    model = tiny("gpt2")
    (tmp_path / "a.txt").write_text("abcdefghij")  # 10 tokens with the byte tokenizer
    (tmp_path / "b.txt").write_text("xyz")
    c = kc.from_files(tmp_path)
    windows = list(kc.token_windows(model, c, window=4))
    assert [len(w) for w in windows] == [4, 4, 2, 3]  # "ij" kept (>= min_tokens), "xyz" whole
    flat = [t for w in windows[:3] for t in w]
    assert flat == model.tokenizer("abcdefghij", add_special_tokens=False)["input_ids"]
    capped = list(kc.token_windows(model, c, window=4, max_tokens=6))
    assert sum(len(w) for w in capped) == 6


def test_token_windows_start_with_model_prefix(embedded):
    c = kc.bundled().head(1)
    w = next(kc.token_windows(embedded, c, window=16))
    head = kc.head_ids(embedded)
    assert head == [embedded.tokenizer.convert_tokens_to_ids("<|endoftext|>")]
    assert w[: len(head)] == head and len(w) == 16 + len(head)


def test_batches_are_right_padded(tmp_path):
    model = tiny("llama")
    (tmp_path / "a.txt").write_text("abcdefghij")
    batches = list(kc.batches(model, kc.from_files(tmp_path), batch_size=2, window=4))
    assert [len(b) for b in batches] == [2, 1]
    b0, b1 = batches
    assert b0.attention_mask.tolist() == [[1, 1, 1, 1], [1, 1, 1, 1]]
    assert b1.lengths.tolist() == [2] and b1.input_ids.dtype == torch.long
    with pytest.raises(ValueError, match="batch_size"):
        next(kc.batches(model, kc.from_files(tmp_path), batch_size=0))
    with pytest.raises(ValueError, match="window"):
        next(kc.token_windows(model, kc.from_files(tmp_path), window=0))
