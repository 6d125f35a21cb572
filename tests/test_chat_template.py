"""#25 item 2: chat is rendered with the base model's own chat template everywhere, as vLLM does on
/v1/chat/completions: the records a cycle trains and evaluates on, and the in-process server's chat
endpoint. The tiny test model has a real template (ChatML's shape); a tokenizer without one falls
back to the plain "role: content" format."""

from __future__ import annotations

import json

import httpx
import pytest
from transformers import AutoTokenizer

from ctloop.config import DataConfig
from ctloop.data.records import RawRow
from ctloop.data.validation import validate_records
from ctloop.model.batching import encode, prompt_token_ids, token_counter
from ctloop.model.chat import chat_format
from ctloop.serving.server import create_app, serve_in_background
from ctloop.training.tinymodel import random_adapter
from ctloop.workspace import Workspace
from shadow_helpers import register_versions, serving_config

CHAT = [
    {"role": "system", "content": "Answer with the package's purpose."},
    {"role": "user", "content": "Package: libsdl2-mixer"},
    {"role": "assistant", "content": "mixer library for SDL2"},
]


def _validated(conversations, tokenizer, render_chat, tmp_path):
    """Chat rows through the cycle's validation, rendered by `render_chat`."""
    rows = [RawRow(f"r{i}", "", {"id": f"c{i}", "messages": m}) for i, m in enumerate(conversations)]
    records, _ = validate_records(
        rows,
        source="chat.jsonl",
        config=DataConfig(min_rows=1),
        max_seq_tokens=256,
        count_tokens=token_counter(tokenizer),
        quarantine_path=tmp_path / "q.jsonl",
        render_chat=render_chat,
    )
    return records


def test_chat_records_are_rendered_with_the_template_and_trained_on_the_answer_alone(tiny_base, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_base))
    chat = chat_format(tokenizer)
    assert chat.kind == "template" and len(chat.template_hash) == 16
    [record] = _validated([CHAT], tokenizer, chat.split, tmp_path)
    assert record.prompt == tokenizer.apply_chat_template(CHAT[:2], tokenize=False, add_generation_prompt=True)
    assert record.prompt + record.completion == tokenizer.apply_chat_template(CHAT, tokenize=False).rstrip()
    [example] = encode([record], tokenizer)
    ids = example.input_ids
    assert ids.count(tokenizer.bos_token_id) == 3 and ids[0] == tokenizer.bos_token_id and ids[1] != ids[0]
    assert ids[-1] == tokenizer.eos_token_id and ids[-2] != tokenizer.eos_token_id  # one end of turn, not two
    answer = tokenizer.decode(ids[example.prompt_len :], skip_special_tokens=True)
    assert answer == "mixer library for SDL2"  # the loss covers the answer (and its end of turn) only


def test_a_tokenizer_without_a_template_keeps_the_plain_format(tiny_base, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_base))
    tokenizer.chat_template = None
    chat = chat_format(tokenizer)
    assert chat.describe() == {"kind": "plain", "template_hash": ""}
    assert chat.split(CHAT) == (
        "system: Answer with the package's purpose.\nuser: Package: libsdl2-mixer\nassistant:",
        " mixer library for SDL2",
    )


@pytest.mark.slow
def test_the_chat_endpoint_answers_the_templated_prompt_with_one_bos(tiny_base, tmp_path):
    """/v1/chat/completions gives the same greedy answer as /v1/completions with the template's text
    as the prompt, and that prompt has one <s> (the template's), not two."""
    from ctloop.logstore.requests import LogReader

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_base))
    rendered = tokenizer.apply_chat_template(CHAT[:2], tokenize=False, add_generation_prompt=True)
    ids = prompt_token_ids(tokenizer, [rendered])[0]
    assert ids.count(tokenizer.bos_token_id) == 3 and ids[:2] != [tokenizer.bos_token_id] * 2  # one per turn
    config = serving_config(tiny_base, tmp_path / "ws", shadow={"enabled": False})
    register_versions(config, [random_adapter(tiny_base, tmp_path / "a1", 1)])
    with serve_in_background(create_app(config, Workspace(config.workspace))) as url:
        chat = httpx.post(
            f"{url}/v1/chat/completions",
            json={"model": "srv", "messages": CHAT[:2], "max_tokens": 16, "temperature": 0},
            timeout=60,
        ).json()
        plain = httpx.post(
            f"{url}/v1/completions",
            json={"model": "srv", "prompt": rendered, "max_tokens": 16, "temperature": 0},
            timeout=60,
        ).json()
    assert chat["choices"][0]["message"]["content"] == plain["choices"][0]["text"].strip()
    assert chat["usage"]["prompt_tokens"] == plain["usage"]["prompt_tokens"] == len(ids)
    reader = LogReader(Workspace(config.workspace).shadow_store_url())
    logged = {r["endpoint"]: r for r in reader.requests()}
    reader.close()
    assert logged["chat"]["prompt"] == rendered and json.dumps(logged["chat"]["messages"]) == json.dumps(CHAT[:2])


