"""Causal tracing on tiny models: the fast exact mode equals ROME's per-cell procedure, and more."""

from __future__ import annotations

import hashlib
import math
import warnings

import pytest
import torch
from conftest import tiny

from kvlens.causal import noise_scale, rank_correlation, sever, suggest_edit_layers, trace, trace_many
from kvlens.causal.cells import KINDS, SEVERED, Cell, exact_scores, plain_scores, window_layers
from kvlens.causal.many import GROUPS
from kvlens.causal.setup import prepare
from kvlens.causal.severed import SeveredTrace
from kvlens.models.kvmodel import Site
from kvlens.tracing import run

PROMPT, SUBJECT = "ab {} xyz", "cd"


def sharp(model_type: str):
    """A float64 tiny model whose predictions are peaked enough for effects to show."""
    model = tiny(model_type)
    model.hf.double()
    model.unembedding.weight.data.mul_(40)
    return model


def weights_digest(model) -> str:
    h = hashlib.sha256()
    for name, p in sorted(model.hf.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().cpu().numpy().tobytes())
    return h.hexdigest()


def hook_count(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.hf.modules())


@pytest.mark.parametrize("family", ["llama", "gpt2", "gptj", "gpt_neox"])
def test_exact_mode_equals_the_plain_procedure(family):
    model = sharp(family)
    setup = prepare(model, PROMPT, SUBJECT, None, noise=1.0, samples=3, seed=0)
    cells = [Cell(k, layer, t) for k in KINDS + SEVERED for layer in range(model.n_layers)
             for t in range(setup.n_prompt)]
    stacked = plain_scores(model, setup, cells, window=2, per_forward=len(cells))  # ROME's writes, one forward
    exact = exact_scores(model, setup, cells, window=2, memory=400_000)  # small budget: several chunks
    assert (stacked - setup.low).abs().max() > 1e-7  # the comparison is not between constants
    assert (stacked.double() - exact).abs().max() < 1e-14


def test_stacked_cells_equal_one_forward_per_cell():
    model = sharp("llama")
    setup = prepare(model, PROMPT, SUBJECT, None, noise=1.0, samples=2, seed=0)
    cells = [Cell(k, layer, t) for k in KINDS + SEVERED for layer, t in ((0, 3), (1, 4), (2, 8))]
    per_cell = plain_scores(model, setup, cells, window=2, per_forward=1)
    stacked = plain_scores(model, setup, cells, window=2, per_forward=len(cells))
    assert (per_cell - stacked).abs().max() < 1e-14


def test_restored_states_give_known_probabilities():
    model = sharp("llama")
    tr = trace(model, PROMPT, SUBJECT, kind="all", noise=1.0, samples=2, window=2, progress=False)
    start = tr.subject_range[0]
    # the last layer's output at the last token decides the prediction: restoring it is the clean run
    assert tr.scores["hidden"][-1, -1] == pytest.approx(tr.high, abs=1e-12)
    # before the subject nothing is corrupted: restoring those states changes nothing
    for kind in tr.kinds:
        assert tr.effect(kind)[:start].abs().max() < 1e-14


def test_multi_token_target_scores_the_whole_sequence():
    model = sharp("llama")
    target = " zz"  # two byte tokens with the char tokenizer
    tr = trace(model, PROMPT, SUBJECT, target, kind="hidden", noise=1.0, samples=2, progress=False)
    assert len(tr.target_ids) == 3  # ' ', 'z', 'z'
    batch = model.tokenize("ab cd xyz" + target[:-1])
    logits = run(model, batch, read=[Site("logits")])[Site("logits")][0]
    n = len(model.tokenize("ab cd xyz").input_ids[0])
    logp = torch.log_softmax(logits, -1)
    expected = math.exp(sum(float(logp[n - 1 + k, tok]) for k, tok in enumerate(tr.target_ids)))
    assert tr.high == pytest.approx(expected, rel=1e-9)
    plain = trace(model, PROMPT, SUBJECT, target, kind="hidden", noise=1.0, samples=2, mode="plain",
                  progress=False)
    assert (plain.scores["hidden"] - tr.scores["hidden"]).abs().max() < 1e-14
    assert tr.scores["hidden"].shape[0] == n  # the grid covers the prompt, not the target


