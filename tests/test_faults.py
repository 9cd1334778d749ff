"""Fault injection: hostile but realistic inputs get a clear kvlens error (or the right result).

Each test reproduces a case that used to go silently wrong or end in a raw library exception
(issue 13): non-finite deltas, nested applies, over-long prompts, impossible statistics,
invisible subjects, typos in hyperparameters, truncated or foreign files and caches.
"""

from __future__ import annotations

import gzip
import json
import pickle
import warnings
from pathlib import Path

import pytest
import torch
from conftest import tiny

import kvlens
from kvlens import errors
from kvlens.editing import (
    MEMIT,
    ROME,
    AlphaEdit,
    AlphaEditHparams,
    Contexts,
    EditHistory,
    EditRequest,
    FineTune,
    MEMITHparams,
    Part,
    ROMEHparams,
    TargetOpt,
    WeightDelta,
)

REQ = EditRequest("{} lives in", "Alice", "Paris")
CTX = Contexts(n=1, tokens=2)
OPT = TargetOpt(steps=2)


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.hf.state_dict().items()}


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bytes of a tensor (NaN == NaN when the bits agree)."""
    return t.detach().contiguous().view(torch.uint8)


def same_bits(model, snap) -> bool:
    now = model.hf.state_dict()
    return all(torch.equal(bits(now[k]), bits(v)) for k, v in snap.items())


def make_delta(model, layer=1, seed=0, scale=0.1) -> WeightDelta:
    g = torch.Generator().manual_seed(seed)
    left = torch.randn(model.d_ff, 2, generator=g) * scale
    return WeightDelta.from_model(model, {(layer, "value"): Part(left, torch.randn(2, model.d_model, generator=g))},
                                  method="test", hparams={}, requests=[REQ])


def good_stats(model, layers):
    g = torch.Generator().manual_seed(0)
    k = torch.randn(4 * model.d_ff, model.d_ff, generator=g)
    return {l: k.T @ k / len(k) for l in layers}


def count_forwards(monkeypatch):
    """Count every forward through the seam (tracing.run and the raw HF model)."""
    calls = []
    from kvlens import tracing

    original = tracing.run

    def counted(*a, **k):
        calls.append(1)
        return original(*a, **k)

    monkeypatch.setattr(tracing, "run", counted)
    return calls


# ---- 1. non-finite deltas ------------------------------------------------------------------------
def test_non_finite_part_refused():
    m = tiny("llama")
    left = torch.randn(m.d_ff, 1)
    left[3, 0] = float("nan")
    with pytest.raises(errors.BadInput, match="NaN or Inf"):
        Part(left, torch.randn(1, m.d_model))
    with pytest.raises(ValueError, match="NaN or Inf"):
        Part(torch.full((m.d_ff, m.d_model), float("inf")))


def test_nan_delta_file_refused_on_load(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    m = tiny("llama")
    path = tmp_path / "d.safetensors"
    make_delta(m).save(str(path))
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    tensors = {k: torch.full_like(v, float("nan")) for k, v in load_file(str(path)).items()}
    save_file(tensors, str(path), metadata=meta)  # valid metadata, matching fingerprint
    snap = snapshot(m)
    with pytest.raises(errors.CorruptFile, match="NaN or Inf"):
        WeightDelta.load(str(path), m)
    assert same_bits(m, snap)


def test_non_finite_change_refused_on_apply_model_untouched():
    m = tiny("llama")
    snap = snapshot(m)
    d = make_delta(m)
    d.parts[(1, "value")].left[0, 0] = float("nan")  # tensors are mutable after construction
    with pytest.raises(errors.BadInput, match="NaN or Inf"):
        d.apply(m)
    assert same_bits(m, snap) and not d.is_applied(m)


def test_overflow_to_inf_in_half_precision_refused():
    m = tiny("llama")
    m.hf.half()
    snap = snapshot(m)
    d = make_delta(m, scale=1e6)  # finite in float32, beyond float16's range once added
    with pytest.raises(errors.BadInput, match="overflow"):
        d.apply(m)
    assert same_bits(m, snap)


def test_revert_is_not_blocked_by_nan_already_in_the_weight():
    m = tiny("llama")
    with torch.no_grad():
        m.projection(1, "value").weight[0, 0] = float("nan")  # the user's weight, not ours
    snap = snapshot(m)
    d = make_delta(m)
    d.apply(m)
    d.revert()  # NaN != NaN must not read as "changed after this edit was applied"
    assert same_bits(m, snap) and not d.is_applied(m)


# ---- 2. nested and interleaved applies -------------------------------------------------------------
def test_apply_inside_applied_block_survives_its_exit():
    m = tiny("llama")
    snap = snapshot(m)
    a, b = make_delta(m, seed=0), make_delta(m, seed=1)
    with b.applied(m):
        only_b = snapshot(m)
    with a.applied(m):
        b.apply(m, force=True)
    assert not a.is_applied(m) and b.is_applied(m)
    assert same_bits(m, only_b)  # B's change is still there, A's is gone: is_applied tells the truth
    b.revert()
    assert same_bits(m, snap) and not b.is_applied(m)


def test_interleaved_reverts_compose():
    m = tiny("gpt2")
    snap = snapshot(m)
    a, b = make_delta(m, seed=0), make_delta(m, seed=1)
    with b.applied(m):
        only_b = snapshot(m)
    ha = a.apply(m)
    hb = b.apply(m, force=True)
    ha.revert()  # the older edit first: B stays, exactly as if it had been applied alone
    assert same_bits(m, only_b) and hb.active and b.is_applied(m)
    hb.revert()
    assert same_bits(m, snap)


def test_history_survives_an_edit_reverted_by_hand():
    m = tiny("llama")
    snap = snapshot(m)
    h = EditHistory(m)
    h1 = h.push(make_delta(m, seed=0))
    h.push(make_delta(m, seed=1), force=True)
    h1.revert()
    h.undo_all()
    assert same_bits(m, snap) and len(h) == 0


def test_weight_changed_outside_kvlens_still_refuses_revert():
    m = tiny("llama")
    d = make_delta(m)
    handle = d.apply(m)
    with torch.no_grad():
        m.projection(1, "value").weight.add_(1.0)
    with pytest.raises(errors.EditStateError, match="changed after this edit"):
        handle.revert()
    assert d.is_applied(m)
    handle.revert(force=True)
    assert not d.is_applied(m)


# ---- 3. prompt length ---------------------------------------------------------------------------------
def test_subject_longer_than_position_limit_refused_before_any_work(monkeypatch):
    m = tiny("gpt2")  # n_positions = 64
    calls = count_forwards(monkeypatch)
    req = EditRequest("{} lives in", "A" * 80, "Paris")
    with pytest.raises(errors.PromptTooLong, match="64"):
        ROME(ROMEHparams(layer=1, opt=OPT, contexts=CTX)).compute(m, [req], stats=good_stats(m, [1]))
    with pytest.raises(ValueError, match="position limit"):
        FineTune(layers=(1,), steps=1).compute(m, [req])
    assert calls == []


def test_context_prefix_pushing_past_the_limit_refused_before_optimising(monkeypatch):
    import kvlens.editing.rome as rome

    m = tiny("gpt2")
    req = EditRequest("{} lives in", "B" * 40, "Paris")  # 40 + 9 + target fits alone, not with 30 prefix tokens
    monkeypatch.setattr(rome, "optimise_targets", lambda *a, **k: pytest.fail("optimised a prompt that cannot fit"))
    with pytest.raises(errors.PromptTooLong, match="context prefix"):
        ROME(ROMEHparams(layer=1, opt=OPT, contexts=Contexts(n=2, tokens=30))).compute(
            m, [req], stats=good_stats(m, [1]), report=False)


def test_evaluation_refuses_an_over_long_prompt_before_scoring(monkeypatch):
    m = tiny("gpt2")
    calls = count_forwards(monkeypatch)
    with pytest.raises(errors.PromptTooLong, match="64"):
        kvlens.evaluate(m, [EditRequest("{} lives in", "C" * 70, "Paris")])
    assert calls == []


# ---- 4. statistics that cannot be E[kkᵀ] ----------------------------------------------------------------
@pytest.mark.parametrize("bad, message", [
    ("negative", "positive semi-definite"),
    ("asymmetric", "symmetric"),
    ("singular", "singular"),
])
def test_impossible_statistics_refused_before_optimising(monkeypatch, bad, message):
    import kvlens.editing.rome as rome

    m = tiny("llama")
    C = good_stats(m, [1])[1]
    C = {"negative": -torch.eye(m.d_ff), "asymmetric": C + torch.triu(torch.ones_like(C)),
         "singular": torch.diag(torch.cat([torch.ones(m.d_ff - 3), torch.zeros(3)]))}[bad]
    monkeypatch.setattr(rome, "optimise_targets", lambda *a, **k: pytest.fail("optimised with bad statistics"))
    with pytest.raises(errors.BadStatistics, match=message) as info:
        ROME(ROMEHparams(layer=1, opt=OPT, contexts=CTX)).compute(m, [REQ], stats={1: C}, report=False)
    assert "n_tokens" in str(info.value) or "second moment" in str(info.value)


def test_memit_refuses_singular_statistics_alphaedit_accepts_them(monkeypatch):
    m = tiny("llama")
    singular = torch.diag(torch.cat([torch.ones(m.d_ff - 3), torch.zeros(3)]))
    with pytest.raises(errors.BadStatistics, match="singular"):
        MEMIT(MEMITHparams(layers=(1,), lam=1.0, opt=OPT, contexts=CTX)).compute(
            m, [REQ], stats={1: singular}, report=False)
    with pytest.raises(errors.BadStatistics, match="positive semi-definite"):
        AlphaEdit(AlphaEditHparams(layers=(1,), opt=OPT, contexts=CTX)).compute(
            m, [REQ], stats={1: -torch.eye(m.d_ff)}, report=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        delta = AlphaEdit(AlphaEditHparams(layers=(1,), opt=OPT, contexts=CTX, nullspace_threshold=0.5)).compute(
            m, [REQ], stats={1: singular}, report=False)
    assert delta.norms()["1.value"] > 0


# ---- 5. invisible subjects, empty files ------------------------------------------------------------------
@pytest.mark.parametrize("subject", ["\u200b", "\u200b\u200c ", "\u00a0\t", "\ufeff"])
def test_invisible_subject_refused(subject):
    with pytest.raises(errors.BadInput, match="visible"):
        EditRequest("{} lives in", subject, "Paris")
    with pytest.raises(ValueError, match="visible"):
        kvlens.datasets.EvalCase(0, "{} lives in", subject, " Paris")


def test_invisible_target_refused():
    with pytest.raises(errors.BadInput, match="visible"):
        EditRequest("{} lives in", "Alice", "\u200b")


def test_subject_whose_tokens_show_nothing_refused():
    m = tiny("llama")  # the test tokenizer turns '~' into an unprintable control character
    with pytest.raises(errors.BadInput, match="nothing visible"):
        kvlens.prompts.subject_span(m, "{} lives in", "~~")


def test_load_json_refuses_empty_file_and_empty_list(tmp_path):
    (tmp_path / "empty.json").write_text("")
    (tmp_path / "blank.json").write_text("  \n")
    (tmp_path / "list.json").write_text("[]")
    for name in ("empty.json", "blank.json"):
        with pytest.raises(errors.CorruptFile, match="empty"):
            kvlens.load_json(tmp_path / name)
    with pytest.raises(errors.CorruptFile, match="no records"):
        kvlens.load_json(tmp_path / "list.json")


# ---- 6. unclear errors -------------------------------------------------------------------------------------
def test_hparam_typo_fails_at_construction_with_suggestion():
    with pytest.raises(errors.BadHparams, match="did you mean 'layer'"):
        ROME(layr=7)
    with pytest.raises(TypeError, match="did you mean 'layers'"):
        MEMIT(layer=(1, 2))
    with pytest.raises(TypeError, match="did you mean 'steps'"):
        FineTune(stepz=3)
    with pytest.raises(errors.BadHparams, match="nullspace_threshold"):
        AlphaEdit(null_space_threshold=0.1)
    ROME(layer=3)  # real fields still pass


def _rewrite_meta(path: Path, raw: str | None):
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(path))
    save_file(tensors, str(path), metadata=None if raw is None else {"kvlens": raw})


def test_delta_metadata_not_json_or_missing_field(tmp_path):
    m = tiny("llama")
    path = tmp_path / "d.safetensors"
    make_delta(m).save(str(path))
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["kvlens"])
    _rewrite_meta(path, "{not json")
    with pytest.raises(errors.CorruptFile, match="not valid JSON"):
        WeightDelta.load(str(path))
    for field in ("base", "method", "requests"):
        _rewrite_meta(path, json.dumps({k: v for k, v in meta.items() if k != field}))
        with pytest.raises(errors.CorruptFile, match=f"'{field}'"):
            WeightDelta.load(str(path))
    _rewrite_meta(path, json.dumps({**meta, "requests": [{"prompt": "x"}]}))
    with pytest.raises(errors.CorruptFile, match="request"):
        WeightDelta.load(str(path))


def test_save_into_missing_folder(tmp_path):
    m = tiny("llama")
    target = tmp_path / "nope" / "d.safetensors"
    with pytest.raises(errors.MissingFolder, match="does not exist"):
        make_delta(m).save(str(target))
    with pytest.raises(FileNotFoundError, match="nope"):
        kvlens.datasets.save_json(kvlens.load_bundled(1), target.with_suffix(".json"))
    assert not (tmp_path / "nope").exists()


def test_delta_save_writes_through_a_temporary_file(tmp_path, monkeypatch):
    import safetensors.torch

    m = tiny("llama")
    seen = []
    original = safetensors.torch.save_file
    monkeypatch.setattr(safetensors.torch, "save_file", lambda t, p, metadata=None: (seen.append(p),
                                                                                     original(t, p, metadata)))
    make_delta(m).save(str(tmp_path / "d.safetensors"))
    assert seen and Path(seen[0]).name != "d.safetensors" and Path(seen[0]).parent == tmp_path
    assert [p.name for p in tmp_path.iterdir()] == ["d.safetensors"]


def test_kvlens_cache_pointing_at_a_file(tmp_path, monkeypatch):
    f = tmp_path / "cachefile"
    f.write_text("x")
    monkeypatch.setenv("KVLENS_CACHE", str(f))
    with pytest.raises(errors.CacheLocationError, match="KVLENS_CACHE"):
        kvlens.cache_dir()


@pytest.fixture()
def fake_copy(tmp_path, monkeypatch):
    """A converted-model cache folder (tiny llama) where kvlens.load() looks for the embedded copy."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from kvlens.models import loading

    monkeypatch.setenv("KVLENS_CACHE", str(tmp_path / "cache"))
    folder = loading.embedded_dir()
    cfg = AutoConfig.for_model("llama", num_hidden_layers=1, hidden_size=16, num_attention_heads=2,
                               num_key_value_heads=1, intermediate_size=32, vocab_size=64, head_dim=8)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(folder)
    (folder / "tokenizer.json").write_text(json.dumps({"version": "1.0"}))
    loading.write_manifest(folder)
    return folder


