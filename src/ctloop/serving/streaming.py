"""Streamed answers (`stream: true`): text deltas as tokens are decoded, sent as OpenAI's
server-sent events, ending in `data: [DONE]`.

- `TextDeltas` turns a growing list of token ids into text deltas. It never splits a multi-byte
  character (a decode ending in U+FFFD waits for the next token), never sends text at or after a
  stop string nor a tail that may still become one, and ends on exactly the text the non-streamed
  answer has: greedy streamed text equals the non-streamed answer.
- `ChatTrim` gives chat deltas the non-streamed message's `.strip()`: leading whitespace is never
  sent, trailing whitespace only once more text follows it.
- `event_stream` runs one streamed request for the server: the chunks, then the complete answer
  to the request log and the router (queues: `[DONE]` never waits on them). A client that leaves
  closes the backend's stream (the batch slot or the upstream request is freed at once) and the
  answer so far is logged with finish_reason `client_disconnected`; a backend failure mid-stream
  ends the stream with an OpenAI-shaped error event, counted and logged.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from ctloop.serving.backends import CLIENT_GONE, Generation

log = logging.getLogger(__name__)


def _safe_end(text: str, stop: tuple[str, ...]) -> int:
    """How much of `text` may be sent while more tokens can come: not a trailing replacement
    character (half a UTF-8 sequence), nor a suffix that is the start of a stop string."""
    end = len(text)
    while end and text[end - 1] == "\ufffd":
        end -= 1
    for s in stop:
        for k in range(min(len(s) - 1, end), 0, -1):
            if text[end - k : end] == s[:k]:
                end -= k
                break
    return end


class TextDeltas:
    def __init__(self, tokenizer: Any, stop: tuple[str, ...]):
        self.tokenizer = tokenizer
        self.stop = stop
        self.sent = ""

    def update(self, ids: list[int]) -> str:
        """The new text since the last call, for the tokens decoded so far."""
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        cut = min((text.find(s) for s in self.stop if s and s in text), default=-1)
        text = text[:cut] if cut >= 0 else text[: _safe_end(text, self.stop)]
        if not text.startswith(self.sent):  # the decoder rewrote earlier text: wait for the final answer
            return ""
        delta, self.sent = text[len(self.sent) :], text
        return delta

    def finish(self, final: str) -> str:
        """What is left to send of the complete answer."""
        if not final.startswith(self.sent):
            log.warning("a streamed answer's text was sent before the decoder changed it; the log has the final text")
            return ""
        delta, self.sent = final[len(self.sent) :], final
        return delta


class ChatTrim:
    """Deltas whose concatenation is the whole text `.strip()`ped, as the non-streamed message is."""

    def __init__(self) -> None:
        self.started = False
        self.held = ""

    def __call__(self, delta: str) -> str:
        if not self.started:
            delta = delta.lstrip()
            if not delta:
                return ""
            self.started = True
        text = self.held + delta
        body = text.rstrip()
        self.held = text[len(body) :]
        return body


def sse(data: dict[str, Any] | str) -> bytes:
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return f"data: {payload}\n\n".encode()


def chunk(response_id: str, model: str, endpoint: str, delta: str | None, finish: str | None = None) -> dict[str, Any]:
    """One chunk in OpenAI's shape: `text_completion` or `chat.completion.chunk` with a `delta`."""
    created = int(time.time())
    if endpoint == "chat":
        content = {} if delta is None else {"content": delta}
        if delta is not None and finish is None and not content["content"]:
            content = {"role": "assistant", "content": ""}
        choice = {"index": 0, "delta": content, "logprobs": None, "finish_reason": finish}
        return {
            "id": response_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": [choice],
        }
    choice = {"index": 0, "text": delta or "", "logprobs": None, "finish_reason": finish}
    return {"id": response_id, "object": "text_completion", "created": created, "model": model, "choices": [choice]}


def usage_chunk(response_id: str, model: str, endpoint: str, generation: Generation) -> dict[str, Any]:
    kind = "chat.completion.chunk" if endpoint == "chat" else "text_completion"
    usage = {
        "prompt_tokens": generation.prompt_tokens,
        "completion_tokens": generation.completion_tokens,
        "total_tokens": generation.prompt_tokens + generation.completion_tokens,
    }
    return {
        "id": response_id,
        "object": kind,
        "created": int(time.time()),
        "model": model,
        "choices": [],
        "usage": usage,
    }


async def event_stream(
    deltas: AsyncIterator[str | Generation],
    response_id: str,
    model: str,
    endpoint: str,
    include_usage: bool,
    on_complete: Any,
    on_failure: Any,
    on_first_text: Any = None,
    started: float | None = None,
) -> AsyncIterator[bytes]:
    """The SSE body of one streamed answer. `deltas` is the backend's stream; `on_complete(generation)`
    logs and mirrors the answer (also a cut one, with CLIENT_GONE); `on_failure(exc)` counts and logs;
    `on_first_text(seconds)` hears when the first text goes out, counted from `started` (a
    perf_counter reading; default: now)."""
    trim = ChatTrim() if endpoint == "chat" else (lambda d: d)
    parts: list[str] = []
    generation: Generation | None = None
    started = time.perf_counter() if started is None else started
    if endpoint == "chat":
        yield sse(chunk(response_id, model, endpoint, ""))  # the role first, as OpenAI's stream does
    try:
        async for item in deltas:
            if isinstance(item, Generation):
                generation = item
                continue
            parts.append(item)
            text = trim(item)
            if text:
                if on_first_text is not None:
                    on_first_text(time.perf_counter() - started)
                    on_first_text = None
                yield sse(chunk(response_id, model, endpoint, text))
    except BaseException as exc:
        if isinstance(exc, Exception):  # a failure of the backend: the stream ends with an error event
            on_failure(exc)
            yield sse({"error": {"message": f"the model failed mid-answer: {exc}"[:500], "type": "server_error"}})
            yield sse("[DONE]")
            return
        # The client left (cancellation): the backend's stream is closed by now; log what it got.
        text = "".join(parts)
        on_complete(Generation(text, 0, 0, CLIENT_GONE, (time.perf_counter() - started) * 1000))
        raise
    finally:
        await close_stream(deltas)
    assert generation is not None  # a backend's stream always ends with the complete Generation
    yield sse(chunk(response_id, model, endpoint, None, generation.finish_reason))
    if include_usage:
        yield sse(usage_chunk(response_id, model, endpoint, generation))
    on_complete(generation)
    yield sse("[DONE]")


async def close_stream(stream: AsyncIterator[Any]) -> None:
    close = getattr(stream, "aclose", None)
    if close is not None:
        await close()
