"""A tiny causal LM built from scratch on local text: the demo's and the tests' base model.

Nothing can be downloaded here (and users' CI often has no network either), so the quickstart
trains a byte-level BPE tokenizer and a small Llama-shaped model on shipped sample text, and saves
both with `save_pretrained`. The rest of ctloop loads it like any other model, through
`from_pretrained(path)`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ctloop.fileio import read_json, write_json

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>")


@dataclass(frozen=True)
class TinyModelSpec:
    vocab_size: int = 2048
    hidden_size: int = 128
    layers: int = 4
    heads: int = 4
    intermediate_size: int = 344
    max_positions: int = 256
    pretrain_steps: int = 300
    batch_rows: int = 48
    learning_rate: float = 3e-3
    seed: int = 0

    def key(self) -> str:
        import hashlib
        import json

        return hashlib.sha256(json.dumps(self.__dict__, sort_keys=True).encode()).hexdigest()[:12]


def build_tiny_model(
    texts: list[str],
    out_dir: Path,
    spec: TinyModelSpec = TinyModelSpec(),
    on_step: Callable[[int, float], None] | None = None,
) -> Path:
    """Train a tokenizer and pre-train a tiny Llama on `texts`; save both to `out_dir`.

    Idempotent: a folder already holding a finished model of the same spec and corpus is reused.
    """
    import hashlib

    corpus_key = hashlib.sha256("\n".join(texts).encode()).hexdigest()[:12]
    marker = out_dir / "ctloop-tiny-model.json"
    if marker.is_file() and read_json(marker) == {"spec": spec.key(), "corpus": corpus_key}:
        return out_dir

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, set_seed

    from ctloop.model.loading import quiet_transformers

    quiet_transformers()
    set_seed(spec.seed)
    tokenizer = _train_tokenizer(texts, spec.vocab_size)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads,
        num_key_value_heads=spec.heads,
        max_position_embeddings=spec.max_positions,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    model = LlamaForCausalLM(config)
    ids = [
        [tokenizer.bos_token_id, *row[: spec.max_positions - 2], tokenizer.eos_token_id]
        for row in tokenizer(texts, add_special_tokens=False)["input_ids"]
    ]
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.learning_rate, weight_decay=0.01)
    generator = torch.Generator().manual_seed(spec.seed)
    model.train()
    started = time.monotonic()
    for step in range(spec.pretrain_steps):
        lr_scale = min(1.0, (step + 1) / 20) * 0.5 * (1 + math.cos(math.pi * step / spec.pretrain_steps))
        for group in optimizer.param_groups:
            group["lr"] = spec.learning_rate * lr_scale
        picks = torch.randint(len(ids), (spec.batch_rows,), generator=generator).tolist()
        batch = [ids[i] for i in picks]
        width = max(len(row) for row in batch)
        input_ids = torch.tensor([row + [tokenizer.pad_token_id] * (width - len(row)) for row in batch])
        mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in batch])
        labels = input_ids.masked_fill(mask == 0, -100)
        loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if on_step:
            on_step(step + 1, loss.item())
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    write_json(
        out_dir / "pretrain.json",
        {
            "steps": spec.pretrain_steps,
            "final_loss": loss.item(),
            "seconds": round(time.monotonic() - started, 1),
            "rows": len(texts),
        },
    )
    write_json(marker, {"spec": spec.key(), "corpus": corpus_key})
    return out_dir


def _train_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(texts, trainer=trainer)
    pad, bos, eos = SPECIAL_TOKENS
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token=pad, bos_token=bos, eos_token=eos)
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


# A real chat template (ChatML's shape, with the tiny vocabulary's <s> and </s> as the turn markers),
# so the quickstart and the tests run chat through apply_chat_template as an instruct model would.
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ bos_token }}{{ message['role'] }}\n{{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}{% if add_generation_prompt %}{{ bos_token }}assistant\n{% endif %}"
)


def random_adapter(base: Path, out_dir: Path, seed: int, rank: int = 4) -> Path:
    """A LoRA adapter with random non-zero weights (peft's `init_lora_weights=False`), so each seed
    answers differently: real adapter files for serving tests and benchmarks without training."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from ctloop.model.loading import quiet_transformers

    quiet_transformers()
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(str(base))
    lora = LoraConfig(r=rank, lora_alpha=16 * rank, target_modules="all-linear", init_lora_weights=False)
    get_peft_model(model, lora).save_pretrained(str(out_dir))
    return out_dir
