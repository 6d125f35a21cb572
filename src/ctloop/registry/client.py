"""The model registry and run tracking, on MLflow: the only module that imports mlflow.

Each cycle is an MLflow run (params, metrics, reports, the adapter). A candidate that passes the
gate becomes a registered model version with lineage tags. Who may hold the `challenger` and
`champion` aliases, and when, is `promotion.py`'s business; this module only reads and writes.
Every write is idempotent on the cycle key: a retried cycle finds its version instead of adding one.

An unreachable registry is never read as an empty one. Every MLflow call goes through
`Registry._call`: "does not exist" (MLflow's RESOURCE_DOES_NOT_EXIST) is the only answer that
means absence (`None`, `[]`, `{}`); a transport, server or database error is retried with backoff
where the call is idempotent (`registry.retry_delays_s`), then raised as `RegistryUnavailable`
naming the URI and the fix, so the stage fails and resumes later instead of deciding on nothing.
"""

from __future__ import annotations

import json
import logging
import re
import secrets
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from ctloop.config import RegistryConfig
from ctloop.errors import RegistryError, RegistryUnavailable, WorkspaceError
from ctloop.workspace import Workspace

log = logging.getLogger(__name__)

CHAMPION = "champion"
CHALLENGER = "challenger"
CYCLE_KEY_TAG = "ctloop.cycle_key"
ABSENT = "RESOURCE_DOES_NOT_EXIST"
ALREADY_EXISTS = "RESOURCE_ALREADY_EXISTS"
RETRY_DELAYS_S = (1.0, 4.0, 16.0)
_T = TypeVar("_T")


def shown_uri(uri: str) -> str:
    """A URI fit for messages, logs and tags: a `user:password@` part loses its password."""
    return re.sub(r"(//[^/@:]*):[^/@]*@", r"\1:***@", uri)


def is_absent(exc: BaseException) -> bool:
    """Whether an MLflow error says only that the thing asked for does not exist."""
    return getattr(exc, "error_code", None) == ABSENT


@dataclass(frozen=True)
class VersionInfo:
    version: int
    run_id: str
    source: str
    aliases: tuple[str, ...]
    tags: dict[str, str]
    created: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "run_id": self.run_id,
            "source": self.source,
            "aliases": list(self.aliases),
            "tags": self.tags,
            "created": self.created,
        }


def _info(model_version: Any, aliases: dict[str, Any]) -> VersionInfo:
    number = int(model_version.version)
    return VersionInfo(
        number,
        model_version.run_id or "",
        model_version.source,
        tuple(sorted(a for a, v in aliases.items() if int(v) == number)),
        dict(model_version.tags),
        model_version.creation_timestamp / 1000,
    )