def test_truncated_converted_model_cache_names_file_and_fix(fake_copy):
    from kvlens.models import loading

    loading.verify_copy(fake_copy)  # intact
    weights = fake_copy / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(errors.CorruptCache) as info:
        kvlens.load()
    msg = str(info.value)
    assert "model.safetensors" in msg and "delete" in msg and str(fake_copy) in msg and "cache" in msg


def test_converted_copy_of_wrong_size_refused_by_manifest(fake_copy):
    from kvlens.models import loading

    with open(fake_copy / "tokenizer.json", "a") as f:
        f.write(" ")  # still valid JSON, but not the file written at conversion
    with pytest.raises(errors.CorruptCache, match="tokenizer.json"):
        loading.verify_copy(fake_copy)


def test_garbage_config_in_cache_does_not_send_user_online(fake_copy):
    (fake_copy / "config.json").write_text("\x00garbage{")
    with pytest.raises(errors.CorruptCache) as info:
        kvlens.load()
    msg = str(info.value)
    assert "config.json" in msg and "delete" in msg
    assert "offline" not in msg and "hub" not in msg


def test_unknown_model_type_gives_kvlens_registry_message(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "not_a_family", "architectures": ["X"]}))
    (tmp_path / "model.safetensors").write_bytes(b"")
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(kvlens.UnknownArchitectureError, match="register_arch"):
        kvlens.load(tmp_path)
    (tmp_path / "config.json").write_text("{garbage")
    with pytest.raises(errors.CorruptFile, match="config.json"):
        kvlens.load(tmp_path)


