"""POST /v1/feedback: a rating or a correction of an answer, named by the answer's request id,
behind its own bearer token (`serve.feedback_token_env`). The body is read before the token is
checked, so an oversized or slow body is a 413 or 408 whatever the token."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse

from ctloop.serving.dependencies import get_serving, raw_body, require_feedback_token
from ctloop.serving.schemas import parse_body
from ctloop.serving.service import Serving

router = APIRouter()


@router.post("/v1/feedback", status_code=201)
async def feedback(
    raw: Annotated[bytes, Depends(raw_body)],
    _: Annotated[None, Depends(require_feedback_token)],
    serving: Annotated[Serving, Depends(get_serving)],
):
    from ctloop.logstore.requests import FeedbackBody

    body = parse_body(FeedbackBody, raw, serving.config.serve.max_body_bytes)
    return JSONResponse(await serving.production.add_feedback(body), status_code=201)
