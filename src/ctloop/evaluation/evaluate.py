"""Per-example evaluation of several adapters on the same examples.

Every model (the candidate, the champion, and the bare base model when asked) is scored on the
same evaluation sets with the same tokens; the score is the mean NLL over each example's
completion tokens. One base model is loaded; adapters are switched on it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ctloop.config import EvalConfig, ModelConfig
from ctloop.console import progress_bar
from ctloop.data.records import Record
from ctloop.evaluation.textmetrics import load_metrics, score
from ctloop.fileio import nan_for_none
from ctloop.model.batching import collate, encode, prompt_token_ids, token_budget_batches
from ctloop.model.loading import load_base_model, load_tokenizer
from ctloop.model.losses import token_losses


@dataclass(frozen=True)
class EvalReport:
    """`losses[set][model]` lists per-example losses in the order of `ids[set]`; with generation,
    `metrics[set][model][metric]` per-example scores and `predictions[set][model]` the answers.
    `tokens[set]` counts each example's answer tokens (a loss times it is the answer's log-probability,
    negated); `kl[set][model]` is each example's mean token KL(model || reference), where asked."""

    ids: dict[str, list[str]]
    losses: dict[str, dict[str, list[float]]]
    metrics: dict[str, dict[str, dict[str, list[float]]]] = field(default_factory=dict)
    predictions: dict[str, dict[str, list[str]]] = field(default_factory=dict)
    tokens: dict[str, list[int]] = field(default_factory=dict)
    kl: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    # For the report, per set: the indices of a few examples (the candidate's worst losses, then a
    # seeded sample) and each model's greedy answer to them: {"worst": [...], "sample": [...], "answers": {...}}.
    examples: dict[str, dict] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, stored: dict) -> EvalReport:
        """Read back what `to_dict` wrote (eval.json)."""
        return cls(
            ids=stored["ids"],
            losses=nan_for_none(stored["losses"]),  # a diverged model's NaN losses are stored as null
            metrics=nan_for_none(stored.get("metrics", {})),
            predictions=stored.get("predictions", {}),
            tokens=stored.get("tokens", {}),
            kl=nan_for_none(stored.get("kl", {})),
            examples=stored.get("examples", {}),
        )

    def metric_means(self) -> dict[str, dict[str, dict[str, float]]]:
        return {
            s: {m: {k: sum(v) / len(v) for k, v in by_metric.items() if v} for m, by_metric in by_model.items()}
            for s, by_model in self.metrics.items()
        }

    def mean(self, eval_set: str, model: str) -> float:
        values = self.losses[eval_set][model]
        return sum(values) / len(values) if values else float("nan")

    @property
    def means(self) -> dict[str, dict[str, float]]:
        return {s: {m: self.mean(s, m) for m in by_model} for s, by_model in self.losses.items()}

    def summary(self) -> str:
        parts = []
        for eval_set, by_model in self.means.items():
            scores = ", ".join(f"{m} {v:.3f}" for m, v in by_model.items())
            parts.append(f"{eval_set} ({len(self.ids[eval_set])} examples): {scores}")
        return "mean token loss - " + "; ".join(parts)

    def to_dict(self) -> dict:
        return {**asdict(self), "means": self.means, "metric_means": self.metric_means()}


def evaluate(
    eval_sets: dict[str, list[Record]],
    adapters: dict[str, Path | None],
    *,
    model: ModelConfig,
    config: EvalConfig,
    also_base: tuple[str, ...] = (),
    generate_sets: tuple[str, ...] = (),
    kl_to: tuple[str, str, tuple[str, ...]] | None = None,
    examples_of: tuple[str, ...] = (),
) -> EvalReport:
    """Score each adapter (None = the bare base model) on each non-empty evaluation set.

    `also_base`: sets the bare base model scores too (as "base"); `generate_sets`: sets answered
    greedily even when eval.generate is off; `kl_to` (model, reference, sets): the model's token KL
    to the reference on those sets, teacher-forced on their answers; `examples_of`: sets whose
    report shows answers side by side (`eval.report_examples` of each kind, see EvalReport)."""
    import torch
    from peft import PeftModel

    tokenizer = load_tokenizer(model)
    base = load_base_model(model)
    named = {name: path for name, path in adapters.items() if path is not None}
    peft_model = None
    for name, path in named.items():
        if peft_model is None:
            peft_model = PeftModel.from_pretrained(base, str(path), adapter_name=name)
        else:
            peft_model.load_adapter(str(path), adapter_name=name)
    network = peft_model if peft_model is not None else base
    network.eval()

    sets = {name: records for name, records in eval_sets.items() if records}
    encoded = {name: encode(records, tokenizer) for name, records in sets.items()}
    plans = {
        name: token_budget_batches([len(e.input_ids) for e in ex], config.batch_tokens, seed=None)
        for name, ex in encoded.items()
    }
    scorers_of = {name: dict(adapters) for name in sets}
    for name in also_base:
        if name in scorers_of and "base" not in scorers_of[name]:
            scorers_of[name]["base"] = None
    total = sum(len(plans[name]) * len(scorers_of[name]) for name in sets)
    losses: dict[str, dict[str, list[float]]] = {name: {} for name in sets}
    with torch.inference_mode(), progress_bar("evaluating", total, unit="batches") as advance:
        for model_name, path in {k: v for by_set in scorers_of.values() for k, v in by_set.items()}.items():
            for set_name, examples in encoded.items():
                if model_name not in scorers_of[set_name]:
                    continue
                per_example = [0.0] * len(examples)
                for batch_indices in plans[set_name]:
                    batch = collate([examples[i] for i in batch_indices], tokenizer.pad_token_id)
                    batch = {key: value.to(base.device) for key, value in batch.items()}
                    if path is None and peft_model is not None:
                        with peft_model.disable_adapter():
                            nll, mask = token_losses(peft_model, batch)
                    else:
                        if peft_model is not None:
                            peft_model.set_adapter(model_name)
                        nll, mask = token_losses(network, batch)
                    means = (nll.sum(dim=1) / mask.sum(dim=1).clamp(min=1)).tolist()
                    for index, value in zip(batch_indices, means, strict=True):
                        per_example[index] = value
                    advance()
                losses[set_name][model_name] = per_example
    metrics: dict = {}
    predictions: dict = {}
    scorers = load_metrics(config.custom_metrics)
    for set_name, records in sets.items():
        if config.generate or set_name in generate_sets:
            for model_name, path in adapters.items():
                answers = _generate(
                    peft_model if peft_model is not None else base,
                    tokenizer,
                    records,
                    None if path is None else model_name,
                    config,
                )
                predictions.setdefault(set_name, {})[model_name] = answers
                scored = [score(a, r.completion, scorers) for a, r in zip(answers, records, strict=True)]
                metrics.setdefault(set_name, {})[model_name] = {k: [s[k] for s in scored] for k in scorers}
    kl: dict[str, dict[str, list[float]]] = {}
    if kl_to is not None and peft_model is not None and {kl_to[0], kl_to[1]} <= set(adapters):
        model_name, reference, kl_sets = kl_to
        for set_name in (s for s in kl_sets if s in encoded):
            kl[set_name] = {
                model_name: _token_kl(
                    peft_model, encoded[set_name], tokenizer.pad_token_id, model_name, adapters, reference
                )
            }
    examples = {
        set_name: _examples(losses[set_name], sets[set_name], adapters, network, tokenizer, config)
        for set_name in examples_of
        if set_name in sets and config.report_examples
    }
    return EvalReport(
        ids={name: [r.id for r in records] for name, records in sets.items()},
        losses=losses,
        metrics=metrics,
        predictions=predictions,
        examples=examples,
        tokens={name: [len(e.input_ids) - e.prompt_len for e in examples] for name, examples in encoded.items()},
        kl=kl,
    )


