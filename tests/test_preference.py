"""Preference objectives (#27): feedback kinds route rows, ctloop's DPO and KTO losses agree with TRL's
on identical batches, and preference training moves the adapter toward the preferred answers."""

from __future__ import annotations

import json

import pytest

from conftest import quickstart_rows
from ctloop.config import LoraConfig, ModelConfig, TrainConfig
from ctloop.data.preference import preference_set, supervised_rows
from ctloop.data.records import Record


def _qa(n: int, offset: int = 0) -> list[dict]:
    return [json.loads(line) for line in quickstart_rows("old_domain.jsonl", offset + n)[offset:]]


def _row(i: int, kind: str, prompt: str, completion: str, rejected: str = "") -> Record:
    metadata = {"feedback_kind": kind} | ({"rejected_answer": rejected} if rejected else {})
    return Record(f"r{i}", prompt, completion, metadata=metadata)


def test_feedback_kinds_route_rows_to_each_objective():
    rows = [
        _row(0, "correction", "p0", "fixed", rejected="wrong"),
        _row(1, "rated_up", "p1", "good"),
        _row(2, "rated_down", "p2", "bad"),
        _row(3, "correction", "p3", "same", rejected="same"),  # repeats the answer: no pair
        Record("plain", "p4", "a file's row"),
        Record("old", "p5", "an older harvest", metadata={"harvest_reason": "rated_up"}),
    ]
    assert [r.id for r in supervised_rows(rows)] == ["r0", "r1", "r3", "plain", "old"]
    dpo = preference_set(rows, "dpo")
    assert [(p.chosen, p.rejected) for p in dpo.pairs] == [("fixed", "wrong")]
    kto = preference_set(rows, "kto")
    assert [(a.completion, a.desirable) for a in kto.answers] == [
        ("fixed", True),
        ("wrong", False),
        ("good", True),
        ("bad", False),
        ("an older harvest", True),
    ]
    assert kto.describe() == "kto on 5 rated answers (3 up, 2 down; 2 from corrections)"


def _policy(tiny_base):
    """The tiny base with a LoRA adapter whose B matrices are random: policy and reference differ."""
    import torch
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(str(tiny_base), dtype=torch.float32)
    model = get_peft_model(base, PeftLoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"))
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.2)
    return model


def _perturb(model) -> None:
    """Move the trained adapter ("default") away from TRL's copy of it ("ref", the reference)."""
    import torch

    assert "ref" in model.peft_config  # TRL keeps the starting adapter as the reference, as ctloop does
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B.default" in name:
                param.add_(torch.randn_like(param) * 0.2)


def _examples(batch, key: str = ""):
    """TRL's collated rows as ctloop's examples: the same token ids, the loss on the same tokens."""
    from ctloop.model.batching import Example

    ids, attention, completion = (batch[f"{key}{name}"] for name in ("input_ids", "attention_mask", "completion_mask"))
    out = []
    for row in range(ids.shape[0]):
        n = int(attention[row].sum())
        out.append(Example(ids[row, :n].tolist(), int(completion[row].nonzero()[0])))
    return out


@pytest.mark.parametrize("loss", ["sigmoid", "robust"])
def test_dpo_loss_matches_trl_on_identical_batches(tiny_base, tmp_path, loss):
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from ctloop.training.preference import dpo_losses, sequence_logps

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_base))
    model = _policy(tiny_base)
    good, bad = _qa(8), _qa(8, offset=50)
    data = Dataset.from_list(
        [{"prompt": g["prompt"], "chosen": g["completion"], "rejected": b["completion"]} for g, b in zip(good, bad)]
    )
    args = DPOConfig(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        beta=0.3,
        loss_type=[loss],
        label_smoothing=0.2 if loss == "robust" else 0.0,
        report_to=[],
        use_cpu=True,
        max_length=None,
    )
    trainer = DPOTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer)
    batch = next(iter(trainer.get_train_dataloader()))
    model.eval()
    examples = _examples(batch)
    half = len(examples) // 2
    with torch.no_grad():
        reference = sequence_logps(model, examples, tokenizer.pad_token_id)  # the starting adapter
        _perturb(model)
        theirs = trainer.compute_loss(model, batch)
        policy = sequence_logps(model, examples, tokenizer.pad_token_id)
        ours = dpo_losses(
            policy[:half],
            policy[half:],
            reference[:half],
            reference[half:],
            beta=0.3,
            loss=loss,
            label_noise=0.2 if loss == "robust" else 0.0,
        ).mean()
    assert abs(float(policy[:half].mean() - reference[:half].mean())) > 0.1  # the adapter does change the answer
    assert float(ours) == pytest.approx(float(theirs), rel=1e-4, abs=1e-5)


