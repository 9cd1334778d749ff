"""Task tuning (Qiu et al. 2024 §4): presets, targets from the registry, tasks and their checks,
scoring, the memory plan, and a tuning run that leaves the model bit-identical (tiny models)."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from conftest import TINY_CONFIGS, CharTokenizer, tiny

import kvlens as kv
from kvlens.metrics import wilson
from kvlens.tuning import Task, TuneHParams, lora_targets
from kvlens.tuning.score import macro_f1, match_label, score_task
from kvlens.tuning.train import VARIANTS, BatchPlan, check_variants, plan_batch


def parity(n_train: int = 24, n_test: int = 12, template: str = "even or odd? {text} =") -> Task:
    def lab(i: int) -> str:
        return "even" if i % 2 == 0 else "odd"

    return Task("parity", template, ("even", "odd"), [(str(i), lab(i)) for i in range(n_train)],
                [(str(i), lab(i)) for i in range(100, 100 + n_test)])


def test_qiu_preset_is_the_released_settings():
    hp = TuneHParams.preset("qiu2024")
    assert (hp.rank, hp.alpha, hp.dropout, hp.lr, hp.schedule, hp.warmup_ratio, hp.max_grad_norm, hp.epochs) == \
        (8, 16.0, 0.1, 2e-4, "constant", 0.03, 0.3, 5.0)
    assert hp.quantize is None and hp.effective_batch == 64
    q = TuneHParams.preset("qiu2024-4bit")
    assert q.quantize == "nf4" and (q.batch_size, q.grad_accum) == (32, 2)
    assert TuneHParams.preset("qiu2024", epochs=1).epochs == 1
    with pytest.raises(ValueError, match="unknown task-tuning preset"):
        TuneHParams.preset("qiu")
    for bad in (dict(rank=0), dict(dropout=1.0), dict(schedule="warm"), dict(loss_on="prompt"), dict(quantize="int8"),
                dict(lr=0)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            TuneHParams(**bad)


@pytest.mark.parametrize("family", ["gpt2", "gptj", "gpt_neox", "llama"])
def test_targets_come_from_the_registry_and_exist(family):
    model = tiny(family)
    modules = dict(model.hf.named_modules())
    spec = model.spec
    for variant in check_variants(model, None):
        names = lora_targets(model, variant)
        assert names and all(n in modules for n in names)
        assert len(names) == model.n_layers * (len(spec.attn_lora) + len(VARIANTS[variant]))
    keys = set(lora_targets(model, "+keys")) - set(lora_targets(model, "q,v"))
    values = set(lora_targets(model, "+values")) - set(lora_targets(model, "q,v"))
    assert all(n.endswith("." + spec.key) for n in keys) and all(n.endswith("." + spec.value) for n in values)
    if not spec.gated:
        assert "+gate" not in check_variants(model, None)
        with pytest.raises(ValueError, match="gated FFN"):
            check_variants(model, ["+gate"])
    with pytest.raises(ValueError, match="unknown tuning variant"):
        check_variants(model, ["keys"])


def test_every_llama_like_family_names_its_attention_targets():
    for family in TINY_CONFIGS:
        spec = kv.get_arch(family)
        assert spec.attn_lora, family


# ---- tasks and their bad input -----------------------------------------------------------------------
def test_task_bad_input_is_named_before_any_work():
    with pytest.raises(ValueError, match="train split is empty"):
        Task("t", "even or odd? {text}", ("even", "odd"), [], [("1", "odd")])
    with pytest.raises(ValueError, match="test split is empty"):
        Task("t", "even or odd? {text}", ("even", "odd"), [("1", "odd"), ("2", "even")], [])
    with pytest.raises(ValueError, match=r"labels \['odd'\] are not named in the prompt"):
        Task("t", "is it even? {text}", ("even", "odd"), [("1", "odd")], [("1", "odd")])
    with pytest.raises(ValueError, match="outside the label set"):
        Task("t", "even or odd? {text}", ("even", "odd"), [("1", "odd"), ("2", "even"), ("3", "prime")], [("1", "odd")])
    with pytest.raises(ValueError, match="never occur in the train split"):
        Task("t", "even or odd? {text}", ("even", "odd"), [("1", "odd")], [("2", "even")])
    with pytest.raises(ValueError, match="more than once"):
        Task("t", "even or Even? {text}", ("even", "Even"), [("1", "even")], [("2", "even")])
    with pytest.raises(ValueError, match="exactly once"):
        Task("t", "even or odd?", ("even", "odd"), [("1", "odd")], [("2", "even")])
    with pytest.warns(UserWarning, match="unbalanced"):
        Task("t", "even or odd? {text}", ("even", "odd"), [("2", "even")] * 10 + [("1", "odd")], [("1", "odd")])


class MergingTokenizer(CharTokenizer):
    """Bytes, except that ``"= e"`` becomes one token (as BPE merges across a prompt's end)."""

    MERGED = 127

    def __call__(self, text, add_special_tokens=True, **kw):
        parts = text.split("= e")
        ids: list[int] = []
        for i, part in enumerate(parts):
            if i:
                ids.append(self.MERGED)
            ids += super().__call__(part)["input_ids"]
        return {"input_ids": ids}


def test_labels_the_tokenizer_splits_differently_after_the_prompt_are_named():
    model = kv.wrap(tiny_hf_llama(), MergingTokenizer())
    with pytest.raises(ValueError, match=r"label 'even' tokenizes as .* on its own but as .* after the prompt"):
        kv.tune_keys_vs_values(model, [parity()], hparams="cpu-small")
    model = tiny("llama")  # a prefix clash: 'odd' is a token prefix of 'odder'
    task = Task("t", "odd or odder? {text} =", ("odd", "odder"), [("1", "odd"), ("2", "odder")], [("3", "odd")])
    with pytest.raises(ValueError, match="token prefix"):
        kv.tune_keys_vs_values(model, [task])


def tiny_hf_llama():
    from conftest import tiny_hf

    return tiny_hf("llama")


def test_bundled_tasks_load_balanced_and_distinct():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the bundled splits are balanced enough to raise no warning
        tasks = kv.tuning.load_bundled_tasks()
    assert [t.name for t in tasks] == ["sentiment", "continent", "parity", "animal_class"]
    for t in tasks:
        assert len(t.train) >= 150 and len(t.test) >= 60
        assert not {e.text for e in t.train} & {e.text for e in t.test}  # no input in both splits
    sub = tasks[2].subset(train=10, test=4)
    assert len(sub.train) == 10 and set(sub.counts("train").values()) == {5}
    with pytest.raises(ValueError, match="unknown bundled tasks"):
        kv.tuning.load_bundled_tasks(["boolq"])


def test_hub_tasks_fail_fast_offline_and_convert_rows(monkeypatch):
    import huggingface_hub

    from kvlens.datasets import DatasetUnavailableError
    from kvlens.tuning.hub import HUB_TASKS, load_hub_task
    from kvlens.tuning.tasks import check_labels

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)

    def unreachable(self, *a, **k):
        raise ConnectionError("no network")

    monkeypatch.setattr(huggingface_hub.HfApi, "dataset_info", unreachable)
    with pytest.raises(DatasetUnavailableError, match="load_bundled_tasks"):
        load_hub_task("boolq")
    with pytest.raises(ValueError, match="unknown hub task"):
        load_hub_task("sst2")
    assert set(HUB_TASKS) == {"boolq", "COPA", "CB", "race_high", "QNLI", "20_newsgroups"}
    rows = {"boolq": {"question": "is it?", "passage": "It is.", "answer": True},
            "COPA": {"premise": "P", "choice1": "a", "choice2": "b", "question": "cause", "label": 1},
            "CB": {"premise": "P", "hypothesis": "H", "label": 2},
            "race_high": {"article": "A", "question": "Q", "options": ["w", "x", "y", "z"], "answer": "C"},
            "QNLI": {"question": "Q", "sentence": "S", "label": 1},
            "20_newsgroups": {"text": "orbit", "label": "sci.space"}}
    expect = {"boolq": "true", "COPA": "Choice2", "CB": "neutral", "race_high": "C", "QNLI": "not_entailment",
              "20_newsgroups": "sci.space"}
    for name, spec in HUB_TASKS.items():
        check_labels(name, spec.labels, spec.template)
        text, label = spec.convert(rows[name], spec.labels)
        assert label == expect[name] and text and "{text}" in spec.template


