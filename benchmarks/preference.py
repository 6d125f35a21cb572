"""Preference objectives side by side on one simulated harvest: SFT on corrections, DPO on
corrections, KTO on thumbs.

    OMP_NUM_THREADS=1 python benchmarks/preference.py [--seeds 10]

Setup: the quickstart's tiny base model; prompts and reference answers from its new domain.
- The champion (production's model) is an SFT adapter trained on 300 new-domain rows.
- Production: the champion answers each of 300 harvest prompts twice, sampled at temperature 0.8.
- Simulated users rate every answer by its token F1 against the reference answer: up above the
  median F1 of the harvest, down at or below it; each label is flipped with probability 0.1. A
  user corrects a rated-down answer (the reference is the correction) with probability 1/2.
- The same harvest trains three candidates, all continuing the champion (the preference
  objectives' reference), same learning rate, LoRA and epochs: `sft` on the corrections, `dpo` on
  the corrections against the answers they corrected, `kto` on the thumbs alone (no corrections).
- 100 other prompts are held out: their references, and feedback simulated the same way on the
  champion's two answers to each.

Per run: the held-out preference accuracy minus the champion's (for the DPO and SFT runs on the
held-out correction pairs: the share where the model gives the correction the higher
log-probability; for KTO on the held-out thumbs: the AUC of the implicit reward against the base
model), the token-F1 gain of greedy answers against the references, the median length ratio
against the champion's greedy answers, the mean token KL to the champion on the references, and
training tokens per second relative to SFT. Every seed draws its own harvest, user noise and split,
and trains with its own seed; figures are means over seeds with 95% t-intervals. Printed last.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import time
from pathlib import Path

from _quickstart import records, tiny_base

from ctloop.config import EvalConfig, GateConfig, LoraConfig, ModelConfig, TrainConfig
from ctloop.data.preference import PreferenceSet, preference_set
from ctloop.data.records import Record
from ctloop.evaluation.evaluate import evaluate
from ctloop.evaluation.preference_gate import CHOSEN, DESIRABLE, REJECTED, UNDESIRABLE, preference_rules
from ctloop.evaluation.textmetrics import token_f1

FLIP = 0.1
RUNS = ("sft", "dpo", "kto")


def sample_answers(model: ModelConfig, adapter: Path, prompts: list[str], seed: int, max_new_tokens: int):
    """The champion's answers, sampled at temperature 0.8 (production traffic)."""
    import torch
    from peft import PeftModel

    from ctloop.model.batching import prompt_token_ids
    from ctloop.model.loading import load_base_model, load_tokenizer

    tokenizer = load_tokenizer(model)
    network = PeftModel.from_pretrained(load_base_model(model), str(adapter)).eval()
    torch.manual_seed(seed)
    answers = []
    ids = prompt_token_ids(tokenizer, prompts)
    with torch.inference_mode():
        for start in range(0, len(ids), 32):
            chunk = ids[start : start + 32]
            width = max(len(p) for p in chunk)
            input_ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(p)) + p for p in chunk])
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk])
            out = network.generate(
                input_ids=input_ids,
                attention_mask=mask,
                do_sample=True,
                temperature=0.8,
                top_k=0,
                max_new_tokens=max_new_tokens,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
            answers.extend(tokenizer.batch_decode(out[:, width:], skip_special_tokens=True))
    return answers


def feedback(rows: list[Record], answers: list[str], threshold: float, rng: random.Random) -> list[Record]:
    """Simulated users: thumbs by token F1 against the reference (flipped at FLIP), and a correction
    (the reference) for half the answers rated down."""
    out = []
    for i, (row, answer) in enumerate(zip(rows, answers, strict=True)):
        up = token_f1(answer, row.completion) > threshold
        if rng.random() < FLIP:
            up = not up
        if not up and rng.random() < 0.5:
            meta = {"feedback_kind": "correction", "rejected_answer": answer}
            out.append(Record(f"{row.id}-{i}", row.prompt, row.completion, metadata=meta))
        else:
            kind = "rated_up" if up else "rated_down"
            out.append(Record(f"{row.id}-{i}", row.prompt, answer, metadata={"feedback_kind": kind}))
    return out


def t_bounds(values: list[float]) -> tuple[float, float]:
    """The 95% t-interval of the mean (the mean twice for a single value)."""
    from scipy.stats import t

    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, mean
    half = t.ppf(0.975, len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))
    return mean - half, mean + half


def t_interval(values: list[float]) -> str:
    low, high = t_bounds(values)
    return f"{statistics.fmean(values):+.4f} [95% CI {low:+.4f}, {high:+.4f}]"