def test_unknown_model_type_on_the_hub_refused_before_weights_are_fetched(monkeypatch):
    import transformers

    monkeypatch.setattr(transformers.PretrainedConfig, "get_config_dict",
                        classmethod(lambda cls, source, **kw: ({"model_type": "not_a_family"}, kw)))
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained",
                        lambda *a, **k: pytest.fail("weights fetched for an unknown family"))
    with pytest.raises(kvlens.UnknownArchitectureError, match="register_arch"):
        kvlens.load("some-org/some-model")


# ---- trigger caches --------------------------------------------------------------------------------------
TEXT = "The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs."


@pytest.fixture()
def mined(tmp_cache, tmp_path):
    from kvlens import corpus as kc
    from kvlens.memory import triggers

    m = tiny("llama", seed=3)
    (tmp_path / "a.txt").write_text(TEXT)
    corpus = kc.from_files(tmp_path / "a.txt")
    args = dict(n=3, window=16, max_tokens=None, progress=False)
    triggers.trigger_examples(m, [(1, 5)], corpus, **args)
    path = triggers._cache_path(m, corpus, 1, 3, 16, None)
    assert path.is_file()
    return m, corpus, args, path


def test_trigger_cache_round_trip_uses_no_pickle(mined):
    from kvlens.memory import triggers

    m, corpus, args, path = mined
    assert path.suffix == ".safetensors"
    again = triggers.trigger_examples(m, [(1, 5)], corpus, **args)
    assert again.from_cache


