"""The trainer: packed samples stay isolated, runs are reproducible, a killed run resumes."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import quickstart_rows
from ctloop.config import LoraConfig, ModelConfig, TrainConfig
from ctloop.data.records import record_from_fields

pytestmark = pytest.mark.slow


def _records(n: int):
    return [record_from_fields(json.loads(line)) for line in quickstart_rows("old_domain.jsonl", n)]


def _adapter_tensors(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "adapter_model.safetensors"))


def _train(tiny_base, out: Path, checkpoint_dir: Path | None = None, **train):
    """sft on 120 quickstart rows; objective dpo: the same rows as corrections of another row's answer."""
    from dataclasses import replace

    from ctloop.data.preference import preference_set
    from ctloop.training.trainer import train_adapter

    settings = {"epochs": 2, "learning_rate": 0.01, "batch_tokens": 256, "checkpoint_every": 3} | train
    records, preference = _records(120), None
    if settings.get("objective", "sft") == "dpo":
        corrected = [
            replace(r, metadata={"feedback_kind": "correction", "rejected_answer": records[i - 7].completion})
            for i, r in enumerate(records)
        ]
        records, preference = [], preference_set(corrected, "dpo")
    return train_adapter(
        records,
        model=ModelConfig(base=str(tiny_base), max_seq_tokens=96),
        lora=LoraConfig(r=4, alpha=8),
        train=TrainConfig(**settings),
        out_dir=out,
        checkpoint_dir=checkpoint_dir,
        preference=preference,
    )


def test_packed_samples_do_not_attend_to_each_other():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from ctloop.model.batching import Example, collate, collate_packed
    from ctloop.model.losses import token_losses

    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
        )
    ).eval()
    first = Example([1, 5, 6, 7, 8, 9, 2], prompt_len=3)
    second, perturbed = Example([1, 10, 11, 12, 2], 2), Example([1, 30, 31, 32, 2], 2)
    with torch.no_grad():
        packed, _ = token_losses(model, collate_packed([[second, first]], 0))
        changed, _ = token_losses(model, collate_packed([[perturbed, first]], 0))
        alone, _ = token_losses(model, collate([first], 0))
    # `first` sits after the other sample; its losses ignore what that sample says ...
    assert torch.allclose(packed[0, 5:11], changed[0, 5:11], atol=1e-6)
    # ... and equal its losses when it is trained alone.
    assert torch.allclose(packed[0, 5:11], alone[0, :6], atol=1e-5)
    assert not torch.allclose(packed[0, :4], changed[0, :4])  # the perturbation did change its own sample


def test_packing_fills_fixed_width_rows(tiny_base, tmp_path):
    packed = _train(tiny_base, tmp_path / "packed", epochs=1, packing=True)
    grouped = _train(tiny_base, tmp_path / "grouped", epochs=1, packing=False)
    assert packed.tokens == grouped.tokens  # the same real tokens ...
    assert packed.tokens / packed.padded_tokens > 0.9  # ... in rows that are more than 90% full


def test_packed_batches_hold_every_example_once_in_one_batch_shape():
    import random

    from ctloop.model.batching import packed_batches, packed_row_width

    rng = random.Random(0)
    lengths = [rng.randint(5, 250) for _ in range(900)]
    width = packed_row_width(lengths, batch_tokens=1024, hidden_size=512)
    assert width == 256  # the narrowest power of two that holds the longest example pays off here
    batches = packed_batches(lengths, width, rows_per_batch=4, seed=3)
    assert all(len(batch) == 4 for batch in batches[:-1]) and 1 <= len(batches[-1]) <= 4
    assert all(sum(lengths[i] for i in row) <= width for batch in batches for row in batch)
    assert sorted(i for batch in batches for row in batch for i in row) == list(range(900))
    slots = sum(len(batch) * width for batch in batches)
    assert sum(lengths) / slots > 0.95
    # 70-token examples fill 128-token rows to 55%, 512-token rows to 96%: a wide model, for which
    # attention is cheap, takes the wider rows; a narrow one, for which it is dear, the narrow ones.
    assert packed_row_width([70] * 200, batch_tokens=4096, hidden_size=4096) >= 512
    assert packed_row_width([70] * 200, batch_tokens=4096, hidden_size=32) == 128