def main() -> None:
    from ctloop.training.trainer import train_adapter

    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--harvest-prompts", type=int, default=300)
    parser.add_argument("--holdout-prompts", type=int, default=100)
    parser.add_argument("--epochs", type=float, default=2.0)
    parser.add_argument("--learning-rate", type=float, default=3e-3)
    parser.add_argument("--work", default="/tmp/ctloop-preference-benchmark")
    args = parser.parse_args()
    work = Path(args.work)
    base = tiny_base(work)
    model = ModelConfig(base=str(base), max_seq_tokens=128)
    lora = LoraConfig()
    new = [r for r in records("new_domain.jsonl") if r.prompt.strip() and r.completion.strip()]
    eval_config = EvalConfig(max_new_tokens=48)
    gate = GateConfig(min_examples=5, seed_spread=0.0)

    def train(rows, out: Path, seed: int, objective: str, preference=None, warm_start=None):
        if (out / "adapter_config.json").is_file() and (out / "result.json").is_file():
            return json.loads((out / "result.json").read_text())
        result = train_adapter(
            rows,
            model=model,
            lora=lora,
            out_dir=out,
            train=TrainConfig(
                objective=objective,
                epochs=args.epochs,
                learning_rate=args.learning_rate,
                batch_tokens=1024,
                seed=seed,
                checkpoint_every=0,
            ),
            preference=preference,
            warm_start_from=warm_start,
            reference_adapter=warm_start,
        )
        summary = {"tokens_per_s": result.tokens / max(result.seconds, 1e-9), "steps": result.steps}
        (out / "result.json").write_text(json.dumps(summary))
        return summary

    figures: dict[str, dict[str, list[float]]] = {run: {} for run in RUNS}
    started = time.monotonic()
    for seed in range(args.seeds):
        rng = random.Random(seed)
        shuffled = rng.sample(new, len(new))
        champion_rows = shuffled[:300]
        harvest_rows = shuffled[300 : 300 + args.harvest_prompts]
        held_rows = shuffled[300 + args.harvest_prompts : 300 + args.harvest_prompts + args.holdout_prompts]
        champion = work / f"champion-{seed}"
        train(champion_rows, champion, seed, "sft")
        asked = harvest_rows + harvest_rows  # two answers per prompt
        answers = sample_answers(model, champion, [r.prompt for r in asked], seed, eval_config.max_new_tokens)
        threshold = statistics.median(token_f1(a, r.completion) for a, r in zip(answers, asked, strict=True))
        harvest = feedback(asked, answers, threshold, rng)
        held_asked = held_rows + held_rows
        held_answers = sample_answers(model, champion, [r.prompt for r in held_asked], seed + 1000, 48)
        held = feedback(held_asked, held_answers, threshold, rng)
        pairs, thumbs = preference_set(harvest, "dpo"), preference_set(harvest, "kto")
        thumbs = PreferenceSet("kto", answers=tuple(a for a in thumbs.answers if ":" not in a.id))  # thumbs only
        corrections = [r for r in harvest if r.metadata["feedback_kind"] == "correction"]
        held_pairs = preference_set(held, "dpo")
        held_thumbs = [r for r in held if r.metadata["feedback_kind"] != "correction"]
        sets = {
            "new_holdout": held_rows,
            CHOSEN: [Record(p.id, p.prompt, p.chosen) for p in held_pairs.pairs],
            REJECTED: [Record(p.id, p.prompt, p.rejected) for p in held_pairs.pairs],
            DESIRABLE: [r for r in held_thumbs if r.metadata["feedback_kind"] == "rated_up"],
            UNDESIRABLE: [r for r in held_thumbs if r.metadata["feedback_kind"] == "rated_down"],
        }
        print(
            f"seed {seed}: harvest {len(harvest)} answers ({len(corrections)} corrections, "
            f"{thumbs.desirable} up, {len(thumbs.answers) - thumbs.desirable} down), held out {len(held_rows)} "
            f"prompts ({len(held_pairs.pairs)} pairs, {len(held_thumbs)} thumbs)",
            flush=True,
        )
        runs = {
            "sft": train(corrections, work / f"sft-{seed}", seed, "sft", warm_start=champion),
            "dpo": train([], work / f"dpo-{seed}", seed, "dpo", preference=pairs, warm_start=champion),
            "kto": train([], work / f"kto-{seed}", seed, "kto", preference=thumbs, warm_start=champion),
        }
        for run, result in runs.items():
            report = evaluate(
                sets,
                {"candidate": work / f"{run}-{seed}", "champion": champion},
                model=model,
                config=eval_config,
                also_base=(DESIRABLE, UNDESIRABLE),
                generate_sets=("new_holdout",),
                kl_to=("candidate", "champion", ("new_holdout",)),
            )
            stored = report.to_dict()
            rules = {rule.name: rule for rule, _ in preference_rules(stored, gate, "champion")}
            f1 = report.metric_means()["new_holdout"]
            predictions = report.predictions["new_holdout"]
            ratios = [
                (len(c.split()) + 1) / (len(r.split()) + 1)
                for c, r in zip(predictions["candidate"], predictions["champion"], strict=True)
            ]
            measured = {
                "pair accuracy gain": rules["preference accuracy (pairs)"].estimate,
                "thumbs AUC gain": rules["preference accuracy (rated)"].estimate,
                "token F1 gain": f1["candidate"]["token_f1"] - f1["champion"]["token_f1"],
                "length ratio": statistics.median(ratios),
                "KL to champion": statistics.fmean(report.kl["new_holdout"]["candidate"]),
                "throughput vs sft": result["tokens_per_s"] / runs["sft"]["tokens_per_s"],
            }
            for key, value in measured.items():
                figures[run].setdefault(key, []).append(value)
            print(f"  {run}: " + ", ".join(f"{k} {v:+.4f}" for k, v in measured.items()), flush=True)

    print(
        f"\n{args.seeds} seeds; tiny model; harvest {args.harvest_prompts} prompts x 2 sampled answers, labels "
        f"flipped at {FLIP:.0%}; epochs {args.epochs}, learning rate {args.learning_rate}; "
        f"{time.monotonic() - started:.0f} s"
    )
    for run in RUNS:
        print(f"{run}:")
        for key, values in figures[run].items():
            print(f"  {key}: {t_interval(values)}")
    print("paired over seeds, against sft:")
    for run in ("dpo", "kto"):
        for key in ("token F1 gain", "pair accuracy gain", "thumbs AUC gain"):
            diffs = [a - b for a, b in zip(figures[run][key], figures["sft"][key], strict=True)]
            low, high = t_bounds(diffs)
            verdict = "beats sft" if low > 0 else "is worse than sft" if high < 0 else "is not shown to differ from sft"
            print(f"  {run} {verdict} on {key}: difference {t_interval(diffs)}")


if __name__ == "__main__":
    main()
