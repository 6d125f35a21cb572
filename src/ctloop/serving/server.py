"""`ctloop serve`: an OpenAI-compatible server that answers with the champion and shadows the challenger.

Endpoints: /v1/completions, /v1/chat/completions, /v1/models, /v1/feedback, /healthz, /metrics
(`metrics.py`), and the admin API behind a bearer token (`admin.py`: /admin/reload, /admin/promote,
/admin/rollback, vLLM's /v1/load_lora_adapter and /v1/unload_lora_adapter). Request models, body
limits and the OpenAI error shape are in `schemas.py`.

Every answered request is written to the request log (`production_log.py`) with the id the client
sent as X-Request-Id (or a new one), which the response carries as its `id` and `X-Request-Id`;
feedback on an answer names that id.

A request's `model` may be the registered model's name or `champion` (the champion answers and
the request is mirrored to the challenger), or an explicit version (`<name>-v3`, `v3`, `3`) or
`challenger`, which answer from that version without mirroring. The registry's aliases are
re-read every `serve.poll_seconds`: when `champion` moves, the new adapter is loaded first and
then swapped in, so requests already running finish on the adapter they started with.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, replace
from typing import Any

from fastapi import Request  # at module level: FastAPI resolves the handlers' string annotations here

from ctloop.config import CtloopConfig, ServeConfig
from ctloop.errors import CtloopError, ModelError
from ctloop.serving.admin import add_admin_routes
from ctloop.serving.backends import USER, Backend, GenerationRequest
from ctloop.serving.metrics import prometheus_text
from ctloop.serving.schemas import (
    ApiError,
    Body,
    ChatBody,
    CompletionBody,
    error_response,
    parse_body,
    parse_request,
    read_body,
    require_bearer,
    too_large,
)
from ctloop.workspace import Workspace

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Roles:
    champion: int | None = None
    challenger: int | None = None
    previous: int | None = None

    def versions(self) -> set[int]:
        return {v for v in (self.champion, self.challenger, self.previous) if v is not None}


class Serving:
    """What the server holds: the backend, the router, the roles and the registry."""

    def __init__(self, config: CtloopConfig, workspace: Workspace):
        self.config = config
        self.workspace = workspace
        self.model_name = config.registry.model_name
        self.roles = Roles()
        self.backend: Backend | None = None
        self.router: Any = None
        self.registry: Any = None
        self.requests: Counter[tuple[str, int]] = Counter()
        self.latency_sum: Counter[str] = Counter()
        self.production: Any = None
        self.pinned: set[int] = set()  # loaded through /v1/load_lora_adapter: kept until unloaded there
        self.last_sync_error = ""
        self.sync_errors = 0
        self._sync_lock = asyncio.Lock()

    async def start(self) -> None:
        from ctloop.logstore.shadow import ShadowStore
        from ctloop.registry.client import open_registry
        from ctloop.serving.production_log import ProductionLog
        from ctloop.serving.router import ShadowRouter

        self.registry = await asyncio.to_thread(open_registry, self.config.registry, self.workspace)
        self.backend = await asyncio.to_thread(self._make_backend)
        shadow = self.config.shadow
        store_url = self.workspace.shadow_store_url(shadow.store_url)
        store = ShadowStore(store_url, redact_pii=shadow.redact or self.config.serve.redact)
        self.production = ProductionLog(self.config, store_url)
        self.router = ShadowRouter(
            self.backend, store, shadow, challenger=lambda: self.roles.challenger if shadow.enabled else None
        )
        self.router.start()
        await self.sync_roles()

    def _make_backend(self) -> Backend:
        serve = self.config.serve
        if serve.backend == "openai":
            from ctloop.serving.backends import OpenAIBackend

            if not serve.upstream_url:
                raise ModelError(
                    "serve.backend is 'openai' but serve.upstream_url is not set; set it to the "
                    "server's base URL, e.g. http://vllm:8000/v1"
                )
            return OpenAIBackend(
                serve.upstream_url,
                self.model_name,
                serve.upstream_model,
                os.environ.get(serve.upstream_api_key_env),
                serve.upstream_timeout_s,
            )
        from ctloop.serving.backends import InProcessBackend
        from ctloop.serving.batching import BatchLimits

        return InProcessBackend(self.config.model, BatchLimits(serve.max_batch_size, serve.max_batch_tokens))

    async def sync_roles(self) -> Roles:
        """Read the aliases; load new versions before they take a role; free versions without one."""
        from ctloop.registry.client import CHALLENGER, CHAMPION
        from ctloop.registry.promotion import champion_history

        async with self._sync_lock:

            def read() -> Roles:
                history = champion_history(self.registry)
                champion = self.registry.alias(CHAMPION)
                previous = next((v for v in reversed(history) if v != champion), None)
                return Roles(champion, self.registry.alias(CHALLENGER), previous)

            roles = await asyncio.to_thread(read)
            if roles.challenger == roles.champion:
                roles = Roles(roles.champion, None, roles.previous)
            if roles.champion is not None:
                await asyncio.to_thread(self._load, roles.champion)  # no champion adapter: keep the old roles
            problems = []
            for role in ("challenger", "previous"):  # optional: without them we serve, and say why
                version = getattr(roles, role)
                if version is not None:
                    try:
                        await asyncio.to_thread(self._load, version)
                    except Exception as exc:  # noqa: BLE001 - reported on /healthz, the champion still serves
                        problems.append(f"{role} v{version} not loaded ({exc.__class__.__name__}: {exc})"[:300])
                        roles = replace(roles, **{role: None})
            self.roles = roles  # one assignment: a request sees the old roles or the new, never a mix
            await asyncio.to_thread(self.backend.unload_except, roles.versions() | self.pinned)
            self.last_sync_error = "; ".join(problems)
            return roles

    async def load_pinned(self, version: int, adapter_dir: Any) -> None:
        """Load a version for /v1/load_lora_adapter (from `adapter_dir`, or from the registry) and keep it.
        Under the roles lock: a concurrent `sync_roles` cannot free it between the load and the pin."""
        async with self._sync_lock:
            if adapter_dir is None:
                await asyncio.to_thread(self._load, version)
            elif version not in self.backend.loaded:
                await asyncio.to_thread(self.backend.load, version, adapter_dir)
            self.pinned.add(version)

    async def unload_pinned(self, version: int) -> None:
        async with self._sync_lock:
            self.pinned.discard(version)
            await asyncio.to_thread(self.backend.unload_except, self.roles.versions() | self.pinned)

    def _load(self, version: int) -> None:
        if version in self.backend.loaded:
            return
        needs_files = self.config.serve.backend == "in_process"
        path = self.registry.download_adapter(version, self.workspace.root / "registry-cache") if needs_files else None
        self.backend.load(version, path)

    async def watch(self) -> None:
        while True:
            await asyncio.sleep(self.config.serve.poll_seconds)
            try:
                await self.sync_roles()
            except Exception as exc:  # noqa: BLE001 - keep serving the roles we have; logs, /healthz, /metrics
                self.sync_errors += 1
                self.last_sync_error = f"{exc.__class__.__name__}: {exc}"[:500]
                log.warning(
                    "reading the registry's aliases failed (serving the roles we have): %s", self.last_sync_error
                )

    async def stop(self) -> None:
        try:
            if self.router is not None:
                await self.router.shutdown(self.config.serve.drain_seconds)
        finally:
            try:
                if self.production is not None:
                    await asyncio.to_thread(self.production.close)  # every queued request row is written
            finally:
                if self.backend is not None:
                    await self.backend.aclose()

    # -- requests ---------------------------------------------------------------------------------

    async def check_fits(self, request: GenerationRequest) -> None:
        """400 before any generation when the prompt plus max_tokens exceeds the model's context (or the
        prompt exceeds serve.max_prompt_tokens); counting runs off the event loop."""
        context, cap = self.backend.context_tokens, self.config.serve.max_prompt_tokens
        if context is None and cap is None:
            return
        tokens = await asyncio.to_thread(self.backend.count_tokens, request.prompt)
        if tokens is None:
            return
        if cap is not None and tokens > cap:
            raise ApiError(
                400,
                f"the prompt has {tokens} tokens, over serve.max_prompt_tokens={cap}; send a shorter prompt",
                "prompt",
                "context_length_exceeded",
            )
        if context is not None and tokens + request.max_tokens > context:
            raise ApiError(
                400,
                f"the prompt has {tokens} tokens and max_tokens is {request.max_tokens}: {tokens + request.max_tokens}"
                f" tokens, over the model's context of {context}; shorten the prompt or lower max_tokens",
                "prompt",
                "context_length_exceeded",
            )

    def publisher(self) -> Any:
        from ctloop.registry.publishing import make_publisher

        return make_publisher(self.config.publish, self.registry, self.workspace)

    def resolve(self, requested: str) -> tuple[int, bool]:
        """(version, explicit) for a request's `model`; explicit versions are not mirrored."""
        roles = self.roles
        name = requested.strip()
        if name in ("", self.model_name, "champion"):
            if roles.champion is None:
                raise ApiError(
                    503,
                    "there is no champion yet; register one (`ctloop run`, `ctloop promote`)",
                    kind="service_unavailable",
                )
            return roles.champion, False
        if name == "challenger":
            if roles.challenger is None:
                raise ApiError(404, "there is no challenger now; ask for the champion", "model", "model_not_found")
            return roles.challenger, True
        match = re.fullmatch(rf"(?:{re.escape(self.model_name)}[-:/])?v?(\d{{1,9}})", name)
        if match is None:
            raise ApiError(
                404,
                f"unknown model {requested!r}; use {self.model_name!r} (the champion), 'champion', "
                f"'challenger' or a loaded version: {self.model_ids()}",
                "model",
                "model_not_found",
            )
        version = int(match.group(1))
        if version not in self.backend.loaded:
            raise ApiError(
                404,
                f"version {version} is not loaded here; loaded versions: {sorted(self.backend.loaded)}",
                "model",
                "model_not_found",
            )
        return version, True

    def model_ids(self) -> list[str]:
        loaded = sorted(self.backend.loaded)
        aliases = [self.model_name, "champion"] if self.roles.champion is not None else []
        return aliases + (["challenger"] if self.roles.challenger else []) + [f"{self.model_name}-v{v}" for v in loaded]

    def generation_request(self, body: Body, prompt: str) -> GenerationRequest:
        serve = self.config.serve
        if body.stream:
            raise ApiError(400, "streaming is not supported; send stream=false", "stream")
        max_tokens = body.max_completion_tokens or body.max_tokens or serve.default_max_tokens
        if max_tokens > serve.max_tokens:
            raise ApiError(
                400,
                f"max_tokens={max_tokens} is above this server's cap serve.max_tokens="
                f"{serve.max_tokens}; ask for at most {serve.max_tokens}",
                "max_tokens",
            )
        if not prompt.strip():
            raise ApiError(400, "the prompt is empty; send some text", "prompt")
        stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
        if len(stop) > 4:
            raise ApiError(400, f"{len(stop)} stop sequences; at most 4 are allowed", "stop")
        return GenerationRequest(
            prompt=prompt,
            max_tokens=max_tokens,
            temperature=body.temperature or 0.0,
            top_p=body.top_p or 1.0,
            stop=stop,
            seed=body.seed,
        )

    async def answer(
        self, request_id: str, body: Body, prompt: str, endpoint: str, messages: list[dict[str, str]] | None = None
    ) -> tuple[Any, int]:
        """The champion's (or an explicit version's) answer, logged in the request log; champion
        answers are then offered to the router."""
        from ctloop.logstore.requests import RequestRecord

        request = self.generation_request(body, prompt)
        version, explicit = self.resolve(body.model)
        await self.check_fits(request)
        try:
            generation = await self.backend.generate(request, version, USER)
        except TimeoutError as exc:
            raise ApiError(504, f"the model did not answer in time: {exc}", kind="timeout") from exc
        except CtloopError as exc:
            raise ApiError(503, f"the model could not answer: {exc}", kind="service_unavailable") from exc
        self.production.record(
            RequestRecord(
                request_id=request_id,
                model_version=str(version),
                endpoint=endpoint,
                prompt=prompt,
                answer=generation.text,
                explicit_version=explicit,
                messages=messages,
                finish_reason=generation.finish_reason,
                prompt_tokens=generation.prompt_tokens,
                completion_tokens=generation.completion_tokens,
                latency_ms=generation.latency_ms,
                user=body.user or "",
                request_metadata=body.metadata or {},
            )
        )
        if not explicit:
            self.router.submit(request_id, request, generation, version)
        return generation, version