def test_same_seed_same_adapter_and_another_seed_another(tiny_base, tmp_path):
    import torch

    first = _adapter_tensors(Path(_train(tiny_base, tmp_path / "a").adapter_dir))
    second = _adapter_tensors(Path(_train(tiny_base, tmp_path / "b").adapter_dir))
    other = _adapter_tensors(Path(_train(tiny_base, tmp_path / "c", seed=1).adapter_dir))
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)


KILLABLE = """
import json, sys
from pathlib import Path
sys.path.insert(0, {tests!r})
import test_train
test_train._train(Path({base!r}), Path({out!r}), Path({ckpt!r}), objective={objective!r})
"""


@pytest.mark.parametrize("objective", ["sft", "dpo"])
def test_a_killed_run_resumes_from_its_checkpoint_and_matches_an_uninterrupted_run(tiny_base, tmp_path, objective):
    """dpo: the reference log-probabilities are computed again on resume, and are the same (#27)."""
    import torch

    reference = _adapter_tensors(Path(_train(tiny_base, tmp_path / "uninterrupted", objective=objective).adapter_dir))
    out, checkpoints = tmp_path / "resumed", tmp_path / "checkpoints"
    code = KILLABLE.format(
        tests=str(Path(__file__).parent), base=str(tiny_base), out=str(out), ckpt=str(checkpoints), objective=objective
    )
    victim = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (checkpoints / "checkpoint.safetensors").exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    victim.send_signal(signal.SIGKILL)  # like kill -9, right after a checkpoint
    victim.wait()
    assert (checkpoints / "checkpoint.safetensors").exists() and not out.exists()

    resumed = _train(tiny_base, out, checkpoints, objective=objective)
    assert resumed.resumed_from_step > 0 and resumed.objective == objective
    weights = _adapter_tensors(out)
    assert all(torch.allclose(weights[k], reference[k], atol=1e-6) for k in reference)
    assert not checkpoints.exists()  # cleaned up once the adapter is final


def test_warm_start_continues_the_given_adapter(tiny_base, tmp_path):
    from ctloop.training.trainer import train_adapter

    first = _train(tiny_base, tmp_path / "first", epochs=3, log_every=1)
    fresh = _train(tiny_base, tmp_path / "fresh", epochs=1, log_every=1)
    continued = train_adapter(
        _records(120),
        model=ModelConfig(base=str(tiny_base), max_seq_tokens=96),
        lora=LoraConfig(r=4, alpha=8),
        train=TrainConfig(epochs=1, learning_rate=0.01, batch_tokens=256, log_every=1, warmup_fraction=0.3),
        out_dir=tmp_path / "continued",
        warm_start_from=Path(first.adapter_dir),
    )
    assert continued.warm_start == first.adapter_dir
    # It starts where the first adapter ended, below a fresh adapter's first loss (deterministic on CPU).
    assert continued.losses[0][1] < fresh.losses[0][1]
    assert continued.learning_rates[0][1] < 0.01  # the learning rate is warmed up again


