"""MEMIT's stage 1 (z, Eq. 16) computed once and reused for other λ, statistics and lower layers."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from conftest import tiny

from kvlens.editing import MEMIT, AlphaEdit, AlphaEditHparams, Contexts, EditRequest, MEMITHparams, TargetOpt

CTX = Contexts(n=1, tokens=2)
OPT = TargetOpt(steps=4, lr=1.0, clamp=100.0)
REQS = [EditRequest("{} lives in", "Alice", "Paris"), EditRequest("{} lives in", "Bob", "Oslo")]


def stats(model, layers):
    g = torch.Generator().manual_seed(0)
    k = torch.randn(4 * model.d_ff, model.d_ff, generator=g)
    return {l: k.T @ k / len(k) for l in layers}


def assert_same(a, b):
    assert a.parts.keys() == b.parts.keys()
    for key in a.parts:
        torch.testing.assert_close(a.parts[key].dense(), b.parts[key].dense(), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_reused_targets_equal_a_fresh_compute_for_other_lambda_statistics_and_layers(family):
    model = tiny(family)
    st = stats(model, [0, 1, 2])
    hp = MEMITHparams(layers=(1, 2), lam=1.0, opt=OPT, contexts=CTX)
    targets = MEMIT(hp).targets(model, REQS)
    assert targets.z.shape == (2, model.d_model) and targets.top == 2
    for other in (replace(hp, lam=7.0), replace(hp, layers=(0, 1, 2)), replace(hp, layers=(2,))):
        fresh = MEMIT(other).compute(model, REQS, report=False, stats=st)
        reused = MEMIT(other).compute(model, REQS, report=False, stats=st, targets=targets)
        assert_same(reused, fresh)
    scaled = {l: 3.0 * c for l, c in st.items()}  # other statistics: only stage 2 changes
    assert_same(MEMIT(hp).compute(model, REQS, report=False, stats=scaled, targets=targets),
                MEMIT(hp).compute(model, REQS, report=False, stats=scaled))
    alpha = AlphaEditHparams(layers=(1, 2), opt=OPT, contexts=CTX, nullspace_threshold=0.5, l2=0.1)
    assert_same(AlphaEdit(alpha).compute(model, REQS, report=False, stats=st, targets=targets),
                AlphaEdit(alpha).compute(model, REQS, report=False, stats=st))


def test_a_reuse_that_would_differ_is_refused_before_work():
    model = tiny("gpt2")
    st = stats(model, [1, 2])
    hp = MEMITHparams(layers=(1, 2), lam=1.0, opt=OPT, contexts=CTX)
    targets = MEMIT(hp).targets(model, REQS)
    with pytest.raises(ValueError, match="other requests"):
        MEMIT(hp).compute(model, REQS[::-1], stats=st, targets=targets)
    with pytest.raises(ValueError, match="top"):
        MEMIT(replace(hp, layers=(1,))).compute(model, REQS, stats=st, targets=targets)
    with pytest.raises(ValueError, match="opt"):
        MEMIT(replace(hp, opt=replace(OPT, steps=5))).compute(model, REQS, stats=st, targets=targets)
    with pytest.raises(ValueError, match="contexts"):
        MEMIT(replace(hp, contexts=Contexts(n=2, tokens=2))).compute(model, REQS, stats=st, targets=targets)
    with pytest.raises(ValueError, match="sequential_batch"):
        MEMIT(hp).compute(model, REQS, stats=st, targets=targets, sequential_batch=1)
    before = {k: v.clone() for k, v in model.hf.state_dict().items()}
    with MEMIT(hp).compute(model, REQS, report=False, stats=st).applied(model):
        with pytest.raises(ValueError, match="FFN weights changed"):
            MEMIT(hp).compute(model, REQS, stats=st, targets=targets)
    assert all(torch.equal(before[k], v) for k, v in model.hf.state_dict().items())