def test_kto_loss_matches_trl_on_identical_batches(tiny_base, tmp_path):
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import KTOConfig, KTOTrainer

    from ctloop.training.preference import kto_loss, sequence_logps

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_base))
    model = _policy(tiny_base)
    rows = [{"prompt": q["prompt"], "completion": q["completion"], "label": i % 3 != 0} for i, q in enumerate(_qa(12))]
    args = KTOConfig(
        output_dir=str(tmp_path),
        per_device_train_batch_size=6,
        beta=0.2,
        desirable_weight=1.0,
        undesirable_weight=1.5,
        report_to=[],
        use_cpu=True,
        max_length=None,
        train_sampling_strategy="sequential",
    )
    trainer = KTOTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
    batch = next(iter(trainer.get_train_dataloader()))
    model.eval()
    main, mismatched = _examples(batch), _examples(batch, key="KL_")
    pad = tokenizer.pad_token_id
    with torch.no_grad():
        reference, reference_kl = sequence_logps(model, main, pad), sequence_logps(model, mismatched, pad)
        _perturb(model)
        theirs = trainer.compute_loss(model, batch)
        policy, policy_kl = sequence_logps(model, main, pad), sequence_logps(model, mismatched, pad)
        ours = kto_loss(
            policy,
            reference,
            batch["label"].bool(),
            policy_kl,
            reference_kl,
            beta=0.2,
            desirable_weight=1.0,
            undesirable_weight=1.5,
        )
    assert float(ours) == pytest.approx(float(theirs), rel=1e-4, abs=1e-5)


def _pairs(n: int) -> list[Record]:
    """Corrections whose chosen answer is the dataset's, the rejected one another question's."""
    good, bad = _qa(n), _qa(n, offset=100)
    return [
        Record(
            f"c{i}",
            g["prompt"],
            g["completion"],
            metadata={"feedback_kind": "correction", "rejected_answer": b["completion"]},
        )
        for i, (g, b) in enumerate(zip(good, bad))
    ]


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["dpo", "kto", "sft+dpo"])
def test_preference_training_prefers_the_chosen_answers_more(tiny_base, tmp_path, objective):
    """After training, the adapter's margin log p(chosen) - log p(rejected) exceeds the base model's
    on the training pairs; the result records the objective and its settings."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ctloop.model.batching import encode
    from ctloop.training.preference import sequence_logps
    from ctloop.training.trainer import train_adapter

    rows = _pairs(48)
    kind = objective.rpartition("+")[2]
    data = preference_set(rows, kind)
    sft_rows = supervised_rows(rows) if objective.startswith("sft") else []
    result = train_adapter(
        sft_rows,
        model=ModelConfig(base=str(tiny_base), max_seq_tokens=96),
        lora=LoraConfig(r=4, alpha=8),
        train=TrainConfig(
            objective=objective,
            epochs=3,
            learning_rate=0.02,
            preference_batch_size=8,
            dpo={"beta": 0.5},
            kto={"beta": 0.5},
        ),
        out_dir=tmp_path / "adapter",
        preference=data,
    )
    assert result.objective == objective
    assert result.preference["kind"] == kind and result.preference["examples"] == len(data)
    assert result.steps == 3 * 6 * (2 if kind == "kto" else 1)

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_base))
    chosen = encode(
        [Record(p.id, p.prompt, p.chosen) for p in data.pairs[:24]]
        if kind == "dpo"
        else [Record(r.id, r.prompt, r.completion) for r in rows[:24]],
        tokenizer,
    )
    rejected = encode([Record(r.id, r.prompt, r.metadata["rejected_answer"]) for r in rows[:24]], tokenizer)
    base = AutoModelForCausalLM.from_pretrained(str(tiny_base), dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    pad = tokenizer.pad_token_id
    with torch.no_grad():
        trained = sequence_logps(model, chosen, pad) - sequence_logps(model, rejected, pad)
        with model.disable_adapter():
            before = sequence_logps(model, chosen, pad) - sequence_logps(model, rejected, pad)
    assert float((trained - before).mean()) > 0.25
    assert result.preference["reward_margins"]["last"] > result.preference["reward_margins"]["first"]