# ---- scoring -------------------------------------------------------------------------------------------
def test_answers_match_labels_at_a_word_boundary():
    labels = ("North America", "Asia", "odd", "odder")
    assert match_label(" North America\n", labels) == "North America"
    assert match_label(" asia.", labels) == "Asia"
    assert match_label(" odder", labels) == "odder" and match_label(" odd!", labels) == "odd"
    assert match_label(" oddly", labels) is None and match_label(" Europe", labels) is None


def test_wilson_and_macro_f1_match_hand_computed_values():
    est = wilson(8, 10, "task")  # Wilson 1927: 0.8, n 10 -> [0.490, 0.943]
    assert est.mean == pytest.approx(80.0) and est.low == pytest.approx(49.02, abs=0.01)
    assert est.high == pytest.approx(94.33, abs=0.01) and est.method == "wilson"
    assert wilson(0, 5, "task").low == 0.0 and wilson(5, 5, "task").high == pytest.approx(100.0)
    gold, pred = np.array([0, 0, 1, 1, 2]), np.array([0, 1, 1, -1, 2])
    # class 0: tp1 fp0 fn1 -> 2/3; class 1: tp1 fp1 fn1 -> 1/2; class 2: 1
    assert macro_f1(gold, pred, 3) == pytest.approx((2 / 3 + 1 / 2 + 1) / 3)
    task = parity(4, 4)
    s = score_task(task, [" even", " odd", " odd", " banana"], n_boot=200)  # gold: even odd even odd
    assert s.gold == ["even", "odd", "even", "odd"] and s.invalid == 1
    assert s.accuracy.mean == pytest.approx(50.0)
    assert s.f1 == pytest.approx({"even": 2 / 3, "odd": 1 / 2})  # odd: tp 1, fp 1, fn 1
    assert s.macro_f1.low <= s.macro_f1.mean <= s.macro_f1.high
    with pytest.raises(ValueError, match="3 answers for 4"):
        score_task(task, [" even"] * 3)


