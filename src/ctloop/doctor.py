"""`ctloop doctor`: a config and the environment it will run in, checked one by one.

Each check says what it found, and when something is wrong, the fix. It reads and writes nothing
that matters: a probe file in the workspace, a `SELECT 1` and the schema revision of the log store
(never migrated here), one alias read in the registry (no retries, so an unreachable server is
reported in seconds), the base model's config and tokenizer (not its weights).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ctloop.config import CtloopConfig
from ctloop.errors import CtloopError
from ctloop.workspace import Workspace

OK, WARN, FAIL = "ok", "warn", "fail"


@dataclass(frozen=True)
class Check:
    name: str
    status: str  # ok | warn | fail
    found: str
    fix: str = ""

    def line(self) -> str:
        mark = {OK: "ok  ", WARN: "warn", FAIL: "FAIL"}[self.status]
        return f"{mark} {self.name}: {self.found}" + (f"\n       fix: {self.fix}" if self.fix else "")


def run_checks(config: CtloopConfig, workspace: Workspace) -> list[Check]:
    """Every check, in the order a cycle needs them; one failing does not stop the others."""
    checks = [_config(config)]
    for name, probe in (
        ("workspace", lambda: _workspace(workspace)),
        ("registry", lambda: _registry(config, workspace)),
        ("log store", lambda: _log_store(config, workspace)),
        ("device", lambda: _device(config)),
        ("base model", lambda: _base_model(config)),
    ):
        checks.append(_guarded(name, probe))
    return checks + _tokens(config)


def _guarded(name: str, probe: Callable[[], Check]) -> Check:
    try:
        return probe()
    except CtloopError as exc:  # ctloop's own errors name the fix already
        return Check(name, FAIL, str(exc))
    except Exception as exc:  # noqa: BLE001 (a check reports; it never crashes the others)
        first = str(exc).splitlines()[0][:300] if str(exc) else ""
        return Check(name, FAIL, f"{type(exc).__name__}: {first}", "see the message; run the failing step alone")


def _config(config: CtloopConfig) -> Check:
    from ctloop.config import config_warnings

    warnings = config_warnings(config)
    if warnings:
        return Check("config", WARN, f"valid, with {len(warnings)} warning(s): " + "; ".join(warnings))
    return Check("config", OK, "valid")


def _workspace(workspace: Workspace) -> Check:
    root = workspace.root
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = root / f".doctor-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        return Check(
            "workspace", FAIL, f"{root} is not writable ({exc.strerror})", "pass --workspace DIR or fix its permissions"
        )
    return Check("workspace", OK, f"{root} is writable")


def _registry(config: CtloopConfig, workspace: Workspace) -> Check:
    from ctloop.registry.client import CHAMPION, open_registry

    registry = open_registry(config.registry, workspace)
    registry.retry_delays_s = ()  # report an outage now; the stages retry
    started = time.monotonic()
    champion = registry.alias(CHAMPION)
    where = f"{registry.tracking_uri} answered in {time.monotonic() - started:.1f} s"
    return Check(
        "registry",
        OK,
        f"{where}; model {config.registry.model_name!r}, champion " + (f"v{champion}" if champion else "none yet"),
    )


def _log_store(config: CtloopConfig, workspace: Workspace) -> Check:
    """Reachable, and at which schema revision; never migrates it (the first `ctloop serve` or cycle
    that opens the store does)."""
    from sqlalchemy import create_engine, text

    from ctloop.logstore.database import HEAD, schema_revision

    url = workspace.shadow_store_url(config.shadow.store_url)
    if url.startswith("sqlite:///") and not Path(url.removeprefix("sqlite:///")).exists():
        return Check("log store", OK, f"{url} does not exist yet; the first command that logs creates it")
    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            connection.execute(text("SELECT 1"))
        revision = schema_revision(engine)
    finally:
        engine.dispose()
    where = engine.url.render_as_string(hide_password=True)
    if revision == HEAD:
        return Check("log store", OK, f"{where} is reachable, schema at revision {HEAD}")
    state = "empty or from before migrations" if revision is None else f"at revision {revision}"
    return Check(
        "log store", OK, f"{where} is reachable, schema {state}; migrated to {HEAD} when ctloop first opens it"
    )


def _device(config: CtloopConfig) -> Check:
    import torch

    from ctloop.model.loading import model_device
    from ctloop.threads import chosen_threads, usable_cpus

    device = model_device(config.model)
    if device.startswith("cuda"):
        return Check("device", OK, f"{device}: {torch.cuda.get_device_name(torch.device(device))}")
    threads = chosen_threads(config.model.threads)
    gpu = "" if config.model.device == "cpu" else " (torch sees no CUDA GPU)"
    return Check("device", OK, f"cpu{gpu}, {threads} thread(s) of {usable_cpus()} usable CPU(s)")


def _base_model(config: CtloopConfig) -> Check:
    from transformers import AutoConfig

    from ctloop.model.chat import chat_format
    from ctloop.model.loading import _explained_load_errors, load_tokenizer

    with _explained_load_errors(config.model):
        model_config = AutoConfig.from_pretrained(config.model.base, revision=config.model.revision)
    tokenizer = load_tokenizer(config.model)
    layers = getattr(model_config, "num_hidden_layers", "?")
    chat = chat_format(tokenizer).kind
    found = f"{config.model.base}: {model_config.model_type}, {layers} layers, vocabulary {len(tokenizer)}, chat format {chat}"
    return Check("base model", OK, found)


def _tokens(config: CtloopConfig) -> list[Check]:
    """The secrets the server and the targets read from the environment: set or not (never shown)."""
    wanted = [
        (config.serve.feedback_token_env, "POST /v1/feedback answers 403"),
        (config.serve.admin_token_env, "the admin endpoints are disabled"),
    ]
    if config.serve.backend == "openai":
        wanted.append((config.serve.upstream_api_key_env, "the upstream is called without a key"))
    checks = []
    for env, without in wanted:
        if os.environ.get(env):
            checks.append(Check(f"${env}", OK, "set"))
        else:
            checks.append(Check(f"${env}", WARN, f"not set: {without}", f"export {env}=... where ctloop serve runs"))
    return checks
