"""Helpers for the shadow tests: a log row, a config, and a real MLflow registry holding real LoRA adapters."""

from __future__ import annotations

from pathlib import Path

from ctloop.config import config_from_dict
from ctloop.logstore.shadow import ShadowRecord
from ctloop.registry.client import CHALLENGER, Registry
from ctloop.workspace import Workspace


def shadow_record(i: int, prompt: str = "p", challenger: str = "2") -> ShadowRecord:
    """One completed pair, request id r<i>."""
    return ShadowRecord(
        request_id=f"r{i}",
        prompt=prompt,
        champion_output="a",
        challenger_output="b",
        status="completed",
        champion_version="1",
        challenger_version=challenger,
        champion_latency_ms=1.5,
        challenger_latency_ms=2.5,
        champion_tokens=3,
        challenger_tokens=4,
    )


def serving_config(base: Path, workspace: Path, **sections) -> object:
    raw = {
        "workspace": str(workspace),
        "model": {"base": str(base)},
        "registry": {"model_name": "srv", "experiment": "srv"},
        "serve": {"poll_seconds": 0.2, "default_max_tokens": 6, "max_tokens": 32, "drain_seconds": 5},
        "shadow": {"min_pairs": 5, "embedding_similarity": False},
    }
    for name, values in sections.items():
        raw[name] = {**raw.get(name, {}), **values}
    return config_from_dict(raw)


def register_versions(config, adapters: list[Path]) -> Registry:
    """v1 = champion, v2 = challenger, ... one MLflow run per adapter."""
    from ctloop.registry.client import open_registry
    from ctloop.registry.promotion import promote

    workspace = Workspace(config.workspace).create()
    registry = open_registry(config.registry, workspace)
    for number, adapter in enumerate(adapters, start=1):
        registry.register_adapter_dir(adapter, f"key-{number}", {"ctloop.gate": "PASS"}, f"version {number}")
    promote(registry, 1, by="test", note="first")
    if len(adapters) > 1:
        registry.set_alias(CHALLENGER, 2)
    return registry


def echo_upstream(models: list[str], seen: list[dict] | None = None):
    """A real OpenAI-compatible HTTP app that answers at once (the prompt's last word, reversed), for
    tests of what ctloop does around generation (logging, feedback, load) where the tiny model's
    speed would make 10,000 requests take minutes. It stands where vLLM stands in production."""
    from fastapi import FastAPI

    app = FastAPI()

    @app.get("/v1/models")
    async def listed():
        return {"object": "list", "data": [{"id": m, "object": "model"} for m in models]}

    @app.post("/v1/chat/completions")
    async def chat(body: dict):
        if seen is not None:
            seen.append(body)
        last = next((m for m in reversed(body.get("messages") or []) if m.get("role") == "user"), {})
        words = str(last.get("content") or "").split() or ["-"]
        text = words[-1][::-1]
        usage = {"prompt_tokens": len(words), "completion_tokens": 1, "total_tokens": len(words) + 1}
        message = {"role": "assistant", "content": text}
        if body.get("tools"):  # answers with a call of the first tool, as an engine with tool parsing does
            name = body["tools"][0]["function"]["name"]
            call = {
                "id": "call_1",
                "type": "function",
                "function": {"name": name, "arguments": '{"q": "' + text + '"}'},
            }
            message = {"role": "assistant", "content": None, "tool_calls": [call]}
        if body.get("stream"):
            return _sse(body, list(text), usage, chat=True)
        choice = {"index": 0, "message": message, "finish_reason": "tool_calls" if body.get("tools") else "stop"}
        return {
            "id": "up",
            "object": "chat.completion",
            "model": body.get("model"),
            "choices": [choice],
            "usage": usage,
        }

    @app.post("/v1/completions")
    async def complete(body: dict):
        if seen is not None:
            seen.append(body)
        words = str(body.get("prompt", "")).split() or ["-"]
        text = " " + words[-1][::-1]
        usage = {"prompt_tokens": len(words), "completion_tokens": 1, "total_tokens": len(words) + 1}
        if body.get("stream"):  # one character per chunk, as an engine streams tokens
            return _sse(body, list(text), usage)
        return {
            "id": "up",
            "object": "text_completion",
            "model": body.get("model"),
            "choices": [{"index": 0, "text": text, "finish_reason": "stop"}],
            "usage": usage,
        }

    return app


def _sse(body: dict, pieces: list[str], usage: dict, chat: bool = False):
    import json

    from fastapi.responses import StreamingResponse

    def events():
        for i, piece in enumerate(pieces):
            finish = "stop" if i == len(pieces) - 1 else None
            choice = {"index": 0, ("delta" if chat else "text"): {"content": piece} if chat else piece}
            choice["finish_reason"] = finish
            yield f"data: {json.dumps({'id': 'up', 'object': 'text_completion', 'choices': [choice]})}\n\n"
        if (body.get("stream_options") or {}).get("include_usage"):
            yield f"data: {json.dumps({'id': 'up', 'object': 'text_completion', 'choices': [], 'usage': usage})}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")