# ---- memory plan ---------------------------------------------------------------------------------------
def test_a_batch_over_the_memory_budget_is_chosen_down_and_said():
    model = tiny("llama")
    hp = TuneHParams.preset("qiu2024")
    assert plan_batch(model, hp, 32, memory=2**34) == BatchPlan(4, 16)
    from kvlens.tuning.train import bytes_per_example

    per = bytes_per_example(model, 32)
    with pytest.warns(UserWarning, match=r"using batch 2 with 32 accumulation steps \(effective batch 64"):
        plan = plan_batch(model, hp, 32, memory=2 * per + 1)
    assert (plan.batch_size, plan.grad_accum) == (2, 32) and "over the memory budget" in plan.note
    with pytest.raises(ValueError, match="more than the memory budget"):
        plan_batch(model, hp, 32, memory=per - 1)


# ---- a tuning run ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tuned():
    model = tiny("llama")
    before = {k: v.clone() for k, v in model.hf.state_dict().items()}
    result = kv.tune_keys_vs_values(model, [parity()], variants=["q,v", "+keys"], hparams="cpu-small", epochs=1,
                                    n_boot=100, progress=False)
    return model, before, result


def test_tuning_leaves_the_model_bit_identical(tuned):
    model, before, result = tuned
    after = model.hf.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not model.hf.training and not any(p.requires_grad for p in model.hf.parameters())
    assert not hasattr(model.hf, "peft_config")
    assert not any("lora" in n for n, _ in model.hf.named_modules())