@pytest.mark.parametrize("objective", ["sft", "sft+dpo"])
def test_two_processes_train_one_adapter_with_torchrun(tiny_base, tmp_path, objective):
    """sft+dpo: a preference term beside the supervised one under DDP (#27)."""
    import os

    import yaml
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from ctloop.config import config_from_dict
    from ctloop.cycle.declaration import stage
    from ctloop.cycle.folder import StageContext
    from ctloop.cycle.run import run_stage
    from ctloop.fileio import read_json
    from ctloop.workspace import Workspace

    raw = {
        "model": {"base": str(tiny_base), "max_seq_tokens": 96},
        "data": {"min_rows": 20},
        "train": {"epochs": 1, "learning_rate": 0.01, "batch_tokens": 256, "objective": objective},
        "registry": {"model_name": "ddp"},
    }
    config_path = tmp_path / "c.yaml"
    config_path.write_text(yaml.safe_dump(raw))
    config, workspace = config_from_dict(raw), Workspace(tmp_path / "ws")
    data = tmp_path / "d.jsonl"
    rows = [json.loads(line) for line in quickstart_rows("old_domain.jsonl", 120)]
    if objective == "sft+dpo":  # corrections, each of the answer another row holds
        for i, row in enumerate(rows):
            other = rows[(i + 7) % len(rows)]
            row["metadata"] = {"feedback_kind": "correction", "rejected_answer": str(other.get("completion"))}
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    cycle_id = run_stage(stage("validate"), StageContext(config, workspace, data=data)).cycle_id
    assert run_stage(stage("trigger"), StageContext(config, workspace, cycle_id)).proceed
    run_stage(stage("prepare"), StageContext(config, workspace, cycle_id))

    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "ctloop",
        "train",
        "--config",
        str(config_path),
        "--cycle",
        cycle_id,
        "--workspace",
        str(workspace.root),
    ]
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert done.returncode == 0, done.stderr[-3000:]
    cycle_dir = workspace.cycle_dir(cycle_id)
    training = read_json(cycle_dir / "training.json")
    assert training["world_size"] == 2 and training["objective"] == objective
    if objective == "sft+dpo":
        pairs = training["preference"]["examples"]  # in batches of 8, half of them on each process
        assert training["preference"]["kind"] == "dpo" and training["steps"] == -(-pairs // 8) // 2
    assert sorted(p.name for p in cycle_dir.iterdir() if p.name.startswith("adapter")) == ["adapter"]
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base), str(cycle_dir / "adapter"))
    assert sum(p.numel() for n, p in model.named_parameters() if "lora_" in n) > 0


def test_evaluation_with_generation_scores_greedy_answers(tiny_base, tmp_path):
    from ctloop.config import EvalConfig
    from ctloop.evaluation.evaluate import evaluate

    adapter = Path(_train(tiny_base, tmp_path / "a", epochs=1).adapter_dir)
    rows = _records(12)
    report = evaluate(
        {"heldout": rows},
        {"candidate": adapter, "base": None},
        model=ModelConfig(base=str(tiny_base), max_seq_tokens=96),
        config=EvalConfig(
            generate=True, max_new_tokens=8, generation_batch=5, custom_metrics={"verbatim": "operator:eq"}
        ),
    )
    for model in ("candidate", "base"):
        assert len(report.predictions["heldout"][model]) == 12
        assert all(isinstance(answer, str) for answer in report.predictions["heldout"][model])
        for metric in ("exact_match", "token_f1", "rouge_l", "verbatim"):
            values = report.metrics["heldout"][model][metric]
            assert len(values) == 12 and all(0.0 <= v <= 1.0 for v in values)
    assert report.to_dict()["metric_means"]["heldout"]["candidate"].keys() == {
        "exact_match",
        "token_f1",
        "rouge_l",
        "verbatim",
    }


def test_bf16_training_keeps_an_fp32_adapter_and_tracks_fp32(tiny_base, tmp_path):
    """bf16: frozen base in bf16 under autocast, LoRA inputs not cast up to fp32, adapter and optimizer in fp32."""
    bf16 = _train(tiny_base, tmp_path / "bf16", precision="bf16", checkpoint_every=0, log_every=1)
    fp32 = _train(tiny_base, tmp_path / "fp32", precision="fp32", checkpoint_every=0, log_every=1)
    tensors = _adapter_tensors(tmp_path / "bf16")
    assert tensors and all(t.dtype.itemsize == 4 for t in tensors.values())
    assert len(bf16.losses) == len(fp32.losses) > 5
    assert max(abs(a[1] - b[1]) for a, b in zip(bf16.losses, fp32.losses, strict=True)) < 0.05
    assert _adapter_tensors(tmp_path / "fp32").keys() == tensors.keys()


