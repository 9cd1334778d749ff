"""Edits on the real embedded model: Eiffel Tower -> Rome by ROME, MEMIT, AlphaEdit, key/value FT, LoRA.

Each edit makes " Rome" top-1 on the prompt, raises it on a paraphrase, keeps "The capital of
France is" -> " Paris", and ``revert()`` gives the model back bit for bit. Statistics come from a
small low-sample estimate (a few thousand tokens) to keep the test fast.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from kvlens.editing import MEMIT, ROME, AlphaEdit, EditRequest, KeyFT, LoRAKeys, ValueFT, WeightDelta
from kvlens.editing._shared import target_report
from kvlens.memory.stats import second_moments

REQ = EditRequest("{} is located in the city of", "The Eiffel Tower", "Rome", "Paris")
PARAPHRASE = EditRequest("The famous {} stands in the city of", "Eiffel Tower", "Rome")
CONTROL = EditRequest("{} is", "The capital of France", "Paris")


@pytest.fixture(scope="module")
def stats(embedded):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # low-sample mode, on purpose
        return second_moments(embedded, [2, 3, 4, 5, 6, 7, 8], n_tokens=3000, cache=False, progress=False)


@pytest.fixture(scope="module")
def before(embedded):
    return {"weights": {k: v.clone() for k, v in embedded.hf.state_dict().items()},
            "probe": target_report(embedded, [PARAPHRASE, CONTROL])}


def unchanged(model, weights) -> bool:
    return all(torch.equal(v, weights[k]) for k, v in model.hf.state_dict().items())


EDITORS = {
    "rome": (lambda: ROME(), True),
    "memit": (lambda: MEMIT(), True),
    "alphaedit": (lambda: AlphaEdit(), True),
    "key-ft": (lambda: KeyFT(), False),
    "value-ft": (lambda: ValueFT(), False),
    "lora-keys": (lambda: LoRAKeys(), False),
}


@pytest.mark.parametrize("name", list(EDITORS))
def test_eiffel_tower_to_rome(embedded, stats, before, name):
    factory, needs_stats = EDITORS[name]
    delta = factory().compute(embedded, [REQ], **({"stats": stats} if needs_stats else {}))
    assert unchanged(embedded, before["weights"]), "compute must leave the model bit-identical"
    out = delta.info["outcome"]
    assert out["reached"] and out["requests"][0]["p_after"] > out["requests"][0]["p_before"]
    handle = delta.apply(embedded)
    now = target_report(embedded, [REQ, PARAPHRASE, CONTROL])
    delta.revert()
    assert not handle.active and unchanged(embedded, before["weights"])
    assert now[0]["top1"] == " Rome" and now[0]["target_is_top1"]
    assert now[1]["p_target"] > before["probe"][0]["p_target"] + 0.2, "the edit should generalise to a paraphrase"
    assert now[2]["top1"] == " Paris", "an unrelated fact must survive"


def test_delta_file_round_trip_on_embedded(embedded, stats, before, tmp_path):
    delta = ROME().compute(embedded, [REQ], stats=stats, report=False)
    path = tmp_path / "eiffel.safetensors"
    delta.save(path)
    back = WeightDelta.load(path, embedded)
    assert back.info["contexts"] == delta.info["contexts"] and back.hparams["layer"] == 8
    with back.applied(embedded):
        assert target_report(embedded, [REQ])[0]["top1"] == " Rome"
    assert unchanged(embedded, before["weights"])


def test_memit_z_stage_resuming_from_the_subject_equals_full_forwards(embedded):
    """The batched z optimisation (cached layers <= L and positions before the subject) gives the
    z of the paper's one-by-one full forwards, and its recorded curves show the optimisation."""
    from dataclasses import replace

    from kvlens.editing import Contexts
    from kvlens.editing._shared import build_rows, context_templates
    from kvlens.editing.memit import target_vectors

    reqs = [REQ, EditRequest("The capital of {} is", "France", "Berlin", "Paris")]  # subject first, and later
    preset = MEMIT().hparams_for(embedded)
    hp = replace(preset, opt=replace(preset.opt, steps=4), contexts=Contexts(n=1, tokens=3))
    rows = build_rows(embedded, reqs, context_templates(embedded, hp.contexts))
    z, h, log = target_vectors(embedded, rows, hp)
    z_one, _, _ = target_vectors(embedded, rows, replace(hp, z_batch=1, skip_fixed=False))
    assert float(((z - z_one).norm(dim=-1) / (z - h).norm(dim=-1)).max()) < 1e-4
    for i in range(len(reqs)):
        nll, norm = log["curves"]["nll"][i], log["curves"]["norm"][i]
        assert nll[-1] < nll[0] and max(norm) <= log["max_norm"][i] * (1 + 1e-5)


def test_memit_targets_reused_for_another_lambda_and_range_on_embedded(embedded, stats, before):
    """The sweep's path on the real model: z made once, then λ and the lower layers changed."""
    from dataclasses import replace

    preset = MEMIT().hparams_for(embedded)
    reqs = [REQ, EditRequest("The capital of {} is", "France", "Berlin", "Paris")]
    targets = MEMIT(preset).targets(embedded, reqs)
    assert unchanged(embedded, before["weights"])
    for other in (replace(preset, lam=4 * preset.lam), replace(preset, layers=(6, 7, 8))):
        fresh = MEMIT(other).compute(embedded, reqs, stats=stats, report=False)
        reused = MEMIT(other).compute(embedded, reqs, stats=stats, report=False, targets=targets)
        assert fresh.parts.keys() == reused.parts.keys()
        for key in fresh.parts:
            torch.testing.assert_close(reused.parts[key].dense(), fresh.parts[key].dense(), rtol=1e-4, atol=1e-6)
    with reused.applied(embedded):
        assert target_report(embedded, [REQ])[0]["top1"] == " Rome"
    assert unchanged(embedded, before["weights"])
