"""#24 item 1: no adapter a server loads may change the shared base model.

A crafted `adapter_config.json` (PiSSA or OLoRA initialisation, layer replication, modules_to_save)
used to load with 200 and rewrite the base weights, so the champion answered "::::::::" for every
user from then on. Each crafted adapter here is a registry version (the checks apply to registry
adapters and folders alike); loading it through the runtime LoRA API or giving it a role must be
refused naming the field, and the champion's greedy answers must stay the same, bit for bit. A
change that slips past the checks anyway is caught by the base fingerprint: the base is reloaded.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import httpx
import pytest

from ctloop.registry.client import CHALLENGER
from ctloop.serving.server import create_app, serve_in_background
from ctloop.training.tinymodel import random_adapter
from ctloop.workspace import Workspace
from shadow_helpers import register_versions, serving_config

pytestmark = pytest.mark.slow
TOKEN = "safety-s3cret"
PROMPTS = ["Package: python3-requests\nDescription:", "Package: perl-json\nDescription:"]
CRAFTED = {
    "pissa": {"init_lora_weights": "pissa"},
    "olora": {"init_lora_weights": "olora"},
    "loftq": {"init_lora_weights": "loftq"},
    "layer_replication": {"layer_replication": [[0, 2], [1, 2]]},
    "modules_to_save": {"modules_to_save": ["lm_head"]},
    "rank_over_the_cap": {"r": 10000},
}
FIELD = {"pissa": "init_lora_weights", "olora": "init_lora_weights", "loftq": "init_lora_weights"}


def _crafted(source: Path, folder: Path, changes: dict) -> Path:
    shutil.copytree(source, folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps(config | changes))
    return folder


@pytest.fixture(scope="module")
def crafted_registry(tiny_base, tmp_path_factory):
    """v1 champion, v2 challenger (both honest), then one registry version per crafted config."""
    root = tmp_path_factory.mktemp("crafted")
    honest = [random_adapter(tiny_base, root / f"a{seed}", seed) for seed in (1, 2)]
    crafted = [_crafted(honest[0], root / name, changes) for name, changes in CRAFTED.items()]
    config = serving_config(tiny_base, root / "ws", serve={"max_lora_rank": 64})
    registry = register_versions(config, [*honest, *crafted])
    versions = {name: 3 + i for i, name in enumerate(CRAFTED)}
    return config, registry, versions


def _answers(url: str, model: str = "champion") -> list[str]:
    return [
        httpx.post(
            f"{url}/v1/completions",
            json={"model": model, "prompt": p, "max_tokens": 12, "temperature": 0},
            timeout=120,
        ).json()["choices"][0]["text"]
        for p in PROMPTS
    ]


def test_crafted_adapter_configs_are_refused_and_the_champion_answers_bit_for_bit_the_same(
    crafted_registry, monkeypatch
):
    config, registry, versions = crafted_registry
    monkeypatch.setenv("CTLOOP_ADMIN_TOKEN", TOKEN)
    auth = {"authorization": f"Bearer {TOKEN}"}
    with serve_in_background(create_app(config, Workspace(config.workspace))) as url:
        before = _answers(url)
        before_v2 = _answers(url, "srv-v2")
        for name, version in versions.items():
            load = httpx.post(
                f"{url}/v1/load_lora_adapter", json={"lora_name": f"srv-v{version}"}, headers=auth, timeout=120
            )
            assert load.status_code == 400, (name, load.text)
            error = load.json()["error"]
            assert error["param"] == FIELD.get(name, name if name != "rank_over_the_cap" else "r"), error
            assert _answers(url) == before, f"the champion's answers changed after loading {name}"
        assert _answers(url, "srv-v2") == before_v2
        # From the registry's side: a crafted version made challenger is not loaded either.
        registry.set_alias(CHALLENGER, versions["pissa"])
        deadline = time.time() + 60
        while time.time() < deadline:
            health = httpx.get(f"{url}/healthz").json()
            if "init_lora_weights" in health["last_sync_error"]:
                break
            time.sleep(0.2)
        assert "init_lora_weights" in health["last_sync_error"] and health["challenger"] is None
        assert health["status"] == "ok" and health["base_incidents"] == 0
        assert _answers(url) == before
        registry.set_alias(CHALLENGER, 2)


def test_a_base_change_that_slips_past_the_checks_is_caught_and_the_base_reloaded(tiny_base, tmp_path, monkeypatch):
    """The fingerprint is the second line: a load that rewrites base weights by any route is refused,
    the base is reloaded from disk with the other adapters, and answers are as before."""
    import torch

    from ctloop.config import ModelConfig
    from ctloop.errors import ModelError
    from ctloop.serving import adapter_safety
    from ctloop.serving.backends import InProcessBackend
    from ctloop.serving.batching import BatchLimits

    first, second = (random_adapter(tiny_base, tmp_path / f"a{seed}", seed) for seed in (1, 2))
    backend = InProcessBackend(ModelConfig(base=str(tiny_base)), BatchLimits(1, 8192))
    backend.load(1, first)
    ids = backend.tokenizer(PROMPTS[0], return_tensors="pt").input_ids

    def logits() -> torch.Tensor:
        with torch.no_grad():
            backend.network.set_adapter("v1")
            return backend.network(input_ids=ids).logits

    expected = logits()
    real_fill = adapter_safety.fill_adapter

    def fill_and_corrupt(network, adapter_dir, name):
        real_fill(network, adapter_dir, name)
        if name == "v2":  # only the rogue adapter; v1's reload after it is honest
            with torch.no_grad():
                next(p for k, p in network.named_parameters() if "q_proj.base_layer" in k).mul_(0.5)

    monkeypatch.setattr(adapter_safety, "fill_adapter", fill_and_corrupt)
    with pytest.raises(ModelError, match="changed the shared base model's weights.*reloaded.*v2 refused"):
        backend.load(2, second)
    monkeypatch.setattr(adapter_safety, "fill_adapter", real_fill)
    assert sorted(backend.loaded) == [1] and backend.base_incidents == 1 and backend.base_problem == ""
    assert torch.equal(logits(), expected)
    backend.load(2, second)  # an honest load afterwards is fine
    assert sorted(backend.loaded) == [1, 2] and torch.equal(logits(), expected)


def test_a_failed_load_frees_what_it_allocated(tiny_base, tmp_path):
    """#24 item 9: a load that fails (here: weights missing from the file) keeps nothing."""
    from ctloop.config import ModelConfig
    from ctloop.errors import ModelError
    from ctloop.serving.backends import InProcessBackend
    from ctloop.serving.batching import BatchLimits

    good = random_adapter(tiny_base, tmp_path / "good", 1)
    broken = _crafted(
        good, tmp_path / "broken", {"target_modules": ["q_proj", "v_proj", "k_proj", "o_proj", "lm_head"]}
    )
    backend = InProcessBackend(ModelConfig(base=str(tiny_base)), BatchLimits(1, 8192))
    backend.load(1, good)
    parameters = sum(p.numel() for p in backend.network.parameters())
    with pytest.raises(ModelError, match="lack .* of the weights"):
        backend.load(2, broken)
    assert sorted(backend.loaded) == [1] and list(backend.network.peft_config) == ["v1"]
    assert sum(p.numel() for p in backend.network.parameters()) == parameters


