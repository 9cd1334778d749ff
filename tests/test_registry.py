"""Every registered family: roles and the canonical [d_ff, d_model] orientation, proved by a
reference forward on a tiny random model (Geva et al. 2021: FFN(x) = f(x Kᵀ) V)."""

from __future__ import annotations

import pytest
import torch

import kvlens
from kvlens import tracing
from kvlens.models.kvmodel import Site
from tests.conftest import TINY_CONFIGS, tiny

FAMILIES = sorted(TINY_CONFIGS)


def close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_every_registered_family_is_tested():
    assert set(FAMILIES) == set(kvlens.registered_types())


@pytest.mark.parametrize("model_type", FAMILIES)
def test_reference_forward_proves_roles_and_orientation(model_type):
    m = tiny(model_type)
    torch.manual_seed(1)
    for layer in range(m.n_layers):
        x = torch.randn(2, 5, m.d_model)
        K, V = m.K(layer), m.V(layer)
        assert K.shape == V.shape == (m.d_ff, m.d_model)
        assert K.data_ptr() == m.weight(layer, "key").data_ptr()  # a view, not a copy
        act = m.activation(layer)
        if m.spec.gated:
            coef = act(x @ m.gate(layer).T) * (x @ K.T)  # (f(x Gᵀ) ⊙ x Kᵀ)
        else:
            b_k = m.key_bias(layer)
            coef = act(x @ K.T + (0 if b_k is None else b_k))  # f(x Kᵀ + b_K)
        b_v = m.value_bias(layer)
        expected = coef @ V + (0 if b_v is None else b_v)
        with torch.no_grad():
            got = m.mlp(layer)(x)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model_type", FAMILIES)
def test_site_accessors_match_the_models_own_forward(model_type):
    m = tiny(model_type)
    batch = m.tokenize(["hello world", "kv"])
    kinds = ("resid_pre", "attn", "mlp_in", "key_pre", "key", "mlp", "resid") + (("gate_pre",) if m.spec.gated else ())
    sites = [Site(kind, l) for l in range(m.n_layers) for kind in kinds]
    states = tracing.run(m, batch, read=sites + [Site("embed"), Site("logits")])
    with torch.no_grad():
        ref = m.hf(**batch.inputs(), output_hidden_states=True)
    close(states[Site("logits")], ref.logits)
    torch.testing.assert_close(states[Site("embed")], m.embedding(batch.input_ids))
    for l in range(m.n_layers - 1):  # the last hidden state of HF has the final norm applied
        close(states[Site("resid", l)], ref.hidden_states[l + 1])
    for l in range(m.n_layers):
        b_v = m.value_bias(l)
        mlp = states[Site("key", l)] @ m.V(l) + (0 if b_v is None else b_v)
        close(mlp, states[Site("mlp", l)])
        with torch.no_grad():  # the key activation from the projections' outputs: f(x Gᵀ) ⊙ x Kᵀ, or f(x Kᵀ + b)
            act, pre = m.activation(l), states[Site("key_pre", l)]
            close(act(states[Site("gate_pre", l)]) * pre if m.spec.gated else act(pre), states[Site("key", l)])
    for l in range(m.n_layers):  # residual after l = before + attn + mlp (serial and parallel alike)
        before, attn, ffn = states[Site("resid_pre", l)], states[Site("attn", l)], states[Site("mlp", l)]
        if l > 0:
            torch.testing.assert_close(before, states[Site("resid", l - 1)])
        close(before + attn + ffn, states[Site("resid", l)])
        with torch.no_grad():  # the FFN's input gives its output
            close(m.mlp(l)(states[Site("mlp_in", l)]), ffn)


def test_parallel_residual_flags():
    assert tiny("gptj").parallel_residual
    assert tiny("gpt_neox").parallel_residual
    assert not tiny("gpt_neox", use_parallel_residual=False).parallel_residual
    assert not tiny("gpt2").parallel_residual and not tiny("llama").parallel_residual