def test_tuning_result_table_and_logs(tuned):
    model, _, result = tuned
    assert result.rows == ("untuned", "q,v", "+keys")
    table = result.table()
    assert len(table) == 3 * 2 and {r["task"] for r in table} == {"parity", "overall"}
    for r in table:
        assert r["n"] == 12 and r["accuracy_low"] <= r["accuracy"] <= r["accuracy_high"]
        assert r["macro_f1_low"] <= r["macro_f1"] <= r["macro_f1_high"]
    for v in ("q,v", "+keys"):
        assert result.logs[v]["steps"] == 3 and math.isfinite(result.logs[v]["train_loss"])
    assert len(result.targets["+keys"]) == len(result.targets["q,v"]) + model.n_layers
    assert "accuracy" in result.summary() and result.to_dict()["hparams"]["rank"] == 8


def test_tuning_changes_answers_only_while_adapters_are_in(tuned):
    """Tuned logits differ from untuned ones (the adapters trained), and the model answers as before afterwards."""
    from kvlens.tuning.score import greedy_answers
    from kvlens.tuning.train import adapters, train, training_rows

    model, _, result = tuned
    task = parity()
    hp = TuneHParams.preset("cpu-small", epochs=1)
    prompts = model.tokenize([task.prompt(e.text) for e in task.test])
    base = kv.tracing.run(model, prompts, read=[kv.Site("logits")])[kv.Site("logits")]
    with adapters(model, lora_targets(model, "+values"), hp):
        train(model, training_rows(model, [task], hp), hp, BatchPlan(8, 1), progress=False)
        tuned_logits = kv.tracing.run(model, prompts, read=[kv.Site("logits")])[kv.Site("logits")]
    assert not torch.allclose(base, tuned_logits)
    again = kv.tracing.run(model, prompts, read=[kv.Site("logits")])[kv.Site("logits")]
    assert torch.equal(base, again)
    assert greedy_answers(model, task, task.test, hp=hp) == result.scores["untuned"]["parity"].answers


def test_a_failed_training_still_removes_the_adapters(monkeypatch):
    from kvlens.tuning import compare

    model = tiny("gpt2")
    before = {k: v.clone() for k, v in model.hf.state_dict().items()}

    def boom(*a, **k):
        raise RuntimeError("interrupted")

    monkeypatch.setattr(compare, "train", boom)
    with pytest.raises(RuntimeError, match="interrupted"):
        kv.tune_keys_vs_values(model, [parity()], variants=["+keys"], baseline=False, progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.hf.state_dict().items())
    assert not any("lora" in n for n, _ in model.hf.named_modules())


def test_figure_and_report_section(tuned):
    from kvlens.views.renderers import to_sections
    from kvlens.views.tuning_figures import tuning_bars

    _, _, result = tuned
    fig = tuning_bars(result, "macro_f1")
    assert [t.name for t in fig.data] == ["untuned", "q,v", "+keys"]
    assert list(fig.data[1].x) == ["parity", "overall"]
    with pytest.raises(ValueError, match="metric"):
        tuning_bars(result, "f1")
    (section,) = to_sections(result)
    assert section.table and len(section.all_figures()) == 2 and section.params["hparams"]["rank"] == 8


def test_four_bit_option_trains_a_quantized_copy_and_leaves_the_model_alone():
    pytest.importorskip("bitsandbytes")
    from kvlens.tuning.train import quantized_copy

    model = tiny("llama")
    before = {k: v.clone() for k, v in model.hf.state_dict().items()}
    with quantized_copy(model) as copy:
        kinds = {type(m).__name__ for m in copy.hf.modules()}
        assert "Linear4bit" in kinds and copy.prefix == model.prefix
        assert copy.hf.get_submodule(lora_targets(copy, "+keys")[-1]).weight.quant_type == "nf4"
    hp = TuneHParams.preset("qiu2024-4bit", epochs=1, batch_size=8, grad_accum=1)
    result = kv.tune_keys_vs_values(model, [parity()], variants=["+keys"], hparams=hp, baseline=False,
                                    n_boot=20, progress=False)
    assert result.rows == ("+keys",) and result.logs["+keys"]["steps"] == 3
    assert all(torch.equal(before[k], v) for k, v in model.hf.state_dict().items())
    assert "Linear4bit" not in {type(m).__name__ for m in model.hf.modules()}
