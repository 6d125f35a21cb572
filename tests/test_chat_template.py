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


def test_chat_records_are_rendered_with_the_template_and_trained_on_the_answer_alone(tiny_base, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_base))
    chat = chat_format(tokenizer)
    assert chat.kind == "template" and len(chat.template_hash) == 16
    rows = [RawRow("r1", "", {"id": "c1", "messages": CHAT})]
    [record], report = validate_records(
        rows,
        source="chat.jsonl",
        config=DataConfig(min_rows=1),
        max_seq_tokens=256,
        count_tokens=token_counter(tokenizer),
        quarantine_path=tmp_path / "q.jsonl",
        render_chat=chat.split,
    )
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
