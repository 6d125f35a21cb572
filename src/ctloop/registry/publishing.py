"""Publishing: a version becomes servable on every serving engine before an alias points at it.

Targets (`publish.targets`): vLLM/SGLang replicas through their runtime LoRA API, other `ctloop
serve` instances through the same API, and a directory that an engine watches. A version is always
published as `<name>-v<N>`: a name is never reused for other weights (engines keep prefix-cache
entries under a name). An HTTP load is checked against the replica's /v1/models and retried with
backoff. Each replica's outcome is recorded on the version in the registry; `ctloop status` shows
them and `ctloop publish N` retries. Versions that are neither the new one nor champion, challenger
or the previous champion are retired from the targets after a publish (the previous champion stays,
so answers already running finish and a rollback is instant).

Bounded and discreet: every HTTP call has an overall deadline (`timeout_s`, however slowly a
replica drips its answer) and reads at most MAX_ANSWER_BYTES of it; bearer tokens and URL
passwords are removed from every message, log line and registry tag. A directory copy is checked
against the registry's files after it lands; a stale folder under the version's name is replaced
atomically, and a symlink there is refused.
"""

from __future__ import annotations

import logging
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from ctloop.config import PublishConfig, PublishTarget
from ctloop.errors import RegistryError
from ctloop.fileio import adapter_digest, utc_now
from ctloop.registry.client import Registry, shown_uri
from ctloop.workspace import Workspace

log = logging.getLogger(__name__)
TAG_PREFIX = "ctloop.publish."
MAX_ANSWER_BYTES = 1 << 20  # of a replica's answer: a huge error page costs nothing


@dataclass(frozen=True)
class Answer:
    """A replica's HTTP answer, read within the deadline and the byte cap."""

    status_code: int
    text: str

    def json(self):
        import json

        return json.loads(self.text)

    def raise_for_status(self) -> None:
        import httpx

        if self.status_code >= 400:
            raise httpx.HTTPError(f"answered {self.status_code}: {self.text[:200]}")


@dataclass(frozen=True)
class ReplicaOutcome:
    target: str  # "directory /srv/adapters", "vllm http://gpu-1:8000"
    ok: bool
    detail: str


@dataclass(frozen=True)
class PublishResult:
    version: int
    outcomes: tuple[ReplicaOutcome, ...]

    def enough(self, require: str | int) -> bool:
        ok = sum(o.ok for o in self.outcomes)
        return ok == len(self.outcomes) if require == "all" else ok >= int(require)

    def failures(self) -> str:
        return "; ".join(f"{o.target}: {o.detail}" for o in self.outcomes if not o.ok)

    def summary(self) -> str:
        ok = sum(o.ok for o in self.outcomes)
        return f"published v{self.version} to {ok} of {len(self.outcomes)} replicas" + (
            f"; failed: {self.failures()}" if ok < len(self.outcomes) else ""
        )


