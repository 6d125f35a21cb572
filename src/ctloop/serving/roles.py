"""The roles a server answers with, and the adapters it holds for them.

`RoleSync` reads the registry's aliases (champion, challenger) and the champion history (the
previous champion), loads a version on the backend before it takes a role, frees the versions no
role needs, and keeps the ones pinned through vLLM's adapter API (`/v1/load_lora_adapter`). One
lock orders a sync against a pin, so a concurrent sync never frees a version between its load and
its pin. `watch` re-reads the aliases every `serve.poll_seconds`; a poll the registry does not
answer within `serve.poll_timeout_s` keeps the roles in place and says why (logs, /healthz,
/metrics).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, replace
from typing import Any

from ctloop.config import CtloopConfig
from ctloop.errors import RegistryUnavailable
from ctloop.serving.backends import Backend
from ctloop.workspace import Workspace

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Roles:
    champion: int | None = None
    challenger: int | None = None
    previous: int | None = None

    def versions(self) -> set[int]:
        return {v for v in (self.champion, self.challenger, self.previous) if v is not None}


class RoleSync:
    """The roles (`roles`, replaced whole: a request sees the old roles or the new, never a mix), the
    running rollout that goes with them, and the versions pinned through the adapter API."""

    def __init__(self, config: CtloopConfig, workspace: Workspace, registry: Any, backend: Backend):
        self.config = config
        self.workspace = workspace
        self.registry = registry
        self.backend = backend
        self.roles = Roles()
        self.rollout: Any = None  # the challenger's running rollout (serving.rollout.Rollout), read with the roles
        self.pinned: set[int] = set()  # loaded through /v1/load_lora_adapter: kept until unloaded there
        self.last_sync_error = ""
        self.sync_errors = 0
        self._sync_lock = asyncio.Lock()
        self._polling: Any = None  # the alias poll's read, while it runs (at most one at a time)
        self._polling_since = 0.0

    async def sync(self) -> Roles:
        """Read the aliases; load new versions before they take a role; free versions without one."""
        from ctloop.registry.client import CHALLENGER, CHAMPION
        from ctloop.registry.promotion import champion_history, previous_champion

        async with self._sync_lock:

            def read() -> tuple[Roles, Any]:
                from ctloop.serving.rollout import active

                history = champion_history(self.registry)
                champion = self.registry.alias(CHAMPION)
                previous = previous_champion(history, champion)
                try:
                    rollout = active(self.registry)
                except (ValueError, TypeError, KeyError) as exc:  # a damaged tag must not stop the role sync
                    log.warning("the challenger's ctloop.rollout tag is unreadable (%s): no rollout routed", exc)
                    rollout = None
                return Roles(champion, self.registry.alias(CHALLENGER), previous), rollout

            if self._polling is not None and not self._polling.done():
                # the last poll's thread is still waiting on the registry: no second thread piles up
                waited = time.monotonic() - self._polling_since
                raise RegistryUnavailable(
                    f"the registry has not answered the alias poll for {waited:.1f} s (over "
                    f"serve.poll_timeout_s={self.config.serve.poll_timeout_s:g} s); serving the roles in place"
                )
            self._polling = asyncio.ensure_future(asyncio.to_thread(read))
            self._polling_since = time.monotonic()
            try:
                roles, rollout = await asyncio.wait_for(asyncio.shield(self._polling), self.config.serve.poll_timeout_s)
            except TimeoutError:
                raise RegistryUnavailable(
                    f"the registry did not answer the alias poll within serve.poll_timeout_s="
                    f"{self.config.serve.poll_timeout_s:g} s; serving the roles in place until it does"
                ) from None
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
            live = rollout is not None and rollout.candidate == roles.challenger and rollout.champion == roles.champion
            self.rollout = rollout if live else None
            await asyncio.to_thread(self.backend.unload_except, roles.versions() | self.pinned)
            self.last_sync_error = "; ".join(problems)
            return roles

    async def load_pinned(self, version: int, adapter_dir: Any) -> None:
        """Load registry version `version` for /v1/load_lora_adapter and keep it. `<name>-v<N>` always
        means the registry's weights: a `lora_path` (`adapter_dir`) must hold the same files as
        version N in the registry, else AdapterRequestError; a version not registered (yet) is a
        RegistryError. Under the roles lock: a concurrent `sync` cannot free it between the
        load and the pin."""
        from ctloop.serving.adapter_api import require_same_adapter

        async with self._sync_lock:
            if adapter_dir is not None:
                registered = await asyncio.to_thread(
                    self.registry.download_adapter, version, self.workspace.root / "registry-cache"
                )
                require_same_adapter(adapter_dir, registered, version)
            await asyncio.to_thread(self._load, version)
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
                await self.sync()
            except Exception as exc:  # noqa: BLE001 - keep serving the roles we have; logs, /healthz, /metrics
                self.sync_errors += 1
                self.last_sync_error = f"{exc.__class__.__name__}: {exc}"[:500]
                log.warning(
                    "reading the registry's aliases failed (serving the roles we have): %s", self.last_sync_error
                )