def test_base_layer_copies_inside_an_adapter_file_are_never_loaded(tiny_base, tmp_path):
    """peft saves the embedding matrix with an adapter that puts LoRA on the embeddings, and loads
    it back over the shared base (untying it from the output layer). A file whose copy was altered
    would change every adapter's answers; only LoRA weights may load."""
    import torch
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    from ctloop.config import ModelConfig
    from ctloop.serving.backends import InProcessBackend
    from ctloop.serving.batching import BatchLimits

    honest = random_adapter(tiny_base, tmp_path / "honest", 1)
    torch.manual_seed(2)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_base))
    lora = LoraConfig(r=4, lora_alpha=32, target_modules=["q_proj", "embed_tokens"], init_lora_weights=False)
    get_peft_model(model, lora).save_pretrained(str(tmp_path / "embeddings"))
    weights_file = tmp_path / "embeddings" / "adapter_model.safetensors"
    weights = load_file(weights_file)
    [copy] = [k for k in weights if "embed_tokens" in k and "lora_" not in k]
    save_file({**weights, copy: weights[copy] * -3.0}, weights_file)  # a poisoned copy of the base layer

    backend = InProcessBackend(ModelConfig(base=str(tiny_base)), BatchLimits(1, 8192))
    backend.load(1, honest)
    ids = backend.tokenizer(PROMPTS[0], return_tensors="pt").input_ids
    with torch.no_grad():
        expected = backend.network(input_ids=ids).logits
        backend.load(2, tmp_path / "embeddings")
        backend.network.set_adapter("v1")
        assert torch.equal(backend.network(input_ids=ids).logits, expected)
    assert backend.base_incidents == 0
