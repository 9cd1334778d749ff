"""Models split by a ``device_map``: layers offloaded to disk through accelerate's hooks (CPU test), and
half the layers on a CUDA GPU (``@pytest.mark.gpu``: runs where one is present). Trace, keys, ROME,
MEMIT and evaluate give the numbers of the unsplit model; edits of offloaded weights apply beside them."""

from __future__ import annotations

import warnings

import pytest
import torch

import kvlens as kv
from kvlens.editing.hparams import Contexts, TargetOpt
from kvlens.memory.stats import second_moments

REQ = kv.EditRequest("{} is located in the city of", "The Eiffel Tower", "Rome", "Paris")
FAST = dict(opt=TargetOpt(steps=3), contexts=Contexts(n=2, tokens=3))
pytestmark = pytest.mark.filterwarnings("ignore:.*did not reach its goal",
                                        "ignore:low-sample")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, embedded):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = AutoConfig.for_model("llama", num_hidden_layers=4, hidden_size=64, num_attention_heads=4,
                               num_key_value_heads=2, intermediate_size=128, vocab_size=embedded.vocab_size,
                               head_dim=16)
    path = tmp_path_factory.mktemp("tiny-llama-split")
    AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    embedded.tokenizer.save_pretrained(path)
    return path


def _split(where: list[str]) -> dict[str, str]:
    layers = {f"model.layers.{i}": d for i, d in enumerate(where)}
    return {"model.embed_tokens": where[0], **layers, "model.norm": where[-1], "model.rotary_emb": where[0],
            "lm_head": where[-1]}


def _compare(full, split):
    opts = dict(samples=2, progress=False, noise=0.3)
    a = kv.trace(full, "The Eiffel Tower is in", "Eiffel", **opts)
    b = kv.trace(split, "The Eiffel Tower is in", "Eiffel", **opts)
    torch.testing.assert_close(b.scores["hidden"], a.scores["hidden"], rtol=1e-5, atol=1e-6)
    ka, kb = kv.keys(full, "The Eiffel Tower", [1, 3]), kv.keys(split, "The Eiffel Tower", [1, 3])
    for layer in (1, 3):
        torch.testing.assert_close(kb.coefficients[layer].cpu(), ka.coefficients[layer].cpu(), rtol=1e-5, atol=1e-6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sa = second_moments(full, [1, 2], n_tokens=300, cache=False, progress=False)
        sb = second_moments(split, [1, 2], n_tokens=300, cache=False, progress=False)
    for layer in (1, 2):
        torch.testing.assert_close(sb[layer].cpu(), sa[layer].cpu(), rtol=1e-4, atol=1e-6)
    for method in (kv.ROME(layer=2, **FAST), kv.MEMIT(layers=(1, 2), **FAST)):
        da, db = method.compute(full, [REQ], stats=sa), method.compute(split, [REQ], stats=sb)
        for key in da.parts:
            torch.testing.assert_close(db.parts[key].dense().cpu(), da.parts[key].dense().cpu(), rtol=1e-3, atol=1e-5)
        ea = kv.evaluate(full, [REQ], da, tests=("rewrite",))
        eb = kv.evaluate(split, [REQ], db, tests=("rewrite",))
        for name in ("ES", "EM"):
            assert abs(eb.metric(name).mean - ea.metric(name).mean) < 1e-4


def test_disk_offloaded_layers_give_the_unsplit_numbers(tiny_dir, tmp_path):
    full = kv.load(tiny_dir)
    split = kv.load(tiny_dir, device_map=_split(["cpu", "disk", "cpu", "disk"]), offload_folder=str(tmp_path),
                    dtype=torch.float32)
    assert split.projection(1, "value").weight.is_meta  # really offloaded: weights stream from disk
    _compare(full, split)


@pytest.mark.gpu
def test_half_the_layers_on_a_gpu_give_the_unsplit_numbers(tiny_dir):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    full = kv.load(tiny_dir)
    split = kv.load(tiny_dir, device_map=_split(["cuda:0", "cuda:0", "cpu", "cpu"]), dtype=torch.float32)
    assert split.projection(0, "value").weight.device.type == "cuda"
    _compare(full, split)


def test_an_offloaded_model_computes_on_the_cpu_and_keeps_the_cpu_budget(tiny_dir, tmp_path):
    split = kv.load(tiny_dir, device_map=_split(["cpu", "disk", "cpu", "disk"]), offload_folder=str(tmp_path),
                    dtype=torch.float32)
    assert split.devices() == [torch.device("cpu")]
    assert split.memory_budget(cpu_bytes=123) == 123


def test_the_budget_is_the_tightest_gpus(tiny_dir, monkeypatch):
    """A batch must fit on every device holding layers: the budget follows the GPU with least free memory."""
    model = kv.load(tiny_dir)
    devices = [torch.device("cpu"), torch.device("cuda:0"), torch.device("cuda:1")]
    free = {"cuda:0": 8 * 2**30, "cuda:1": 2 * 2**30}
    monkeypatch.setattr(type(model), "devices", lambda self: devices)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda d: (free[str(d)], 16 * 2**30))
    assert model.memory_budget(cpu_bytes=123) == 2**30  # half of cuda:1's 2 GiB
    from kvlens.tuning.train import default_memory

    assert default_memory(model) == 2**30  # task tuning's batch planning reads the same budget


@pytest.mark.gpu
def test_a_split_model_lists_both_devices(tiny_dir):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    split = kv.load(tiny_dir, device_map=_split(["cuda:0", "cuda:0", "cpu", "cpu"]), dtype=torch.float32)
    assert {d.type for d in split.devices()} == {"cuda", "cpu"}
    assert 0 < split.memory_budget(cpu_bytes=1) <= torch.cuda.mem_get_info(0)[0]