def test_conv1d_and_linear_store_opposite_layouts():
    gpt2, neox = tiny("gpt2"), tiny("gpt_neox")
    assert gpt2.weight(0, "key").shape == (gpt2.d_model, gpt2.d_ff)  # Conv1D [in, out]
    assert neox.weight(0, "key").shape == (neox.d_ff, neox.d_model)  # Linear [out, in]
    for m in (gpt2, neox):
        for role in ("key", "value"):
            w = m.weight(0, role)
            assert m.stored(m.canonical(w, role), role).data_ptr() == w.data_ptr()


def test_unknown_model_type_names_it_and_says_how_to_register():
    from transformers import AutoConfig, AutoModelForCausalLM

    from tests.conftest import CharTokenizer

    cfg = AutoConfig.for_model("phi", num_hidden_layers=1, hidden_size=32, num_attention_heads=4,
                               intermediate_size=64, vocab_size=128)
    hf = AutoModelForCausalLM.from_config(cfg)
    with pytest.raises(kvlens.UnknownArchitectureError, match="'phi'.*register_arch"):
        kvlens.wrap(hf, CharTokenizer())


def test_register_arch_adds_a_family_and_refuses_silent_overwrite():
    from transformers import AutoConfig, AutoModelForCausalLM

    from tests.conftest import CharTokenizer

    spec = kvlens.ArchSpec(model_type="phi", layers="model.layers", embedding="model.embed_tokens",
                           final_norm="model.final_layernorm", unembedding="lm_head", attn="self_attn",
                           mlp="mlp", key="fc1", value="fc2", activation="activation_fn",
                           parallel_residual=True)
    try:
        kvlens.register_arch(spec)
        cfg = AutoConfig.for_model("phi", num_hidden_layers=1, hidden_size=32, num_attention_heads=4,
                                   intermediate_size=64, vocab_size=128)
        m = kvlens.wrap(AutoModelForCausalLM.from_config(cfg), CharTokenizer())
        x = torch.randn(1, 3, 32)
        with torch.no_grad():
            expected = m.activation(0)(x @ m.K(0).T + m.key_bias(0)) @ m.V(0) + m.value_bias(0)
            torch.testing.assert_close(m.mlp(0)(x), expected)
        with pytest.raises(ValueError, match="already registered"):
            kvlens.register_arch(spec)
    finally:
        from kvlens.models import registry

        registry._REGISTRY.pop("phi", None)


def test_spec_naming_a_missing_module_fails_at_wrap():
    from dataclasses import replace

    from kvlens.models.kvmodel import KVModel
    from tests.conftest import CharTokenizer, tiny_hf

    bad = replace(kvlens.get_arch("llama"), key="w_in")
    hf = tiny_hf("llama").train()
    with pytest.raises(ValueError, match="'w_in'"):
        KVModel(hf, CharTokenizer(), bad)
    assert hf.training and all(p.requires_grad for p in hf.parameters())  # the caller's model untouched
    with pytest.raises(ValueError, match="layers 'model.blocks'"):
        KVModel(hf, CharTokenizer(), replace(bad, key="up_proj", layers="model.blocks"))


def test_layer_out_of_range_and_bad_sites():
    m = tiny("llama")
    with pytest.raises(IndexError, match="layer 3 is out of range.*3 layers"):
        m.K(3)
    with pytest.raises(IndexError, match="out of range"):
        tracing.run(m, m.tokenize("a"), read=[Site("key", 7)])
    with pytest.raises(ValueError, match="unknown site kind"):
        Site("ffn", 0)
    with pytest.raises(ValueError, match="no gate projection"):
        tiny("gpt2").gate(0)


# ---- load-time validation on the model's own forward (kvlens.models.validation) -------------------
VARIANTS = [(f, {}) for f in FAMILIES] + [("gpt_neox", {"use_parallel_residual": False})]


@pytest.mark.parametrize(("model_type", "overrides"), VARIANTS)
def test_validation_passes_on_every_family(model_type, overrides):
    m = tiny(model_type, validate=True, **overrides)
    v = m.validation
    assert v is not None and not v.skipped and v.layers == (0, m.n_layers - 1)
    assert v.parallel_residual == m.parallel_residual
    checks = {f"{c} {l}" for c in ("value", "key", "residual") for l in v.layers} | {"parallel residual"}
    assert set(v.errors) == checks and max(v.errors.values()) <= v.tolerance == 1e-2


