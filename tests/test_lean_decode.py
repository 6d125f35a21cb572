"""The lean decoding step computes the model's own step bit for bit, and is not used where it cannot."""

from __future__ import annotations

import pytest
import torch

from ctloop.config import ModelConfig
from ctloop.serving.backends import GenerationRequest, InProcessBackend
from ctloop.serving.batching import BatchLimits, Sequence, _AdapterRouting, _Batch, _prefill
from ctloop.serving.decode import LeanLlamaStep, lean_step
from ctloop.training.tinymodel import random_adapter
from lora_helpers import two_adapter_llama

PROMPTS = ["Package: a\nDescription:", "Package: x11-common-data-tools\nDescription: the", "Q:", "Package: perl"]


@pytest.fixture(scope="module")
def backend(tiny_base, tmp_path_factory):
    root = tmp_path_factory.mktemp("lean-adapters")
    backend = InProcessBackend(ModelConfig(base=str(tiny_base)), BatchLimits(1, 8192))  # no batcher of its own
    for version in (1, 2):
        backend.load(version, random_adapter(tiny_base, root / f"v{version}", seed=version))
    return backend


def _running_batch(backend, adapters: list[str], routing: _AdapterRouting) -> _Batch:
    from ctloop.model.batching import prompt_token_ids

    sequences = [
        Sequence(GenerationRequest(prompt=p, max_tokens=32), name, 0, i, prompt_token_ids(backend.tokenizer, [p])[0])
        for i, (p, name) in enumerate(zip(PROMPTS, adapters, strict=True))
    ]
    routing.use(backend.network, adapters)
    _prefill(backend.network, backend.tokenizer.pad_token_id, sequences)
    batch = _Batch()
    batch.add(sequences)  # prompts of different lengths: left padding in the cache and the mask
    return batch


@pytest.mark.parametrize("adapters", [["v1"] * 4, ["v1", "v2", "v2", "v1"]], ids=["one-adapter", "mixed"])
def test_the_lean_step_decodes_what_the_model_forward_does_bit_for_bit(backend, adapters):
    routing = _AdapterRouting()
    routing.use(backend.network, adapters)
    assert isinstance(routing.lean, LeanLlamaStep)
    lean, model = _running_batch(backend, adapters, routing), _running_batch(backend, adapters, routing)
    for _ in range(12):
        routing.use(backend.network, adapters)
        lean.decode(backend.network, routing.lean)
        model.decode(backend.network)
        assert torch.equal(lean.mask, model.mask)
        for (lean_keys, lean_values), (keys, values) in zip(lean.layers, model.layers, strict=True):
            assert torch.equal(lean_keys, keys) and torch.equal(lean_values, values)
    assert [s.generated for s in lean.sequences] == [s.generated for s in model.sequences]
    assert len({tuple(s.generated) for s in lean.sequences}) > 1


def test_a_lean_step_that_would_differ_is_refused_by_the_probe(backend, monkeypatch):
    assert lean_step(backend.network) is not None

    def rotary_off(query, key, cos, sin):  # forgets the rotary embedding
        return query, key

    original = LeanLlamaStep.__init__

    def broken_init(self, causal_lm):
        original(self, causal_lm)
        self.rotary = rotary_off

    monkeypatch.setattr(LeanLlamaStep, "__init__", broken_init)
    assert lean_step(backend.network) is None


def test_other_architectures_and_attention_kernels_keep_the_model_forward(tiny_base):
    from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

    eager = AutoModelForCausalLM.from_pretrained(str(tiny_base), attn_implementation="eager").eval()
    assert lean_step(eager) is None
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=50)).eval()
    assert lean_step(gpt2) is None
    hooked = AutoModelForCausalLM.from_pretrained(str(tiny_base)).eval()
    assert lean_step(hooked) is not None
    hooked.model.layers[0].mlp.register_forward_hook(lambda module, args, output: output)
    assert lean_step(hooked) is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("padded", [True, False], ids=["padded", "equal-lengths"])
def test_the_lean_step_matches_on_grouped_query_attention_with_and_without_padding(dtype, padded):
    network = two_adapter_llama(dtype)  # grouped-query attention: 2 key/value heads for 4 query heads
    names = ["default", "other", "other", "default"]
    lengths = [5, 9, 3, 7] if padded else [6, 6, 6, 6]
    routing = _AdapterRouting()
    routing.use(network, names)
    assert isinstance(routing.lean, LeanLlamaStep)

    def running_batch() -> _Batch:
        generator = torch.Generator().manual_seed(1)
        sequences = [
            Sequence(
                GenerationRequest(prompt="", max_tokens=32),
                name,
                0,
                i,
                torch.randint(1, 64, (n,), generator=generator).tolist(),
            )
            for i, (name, n) in enumerate(zip(names, lengths, strict=True))
        ]
        routing.use(network, names)
        _prefill(network, 0, sequences)
        batch = _Batch()
        batch.add(sequences)
        return batch

    lean, model = running_batch(), running_batch()
    assert bool(lean.mask.all()) is not padded
    for _ in range(8):
        routing.use(network, names)
        lean.decode(network, routing.lean)
        model.decode(network)
        for (lean_keys, lean_values), (keys, values) in zip(lean.layers, model.layers, strict=True):
            assert torch.equal(lean_keys, keys) and torch.equal(lean_values, values)
    assert [s.generated for s in lean.sequences] == [s.generated for s in model.sequences]