TWO_TURNS = [
    {"role": "user", "content": "Package: libsdl2-mixer"},
    {"role": "assistant", "content": "mixer library for SDL2"},
    {"role": "user", "content": "And its license?"},
    {"role": "assistant", "content": "zlib"},
]


@pytest.mark.parametrize("template", [True, False])
def test_all_assistant_puts_the_loss_on_every_assistant_turn(tiny_base, tmp_path, template):
    """#25 item 2: `train.chat_loss: all_assistant` learns every assistant turn of a multi-turn
    record in place (each after the conversation before it); `last` only the final one."""
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_base))
    if not template:
        tokenizer.chat_template = None
    chat = chat_format(tokenizer)
    [record] = _validated([TWO_TURNS], tokenizer, chat.split_all, tmp_path)
    ((start, end),) = record.metadata["prompt_loss_spans"]
    assert "mixer library for SDL2" in record.prompt[start:end] and "And its license" not in record.prompt[start:end]
    assert (record.prompt, record.completion) == chat.split(TWO_TURNS)  # the same text as `last`

    def learned(example):
        return [
            tokenizer.decode(example.input_ids[a:b], skip_special_tokens=True).strip() for a, b in example.labelled()
        ]

    [every] = encode([record], tokenizer, prompt_loss=True)
    [last] = encode([record], tokenizer)
    assert learned(every) == ["mixer library for SDL2", "zlib"]
    assert learned(last) == ["zlib"]


def test_training_with_all_assistant_learns_the_earlier_turns(tiny_base, tmp_path):
    """The same conversations trained both ways: only all_assistant lowers the loss of the first
    answer, which `last` never trains on."""
    import torch
    from transformers import AutoModelForCausalLM

    from ctloop.config import LoraConfig, ModelConfig, TrainConfig
    from ctloop.model.batching import Example, collate
    from ctloop.model.losses import token_losses
    from ctloop.training.trainer import train_adapter

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_base))
    chat = chat_format(tokenizer)
    conversations = [
        [
            {"role": "user", "content": f"Package number {i}"},
            {"role": "assistant", "content": "a library of reusable routines"},
            {"role": "user", "content": "Thanks"},
            {"role": "assistant", "content": f"welcome {i}"},
        ]
        for i in range(24)
    ]
    records = _validated(conversations, tokenizer, chat.split_all, tmp_path)
    first_answers = [  # each conversation up to its first answer, the loss on that answer alone
        Example(e.input_ids[:end], end, ((start, end),))
        for e in encode(records, tokenizer, prompt_loss=True)
        for start, end in e.prompt_labels[:1]
    ]

    def first_answer_loss(adapter=None) -> float:
        from peft import PeftModel

        model = AutoModelForCausalLM.from_pretrained(str(tiny_base), dtype=torch.float32)
        if adapter is not None:
            model = PeftModel.from_pretrained(model, str(adapter))
        batch = collate(first_answers, tokenizer.pad_token_id)
        with torch.inference_mode():
            nll, mask = token_losses(model.eval(), batch)
        return float((nll * mask).sum() / mask.sum())

    losses = {}
    for chat_loss in ("last", "all_assistant"):
        train_adapter(
            records,
            model=ModelConfig(base=str(tiny_base), device="cpu"),
            lora=LoraConfig(),
            out_dir=tmp_path / chat_loss,
            train=TrainConfig(chat_loss=chat_loss, epochs=15, learning_rate=1e-2, batch_tokens=512, checkpoint_every=0),
        )
        losses[chat_loss] = first_answer_loss(tmp_path / chat_loss)
    base = first_answer_loss()
    # seeded: base 5.71, last 5.77, all_assistant 5.25 nats per token on the first answers
    assert losses["all_assistant"] < min(base, losses["last"]) - 0.25, (base, losses)