def _wrap_with(spec, hf, **kw):
    """``wrap(hf)`` with ``spec`` registered for the call only."""
    from kvlens.models import registry
    from tests.conftest import CharTokenizer

    old = registry._REGISTRY.get(spec.model_type)
    try:
        kvlens.register_arch(spec, overwrite=True)
        return kvlens.wrap(hf, CharTokenizer(), **kw)
    finally:
        if old is None:
            registry._REGISTRY.pop(spec.model_type, None)
        else:
            registry._REGISTRY[spec.model_type] = old


def _refused(spec, hf, roles, match):
    from kvlens.models.validation import SpecMismatchError

    hf.train()
    with pytest.raises(SpecMismatchError, match=match) as err:
        _wrap_with(spec, hf)
    assert err.value.roles == roles
    assert hf.training and all(p.requires_grad for p in hf.parameters())  # the caller's model as it was
    return err.value


def test_validation_names_swapped_key_and_gate():
    from dataclasses import replace

    from tests.conftest import tiny_hf

    llama = kvlens.get_arch("llama")
    _refused(replace(llama, key="gate_proj", gate="up_proj"), tiny_hf("llama"), ("key/gate",),
             r"key and gate projections are swapped.*set key='up_proj', gate='gate_proj'")


def test_validation_names_a_wrong_activation_orientation_and_value():
    from dataclasses import replace

    from tests.conftest import tiny_hf

    gpt2 = kvlens.get_arch("gpt2")
    _refused(replace(gpt2, activation="dropout"), tiny_hf("gpt2"), ("activation",), r"activation='dropout'")
    e = _refused(replace(gpt2, conv1d=False), tiny_hf("gpt2"), ("value", "key/activation"), "conv1d=False")
    assert "layer 0" in str(e) and "register_arch" in str(e) and "validate=False" in str(e)
    llama = kvlens.get_arch("llama")
    _refused(replace(llama, key="down_proj", value="up_proj"), tiny_hf("llama"),
             ("value", "key/gate/activation"), r"check value='up_proj'")


def test_validation_names_a_wrong_parallel_residual_flag():
    from dataclasses import replace

    from tests.conftest import tiny_hf

    neox = kvlens.get_arch("gpt_neox")
    serial = tiny_hf("gpt_neox", use_parallel_residual=False)
    _refused(replace(neox, parallel_residual_attr=None), serial, ("parallel residual",),
             r"says attention and MLP run in parallel.*depends on.*parallel_residual=False")
    _refused(replace(kvlens.get_arch("gptj"), parallel_residual=False), tiny_hf("gptj"), ("parallel residual",),
             r"run in serial.*does not depend on.*parallel_residual=True")


def test_validation_refuses_a_family_aliased_to_llama_whose_ffn_output_is_normed():
    """Gemma 2 has Llama's module names but a norm after the FFN: the residual identity fails."""
    from dataclasses import replace

    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("gemma2", num_hidden_layers=2, hidden_size=32, num_attention_heads=4,
                               num_key_value_heads=2, intermediate_size=64, head_dim=8, vocab_size=128)
    hf = AutoModelForCausalLM.from_config(cfg)
    for p in hf.parameters():  # norms away from their identity start, so the post-FFN norm shows
        if p.dim() == 1:
            torch.nn.init.normal_(p, std=0.5)
    aliased = replace(kvlens.get_arch("llama"), model_type="gemma2")
    _refused(aliased, hf, ("residual",), r"layer 0: the layer's output is not its input \+ attention.*a norm after")
    assert _wrap_with(aliased, hf, validate=False).validation is None  # validate=False: accepted as asked


def test_validation_is_skipped_with_a_note_without_local_weights():
    """A model whose weights are meta tensors (remote, offloaded) cannot be checked here: a note, no error."""
    from kvlens.models.validation import validate

    m = tiny("llama")
    m.hf.to("meta")
    with pytest.warns(UserWarning, match="validation of the llama spec skipped.*no local weights"):
        v = validate(m)
    assert "no local weights" in v.skipped and not v.errors and not v.layers


def test_validation_of_the_embedded_model(embedded):
    v = embedded.validation
    assert v is not None and v.layers == (0, embedded.n_layers - 1) and v.parallel_residual is False
    assert max(v.errors.values()) <= 1e-4  # float32: the identities hold to rounding