@pytest.mark.parametrize("fault", ["truncated", "foreign", "wrong_shape", "pickle", "altered"])
def test_bad_trigger_cache_refused_with_its_path(mined, fault):
    from safetensors.torch import load_file, save_file

    from kvlens.memory import triggers

    m, corpus, args, path = mined
    if fault == "truncated":
        path.write_bytes(path.read_bytes()[:40])
    elif fault == "foreign":
        save_file({"C": torch.eye(3)}, str(path))
    elif fault == "wrong_shape":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata()
        t = load_file(str(path))
        t = {k: v[:, :-1].contiguous() for k, v in t.items()}
        save_file(t, str(path), metadata={**meta, "sha256": triggers._digest(t)})
    elif fault == "altered":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata()
        t = load_file(str(path))
        t["values"][0, 0] += 1
        save_file(t, str(path), metadata=meta)
    else:
        path.write_bytes(pickle.dumps({"values": 1}))
    with pytest.raises(errors.CorruptCache) as info:
        triggers.trigger_examples(m, [(1, 5)], corpus, **args)
    assert str(path) in str(info.value) and "delete" in str(info.value)


def test_stats_cache_writers_use_their_own_temporary_files(tmp_path, monkeypatch):
    import safetensors.torch

    from kvlens.corpus import Corpus
    from kvlens.memory import stats

    seen = []
    original = safetensors.torch.save_file
    monkeypatch.setattr(safetensors.torch, "save_file",
                        lambda t, p, metadata=None: (seen.append(p), original(t, p, metadata)))
    path = tmp_path / "x" / "layer0.safetensors"
    corpus = Corpus("c", lambda: ["a"])
    stats._save_moment(path, torch.eye(4), 10, corpus)
    stats._save_moment(path, torch.eye(4), 10, corpus)
    assert len(set(seen)) == 2 and all(Path(p).parent == path.parent for p in seen)
    assert torch.equal(stats.load_moment(path), torch.eye(4))
    assert [p.name for p in path.parent.iterdir()] == ["layer0.safetensors"]


