"""#25 item 3: the OpenAI fields ctloop does not implement are never silently dropped.

The in-process backend refuses them with a 400 naming the field (a field sent empty, such as
`presence_penalty: 0`, asks for nothing and is accepted); the openai backend sends chat as chat to
the upstream, with those fields unchanged, and returns the upstream's message (tool calls
included); the request log keeps the messages as sent.
"""

from __future__ import annotations

import httpx
import pytest

from ctloop.logstore.requests import LogReader
from ctloop.serving.server import create_app, serve_in_background
from ctloop.training.tinymodel import random_adapter
from ctloop.workspace import Workspace
from shadow_helpers import echo_upstream, register_versions, serving_config

pytestmark = pytest.mark.slow
TOOLS = [{"type": "function", "function": {"name": "search", "parameters": {"type": "object"}}}]
TOOL_TURN = [
    {"role": "user", "content": "find sdl"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "search", "arguments": "{}"}}],
    },
    {"role": "tool", "tool_call_id": "c1", "content": "libsdl2"},
    {"role": "user", "content": "and its mixer?"},
]


@pytest.fixture(scope="module")
def adapters(tiny_base, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return [random_adapter(tiny_base, root / f"a{seed}", seed) for seed in (1, 2)]


@pytest.mark.parametrize(
    ("path", "extra", "param"),
    [
        ("/v1/completions", {"logprobs": 2}, "logprobs"),
        ("/v1/chat/completions", {"tools": TOOLS}, "tools"),
        ("/v1/chat/completions", {"response_format": {"type": "json_object"}}, "response_format"),
        ("/v1/chat/completions", {"messages": TOOL_TURN}, "messages.1"),
    ],
    ids=["logprobs", "tools", "response_format", "tool-call-messages"],
)
def test_the_in_process_backend_refuses_what_it_does_not_implement(tiny_base, adapters, tmp_path, path, extra, param):
    config = serving_config(tiny_base, tmp_path / "ws", shadow={"enabled": False})
    register_versions(config, adapters)
    base = {"model": "srv"} | ({"prompt": "x"} if "completions" in path and "chat" not in path else {})
    if "chat" in path:
        base["messages"] = [{"role": "user", "content": "hi"}]
    with serve_in_background(create_app(config, Workspace(config.workspace))) as url:
        refused = httpx.post(f"{url}{path}", json=base | extra, timeout=60)
        assert refused.status_code == 400, refused.text
        assert refused.json()["error"]["param"] == param and "in_process backend" in refused.json()["error"]["message"]
        empty = {"presence_penalty": 0, "logprobs": None, "tools": []} if "chat" in path else {"echo": False}
        assert httpx.post(f"{url}{path}", json=base | empty, timeout=60).status_code == 200


def test_the_openai_backend_sends_chat_as_chat_with_every_field_and_returns_tool_calls(tiny_base, adapters, tmp_path):
    seen: list[dict] = []
    with serve_in_background(echo_upstream(["srv-v1", "srv-v2"], seen)) as upstream:
        config = serving_config(
            tiny_base,
            tmp_path / "ws",
            serve={"backend": "openai", "upstream_url": f"{upstream}/v1"},
            shadow={"enabled": False},
        )
        register_versions(config, adapters)
        with serve_in_background(create_app(config, Workspace(config.workspace))) as url:
            body = {"model": "srv", "messages": TOOL_TURN, "tools": TOOLS, "tool_choice": "auto", "seed": 3}
            answer = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)
            completion = httpx.post(
                f"{url}/v1/completions", json={"model": "srv", "prompt": "a b", "logprobs": 1}, timeout=60
            )
        assert answer.status_code == 200 and completion.status_code == 200
        choice = answer.json()["choices"][0]
        assert (
            choice["finish_reason"] == "tool_calls"
            and choice["message"]["tool_calls"][0]["function"]["name"] == "search"
        )
        chat_sent, completion_sent = seen
        assert chat_sent["messages"] == TOOL_TURN and "prompt" not in chat_sent  # chat, not a hand-rendered prompt
        assert chat_sent["tools"] == TOOLS and chat_sent["tool_choice"] == "auto" and chat_sent["seed"] == 3
        assert chat_sent["model"] == "srv-v1" and completion_sent["logprobs"] == 1
    reader = LogReader(Workspace(config.workspace).shadow_store_url())
    [logged] = [r for r in reader.requests() if r["endpoint"] == "chat"]
    reader.close()
    assert logged["messages"] == TOOL_TURN  # the tool call and its result are logged as sent
