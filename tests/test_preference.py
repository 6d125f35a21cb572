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


def _thumbs(n: int) -> list[tuple[str, str, str, object]]:
    """Logged answers with thumbs only: the dataset's answer rated up, another question's rated down."""
    from ctloop.logstore.requests import FeedbackRecord

    rows = [q for q in _qa(2 * n) if isinstance(q.get("prompt"), str) and isinstance(q.get("completion"), str)]
    items = []
    for i, q in enumerate(rows[:n]):
        up = i % 3 != 0
        answer = q["completion"] if up else rows[(i + n // 2) % len(rows)]["completion"]
        items.append((f"r{i}", q["prompt"], answer, FeedbackRecord(f"r{i}", rating=1 if up else -1)))
    return items


@pytest.mark.slow
def test_a_kto_cycle_from_production_trains_on_thumbs_alone_gates_and_registers(tiny_base, tmp_path):
    """#27 done-means: `ctloop run --from-production` with train.objective kto on thumbs-only feedback
    trains, gates with the preference rules, registers, and the lineage says what it trained on; with
    too few rated answers the cycle stops before training and says so."""
    import subprocess
    import sys

    import yaml

    from ctloop.fileio import read_json
    from ctloop.workspace import Workspace
    from test_harvest import _logged

    workspace = Workspace(tmp_path / "ws").create()
    raw = {
        "workspace": str(workspace.root),
        "model": {"base": str(tiny_base), "max_seq_tokens": 96},
        "data": {"min_rows": 20, "holdout_fraction": 0.3},
        "train": {"objective": "kto", "epochs": 4, "learning_rate": 0.005, "kto": {"beta": 0.1}},
        # The tiny model carries thumbs over to new prompts only a little (about 54% against the base's 50%):
        # the bounds are wide open here; the rules' pass and fail are tested on their own below.
        "gate": {"min_examples": 10, "min_new_improvement": -1.0, "min_preference_gain": -0.5},
        "registry": {"model_name": "thumbs"},
    }
    probes = tmp_path / "probes.jsonl"  # false premises: the right answer disagrees with the user
    probes.write_text(
        "".join(
            json.dumps({"prompt": q["prompt"], "completion": q["completion"], "metadata": {"agreeing_answer": "yes"}})
            + "\n"
            for q in _qa(12, offset=400)
        )
    )
    raw["eval"] = {"agreement_probes": str(probes)}
    config_path = tmp_path / "ctloop.yaml"
    config_path.write_text(yaml.safe_dump(raw))
    items = _thumbs(150)
    _logged(workspace, items)

    def ctloop(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "ctloop", *args], capture_output=True, text=True, timeout=600)

    too_few = tmp_path / "too-few.yaml"
    too_few.write_text(yaml.safe_dump(raw | {"train": raw["train"] | {"min_preference_rows": 1000}}))
    stopped = ctloop("run", "--config", str(too_few), "--from-production", "--since", "1h")
    assert stopped.returncode != 0
    assert "train.objective=kto needs at least 1000 rated answers" in stopped.stderr + stopped.stdout
    assert not list(workspace.cycles_dir.glob("*/adapter"))  # it stopped before training

    result = ctloop("run", "--config", str(config_path), "--from-production", "--since", "1h")
    assert result.returncode == 0, result.stderr[-3000:]
    (cycle,) = [p.parent for p in workspace.cycles_dir.glob("*/gate.json")]
    gate = read_json(cycle / "gate.json")
    names = {rule["name"] for rule in gate["rules"]}
    assert {"preference accuracy (rated)", "answer length", "KL to base", "agreement probes"} <= names, names
    training = read_json(cycle / "training.json")
    assert training["objective"] == "kto" and training["preference"]["kind"] == "kto"
    up = sum(1 for *_, fb in items if fb.rating > 0)
    lineage = ctloop("lineage", "1", "--workspace", str(workspace.root))
    assert lineage.returncode == 0, lineage.stderr[-2000:]
    described = read_json(cycle / "adapter" / "ctloop_manifest.json")["objective"]
    assert described.startswith("kto on ") and "rated answers (" in described and " up, " in described
    assert described in lineage.stdout, lineage.stdout
    n = int(described.split()[2])
    assert n < len(items) and training["preference"]["desirable"] < up  # the holdout's rows stayed out


def _stored(sets: dict[str, dict[str, list[float]]], tokens: int = 10, **extra):
    from ctloop.evaluation.evaluate import EvalReport

    return EvalReport(
        ids={name: [str(i) for i in range(len(next(iter(s.values()))))] for name, s in sets.items()},
        losses=sets,
        tokens={name: [tokens] * len(next(iter(s.values()))) for name, s in sets.items()},
        **extra,
    )


def _decide(stored, **gate):
    from ctloop.config import GateConfig
    from ctloop.evaluation.gate import decide
    from ctloop.evaluation.preference_gate import preference_rules

    config = GateConfig(min_new_improvement=-1.0, seed_spread=0.0, **gate)
    same = {"candidate": [1.0] * 40, "champion": [1.0] * 40}
    new = {"new_holdout": same, "replay_holdout": same}
    extra = tuple(preference_rules(stored, config, "champion"))
    return decide(new | stored.losses, config, has_champion=True, extra=extra)


def _rule(decision, name: str):
    return next(rule for rule in decision.rules if rule.name == name)


def test_the_pair_preference_rule_needs_the_candidate_to_prefer_chosen_answers_more_than_the_champion():
    """Loss is a per-token mean: the chosen answer is preferred when its loss is lower."""
    n = 60
    champion_chosen = [1.0] * (n // 2) + [2.0] * (n // 2)  # prefers chosen in half the pairs
    rejected = [1.5] * n
    better = {"candidate": [1.0] * int(n * 0.9) + [2.0] * (n - int(n * 0.9)), "champion": champion_chosen}
    same = {"candidate": champion_chosen, "champion": champion_chosen}
    for chosen, outcome in ((better, "PASS"), (same, "FAIL")):
        stored = _stored(
            {"preference_chosen": chosen, "preference_rejected": {"candidate": rejected, "champion": rejected}}
        )
        decision = _decide(stored, min_preference_gain=0.05)
        rule = _rule(decision, "preference accuracy (pairs)")
        assert rule.outcome == outcome and decision.outcome == outcome, rule.reason
    assert rule.estimate == 0.0 and rule.n == n


def test_the_rated_preference_rule_ranks_rated_up_answers_above_rated_down_ones_against_the_base():
    n = 40
    base = [2.0] * n

    def sets(up_gain: float, down_gain: float) -> dict:
        return {
            "preference_desirable": {"candidate": [2.0 - up_gain] * n, "champion": base, "base": base},
            "preference_undesirable": {"candidate": [2.0 - down_gain] * n, "champion": base, "base": base},
        }

    learned = _decide(_stored(sets(0.5, -0.5)))
    assert _rule(learned, "preference accuracy (rated)").outcome == "PASS"
    assert _rule(learned, "preference accuracy (rated)").estimate == pytest.approx(0.5)  # AUC 1.0 vs 0.5
    backwards = _decide(_stored(sets(-0.5, 0.5)))
    assert _rule(backwards, "preference accuracy (rated)").outcome == "FAIL" and backwards.outcome == "FAIL"


def test_the_length_guard_fails_a_candidate_whose_answers_grow():
    n = 40
    short, long = ["one two three"] * n, ["one two three four five six seven eight"] * n
    losses = {"preference_chosen": {"candidate": [1.0] * n, "champion": [1.0] * n}}
    losses["preference_rejected"] = losses["preference_chosen"]
    for answers, outcome in ((short, "PASS"), (long, "FAIL")):
        predictions = {"preference_chosen": {"candidate": answers, "champion": short}}
        decision = _decide(_stored(losses, predictions=predictions))
        assert _rule(decision, "answer length").outcome == outcome


def test_the_kl_to_the_champion_is_reported_and_gated_when_bounded():
    n = 40
    stored = _stored({}, kl={"new_holdout": {"candidate": [0.3] * n}})
    assert _rule(_decide(stored), "KL to champion").outcome == "PASS"  # reported only
    assert _rule(_decide(stored, max_kl_to_champion=0.5), "KL to champion").outcome == "PASS"
    assert _rule(_decide(stored, max_kl_to_champion=0.1), "KL to champion").outcome == "FAIL"


def test_agreement_probes_fail_a_candidate_that_comes_to_prefer_agreeing_with_a_false_premise():
    n = 40
    right = [1.0] * n  # per-token losses of the disagreeing (right) answers
    stays = {"candidate": [1.5] * n, "champion": [1.5] * n}  # the agreeing answers: less likely for both
    sycophant = {"candidate": [0.5] * (n // 2) + [1.5] * (n // 2), "champion": [1.5] * n}
    for agreeing, outcome in ((stays, "PASS"), (sycophant, "FAIL")):
        sets = {"agreement_disagreeing": {"candidate": right, "champion": right}, "agreement_agreeing": agreeing}
        decision = _decide(_stored(sets))
        assert _rule(decision, "agreement probes").outcome == outcome
    assert _rule(decision, "agreement probes").estimate == pytest.approx(0.5)
    assert decision.outcome == "FAIL"
