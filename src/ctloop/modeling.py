"""Loading the base model and tokenizer, encoding records, and batching by token budget.

Shared by training and evaluation, so both see exactly the same token sequences: `<s>` + prompt +
completion + `</s>`, with the loss on the completion (and `</s>`) only.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ctloop.config import ModelConfig
from ctloop.errors import ModelError
from ctloop.fused_kernels import cross_entropy
from ctloop.records import Record

if TYPE_CHECKING:
    import torch

IGNORE_INDEX = -100


@dataclass(frozen=True)
class Example:
    input_ids: list[int]
    prompt_len: int  # tokens (including <s>) that carry no loss


def load_tokenizer(config: ModelConfig) -> Any:
    from transformers import AutoTokenizer

    with _explained_load_errors(config):
        tokenizer = AutoTokenizer.from_pretrained(config.base, revision=config.revision)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_base_model(config: ModelConfig) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    from ctloop import cpu_attention

    quiet_transformers()
    if config.attn_implementation == cpu_attention.NAME:
        cpu_attention.register()
    extra = {"attn_implementation": config.attn_implementation} if config.attn_implementation else {}
    with _explained_load_errors(config):
        return AutoModelForCausalLM.from_pretrained(
            config.base, revision=config.revision, dtype=getattr(torch, config.dtype), **extra)


CPU_BF16_MIN_HIDDEN = 512  # below this the casts cost more than AMX saves (measured: hidden 128 ran slower)


def fast_bf16_available(config: ModelConfig) -> bool:
    """bf16 matmuls that beat fp32: a CUDA device that supports bf16, or a CPU with AMX (Linux)
    and a model wide enough for its matrix units to pay off."""
    import torch
    from transformers import AutoConfig

    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    hidden = getattr(AutoConfig.from_pretrained(config.base, revision=config.revision), "hidden_size", 0) or 0
    if hidden < CPU_BF16_MIN_HIDDEN:
        return False
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            return "amx_bf16" in handle.read()
    except OSError:
        return False


@contextmanager
def _explained_load_errors(config: ModelConfig) -> Iterator[None]:
    try:
        yield
    except OSError as exc:  # transformers raises OSError for missing folders and unreachable hub ids
        where = "local folder" if Path(config.base).is_absolute() else "local folder or hub id"
        raise ModelError(f"model.base={config.base!r} could not be loaded as a {where} ({exc.__class__.__name__}: "
                         f"{str(exc).splitlines()[0]}); point model.base at a folder saved with "
                         f"save_pretrained, or at a hub id this machine can reach") from exc


def quiet_transformers() -> None:
    """Hide transformers' own tqdm bars and a peft/transformers deprecation warning; ctloop shows progress."""
    import warnings

    from transformers.utils import logging

    logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)


def base_model_revision(config: ModelConfig) -> str:
    """The pinned hub revision, or for a local folder a hash of its weight files."""
    if config.revision:
        return config.revision
    folder = Path(config.base)
    if not folder.is_dir():
        return "unpinned"
    digest = hashlib.sha256()
    for path in sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin")):
        digest.update(path.name.encode())
        with path.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return "sha256:" + digest.hexdigest()[:16]


def token_counter(tokenizer: Any):
    """A function counting the tokens of each text (without special tokens)."""

    def count(texts: list[str]) -> list[int]:
        return [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]

    return count


