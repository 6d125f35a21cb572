"""`ctloop serve`: an OpenAI-compatible server that answers with the champion and shadows the challenger.

This module assembles the app; each concern has its own module:
- routers: `openai_api.py` (/v1/completions, /v1/chat/completions, /v1/models), `feedback_api.py`
  (/v1/feedback), `health.py` (/healthz, /metrics), `admin.py` (behind a bearer token:
  /admin/reload, /admin/promote, /admin/rollback, /admin/rollout, vLLM's /v1/load_lora_adapter and
  /v1/unload_lora_adapter);
- `dependencies.py`: what a handler is given (the state, the request's ids, its body within the
  limits, the token checks); `schemas.py`: request models, body limits, the OpenAI error shape;
- `service.py`: the state (`Serving`) and what it does for a request; `roles.py`: the roles and
  the adapters held for them.

Every answered request is written to the request log (`production_log.py`) under an id the server
generates, which the response carries as its `id` and `X-Request-Id`; feedback on an answer names
that id. A client's own X-Request-Id is kept beside it (`client_request_id`) for correlation, and
returned as X-Client-Request-Id, but never names a request: a client cannot choose, share or
capture another's id.

A request's `model` may be the registered model's name or `champion` (the champion answers and
the request is mirrored to the challenger), or an explicit version (`<name>-v3`, `v3`, `3`) or
`challenger`, which answer from that version without mirroring. The registry's aliases are
re-read every `serve.poll_seconds`: when `champion` moves, the new adapter is loaded first and
then swapped in, so requests already running finish on the adapter they started with.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

from fastapi import Request  # at module level: FastAPI resolves the handlers' string annotations here

from ctloop.config import CtloopConfig, ServeConfig
from ctloop.errors import CtloopError
from ctloop.serving.schemas import ApiError, error_response, too_large
from ctloop.serving.service import Serving
from ctloop.workspace import Workspace

log = logging.getLogger(__name__)


class CountRequests:
    """Pure ASGI middleware around every request: a declared body over `max_body_bytes` is refused
    (413) before a byte of it is read; an unhandled error still answers in the API's shape (500);
    each request is counted and timed by route (to its response's headers). Pure ASGI rather than
    starlette's BaseHTTPMiddleware, which runs every request through an extra task and memory
    streams: the request path's largest cost in front of a fast engine."""

    def __init__(self, app: Any, serving: Serving, max_body_bytes: int):
        self.app = app
        self.serving = serving
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 0

        async def counted(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                self._record(scope, status, time.perf_counter() - started)
            await send(message)

        declared = next((v for k, v in scope["headers"] if k == b"content-length"), b"")
        if declared.isdigit() and int(declared) > self.max_body_bytes:
            await error_response(ApiError(413, too_large(int(declared), self.max_body_bytes)))(scope, receive, counted)
            return
        try:
            await self.app(scope, receive, counted)
        except Exception as exc:  # noqa: BLE001 - a bug must still answer in the API's shape, and be counted
            log.exception("unhandled error on %s", scope.get("path", ""))
            if status:  # the response has started (a stream): nothing more can be said to the client
                return
            message = f"internal error ({exc.__class__.__name__}); see the server log"
            await error_response(ApiError(500, message, kind="server_error"))(scope, receive, counted)

    def _record(self, scope: dict, status: int, seconds: float) -> None:
        route = scope.get("route")  # the route's template, never the raw path: bounded, no injection
        path = getattr(route, "path", "other")
        self.serving.requests[(path, status)] += 1
        self.serving.latency[path].observe(seconds)


def create_app(config: CtloopConfig, workspace: Workspace) -> Any:
    """The server: its state (`Serving`, on `app.state.serving`), started and stopped with the app;
    the routers; errors in the OpenAI shape; and the middleware that counts, times and size-checks
    every request."""
    from fastapi import FastAPI
    from starlette.exceptions import HTTPException as StarletteHTTPException

    from ctloop.serving import admin, feedback_api, health, openai_api

    serving = Serving(config, workspace)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await serving.start()
        background = [
            asyncio.create_task(serving.role_sync.watch()),
            asyncio.create_task(serving.production.purge_forever()),
            asyncio.create_task(serving.watch_rollout()),
        ]
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

    app.add_middleware(CountRequests, serving=serving, max_body_bytes=config.serve.max_body_bytes)
    for module in (openai_api, feedback_api, health, admin):
        app.include_router(module.router)
    return app


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
        http=head_timeout_protocol(
            config.serve.header_timeout_s, config.serve.max_head_bytes, config.serve.max_headers
        ),
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
    protocol = head_timeout_protocol(serve.header_timeout_s, serve.max_head_bytes, serve.max_headers)
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
