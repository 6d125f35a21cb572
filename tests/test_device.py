"""`model.device`: where training, evaluation, serving and the base-model embedder run.

The first tests run anywhere. The `gpu` ones need a CUDA GPU (they skip without one, saying so):
each runs a stage on the GPU and on the CPU with the same tiny model and adapters and checks
that the results agree, so a tensor left on the wrong device, or a GPU path that computes
something else, fails.
"""

from __future__ import annotations

import asyncio
import json

import pytest

from conftest import quickstart_rows
from ctloop.config import CtloopConfig, EvalConfig, LoraConfig, ModelConfig, TrainConfig
from ctloop.data.records import record_from_fields
from ctloop.errors import ModelError
from ctloop.model.loading import model_device


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


gpu = pytest.mark.skipif("not __import__('torch').cuda.is_available()", reason="needs a CUDA GPU")


def test_a_device_that_is_not_one_is_refused_naming_the_field():
    with pytest.raises(ValueError, match="device"):
        ModelConfig(base="m", device="gpu")
    for good in ("auto", "cpu", "cuda", "cuda:1"):
        assert ModelConfig(base="m", device=good).device == good


def test_a_gpu_this_process_cannot_see_is_a_clear_error():
    import torch

    count = torch.cuda.device_count() if _cuda() else 0
    with pytest.raises(ModelError, match=rf"model.device='cuda:{count}'.*sees {count} CUDA device.*model.device: auto"):
        model_device(ModelConfig(base="m", device=f"cuda:{count}"))
    assert model_device(ModelConfig(base="m")) == ("cuda" if _cuda() else "cpu")
    assert model_device(ModelConfig(base="m", device="cpu")) == "cpu"


def test_the_device_does_not_change_the_training_hash(tmp_path):
    def config(device: str) -> CtloopConfig:
        return CtloopConfig(workspace=tmp_path, model={"base": "m", "device": device})

    assert config("cpu").training_hash() == config("auto").training_hash() == config("cuda:3").training_hash()
    other = CtloopConfig(workspace=tmp_path, model={"base": "m", "max_seq_tokens": 64})
    assert other.training_hash() != config("auto").training_hash()


def _records(name: str, n: int):
    return [record_from_fields(json.loads(line)) for line in quickstart_rows(name, n)]


@pytest.fixture(scope="module")
def adapters(tiny_base, tmp_path_factory):
    from ctloop.training.tinymodel import random_adapter

    root = tmp_path_factory.mktemp("device-adapters")
    return {version: random_adapter(tiny_base, root / f"v{version}", seed=version) for version in (1, 2)}


@gpu
def test_evaluation_on_the_gpu_matches_the_cpu(tiny_base, adapters):
    from ctloop.evaluation.evaluate import evaluate

    sets = {"old": _records("old_domain.jsonl", 40)}
    named = {"base": None, "v1": adapters[1], "v2": adapters[2]}
    config = EvalConfig(generate=True, max_new_tokens=6)
    on = {
        device: evaluate(sets, named, model=ModelConfig(base=str(tiny_base), device=device), config=config)
        for device in ("cpu", "cuda")
    }
    for name in named:
        assert on["cuda"].losses["old"][name] == pytest.approx(on["cpu"].losses["old"][name], abs=1e-4)
        assert on["cuda"].predictions["old"][name] == on["cpu"].predictions["old"][name]


@gpu
@pytest.mark.parametrize("max_sequences", [1, 16], ids=["one-at-a-time", "batched"])
def test_serving_on_the_gpu_gives_the_cpus_greedy_answers(tiny_base, adapters, max_sequences):
    from ctloop.serving.backends import GenerationRequest, InProcessBackend
    from ctloop.serving.batching import BatchLimits

    prompts = [f"Package: lib{name}\nDescription:" for name in ("a", "foo-utils", "zlib1g", "perl")]

    async def answers(backend):
        asks = [(GenerationRequest(prompt=p, max_tokens=10), v) for p in prompts for v in (1, 2)]
        done = await asyncio.gather(*(backend.generate(request, v) for request, v in asks))
        await backend.aclose()
        return [a.text for a in done]

    results = {}
    for device in ("cpu", "cuda"):
        backend = InProcessBackend(ModelConfig(base=str(tiny_base), device=device), BatchLimits(max_sequences, 8192))
        assert backend.base.device.type == device
        for version, folder in adapters.items():
            backend.load(version, folder)
        results[device] = asyncio.run(answers(backend))
    assert results["cuda"] == results["cpu"]
    assert results["cpu"][0] != results["cpu"][1]  # the adapters differ


@gpu
def test_training_on_the_gpu_follows_the_cpus_losses(tiny_base, tmp_path):
    from ctloop.training.trainer import train_adapter

    runs = {}
    for device in ("cpu", "cuda"):
        runs[device] = train_adapter(
            _records("old_domain.jsonl", 120),
            model=ModelConfig(base=str(tiny_base), max_seq_tokens=96, device=device),
            lora=LoraConfig(r=4, alpha=8),
            train=TrainConfig(epochs=2, learning_rate=0.01, batch_tokens=256, checkpoint_every=0, precision="fp32"),
            out_dir=tmp_path / device,
        )
    assert runs["cuda"].attn_implementation == "flex_attention"  # packed rows on a GPU
    cpu, cuda = ([loss for _, loss in runs[d].losses] for d in ("cpu", "cuda"))
    assert len(cpu) >= 3 and cuda == pytest.approx(cpu, abs=0.02)  # the same run, step by step


@gpu
def test_the_base_model_embedder_on_the_gpu_matches_the_cpu(tiny_base):
    import numpy as np

    from ctloop.drift.embed import BaseModelEmbedder

    texts = [r.prompt for r in _records("new_domain.jsonl", 30)]
    cpu = BaseModelEmbedder(ModelConfig(base=str(tiny_base), device="cpu")).embed(texts)
    cuda = BaseModelEmbedder(ModelConfig(base=str(tiny_base), device="cuda")).embed(texts)
    np.testing.assert_allclose(cuda, cpu, atol=1e-4)


def test_torchrun_processes_take_their_own_gpu_and_a_pinned_gpu_is_refused(monkeypatch):
    import torch

    from ctloop.training import trainer

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert trainer.training_device(ModelConfig(base="m")) == "cuda:1"
    assert trainer.training_device(ModelConfig(base="m", device="cuda")) == "cuda:1"
    assert trainer.training_device(ModelConfig(base="m", device="cpu")) == "cpu"
    with pytest.raises(ModelError, match=r"model.device='cuda:1' pins one GPU, but torchrun started 4 processes"):
        trainer.training_device(ModelConfig(base="m", device="cuda:1"))
    # the process group's backend follows the training device, not whether the host has a GPU
    calls = []
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda backend: calls.append(backend))
    monkeypatch.setattr(torch.distributed, "get_rank", lambda: 3)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls.append(device))
    assert trainer.distributed_setup("cpu") == (3, 4) and calls == ["gloo"]
    calls.clear()
    assert trainer.distributed_setup("cuda:1") == (3, 4) and calls == ["cuda:1", "nccl"]
