"""Encoding records into token sequences and batching them by token budget or into packed rows.

Shared by training and evaluation, so both see exactly the same token sequences: `<s>` + prompt +
completion + `</s>`, with the loss on the completion (and `</s>`) only.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ctloop.data.records import Record

if TYPE_CHECKING:
    import torch

IGNORE_INDEX = -100


@dataclass(frozen=True)
class Example:
    input_ids: list[int]
    prompt_len: int  # tokens (including <s>) that carry no loss, but for `prompt_labels`
    # token ranges [start, end) inside the prompt that carry loss too: the earlier assistant turns
    # of a chat record under train.chat_loss: all_assistant
    prompt_labels: tuple[tuple[int, int], ...] = ()

    def labelled(self) -> list[tuple[int, int]]:
        """Every token range that carries loss: the prompt's labelled turns, then the completion."""
        return [*self.prompt_labels, (self.prompt_len, len(self.input_ids))]


def token_counter(tokenizer: Any):
    """A function counting the tokens of each text (without special tokens)."""

    def count(texts: list[str]) -> list[int]:
        return [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]

    return count


def prompt_token_ids(tokenizer: Any, prompts: list[str]) -> list[list[int]]:
    """What the model sees before it answers: `<s>` + prompt, exactly as in training (a prompt a
    chat template rendered starts with its own `<s>`, and gets no second one)."""
    return [_with_bos(tokenizer, ids) for ids in tokenizer(prompts, add_special_tokens=False)["input_ids"]]


def encode(records: list[Record], tokenizer: Any, prompt_loss: bool = False) -> list[Example]:
    """Token ids of `<s>` + prompt + completion + `</s>`, the loss on the completion; no second
    `<s>` or `</s>` where a chat template already wrote one. With `prompt_loss`, the loss also
    covers the prompt's character spans in metadata `prompt_loss_spans` (a chat record's earlier
    assistant turns): every token that starts inside a span."""
    if prompt_loss and not getattr(tokenizer, "is_fast", False):
        from ctloop.errors import ConfigError

        raise ConfigError(
            "train.chat_loss", ["all_assistant needs a fast tokenizer (character offsets); use last with this one"]
        )
    tokenized = tokenizer([r.prompt for r in records], add_special_tokens=False, return_offsets_mapping=prompt_loss)
    prompts = tokenized["input_ids"]
    completions = tokenizer([r.completion for r in records], add_special_tokens=False)["input_ids"]
    examples = []
    for i, (p, c) in enumerate(zip(prompts, completions, strict=True)):
        head = _with_bos(tokenizer, p)
        end = [] if c and c[-1] == tokenizer.eos_token_id else [tokenizer.eos_token_id]
        spans = records[i].metadata.get("prompt_loss_spans") if prompt_loss else None
        labelled = _token_ranges(tokenized["offset_mapping"][i], spans, len(head) - len(p)) if spans else ()
        examples.append(Example(head + c + end, len(head), labelled))
    return examples


def _token_ranges(offsets: list[tuple[int, int]], spans: list[list[int]], shift: int) -> tuple[tuple[int, int], ...]:
    """The token ranges [start, end) whose tokens start inside each character span; `shift`: the
    tokens added before the prompt's own (`<s>`)."""
    ranges = []
    for start_char, end_char in spans:
        inside = [t for t, (s, _) in enumerate(offsets) if start_char <= s < end_char]
        if inside:
            ranges.append((inside[0] + shift, inside[-1] + 1 + shift))
    return tuple(ranges)


def _with_bos(tokenizer: Any, ids: list[int]) -> list[int]:
    bos = tokenizer.bos_token_id
    return ids if bos is None or (ids and ids[0] == bos) else [bos, *ids]


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
        order = [
            i
            for start in range(0, len(order), window)
            for i in sorted(order[start : start + window], key=lengths.__getitem__)
        ]
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
        for index in sorted(order[start : start + window], key=lambda i: -lengths[i]):
            size = min(lengths[index], row_tokens)
            slot = next((k for k, (free, _) in enumerate(open_rows) if free >= size), None)
            if slot is None:
                open_rows.append((row_tokens - size, [index]))
            else:
                free, members = open_rows[slot]
                open_rows[slot] = (free - size, members + [index])
        rows.extend(members for _, members in open_rows)
    rng.shuffle(rows)
    return [rows[start : start + rows_per_batch] for start in range(0, len(rows), rows_per_batch)]


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
            input_ids[r, offset : offset + n] = ids
            position_ids[r, offset : offset + n] = torch.arange(n)
            for start, end in example.labelled():
                labels[r, offset + start : offset + end] = ids[start:end]
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
        for start, end in example.labelled():
            labels[row, start:end] = ids[start:end]
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