def prompt_token_ids(tokenizer: Any, prompts: list[str]) -> list[list[int]]:
    """What the model sees before it answers: `<s>` + prompt, exactly as in training."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    return [bos + ids for ids in tokenizer(prompts, add_special_tokens=False)["input_ids"]]


def encode(records: list[Record], tokenizer: Any) -> list[Example]:
    prompts = tokenizer([r.prompt for r in records], add_special_tokens=False)["input_ids"]
    completions = tokenizer([r.completion for r in records], add_special_tokens=False)["input_ids"]
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    return [Example(bos + p + c + [tokenizer.eos_token_id], len(bos) + len(p))
            for p, c in zip(prompts, completions, strict=True)]


def token_budget_batches(lengths: list[int], batch_tokens: int, seed: int | None) -> list[list[int]]:
    """Group example indices into batches whose padded size (rows x longest) fits `batch_tokens`.

    Examples are sorted by length inside shuffled windows, so batches carry little padding while
    the order still varies per seed; batch order is shuffled too. `seed=None` sorts all examples by
    length, for the least padding (evaluation, where callers map results back by index).
    """
    order = list(range(len(lengths)))
    if seed is not None:
        rng = random.Random(seed)
        rng.shuffle(order)
        window = 64 * max(1, batch_tokens // max(1, max(lengths, default=1)))
        order = [i for start in range(0, len(order), window)
                 for i in sorted(order[start:start + window], key=lengths.__getitem__)]
    else:
        order.sort(key=lengths.__getitem__)
    batches: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for index in order:
        new_longest = max(longest, lengths[index])
        if current and new_longest * (len(current) + 1) > batch_tokens:
            batches.append(current)
            current, new_longest = [], lengths[index]
        current.append(index)
        longest = new_longest
    if current:
        batches.append(current)
    if seed is not None:
        random.Random(seed + 1).shuffle(batches)
    return batches


def packed_row_width(lengths: list[int], batch_tokens: int, hidden_size: int) -> int:
    """Width of packed rows: a power of two that holds the longest example, chosen to minimise
    token slots x (1 + width / (2 x hidden_size)).

    Wider rows pack fuller (less padding), but the masked attention inside a row costs time in
    proportion to its width, more so for narrow models; the weighting matches eager attention
    measured on CPU (a 512-wide model spends about a fifth of its time in attention over 256-token
    rows). One width means one batch shape, so CPU kernels (oneDNN) plan their matmuls once
    instead of once per shape, which costs time and resident memory."""
    longest = max(lengths, default=1)
    narrowest = 1 << max(6, (longest - 1).bit_length())  # at least 64
    if narrowest > batch_tokens:
        return max(longest, batch_tokens)
    best, best_cost = narrowest, float("inf")
    width = narrowest
    while width <= batch_tokens and width <= 8 * narrowest:
        rows_per_batch = batch_tokens // width
        slots = sum(len(batch) * width for batch in packed_batches(lengths, width, rows_per_batch, seed=0))
        cost = slots * (1 + width / (2 * hidden_size))
        if cost < best_cost:
            best, best_cost = width, cost
        width *= 2
    return best


def packed_batches(lengths: list[int], row_tokens: int, rows_per_batch: int, seed: int) -> list[list[list[int]]]:
    """Pack examples into rows of at most `row_tokens` tokens, `rows_per_batch` rows a batch (the
    last batch may have fewer): a batch is a list of rows, a row a list of example indices.

    Within shuffled windows, examples are placed longest first into the first row with room
    (first-fit decreasing), so rows are nearly full and padding nearly vanishes; row order is
    shuffled per seed."""
    rng = random.Random(seed)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    rows: list[list[int]] = []
    window = 256
    for start in range(0, len(order), window):
        open_rows: list[tuple[int, list[int]]] = []  # (free tokens, indices)
        for index in sorted(order[start:start + window], key=lambda i: -lengths[i]):
            size = min(lengths[index], row_tokens)
            slot = next((k for k, (free, _) in enumerate(open_rows) if free >= size), None)
            if slot is None:
                open_rows.append((row_tokens - size, [index]))
            else:
                free, members = open_rows[slot]
                open_rows[slot] = (free - size, members + [index])
        rows.extend(members for _, members in open_rows)
    rng.shuffle(rows)
    return [rows[start:start + rows_per_batch] for start in range(0, len(rows), rows_per_batch)]


def collate_packed(rows: list[list[Example]], pad_id: int, width: int = 0) -> dict[str, torch.Tensor]:
    """Concatenate each row's examples into rows of `width` tokens (wider if a row needs it); position
    ids restart at 0 for every example, which is how transformers isolates packed samples (a
    block-diagonal causal mask; no attention_mask given). Labels mask prompts and padding, so no
    token is predicted across a sample boundary."""
    import torch

    width = max(width, max(sum(len(e.input_ids) for e in row) for row in rows))
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    for r, row in enumerate(rows):
        offset = 0
        for example in row:
            n = len(example.input_ids)
            ids = torch.tensor(example.input_ids, dtype=torch.long)
            input_ids[r, offset:offset + n] = ids
            position_ids[r, offset:offset + n] = torch.arange(n)
            labels[r, offset + example.prompt_len:offset + n] = ids[example.prompt_len:]
            offset += n
        position_ids[r, offset:] = torch.arange(width - offset)  # padding: a block of its own
    return {"input_ids": input_ids, "position_ids": position_ids, "labels": labels}


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded input ids, attention mask, and labels masked on prompt and padding."""
    import torch

    width = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        ids = torch.tensor(example.input_ids, dtype=torch.long)
        input_ids[row, :n] = ids
        attention_mask[row, :n] = 1
        labels[row, example.prompt_len:n] = ids[example.prompt_len:]
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


HEAD_ROWS_MULTIPLE = 128  # positions given logits are rounded up to this, so the head's matmul shapes repeat


def token_losses(model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token NLL of the labelled tokens and the label mask, both shaped [rows, width - 1].

    The model computes logits only where a label is (transformers' boolean `logits_to_keep`), not at
    prompt and padding positions, a third of the tokens in typical chat data; its own head applies,
    soft-capping or scaling included. A few unlabelled positions are added so that the count is a
    multiple of HEAD_ROWS_MULTIPLE: CPU kernels (oneDNN) then plan the head's matmul for a handful
    of shapes rather than one per batch. The loss is `fused_kernels.cross_entropy`: no fp32 copy
    of the logits."""
    import torch
    import torch.nn.functional as F

    inputs = {k: v for k, v in batch.items() if k != "labels"}
    targets = batch["labels"][:, 1:]
    mask = targets != IGNORE_INDEX
    keep = mask.clone()
    missing = -int(mask.sum()) % HEAD_ROWS_MULTIPLE
    keep.view(-1)[(~mask).view(-1).nonzero().flatten()[:missing]] = True
    logits = model(**inputs, use_cache=False, logits_to_keep=F.pad(keep, (0, 1))).logits  # [kept, vocab]
    nll = cross_entropy(logits, targets[keep], ignore_index=IGNORE_INDEX)
    return torch.zeros(targets.shape, dtype=nll.dtype, device=nll.device).masked_scatter(keep, nll), mask