def _examples(losses: dict[str, list[float]], records: list[Record], adapters, network, tokenizer, config) -> dict:
    """The candidate's worst-scored examples and a seeded sample of the rest, with every model's
    greedy answer to them (a handful of prompts: cheap next to the evaluation)."""
    import random

    ranked_by = "candidate" if "candidate" in losses else next(iter(losses))
    by_loss = losses[ranked_by]  # a NaN loss (a diverged model) counts as the worst
    order = sorted(range(len(records)), key=lambda i: -math.inf if math.isnan(by_loss[i]) else -by_loss[i])
    worst = order[: config.report_examples]
    rest = order[config.report_examples :]
    sample = sorted(random.Random(0).sample(rest, min(config.report_examples, len(rest))))
    chosen = [records[i] for i in worst + sample]
    answers = {
        name: _generate(network, tokenizer, chosen, None if path is None else name, config)
        for name, path in adapters.items()
    }
    return {"worst": worst, "sample": sample, "answers": answers}


def _token_kl(peft_model, examples, pad_id: int, name: str, adapters: dict, reference: str) -> list[float]:
    """Per example, the mean over its answer tokens of KL(name || reference) between the two
    next-token distributions, one example at a time (a vocabulary-wide row per answer token)."""
    import contextlib

    import torch

    def log_probs(model_name: str, batch) -> torch.Tensor:
        quiet = peft_model.disable_adapter() if adapters[model_name] is None else contextlib.nullcontext()
        if adapters[model_name] is not None:
            peft_model.set_adapter(model_name)
        with quiet:
            logits = peft_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        labelled = batch["labels"][0, 1:] != -100
        return torch.log_softmax(logits[0, :-1][labelled].float(), dim=-1)

    out = []
    with torch.inference_mode(), progress_bar(f"KL {name} to {reference}", len(examples), unit="rows") as advance:
        for example in examples:
            batch = {k: v.to(peft_model.device) for k, v in collate([example], pad_id).items()}
            mine, theirs = log_probs(name, batch), log_probs(reference, batch)
            out.append(float((mine.exp() * (mine - theirs)).sum(dim=-1).mean()) if len(mine) else 0.0)
            advance()
    return out


def _generate(network, tokenizer, records: list[Record], adapter: str | None, config: EvalConfig) -> list[str]:
    """Greedy answers with a fixed maximum length, batched with left padding."""
    import contextlib

    import torch

    if adapter is not None:
        network.set_adapter(adapter)
    quiet = (
        network.disable_adapter()
        if adapter is None and hasattr(network, "disable_adapter")
        else contextlib.nullcontext()
    )
    prompts = prompt_token_ids(tokenizer, [r.prompt for r in records])
    answers: list[str] = []
    with (
        torch.inference_mode(),
        quiet,
        progress_bar(f"generating ({adapter or 'base'})", len(records), unit="rows") as advance,
    ):
        for start in range(0, len(prompts), config.generation_batch):
            chunk = prompts[start : start + config.generation_batch]
            width = max(len(p) for p in chunk)
            input_ids = torch.tensor(
                [[tokenizer.pad_token_id] * (width - len(p)) + p for p in chunk], device=network.device
            )
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=network.device)
            out = network.generate(
                input_ids=input_ids,
                attention_mask=mask,
                max_new_tokens=config.max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
            answers.extend(tokenizer.batch_decode(out[:, width:], skip_special_tokens=True))
            advance(len(chunk))
    return answers