def test_seed_makes_traces_reproducible():
    model = sharp("gpt2")
    a, b, c = (trace(model, PROMPT, SUBJECT, noise=1.0, samples=2, seed=s, progress=False) for s in (5, 5, 6))
    assert torch.equal(a.scores["hidden"], b.scores["hidden"]) and a.low == b.low
    assert a.low != c.low
    assert a.params["seed"] == 5 and a.params["samples"] == 2 and a.params["noise_std"] == 1.0


def test_bad_inputs_fail_clearly_and_leave_the_model_untouched():
    model = sharp("llama")
    before, hooks = weights_digest(model), hook_count(model)
    bad = [
        (dict(prompt="ab cd xyz", subject="qq"), "not in the prompt.*tokens"),
        (dict(prompt="{} and {}", subject="cd"), "exactly one"),
        (dict(prompt=PROMPT, subject=" "), "empty subject"),
        (dict(prompt=PROMPT, subject=SUBJECT, target=""), "empty target"),
        (dict(prompt=PROMPT, subject=SUBJECT, target=[]), "empty target"),
        (dict(prompt=PROMPT, subject=SUBJECT, target=[10_000]), "outside the vocabulary"),
        (dict(prompt=PROMPT, subject=SUBJECT, kind="mlp", window=model.n_layers + 1), "larger than the model"),
        (dict(prompt=PROMPT, subject=SUBJECT, samples=0), "samples must be"),
        (dict(prompt=PROMPT, subject=SUBJECT, kind="neurons"), "unknown kind"),
        (dict(prompt=PROMPT, subject=SUBJECT, mode="fast"), "unknown mode"),
        (dict(prompt=PROMPT, subject=SUBJECT, remote=True), "mode='plain'"),
    ]
    for kwargs, message in bad:
        with pytest.raises(ValueError, match=message):
            trace(model, noise=1.0, progress=False, **kwargs)
    with pytest.raises(ValueError, match="attribution-patching"):
        sever(model, PROMPT, SUBJECT, noise=1.0, mode="approx")
    assert weights_digest(model) == before and hook_count(model) == hooks


def test_unlikely_target_warns_but_runs():
    model = sharp("llama")
    with torch.no_grad():
        logits = run(model, model.tokenize("ab cd xyz"), read=[Site("logits")])[Site("logits")]
    rare = int(logits[0, -1].argmin())
    with pytest.warns(UserWarning, match="does not predict it"):
        tr = trace(model, PROMPT, SUBJECT, [rare, rare], noise=1.0, samples=1, progress=False)
    assert tr.scores["hidden"].shape == (len(tr.tokens), model.n_layers)


def test_approx_mode_is_a_labelled_estimate_close_to_exact_for_small_noise():
    model = sharp("llama")
    opts = dict(kind="all", noise=0.05, samples=2, window=2, progress=False)
    exact = trace(model, PROMPT, SUBJECT, **opts)
    approx = trace(model, PROMPT, SUBJECT, mode="approx", **opts)
    assert approx.estimate and "estimate" in approx.label and not exact.estimate
    start = exact.subject_range[0]
    for kind in exact.kinds:
        assert rank_correlation(approx.effect(kind)[start:], exact.effect(kind)[start:]) > 0.8


def test_noise_scale_is_the_pooled_embedding_std():
    model = sharp("gpt2")
    subjects = ["ab", "xyz"]
    ids = [i for s in subjects for i in model.tokenizer(s)["input_ids"]]
    expected = float(model.embedding.weight[ids].std())
    assert noise_scale(model, subjects) == pytest.approx(expected)
    with torch.no_grad():  # follows the weights: no stale value after they change
        model.embedding.weight.mul_(2)
    assert noise_scale(model, subjects) == pytest.approx(2 * expected)
    with torch.no_grad():
        model.embedding.weight.div_(2)
    tr = trace(model, PROMPT, SUBJECT, samples=1, progress=False)
    assert tr.params["noise_std"] == pytest.approx(3 * noise_scale(model))


def _severed(gap: list[float]) -> SeveredTrace:
    normal = torch.full((len(gap),), 0.5, dtype=torch.float64)
    curves = {"normal": normal, "mlp_severed": normal - torch.tensor(gap, dtype=torch.float64),
              "attn_severed": normal}
    return SeveredTrace("p", "s", 0, "s", "t", curves, 0.9, 0.1)


