"""The OpenAI-compatible API: /v1/completions, /v1/chat/completions (answers, or `stream: true`
server-sent events) and /v1/models. What answers, and what each answer leaves in the request log
and the shadow router, is `service.Serving`'s."""

from __future__ import annotations

import time
from typing import Annotated, Any

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse

from ctloop.serving.dependencies import body_of, get_serving, request_ids
from ctloop.serving.schemas import ApiError, ChatBody, CompletionBody
from ctloop.serving.service import RequestIds, Serving

router = APIRouter()
ServingDep = Annotated[Serving, Depends(get_serving)]
IdsDep = Annotated[RequestIds, Depends(request_ids)]


@router.post("/v1/completions")
async def completions(
    body: Annotated[CompletionBody, Depends(body_of(CompletionBody))], serving: ServingDep, ids: IdsDep
):
    prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    if len(prompts) != 1:
        raise ApiError(400, f"{len(prompts)} prompts in one request; send one prompt per request", "prompt")
    if body.stream:
        return await serving.stream(ids, body, prompts[0], "completions", f"cmpl-{ids.request_id}")
    generation, version = await serving.answer(ids, body, prompts[0], "completions")
    return JSONResponse(
        {
            "id": f"cmpl-{ids.request_id}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": f"{serving.model_name}-v{version}",
            "choices": [
                {"index": 0, "text": generation.text, "logprobs": None, "finish_reason": generation.finish_reason}
            ],
            "usage": _usage(generation),
        },
        headers=ids.headers(),
    )


@router.post("/v1/chat/completions")
async def chat_completions(body: Annotated[ChatBody, Depends(body_of(ChatBody))], serving: ServingDep, ids: IdsDep):
    messages = [m.model_dump(exclude_unset=True) for m in body.messages]  # as sent: tool calls included
    prompt = serving.backend.chat_prompt([{"role": m.role, "content": m.text()} for m in body.messages])
    if body.stream:
        return await serving.stream(ids, body, prompt, "chat", f"chatcmpl-{ids.request_id}", messages)
    generation, version = await serving.answer(ids, body, prompt, "chat", messages)
    message = generation.message or {"role": "assistant", "content": generation.text.strip()}
    return JSONResponse(
        {
            "id": f"chatcmpl-{ids.request_id}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": f"{serving.model_name}-v{version}",
            "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": generation.finish_reason}],
            "usage": _usage(generation),
        },
        headers=ids.headers(),
    )


@router.get("/v1/models")
async def models(serving: ServingDep):
    return {
        "object": "list",
        "data": [{"id": m, "object": "model", "created": 0, "owned_by": "ctloop"} for m in serving.model_ids()],
    }


def _usage(generation: Any) -> dict[str, int]:
    return {
        "prompt_tokens": generation.prompt_tokens,
        "completion_tokens": generation.completion_tokens,
        "total_tokens": generation.prompt_tokens + generation.completion_tokens,
    }
