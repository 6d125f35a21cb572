"""The admin API of `ctloop serve`, behind a bearer token (`serve.admin_token_env`, compared in
constant time; unset: 403): /admin/reload, /admin/promote, /admin/rollback, the rollout
(GET /admin/rollout; POST /admin/rollout/start, /admin/rollout/abort), and vLLM's runtime LoRA
API /v1/load_lora_adapter and /v1/unload_lora_adapter (see `adapter_api.py`)."""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

from fastapi import APIRouter, Depends
from fastapi.responses import PlainTextResponse

from ctloop.errors import CtloopError, ModelError
from ctloop.serving.adapter_api import (
    AdapterRequestError,
    LoadAdapterBody,
    UnloadAdapterBody,
    confined_path,
    version_of,
)
from ctloop.serving.dependencies import body_of, get_serving, require_admin
from ctloop.serving.schemas import ApiError, PromoteBody, RolloutBody
from ctloop.serving.service import Serving

router = APIRouter(dependencies=[Depends(require_admin)])  # the token before anything is read
ServingDep = Annotated[Serving, Depends(get_serving)]
NoBody = b"{}"  # an admin POST may come without a body: its options' defaults


@router.post("/admin/reload")
async def reload(serving: ServingDep):
    return _roles(await _registry_call(serving.role_sync.sync()))


@router.post("/admin/promote")
async def promote(options: Annotated[PromoteBody, Depends(body_of(PromoteBody, NoBody))], serving: ServingDep):
    from ctloop.registry.promotion import promote as promote_version

    # Without a version, promote() reads the challenger from the registry as it promotes, not
    # from this server's cached roles, which may be a poll behind (none: a 409 that says so).
    check = (
        (lambda champion, challenger: _shadow_decision(serving, champion, challenger))
        if options.require_shadow
        else None
    )
    await _registry_call(
        asyncio.to_thread(
            promote_version,
            serving.registry,
            options.version,
            by=options.by,
            note=options.note,
            shadow_check=check,
            publisher=serving.publisher(),
        )
    )
    return _roles(await _registry_call(serving.role_sync.sync()))


@router.post("/admin/rollback")
async def rollback(options: Annotated[PromoteBody, Depends(body_of(PromoteBody, NoBody))], serving: ServingDep):
    from ctloop.registry.promotion import rollback as rollback_champion

    await _registry_call(asyncio.to_thread(rollback_champion, serving.registry, options.by, serving.publisher()))
    return _roles(await _registry_call(serving.role_sync.sync()))


@router.get("/admin/rollout")
async def rollout_status(serving: ServingDep):
    """The running rollout and what a look would decide now (nothing moves)."""
    from ctloop.serving.rollout import decide

    rollout = serving.rollout
    if rollout is None:
        return {"rollout": None}
    counts = await asyncio.to_thread(serving.arm_counts, rollout)
    look = decide(rollout, counts, serving.config.rollout)
    return {"rollout": rollout.to_dict(), "look": look.__dict__}


@router.post("/admin/rollout/start")
async def rollout_start(options: Annotated[RolloutBody, Depends(body_of(RolloutBody, NoBody))], serving: ServingDep):
    from ctloop.serving.rollout import start

    settings = serving.config.rollout
    await _registry_call(asyncio.to_thread(start, serving.registry, settings, options.version, options.skip_shadow))
    await _registry_call(serving.role_sync.sync())
    return {"rollout": None if serving.rollout is None else serving.rollout.to_dict()}


@router.post("/admin/rollout/abort")
async def rollout_abort(options: Annotated[RolloutBody, Depends(body_of(RolloutBody, NoBody))], serving: ServingDep):
    from ctloop.serving.rollout import abort

    stopped = await _registry_call(asyncio.to_thread(abort, serving.registry, options.by))
    await _registry_call(serving.role_sync.sync())
    return {"rollout": stopped.to_dict()}


@router.post("/v1/load_lora_adapter")
async def load_lora_adapter(
    body: Annotated[LoadAdapterBody, Depends(body_of(LoadAdapterBody))], serving: ServingDep
) -> PlainTextResponse:
    from ctloop.serving.adapter_safety import UnsafeAdapter

    try:
        version = version_of(body.lora_name, serving.model_name)
        roots = serving.config.serve.adapter_roots
        folder = None if body.lora_path is None else confined_path(body.lora_path, roots)
    except AdapterRequestError as exc:
        raise ApiError(400, str(exc), exc.param) from None
    roles = serving.role_sync
    if version in serving.backend.loaded and version in roles.pinned:
        # vLLM's answer to a name it holds; a publisher reads "already" as loaded
        raise ApiError(400, f"the LoRA adapter '{body.lora_name}' has already been loaded", "lora_name")
    try:
        await roles.load_pinned(version, folder)
    except AdapterRequestError as exc:
        raise ApiError(400, str(exc), exc.param) from None
    except UnsafeAdapter as exc:  # would modify the shared base, or over serve.max_lora_rank
        raise ApiError(400, f"cannot load {body.lora_name}: {exc}"[:500], exc.field) from exc
    except ModelError as exc:  # files that are not a loadable adapter, or a load that changed the base
        raise ApiError(400, f"cannot load {body.lora_name}: {exc}"[:500], "lora_path") from exc
    except CtloopError as exc:
        raise ApiError(404, f"cannot load {body.lora_name}: {exc}", "lora_name", "not_found") from exc
    except Exception as exc:  # noqa: BLE001 - any other failure to load these files is the files' fault: 400
        raise ApiError(
            400,
            f"cannot load {body.lora_name} from {body.lora_path}: {exc.__class__.__name__}: {exc}"[:500],
            "lora_path",
        ) from exc
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")


@router.post("/v1/unload_lora_adapter")
async def unload_lora_adapter(
    body: Annotated[UnloadAdapterBody, Depends(body_of(UnloadAdapterBody))], serving: ServingDep
) -> PlainTextResponse:
    try:
        version = version_of(body.lora_name, serving.model_name)
    except AdapterRequestError as exc:
        raise ApiError(400, str(exc), exc.param) from None
    if version in serving.roles.versions():
        raise ApiError(
            409,
            f"{body.lora_name} is the champion, challenger or previous champion here; move the alias first",
            "lora_name",
            "conflict",
        )
    if version not in serving.backend.loaded:
        raise ApiError(404, f"the LoRA adapter '{body.lora_name}' is not loaded here", "lora_name", "not_found")
    await serving.role_sync.unload_pinned(version)
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")


async def _registry_call(awaitable: Any) -> Any:
    try:
        return await awaitable
    except CtloopError as exc:
        raise ApiError(409, str(exc), kind="conflict") from exc


def _shadow_decision(serving: Any, champion: int, challenger: int) -> tuple[str, str]:
    """The shadow comparison of two versions on the logged pairs: (decision, reasons)."""
    from ctloop.serving.compare import shadow_report

    settings = serving.config.shadow
    report = shadow_report(
        settings,
        serving.workspace.shadow_store_url(settings.store_url),
        champion,
        challenger,
        agreement_embeddings=False,
        judge_settings=serving.config.judge,
        model=serving.config.model,
        workspace_root=serving.workspace.root,
    )[0]
    return report.decision, "; ".join(report.reasons)


def _roles(roles: Any) -> dict[str, Any]:
    return {"champion": roles.champion, "challenger": roles.challenger, "previous": roles.previous}
