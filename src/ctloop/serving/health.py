"""GET /healthz (503 unless a champion serves, the base model is the one the adapters were trained
on, and the log store takes writes) and GET /metrics (Prometheus text, `metrics.py`)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse, Response

from ctloop.serving.dependencies import get_serving
from ctloop.serving.metrics import prometheus_text
from ctloop.serving.service import Serving

router = APIRouter()
ServingDep = Annotated[Serving, Depends(get_serving)]


@router.get("/healthz")
async def healthz(serving: ServingDep):
    from ctloop.logstore.writer import store_file_problem

    roles = serving.roles
    base_problem = getattr(serving.backend, "base_problem", "")
    writers = {"request_log": serving.production.writer.health(), "shadow_log": serving.router.store.health()}
    store_problem = store_file_problem(serving.router.store.url) or next(
        (f"{name}: {h['last_error']}" for name, h in writers.items() if not h["ok"]), ""
    )
    ok = roles.champion is not None and not base_problem and not store_problem
    status = "base_model_changed" if base_problem else "log_store_failing" if store_problem else "no_champion"
    return JSONResponse(
        {
            "status": "ok" if ok else status,
            "store_problem": store_problem,
            "writers": writers,
            "base_problem": base_problem,
            "base_incidents": getattr(serving.backend, "base_incidents", 0),
            "champion": roles.champion,
            "challenger": roles.challenger,
            "previous": roles.previous,
            "loaded": sorted(serving.backend.loaded),
            "breaker": serving.router.breaker.state,
            "last_sync_error": serving.role_sync.last_sync_error,
            "last_store_error": serving.router.store.last_error,
        },
        status_code=200 if ok else 503,
    )


@router.get("/metrics")
async def metrics(serving: ServingDep):
    from prometheus_client import CONTENT_TYPE_LATEST

    return Response(prometheus_text(serving), media_type=CONTENT_TYPE_LATEST)