def test_suggest_edit_layers_follows_the_documented_rule():
    gap = [0.4, 0.4, 0.4, 0.3, 0.1, 0.05, 0.0, 0.0]  # MLPs 3, 4 (and a bit of 5) carry the effect
    sv = _severed(gap)
    assert suggest_edit_layers(sv, size=1) == range(4, 5)
    assert suggest_edit_layers(sv, size=2) == range(3, 5)
    r = suggest_edit_layers(sv, share=0.85)  # drops 0.1, 0.2, 0.05 (+0.05 at 6) of 0.4 in total
    assert r == range(3, 6) and r.start >= 0 and r.stop <= len(gap)
    assert suggest_edit_layers([sv, _severed([0.2] * 4 + [0.0] * 4)], size=1) == range(4, 5)
    with pytest.raises(ValueError, match="size"):
        suggest_edit_layers(sv, size=0)
    with pytest.warns(UserWarning, match="no MLP range"):
        suggest_edit_layers(_severed([0.0] * 8))


def test_severed_paths_exact_equals_plain():
    model = sharp("gpt_neox")
    a = sever(model, PROMPT, SUBJECT, noise=1.0, samples=2, progress=False)
    b = sever(model, PROMPT, SUBJECT, noise=1.0, samples=2, mode="plain", progress=False)
    for curve in a.curves:
        assert (a.curves[curve] - b.curves[curve]).abs().max() < 1e-14
    assert a.token == 4  # last subject token: "ab cd" -> 'd' at position 4
    r = suggest_edit_layers(a)
    assert 0 <= r.start < r.stop <= model.n_layers


def test_trace_many_averages_token_groups_with_confidence_intervals():
    model = sharp("llama")
    facts = [("ab {} xyz", "cd"), {"prompt": "q {} rs", "subject": "efg"},
             {"requested_rewrite": {"prompt": "{} tu", "subject": "hi", "target_true": {"str": "v"}}}]
    summary = trace_many(model, facts, only_correct=False, sever_paths=True, progress=False, noise=1.0,
                         samples=1, window=2)
    assert summary.n_facts == 3 and summary.groups == GROUPS
    assert summary.per_fact["mlp"].shape == (3, len(GROUPS), model.n_layers)
    # "middle subject tokens" exists only for the 3-token subject: its CI is 0 from one value
    assert summary.per_fact["hidden"][:, 1].isnan().sum() == 2 * model.n_layers
    assert (summary.ci["hidden"][1] == 0).all()
    mean, _ = summary.severed_mean()
    assert mean["normal"].shape == (model.n_layers,)
    with pytest.raises(ValueError, match="no fact was traced"):
        trace_many(model, [("ab {} xyz", "cd", "Q")], progress=False, noise=1.0, samples=1)


def test_window_is_romes_centred_range():
    assert window_layers(0, 10, 30) == range(0, 5)
    assert window_layers(12, 10, 30) == range(7, 17)
    assert window_layers(29, 10, 30) == range(24, 30)
    assert window_layers(3, 3, 30) == range(2, 5)


def test_no_warning_for_a_predicted_target():
    model = sharp("llama")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        trace(model, PROMPT, SUBJECT, noise=1.0, samples=1, progress=False)


def test_post_processed_logits_are_traced_consistently_before_post_processing(monkeypatch):
    # Gemma 2 soft-caps its logits after the unembedding. It is not in the registry (its FFN output
    # is normalised before the residual, which editing does not support); a user registers it for tracing.
    from dataclasses import replace

    from conftest import TINY_CONFIGS

    import kvlens
    from kvlens.models import registry

    monkeypatch.setitem(registry._REGISTRY, "gemma2", replace(kvlens.get_arch("llama"), model_type="gemma2"))
    monkeypatch.setitem(TINY_CONFIGS, "gemma2", TINY_CONFIGS["llama"])
    model = sharp("gemma2")
    with pytest.warns(UserWarning, match="post-processes its logits"):
        exact = trace(model, PROMPT, SUBJECT, noise=1.0, samples=2, progress=False)
    with pytest.warns(UserWarning, match="post-processes its logits"):
        plain = trace(model, PROMPT, SUBJECT, noise=1.0, samples=2, mode="plain", progress=False)
    assert (exact.scores["hidden"] - plain.scores["hidden"]).abs().max() < 1e-14
    assert exact.scores["hidden"][-1, -1] == pytest.approx(exact.high, abs=1e-12)