def test_training_attention_skips_work_across_packed_samples_where_it_can(monkeypatch):
    import torch
    import transformers.utils

    from ctloop.kernels import attention as cpu_attention
    from ctloop.training.trainer import training_attention

    # on the CPU: ctloop's CPU kernel, whatever the batches
    assert training_attention(True, True, "cpu") == training_attention(False, False, "cpu") == cpu_attention.NAME
    # the choice made on a GPU
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    monkeypatch.setattr(transformers.utils, "is_flash_attn_2_available", lambda: False)
    assert training_attention(True, True, "cuda:0") == "flex_attention"
    assert training_attention(False, True, "cuda:0") == "sdpa"
    monkeypatch.setattr(transformers.utils, "is_flash_attn_2_available", lambda: True)
    assert training_attention(True, True, "cuda") == training_attention(False, True, "cuda") == "flash_attention_2"
    # flash-attn has no fp32 kernels and needs Ampere or newer
    assert training_attention(True, False, "cuda") == "flex_attention"
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (7, 0))
    assert training_attention(True, True, "cuda") == "flex_attention"


PAYLOAD_MARKER = "pwned-by-checkpoint"


class _Payload:
    """Unpickling this runs a shell command: what a crafted checkpoint in a shared workspace would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


def test_a_crafted_pickle_checkpoint_never_runs_and_training_starts_over(tiny_base, tmp_path):
    import pickle

    checkpoints, marker = tmp_path / "checkpoints", tmp_path / PAYLOAD_MARKER
    checkpoints.mkdir()
    (checkpoints / "checkpoint.pt").write_bytes(pickle.dumps({"adapter": _Payload(marker)}))
    result = _train(tiny_base, tmp_path / "adapter", checkpoints)
    assert not marker.exists()  # the pickle was never loaded
    assert result.resumed_from_step == 0 and (tmp_path / "adapter" / "adapter_config.json").is_file()


def test_a_crafted_checkpoint_in_the_new_format_is_refused_with_a_clear_error(tiny_base, tmp_path):
    import pickle

    from ctloop.errors import WorkspaceError

    checkpoints, marker = tmp_path / "checkpoints", tmp_path / PAYLOAD_MARKER
    checkpoints.mkdir()
    (checkpoints / "checkpoint.safetensors").write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(WorkspaceError, match="not a checkpoint ctloop can read.*delete"):
        _train(tiny_base, tmp_path / "adapter", checkpoints)
    assert not marker.exists()


def test_the_checkpoint_round_trips_optimizer_scheduler_rng_and_progress(tmp_path):
    import torch
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from ctloop.training.checkpoint import load_checkpoint, save_checkpoint

    def setup():
        torch.manual_seed(0)
        base = LlamaForCausalLM(
            LlamaConfig(
                vocab_size=64,
                hidden_size=16,
                intermediate_size=32,
                num_hidden_layers=1,
                num_attention_heads=2,
                num_key_value_heads=2,
            )
        )
        model = get_peft_model(base, PeftLoraConfig(r=2, target_modules=["q_proj"]))
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1, fused=True)
        return model, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 / (step + 1))

    model, optimizer, scheduler = setup()
    model(input_ids=torch.tensor([[1, 2, 3]]), labels=torch.tensor([[1, 2, 3]])).loss.backward()
    optimizer.step()
    scheduler.step()
    progress = {"step": 1, "losses": [[1, 2.5]], "seconds": 0.5}
    save_checkpoint(tmp_path, model, optimizer, scheduler, progress)
    expected_draw = torch.rand(3)

    fresh, fresh_optimizer, fresh_scheduler = setup()
    restored: dict = {}
    assert load_checkpoint(tmp_path, fresh, fresh_optimizer, fresh_scheduler, restored) == 1
    assert restored == progress and fresh_scheduler.state_dict() == scheduler.state_dict()
    assert torch.equal(torch.rand(3), expected_draw)
    for want, got in zip(optimizer.state.values(), fresh_optimizer.state.values(), strict=True):
        assert set(want) == set(got) and all(torch.equal(want[k], got[k]) for k in want)
    for (name, want), got in zip(model.named_parameters(), fresh.parameters(), strict=True):
        if want.requires_grad:
            assert torch.equal(want, got), name