def create_app(config: CtloopConfig, workspace: Workspace) -> Any:
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse, Response
    from starlette.exceptions import HTTPException as StarletteHTTPException

    serving = Serving(config, workspace)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await serving.start()
        background = [asyncio.create_task(serving.watch()), asyncio.create_task(serving.production.purge_forever())]
        try:
            yield
        finally:
            for task in background:
                task.cancel()
            await asyncio.gather(*background, return_exceptions=True)
            await serving.stop()

    app = FastAPI(title="ctloop", lifespan=lifespan)
    app.state.serving = serving

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError):
        return error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):  # 404, 405 from routing
        kind = "not_found" if exc.status_code == 404 else "invalid_request_error"
        return error_response(
            ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", kind=kind)
        )

    @app.middleware("http")
    async def count_requests(request: Request, call_next):
        started = time.perf_counter()
        declared = request.headers.get("content-length", "")
        limit = config.serve.max_body_bytes
        if declared.isdigit() and int(declared) > limit:  # refused before a byte of the body is read
            response = error_response(ApiError(413, too_large(int(declared), limit)))
        else:
            try:
                response = await call_next(request)
            except Exception as exc:  # noqa: BLE001 - a bug must still answer in the API's shape, and be counted
                log.exception("unhandled error on %s", request.url.path)
                response = error_response(
                    ApiError(500, f"internal error ({exc.__class__.__name__}); see the server log", kind="server_error")
                )
        route = request.scope.get("route")  # the route's template, never the raw path: bounded, no injection
        path = getattr(route, "path", "other")
        serving.requests[(path, response.status_code)] += 1
        serving.latency_sum[path] += time.perf_counter() - started
        return response

    def request_id(request: Request) -> str:
        given = request.headers.get("x-request-id", "")
        return given[:128] if given else uuid.uuid4().hex

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await parse_request(request, CompletionBody, config.serve)
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if len(prompts) != 1:
            raise ApiError(400, f"{len(prompts)} prompts in one request; send one prompt per request", "prompt")
        rid = request_id(request)
        generation, version = await serving.answer(rid, body, prompts[0], "completions")
        return JSONResponse(
            {
                "id": f"cmpl-{rid}",
                "object": "text_completion",
                "created": int(time.time()),
                "model": f"{serving.model_name}-v{version}",
                "choices": [
                    {"index": 0, "text": generation.text, "logprobs": None, "finish_reason": generation.finish_reason}
                ],
                "usage": _usage(generation),
            },
            headers={"x-request-id": rid},
        )

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        from ctloop.data.records import chat_prompt

        body = await parse_request(request, ChatBody, config.serve)
        rid = request_id(request)
        messages = [m.model_dump() for m in body.messages]
        generation, version = await serving.answer(rid, body, chat_prompt(messages), "chat", messages)
        return JSONResponse(
            {
                "id": f"chatcmpl-{rid}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": f"{serving.model_name}-v{version}",
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": generation.text.strip()},
                        "logprobs": None,
                        "finish_reason": generation.finish_reason,
                    }
                ],
                "usage": _usage(generation),
            },
            headers={"x-request-id": rid},
        )

    @app.post("/v1/feedback", status_code=201)
    async def feedback(request: Request):
        from ctloop.logstore.requests import FeedbackBody

        serve = config.serve
        raw = await read_body(request, serve.max_body_bytes, serve.body_timeout_s)  # 413/408 before 401, as before
        require_bearer(request.headers, serve.feedback_token_env, "feedback is disabled", "/v1/feedback")
        answer = await serving.production.add_feedback(parse_body(FeedbackBody, raw, serve.max_body_bytes))
        return JSONResponse(answer, status_code=201)

    @app.get("/v1/models")
    async def models():
        return {
            "object": "list",
            "data": [{"id": m, "object": "model", "created": 0, "owned_by": "ctloop"} for m in serving.model_ids()],
        }

    @app.get("/healthz")
    async def healthz():
        roles = serving.roles
        ok = roles.champion is not None
        return JSONResponse(
            {
                "status": "ok" if ok else "no_champion",
                "champion": roles.champion,
                "challenger": roles.challenger,
                "previous": roles.previous,
                "loaded": sorted(serving.backend.loaded),
                "breaker": serving.router.breaker.state,
                "last_sync_error": serving.last_sync_error,
                "last_store_error": serving.router.store.last_error,
            },
            status_code=200 if ok else 503,
        )

    @app.get("/metrics")
    async def metrics():
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(prometheus_text(serving), media_type=CONTENT_TYPE_LATEST)

    add_admin_routes(app, serving)
    return app