class Registry:
    def __init__(
        self,
        tracking_uri: str,
        model_name: str,
        experiment: str,
        artifact_location: str | Path | None,
        retry_delays_s: Sequence[float] = RETRY_DELAYS_S,
    ):
        from mlflow import MlflowClient

        self.tracking_uri = tracking_uri
        self.model_name = model_name
        self.experiment = experiment
        self.artifact_location = artifact_location
        self.retry_delays_s = tuple(retry_delays_s)
        self.client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)

    def _call(self, what: str, call: Callable[..., _T], *args: Any, retry: bool = True, **kwargs: Any) -> _T:
        """One MLflow call. An answer the caller must interpret ("does not exist", "already exists")
        is re-raised as MLflow's own exception; a refused request is a RegistryError; anything else
        (connection refused, a 5xx, a locked or broken database) is retried when `retry` (the call is
        idempotent), then raised as RegistryUnavailable. Never read as absence."""
        from mlflow.exceptions import MlflowException

        delays = self.retry_delays_s if retry else ()
        error: BaseException | None = None
        for attempt in range(len(delays) + 1):
            if attempt:
                log.warning("MLflow %s failed (%s); retry %d of %d", what, error, attempt, len(delays))
                time.sleep(delays[attempt - 1])
            try:
                return call(*args, **kwargs)
            except MlflowException as exc:
                if exc.error_code in (ABSENT, ALREADY_EXISTS):
                    raise
                status = exc.get_http_status_code()
                if 400 <= status < 500 and status != 429:
                    raise RegistryError(
                        f"MLflow at {shown_uri(self.tracking_uri)} refused {what}: {exc.message}"
                    ) from exc
                error = exc
            except (RegistryError, TypeError, AttributeError):
                raise  # ctloop's own errors and programming errors are not outages
            except Exception as exc:  # noqa: BLE001 - transport and database errors: retried, then raised
                error = exc
        tries = f"{len(delays) + 1} attempts" if delays else "1 attempt, not retried: it is not idempotent"
        raise RegistryUnavailable(
            f"the MLflow registry at {shown_uri(self.tracking_uri)} did not answer {what} ({tries}): "
            f"{error.__class__.__name__}: {shown_uri(str(error))[:300]}. Check that the tracking server is up and "
            f"reachable (or that no other process holds the SQLite file locked), then run the command again; "
            f"a cycle resumes from its finished stages"
        ) from error

    # -- runs ------------------------------------------------------------------------------------

    def experiment_id(self) -> str:
        from mlflow.exceptions import MlflowException

        found = self._call("get_experiment_by_name", self.client.get_experiment_by_name, self.experiment)
        if found is not None:
            return found.experiment_id
        location = None  # a tracking server decides: its proxied store, reachable from every host
        if self.artifact_location is not None:
            raw = str(self.artifact_location)
            location = raw if "://" in raw else Path(raw).resolve().as_uri()
        try:
            return self._call(
                "create_experiment", self.client.create_experiment, self.experiment, artifact_location=location
            )
        except MlflowException as exc:  # another cycle created it a moment ago
            if exc.error_code != ALREADY_EXISTS:
                raise
            found = self._call("get_experiment_by_name", self.client.get_experiment_by_name, self.experiment)
            if found is None:
                raise RegistryError(
                    f"MLflow experiment {self.experiment!r} was created and is gone; run the command again"
                )
            return found.experiment_id

    def run_link(self, run_id: str) -> str:
        """Where a person opens a run: its page on a tracking server, or the `mlflow ui` command for
        an embedded (SQLite) registry and the run's id."""
        run = self._call("get_run", self.client.get_run, run_id)
        experiment = run.info.experiment_id
        if self.tracking_uri.startswith(("http://", "https://")):
            return f"{shown_uri(self.tracking_uri).rstrip('/')}/#/experiments/{experiment}/runs/{run_id}"
        return (
            f"{run_id} in experiment {experiment} (open `mlflow ui --backend-store-uri "
            f"{shown_uri(self.tracking_uri)}`, then #/experiments/{experiment}/runs/{run_id})"
        )

    def start_run(self, run_name: str, tags: dict[str, str]) -> str:
        # Not retried: a retry after a lost answer would open a second run.
        run = self._call(
            "create_run", self.client.create_run, self.experiment_id(), run_name=run_name, tags=tags, retry=False
        )
        return run.info.run_id

    def log_params(self, run_id: str, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for start in range(0, len(items), 100):
            self._call("log_batch (params)", self.client.log_batch, run_id, params=items[start : start + 100])

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        if items:  # not retried: a metric logged twice is two points
            self._call("log_batch (metrics)", self.client.log_batch, run_id, metrics=items, retry=False)

    def log_series(self, run_id: str, key: str, points: list[tuple[int, float]]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(key, float(v), now, int(s)) for s, v in points]
        for start in range(0, len(items), 500):
            self._call(
                "log_batch (series)", self.client.log_batch, run_id, metrics=items[start : start + 500], retry=False
            )

    def log_artifact(self, run_id: str, path: Path, artifact_path: str | None = None) -> None:
        upload = self.client.log_artifacts if path.is_dir() else self.client.log_artifact
        self._call(f"upload of {path.name}", upload, run_id, str(path), artifact_path)

    def set_run_tags(self, run_id: str, tags: dict[str, str]) -> None:
        for key, value in tags.items():
            self._call("set_tag", self.client.set_tag, run_id, key, value)

    def end_run(self, run_id: str, status: str = "FINISHED") -> None:
        self._call("set_terminated", self.client.set_terminated, run_id, status=status)

    # -- model versions --------------------------------------------------------------------------

    def versions(self) -> list[VersionInfo]:
        from mlflow.exceptions import MlflowException

        try:
            model = self._call("get_registered_model", self.client.get_registered_model, self.model_name)
        except MlflowException as exc:
            if is_absent(exc):
                return []
            raise
        found = self._call("search_model_versions", self.client.search_model_versions, f"name='{self.model_name}'")
        # Search results carry no aliases (MLflow 3): they come from the registered model.
        return sorted((_info(v, model.aliases) for v in found), key=lambda info: info.version)

    def version(self, number: int) -> VersionInfo:
        from mlflow.exceptions import MlflowException

        try:
            found = self._call("get_model_version", self.client.get_model_version, self.model_name, str(number))
            aliases = self._call("get_registered_model", self.client.get_registered_model, self.model_name).aliases
        except MlflowException as exc:
            if not is_absent(exc):
                raise
            raise RegistryError(
                f"model '{self.model_name}' has no version {number}; `ctloop status` lists the versions"
            ) from None
        return _info(found, aliases)

    def find_by_cycle_key(self, cycle_key: str) -> VersionInfo | None:
        return next((v for v in self.versions() if v.tags.get(CYCLE_KEY_TAG) == cycle_key), None)

    def register(self, run_id: str, cycle_key: str, tags: dict[str, str], description: str) -> VersionInfo:
        """Register the run's adapter as a new version (or return the one this cycle key made)."""

        existing = self.find_by_cycle_key(cycle_key)
        if existing is not None:
            return existing
        self._ensure_model()
        # Not retried: a lost answer would register the version twice (a rerun finds it by its key).
        created = self._call(
            "create_model_version",
            self.client.create_model_version,
            retry=False,
            name=self.model_name,
            source=f"runs:/{run_id}/adapter",
            run_id=run_id,
            tags={**tags, CYCLE_KEY_TAG: cycle_key},
            description=description,
        )
        return self.version(int(created.version))

    def _ensure_model(self) -> None:
        """The registered model, created when it does not exist yet."""
        from mlflow.exceptions import MlflowException

        try:
            self._call(
                "create_registered_model",
                self.client.create_registered_model,
                self.model_name,
                description="LoRA adapters trained by ctloop",
            )
        except MlflowException as exc:
            if exc.error_code != ALREADY_EXISTS:
                raise

    def register_adapter_dir(self, adapter_dir: Path, key: str, tags: dict[str, str], description: str) -> VersionInfo:
        """Register adapter files made elsewhere (one run that holds them); idempotent on `key`."""
        existing = self.find_by_cycle_key(key)
        if existing is not None:
            return existing
        run_id = self.start_run(f"import-{key}", {"ctloop.imported_from": str(adapter_dir)})
        self.log_artifact(run_id, adapter_dir, "adapter")
        self.end_run(run_id)
        return self.register(run_id, key, tags, description)

    def alias(self, name: str) -> int | None:
        from mlflow.exceptions import MlflowException

        try:
            aliases = self._call("get_registered_model", self.client.get_registered_model, self.model_name).aliases
        except MlflowException as exc:
            if is_absent(exc):
                return None  # no model registered yet
            raise
        return int(aliases[name]) if name in aliases else None

    def set_alias(self, name: str, version: int) -> None:
        self._call(
            "set_registered_model_alias", self.client.set_registered_model_alias, self.model_name, name, str(version)
        )

    def delete_alias(self, name: str) -> None:
        from mlflow.exceptions import MlflowException

        try:
            self._call(
                "delete_registered_model_alias", self.client.delete_registered_model_alias, self.model_name, name
            )
        except MlflowException as exc:
            if not is_absent(exc):
                raise  # absent: already gone

    def add_model_event(self, prefix: str, event: dict[str, Any]) -> str:
        """Append an event to the registered model as a tag of its own (`<prefix>.<time>.<random>`).
        Append-only: two writers at once both land, where a read-modify-write of one tag would
        lose one of them."""
        self._ensure_model()  # an event may come before the first version (a seed calibration)
        # Keys sort in log order: a stamp after the newest event, even when this host's clock is behind.
        newest = max((int(k.split(".")[-2]) for k in self._model_tags() if k.startswith(prefix + ".")), default=0)
        key = f"{prefix}.{max(time.time_ns(), newest + 1):020d}.{secrets.token_hex(4)}"
        self._call(
            "set_registered_model_tag",
            self.client.set_registered_model_tag,
            self.model_name,
            key,
            json.dumps(event, sort_keys=True),
        )
        return key

    def model_events(self, prefix: str) -> list[dict[str, Any]]:
        """The events added under `prefix`, oldest first."""
        tags = self._model_tags()
        return [json.loads(tags[key]) for key in sorted(k for k in tags if k.startswith(prefix + "."))]

    def model_tag(self, key: str) -> str | None:
        return self._model_tags().get(key)

    def _model_tags(self) -> dict[str, str]:
        from mlflow.exceptions import MlflowException

        try:
            return dict(self._call("get_registered_model", self.client.get_registered_model, self.model_name).tags)
        except MlflowException as exc:
            if is_absent(exc):
                return {}
            raise

    def set_version_tags(self, version: int, tags: dict[str, str]) -> None:
        for key, value in tags.items():
            self._call(
                "set_model_version_tag", self.client.set_model_version_tag, self.model_name, str(version), key, value
            )

    def lineage(self, version: int) -> list[VersionInfo]:
        """The version, its parent (the champion it was compared with), and so on back to the first."""
        chain: list[VersionInfo] = []
        current: int | None = version
        while current is not None and current not in {v.version for v in chain}:
            info = self.version(current)
            chain.append(info)
            parent = info.tags.get("ctloop.parent_version", "None")
            current = int(parent) if parent.isdigit() else None
        return chain

    def download_adapter(self, version: int, cache_dir: Path) -> Path:
        """The adapter files of a version, fetched once into `cache_dir/v<N>`."""
        import mlflow.artifacts

        target = cache_dir / f"v{version}"
        if (target / "adapter_config.json").is_file():
            return target
        info = self.version(version)
        partial = cache_dir / f"v{version}.partial"
        partial.mkdir(parents=True, exist_ok=True)
        local = self._call(
            f"download of v{version}'s adapter",
            mlflow.artifacts.download_artifacts,
            artifact_uri=info.source,
            dst_path=str(partial),
            tracking_uri=self.tracking_uri,
        )
        Path(local).rename(target)
        shutil.rmtree(partial, ignore_errors=True)
        return target

    def download_run_file(self, run_id: str, artifact_path: str, cache_dir: Path) -> Path | None:
        """One artifact file of a run, fetched into `cache_dir/<run_id>/`; None when the run (or the
        file in it) does not exist. An unreachable store raises RegistryUnavailable."""
        import mlflow.artifacts
        from mlflow.exceptions import MlflowException

        target = cache_dir / run_id / artifact_path
        if target.is_file():
            return target
        folder = artifact_path.rpartition("/")[0] or None
        try:
            listed = self._call("list_artifacts", self.client.list_artifacts, run_id, folder)
            if artifact_path not in {entry.path for entry in listed}:
                return None
            local = self._call(
                f"download of {artifact_path}",
                mlflow.artifacts.download_artifacts,
                run_id=run_id,
                artifact_path=artifact_path,
                dst_path=str(cache_dir / run_id),
                tracking_uri=self.tracking_uri,
            )
        except MlflowException as exc:
            if is_absent(exc):
                return None
            raise
        return Path(local)


REMOTE_SCHEMES = ("http://", "https://", "databricks")


def open_registry(config: RegistryConfig, workspace: Workspace) -> Registry:
    """The registry a config names: `registry.tracking_uri`, else MLFLOW_TRACKING_URI, else the
    workspace's SQLite file. Artifacts go to `registry.artifact_location` when set; else, with a
    tracking server, where the server says (so any host that reaches the server can download any
    version); else (a database or file URI on this host) to the workspace's mlartifacts/: never
    to ./mlruns of whatever the current directory is."""
    uri = workspace.tracking_uri(config.tracking_uri)
    location: str | Path | None = config.artifact_location
    if location is None and not uri.startswith(REMOTE_SCHEMES):
        location = workspace.artifacts_dir
    if uri == workspace.tracking_uri():  # the embedded registry: its artifacts must be this workspace's
        foreign = foreign_artifact_locations(workspace)
        if foreign:
            raise WorkspaceError(
                f"{workspace.root} holds an MLflow database whose artifacts live in {foreign[0]}, outside this "
                f"workspace: it was copied or moved from there, and would write into the original. Run "
                f"`ctloop workspace relocate --workspace {workspace.root}` to point it at this folder"
            )
    return Registry(uri, config.model_name, config.experiment, location, config.retry_delays_s)


def _embedded_db(workspace: Workspace) -> Path:
    return workspace.root / "mlflow.db"


def foreign_artifact_locations(workspace: Workspace) -> list[str]:
    """Artifact locations in the workspace's own MLflow database that point at another workspace's
    mlartifacts/ (read with sqlite3: no MLflow import, no schema migration)."""
    import sqlite3

    db = _embedded_db(workspace)
    if not db.is_file():
        return []
    here = workspace.artifacts_dir.resolve().as_uri()
    connection = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        rows = connection.execute("SELECT artifact_location FROM experiments").fetchall()
    except sqlite3.OperationalError:  # not initialised yet
        return []
    finally:
        connection.close()
    return [loc for (loc,) in rows if loc and loc.rstrip("/").endswith("/mlartifacts") and loc.rstrip("/") != here]


def relocate_embedded(workspace: Workspace) -> dict[str, int]:
    """Point the workspace's own MLflow database at this workspace's mlartifacts/ (after a copy or a
    move): experiments' artifact locations and runs' artifact URIs. Returns rows changed per table."""
    import sqlite3

    here = workspace.artifacts_dir.resolve().as_uri()
    changed = {"experiments": 0, "runs": 0}
    foreign = foreign_artifact_locations(workspace)
    connection = sqlite3.connect(_embedded_db(workspace))
    with connection:  # one transaction
        for old in foreign:
            old = old.rstrip("/")
            changed["experiments"] += connection.execute(
                "UPDATE experiments SET artifact_location = ? WHERE artifact_location = ?", (here, old)
            ).rowcount
            changed["runs"] += connection.execute(
                "UPDATE runs SET artifact_uri = ? || substr(artifact_uri, ?) WHERE substr(artifact_uri, 1, ?) = ?",
                (here, len(old) + 1, len(old) + 1, old + "/"),
            ).rowcount
    connection.close()
    return changed