class Publisher:
    def __init__(self, config: PublishConfig, registry: Registry, cache_dir: Path, token_of=None):
        import os

        self.config = config
        self.registry = registry
        self.cache_dir = cache_dir
        self.token_of = token_of or (lambda env: os.environ.get(env, "") if env else "")

    @property
    def active(self) -> bool:
        return bool(self.config.targets)

    def name(self, version: int) -> str:
        return f"{self.registry.model_name}-v{version}"

    def publish(self, version: int) -> PublishResult:
        """Load `version` on every replica of every target; record each outcome on the version."""
        outcomes: list[ReplicaOutcome] = []
        local: Path | None = None
        # Directories first: a vLLM target's lora_path usually points into one of them.
        for target in sorted(self.config.targets, key=lambda t: t.kind != "directory"):
            if target.kind == "directory":
                try:
                    local = local or self.registry.download_adapter(version, self.cache_dir)
                    outcomes.append(self._copy(target, version, local))
                except (OSError, RegistryError) as exc:
                    outcomes.append(ReplicaOutcome(_label(target), False, f"{exc.__class__.__name__}: {exc}"))
            else:
                outcomes += [self._load(target, url, version) for url in target.urls]
        outcomes = [ReplicaOutcome(o.target, o.ok, self._discreet(o.detail)) for o in outcomes]
        result = PublishResult(version, tuple(outcomes))
        stamp = utc_now()
        self.registry.set_version_tags(
            version, {_tag(o.target): f"{'ok' if o.ok else 'failed'} {stamp}: {o.detail}"[:4000] for o in outcomes}
        )
        log.info("%s", result.summary())
        return result

    def retire(self, keep: set[int], keep_newer_than: int | None = None) -> None:
        """Unload from the targets every version of this model that is not in `keep` and not newer
        than `keep_newer_than` (best effort)."""

        def unwanted(number: int) -> bool:
            return number not in keep and (keep_newer_than is None or number <= keep_newer_than)

        prefix = f"{self.registry.model_name}-v"
        for target in self.config.targets:
            if target.kind == "directory":
                for folder in Path(target.path).glob(f"{prefix}*"):
                    number = folder.name.removeprefix(prefix)
                    if number.isdigit() and unwanted(int(number)):
                        shutil.rmtree(folder, ignore_errors=True)
                continue
            for url in target.urls:
                try:
                    for name in self._served(target, url):
                        number = name.removeprefix(prefix)
                        if name.startswith(prefix) and number.isdigit() and unwanted(int(number)):
                            self._post(target, url, "/v1/unload_lora_adapter", {"lora_name": name})
                except Exception as exc:  # noqa: BLE001 - retiring is housekeeping; the next publish tries again
                    log.warning("could not retire old versions on %s: %s", shown_uri(url), self._discreet(str(exc)))

    # -- one replica --------------------------------------------------------------------------

    def _copy(self, target: PublishTarget, version: int, adapter: Path) -> ReplicaOutcome:
        """An atomic copy to `<path>/<name>-v<N>/`, checked against the registry's files. A folder
        already there counts only when it holds exactly those files; a stale one is replaced
        atomically, a symlink (or one inside the folder) is refused."""
        folder = Path(target.path)
        final = folder / self.name(version)
        expected = adapter_digest(adapter)
        if final.is_symlink() or (final.is_dir() and any(p.is_symlink() for p in final.iterdir())):
            return ReplicaOutcome(
                _label(target), False, f"{final} is (or holds) a symlink; remove it, a version's folder holds its files"
            )
        if final.is_dir() and adapter_digest(final) == expected:
            return ReplicaOutcome(_label(target), True, f"already in {final} (checked)")
        partial = folder / f".{self.name(version)}.partial"
        shutil.rmtree(partial, ignore_errors=True)
        shutil.copytree(adapter, partial, symlinks=False)
        if adapter_digest(partial) != expected:
            shutil.rmtree(partial, ignore_errors=True)
            return ReplicaOutcome(_label(target), False, f"the copy in {partial} does not match the registry's files")
        stale = None
        if final.exists():  # foreign or half-written bytes under the version's name: set aside, then swapped
            stale = folder / f".{self.name(version)}.stale-{time.time_ns()}"
            final.rename(stale)
        partial.rename(final)  # atomic: a watcher sees the whole adapter or none of it
        if stale is not None:
            shutil.rmtree(stale, ignore_errors=True)
            return ReplicaOutcome(_label(target), True, f"replaced a stale folder with a checked copy in {final}")
        return ReplicaOutcome(_label(target), True, f"copied to {final} (checked)")

    def _load(self, target: PublishTarget, url: str, version: int) -> ReplicaOutcome:
        import httpx

        name = self.name(version)
        body = {"lora_name": name}
        if target.kind == "vllm":
            body["lora_path"] = target.path.format(name=self.registry.model_name, version=version)
        label = f"{target.kind} {shown_uri(url)}"
        detail = "not tried"
        for attempt in range(self.config.attempts):
            if attempt:
                time.sleep(0.5 * 2 ** (attempt - 1))
            try:
                response = self._post(target, url, "/v1/load_lora_adapter", body)
                if response.status_code in (401, 403):
                    return ReplicaOutcome(
                        label,
                        False,
                        f"{response.status_code}: check the token in "
                        f"{target.token_env or 'token_env'} ({response.text[:200]})",
                    )
                already = response.status_code == 400 and "already" in response.text.lower()
                if response.status_code >= 400 and not already:
                    detail = f"load answered {response.status_code}: {response.text[:300]}"
                    continue
                served = self._served(target, url)
                if name in served:
                    return ReplicaOutcome(label, True, f"serves {name}")
                detail = f"loaded, but /v1/models lists {sorted(served)[:10]}, not {name}"
            except httpx.HTTPError as exc:
                detail = f"unreachable ({exc.__class__.__name__}: {exc}); check the URL and that the server is up"
            except (ValueError, AttributeError, TypeError) as exc:  # not the vLLM API's answers
                detail = f"answered something that is not vLLM's API ({exc.__class__.__name__}: {exc}); check the URL"
        return ReplicaOutcome(label, False, detail)

    def _post(self, target: PublishTarget, url: str, path: str, body: dict) -> Answer:
        return self._call(target, "POST", f"{url.rstrip('/')}{path}", body)

    def _served(self, target: PublishTarget, url: str) -> set[str]:
        response = self._call(target, "GET", f"{url.rstrip('/')}/v1/models", None)
        response.raise_for_status()
        return {m.get("id") for m in response.json().get("data", [])}

    def _call(self, target: PublishTarget, method: str, url: str, body: dict | None) -> Answer:
        """One HTTP call with an overall deadline of `timeout_s` (httpx's own timeout restarts with
        every byte, so a replica dripping one byte a second held a publish for minutes) that reads
        at most MAX_ANSWER_BYTES of the answer."""
        import asyncio

        import httpx

        async def call() -> Answer:
            async with asyncio.timeout(target.timeout_s):
                async with httpx.AsyncClient(timeout=target.timeout_s) as client:
                    async with client.stream(method, url, json=body, headers=self._headers(target)) as response:
                        data = bytearray()
                        async for block in response.aiter_bytes():
                            data += block
                            if len(data) >= MAX_ANSWER_BYTES:
                                break
                        return Answer(response.status_code, bytes(data[:MAX_ANSWER_BYTES]).decode("utf-8", "replace"))

        try:
            return asyncio.run(call())
        except TimeoutError:
            raise httpx.TimeoutException(f"no complete answer within timeout_s={target.timeout_s} s") from None

    def _discreet(self, text: str) -> str:
        """`text` without bearer tokens (ours, by value, and any `Bearer ...`) and URL passwords."""
        for target in self.config.targets:
            token = self.token_of(target.token_env)
            if token:
                text = text.replace(token, "***")
        text = re.sub(r"(?i)\b(bearer|basic)(\s+)[A-Za-z0-9._~+/=-]+", r"\1\2***", text)
        return shown_uri(text)

    def _headers(self, target: PublishTarget) -> dict[str, str]:
        token = self.token_of(target.token_env)
        return {"Authorization": f"Bearer {token}"} if token else {}


def make_publisher(settings: PublishConfig, registry: Registry, workspace: Workspace) -> Publisher:
    return Publisher(settings, registry, workspace.root / "registry-cache")


def publication_status(registry: Registry, version: int) -> dict[str, str]:
    """The recorded outcome per replica of a version's last publish."""
    return {
        k.removeprefix(TAG_PREFIX): v for k, v in registry.version(version).tags.items() if k.startswith(TAG_PREFIX)
    }


def _label(target: PublishTarget) -> str:
    return f"directory {target.path}" if target.kind == "directory" else target.kind


def _tag(target: str) -> str:
    # MLflow keys allow few characters and no "//": "vllm http://gpu-1:8000" -> "vllm_http_gpu-1_8000"
    return TAG_PREFIX + re.sub(r"[^A-Za-z0-9.\-]+", "_", target).strip("_")[:200]
