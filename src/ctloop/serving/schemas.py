"""What the server accepts and how it refuses: request models (strictly typed), body reading with
a size cap and a deadline, JSON parsing that names the bad field, and errors in the OpenAI shape."""

from __future__ import annotations

import asyncio
import hmac
import os
from typing import Any, Literal

from fastapi import Request
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, ValidationError


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: StrictBool = False


EMPTY: tuple[Any, ...] = (None, False, 0, "", [], {})  # a field sent with one of these asks for nothing


class Body(BaseModel):
    # Fields ctloop does not implement are kept (`model_extra`), never dropped: the in-process backend
    # refuses them, the openai backend passes them to the upstream unchanged (`asked_extras`).
    model_config = ConfigDict(extra="allow")

    # Strict types: "5", true or "yes" where a number or a boolean belongs is a 400, not a guess.
    model: StrictStr = Field("", max_length=512)
    max_tokens: StrictInt | None = Field(None, ge=1)
    max_completion_tokens: StrictInt | None = Field(None, ge=1)
    temperature: StrictFloat | StrictInt | None = Field(None, ge=0, le=2)
    top_p: StrictFloat | StrictInt | None = Field(None, gt=0, le=1)
    stop: StrictStr | list[StrictStr] | None = None
    seed: StrictInt | None = Field(None, ge=0, le=2**63 - 1)
    n: StrictInt | None = Field(None, ge=1, le=1)
    stream: StrictBool | None = None
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, max_length=256)  # logged with the request, as OpenAI clients send it
    metadata: dict[str, str] | None = Field(None, max_length=16)

    def asked_extras(self) -> dict[str, Any]:
        """The fields ctloop has no model for that ask for something (`logprobs: null` or
        `presence_penalty: 0` ask for nothing, so they do not count)."""
        return {
            k: v for k, v in (self.model_extra or {}).items() if not any(v == e and type(v) is type(e) for e in EMPTY)
        }


class CompletionBody(Body):
    prompt: str | list[str]


class ChatMessage(BaseModel):
    # tool_calls, tool_call_id, name: kept as sent, logged, and passed on by the openai backend
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        """The message's text: its content, or its text parts joined."""
        if isinstance(self.content, list):
            return "".join(str(p.get("text", "")) for p in self.content if p.get("type") == "text")
        return self.content or ""

    def beyond_text(self) -> str:
        """What this message holds besides text ('' when nothing): a tool call, an image part, ..."""
        extras = [k for k, v in (self.model_extra or {}).items() if v not in EMPTY]
        if isinstance(self.content, list):
            extras += sorted({str(p.get("type")) for p in self.content if p.get("type") != "text"})
        return ", ".join(extras)


class ChatBody(Body):
    messages: list[ChatMessage] = Field(min_length=1)


class PromoteBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: int | None = Field(None, ge=1)
    require_shadow: bool = False
    by: str = "admin-api"
    note: str = "promoted through the server's admin API"


class RolloutBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: int | None = Field(None, ge=1)
    skip_shadow: bool = False
    by: str = "admin-api"


def error_response(exc: ApiError) -> Any:
    from fastapi.responses import JSONResponse

    return JSONResponse(
        {"error": {"message": exc.message, "type": exc.kind, "param": exc.param, "code": exc.status}},
        status_code=exc.status,
    )


def too_large(size: int, limit: int) -> str:
    return f"the request body has {size} bytes or more, over serve.max_body_bytes={limit}; send a shorter prompt"


async def read_body(request: Request, limit: int, timeout_s: float) -> bytes:
    """The body, read in chunks and abandoned once it passes `limit` (413; a chunked upload has no
    Content-Length to refuse up front) or takes longer than `timeout_s` to arrive (408)."""
    chunks, size = [], 0
    try:
        async with asyncio.timeout(timeout_s):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise ApiError(413, too_large(size, limit))
                chunks.append(chunk)
    except TimeoutError:
        raise ApiError(
            408, f"the request body did not arrive within {timeout_s:g} s; send it at once", kind="timeout"
        ) from None
    return b"".join(chunks)


def parse_body(model: type[BaseModel], raw: bytes, limit: int) -> Any:
    import json

    if len(raw) > limit:
        raise ApiError(413, too_large(len(raw), limit))
    try:
        data = json.loads(raw or b"null")
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise ApiError(400, f"the body is not valid JSON ({exc}); send a JSON object") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the body must be a JSON object")
    try:
        json.dumps(data, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise ApiError(
            400, "the body holds a lone UTF-16 surrogate (like \\ud800), which is not text; send valid Unicode"
        ) from None
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or "body"
        raise ApiError(400, f"{field}: {first['msg']} (got {first.get('input')!r})", field) from None


def require_bearer(headers: Any, env_name: str, disabled: str, endpoint: str) -> None:
    """The bearer token in `headers` must equal the one in the env var `env_name`, compared in
    constant time: 403 (`disabled`) when that variable is unset, 401 when the token is missing or wrong."""
    expected = os.environ.get(env_name, "")
    if not expected:
        raise ApiError(403, f"{disabled}; set {env_name} in the server's environment", kind="permission_denied")
    given = headers.get("authorization", "")
    token = given[7:] if given.lower().startswith("bearer ") else ""
    if not hmac.compare_digest(token.encode(), expected.encode()):
        raise ApiError(401, f"missing or wrong bearer token for {endpoint}", kind="authentication_error")
