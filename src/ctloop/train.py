"""LoRA training on the base model: token-budget batches, loss on completion tokens only.

The adapter is written to a temporary folder and renamed into place when training ends, so a
killed run never leaves a half-trained adapter where the next stage would find it.
"""

from __future__ import annotations

import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from ctloop.config import LoraConfig, ModelConfig, TrainConfig
from ctloop.console import progress_bar
from ctloop.modeling import collate, encode, load_base_model, load_tokenizer, token_budget_batches, token_losses
from ctloop.records import Record


@dataclass(frozen=True)
class TrainResult:
    adapter_dir: str
    steps: int
    examples: int
    tokens: int
    loss_tokens: int
    seconds: float
    losses: list[tuple[int, float]]
    learning_rates: list[tuple[int, float]]

    @property
    def final_loss(self) -> float:
        return self.losses[-1][1] if self.losses else float("nan")

    def summary(self) -> str:
        rate = self.tokens / self.seconds if self.seconds else 0.0
        return (f"trained {self.steps} steps on {self.examples} examples ({self.tokens} tokens, "
                f"{rate:,.0f} tokens/s); final loss {self.final_loss:.3f} -> {self.adapter_dir}")

    def to_dict(self) -> dict:
        return asdict(self)


def train_adapter(records: list[Record], *, model: ModelConfig, lora: LoraConfig, train: TrainConfig,
                  out_dir: Path) -> TrainResult:
    """Train a fresh LoRA adapter on `records` and save it (safetensors + adapter_config.json)."""
    import torch
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model
    from transformers import set_seed

    set_seed(train.seed)  # before the adapter is created: its initial weights depend on it
    tokenizer = load_tokenizer(model)
    peft_model = get_peft_model(load_base_model(model), PeftLoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=lora.target_modules,
        task_type="CAUSAL_LM"))
    examples = encode(records, tokenizer)
    lengths = [len(e.input_ids) for e in examples]
    schedule = _epoch_batches(lengths, train)
    total_steps = len(schedule)
    warmup = max(1, round(train.warmup_fraction * total_steps)) if train.warmup_fraction else 0
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=train.learning_rate, weight_decay=train.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _lr_scale(step, warmup, total_steps))

    peft_model.train()
    losses: list[tuple[int, float]] = []
    rates: list[tuple[int, float]] = []
    tokens = loss_tokens = 0
    started = time.monotonic()
    with progress_bar("training", total_steps) as advance:
        for step, batch_indices in enumerate(schedule, start=1):
            batch = collate([examples[i] for i in batch_indices], tokenizer.pad_token_id)
            nll, mask = token_losses(peft_model, batch)
            n_loss = int(mask.sum())
            loss = nll.sum() / max(1, n_loss)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, train.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            tokens += int(batch["attention_mask"].sum())
            loss_tokens += n_loss
            if step % train.log_every == 0 or step == total_steps:
                losses.append((step, loss.item()))
                rates.append((step, scheduler.get_last_lr()[0]))
            advance(loss=loss.item())
    seconds = time.monotonic() - started

    partial = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    peft_model.save_pretrained(partial)
    shutil.rmtree(out_dir, ignore_errors=True)
    partial.rename(out_dir)
    return TrainResult(adapter_dir=str(out_dir), steps=total_steps, examples=len(examples), tokens=tokens,
                       loss_tokens=loss_tokens, seconds=round(seconds, 2), losses=losses, learning_rates=rates)


def _epoch_batches(lengths: list[int], train: TrainConfig) -> list[list[int]]:
    """All batches for `train.epochs` passes (a fractional last epoch takes its first batches)."""
    schedule: list[list[int]] = []
    for epoch in range(math.ceil(train.epochs)):
        batches = token_budget_batches(lengths, train.batch_tokens, seed=train.seed + epoch)
        share = min(1.0, train.epochs - epoch)
        schedule.extend(batches[: max(1, round(share * len(batches)))])
    return schedule


def _lr_scale(step: int, warmup: int, total: int) -> float:
    """Linear warm-up, then cosine decay to zero."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