def _usage(generation: Any) -> dict[str, int]:
    return {
        "prompt_tokens": generation.prompt_tokens,
        "completion_tokens": generation.completion_tokens,
        "total_tokens": generation.prompt_tokens + generation.completion_tokens,
    }


def serve(config: CtloopConfig, workspace: Workspace, host: str | None = None, port: int | None = None) -> None:
    """Run the server until SIGINT/SIGTERM; shutdown drains the shadow queue and the log writer."""
    import uvicorn

    from ctloop.serving.http_protocol import head_timeout_protocol

    app = create_app(config, workspace)
    uvicorn.run(
        app,
        host=host or config.serve.host,
        port=port if port is not None else config.serve.port,
        log_level="info",
        timeout_graceful_shutdown=int(config.serve.drain_seconds) + 5,
        http=head_timeout_protocol(config.serve.header_timeout_s),
        timeout_keep_alive=config.serve.keep_alive_s,
    )


@contextmanager
def serve_in_background(
    app: Any, host: str = "127.0.0.1", port: int = 0, start_timeout: float = 300.0
) -> Iterator[str]:
    """Run an app with uvicorn in a thread (the demo, tests); yield its base URL; on exit shut it down
    the same way SIGTERM does (the shadow queue drains, the log writer flushes)."""
    import socket
    import threading

    import uvicorn

    if port == 0:
        with socket.socket() as sock:
            sock.bind((host, 0))
            port = sock.getsockname()[1]
    from ctloop.serving.http_protocol import head_timeout_protocol

    serving = getattr(app.state, "serving", None)  # a ctloop app knows its limits; any other gets the default
    serve = serving.config.serve if serving is not None else ServeConfig()
    protocol = head_timeout_protocol(serve.header_timeout_s)
    server = uvicorn.Server(
        uvicorn.Config(
            app, host=host, port=port, log_level="warning", http=protocol, timeout_keep_alive=serve.keep_alive_s
        )
    )
    thread = threading.Thread(target=server.run, name="ctloop-serve", daemon=True)
    thread.start()
    deadline = time.monotonic() + start_timeout
    while not server.started:
        if not thread.is_alive():
            raise CtloopError("the server stopped while starting; see the messages above")
        if time.monotonic() > deadline:
            server.should_exit = True
            raise CtloopError(f"the server did not start within {start_timeout:.0f} s")
        time.sleep(0.05)
    try:
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(120)