def test_stats_cache_is_a_kvlens_cache_error():
    from kvlens.memory.stats import StatsCacheError

    assert issubclass(StatsCacheError, errors.CorruptCache)


# ---- corpus and data files ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, content, message", [
    ("bin.txt", b"\x00\x01\x02\x00" * 10, "binary"),
    ("latin1.txt", "caf\u00e9 cr\u00e8me".encode("latin-1"), "UTF-8"),
    ("nofield.jsonl", b'{"body": "hello"}\n', "'text'"),
    ("notjson.jsonl", b"hello world\n", "line 1"),
    ("fake.txt.gz", b"this is not gzip at all", "gzip"),
])
def test_bad_corpus_files_refused_naming_the_file(tmp_path, name, content, message):
    from kvlens import corpus as kc

    (tmp_path / name).write_bytes(content)
    with pytest.raises(errors.CorruptFile, match=message) as info:
        kc.from_files(tmp_path / name)
    assert name in str(info.value)


@pytest.mark.parametrize("content, message", [
    (b"\x00\x00\x00\x00", "binary"),
    ("[{\"prompt\": \"caf\u00e9\"}]".encode("latin-1"), "UTF-8"),
    (b'[{"prompt": "{} x", "subject": "A"}]', "target_new"),
    (gzip.compress(b"[]"), "binary|UTF-8"),
])
def test_bad_data_files_refused_naming_the_file(tmp_path, content, message):
    path = tmp_path / "cases.json"
    path.write_bytes(content)
    with pytest.raises(errors.CorruptFile, match=message) as info:
        kvlens.load_json(path)
    assert "cases.json" in str(info.value)


def test_bad_reference_texts_file(tmp_path):
    path = tmp_path / "refs.json"
    path.write_bytes(b"\xff\xfe garbage")
    with pytest.raises(errors.CorruptFile, match="refs.json"):
        kvlens.load_reference_texts(path)
