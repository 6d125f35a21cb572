"""`ctloop demo`: the whole loop on a tiny model, on sample data shipped with the package.

Story: a tiny base model is pre-trained on general Debian package descriptions; cycle 1 trains an
adapter on Python/Perl packages and it becomes the champion; cycle 2 brings a new domain (games,
sound, graphics; a few broken rows included), trains with replay, is evaluated against the
champion on new AND old data, passes the gate and is registered as challenger. Then the server
answers live requests with the champion and mirrors them to the challenger; the logged pairs are
compared, and the challenger is promoted only on a PROMOTE decision.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import time
from importlib import resources
from pathlib import Path

from ctloop.console import console, progress_bar
from ctloop.errors import WorkspaceError
from ctloop.workspace import Workspace

DEMO_MARKER = ".ctloop-demo"
KEEP_ON_RESET = {"base-models"}  # the pre-trained tiny model is reused between demo runs


def quickstart_file(name: str) -> Path:
    return Path(str(resources.files("ctloop") / "quickstart" / name))


def prepare_workspace(workspace: Workspace) -> None:
    """Start from a fresh workspace; only ever wipe one that an earlier demo created."""
    root = workspace.root
    if root.exists() and any(root.iterdir()):
        if not (root / DEMO_MARKER).exists():
            raise WorkspaceError(
                f"{root} is not empty and was not made by `ctloop demo`; pass --workspace with a new folder"
            )
        for child in root.iterdir():
            if child.name not in KEEP_ON_RESET and child.name != DEMO_MARKER:
                shutil.rmtree(child) if child.is_dir() else child.unlink()
    root.mkdir(parents=True, exist_ok=True)
    (root / DEMO_MARKER).write_text("made by `ctloop demo`; the next demo run may wipe this folder\n")


def build_base_model(workspace: Workspace, steps: int = 300) -> Path:
    from ctloop.training.tinymodel import TinyModelSpec, build_tiny_model

    rows = [json.loads(line) for line in quickstart_file("pretrain.jsonl").read_text().splitlines()]
    texts = [row["prompt"] + row["completion"] for row in rows]
    spec = TinyModelSpec(pretrain_steps=steps)
    with progress_bar("pre-training the tiny base model", spec.pretrain_steps) as advance:
        return build_tiny_model(
            texts, workspace.base_models_dir / "tiny", spec, on_step=lambda step, loss: advance(loss=loss)
        )


def write_quickstart_config(workspace: Workspace, path: Path) -> None:
    """The quickstart config, with its base model named by absolute path (the one this workspace
    built), so that a copy of the file works from any folder, as Getting started copies it."""
    import re

    tiny = (workspace.root / "base-models" / "tiny").resolve()
    text = quickstart_file("quickstart.yaml").read_text(encoding="utf-8")
    quoted = json.dumps(str(tiny))  # a YAML double-quoted string: any character of a path survives
    text, replaced = re.subn(r"(?m)^(  base:) base-models/tiny\b", lambda m: f"{m.group(1)} {quoted}", text)
    if replaced != 1:
        raise RuntimeError(
            "the shipped quickstart.yaml no longer names base-models/tiny; update write_quickstart_config"
        )
    path.write_text(text, encoding="utf-8")


def run_demo(workspace: Workspace) -> None:
    from ctloop.config import load_config
    from ctloop.cycle.run import run_cycle
    from ctloop.registry.client import open_registry
    from ctloop.registry.promotion import promote
    from ctloop.registry.publishing import make_publisher
    from ctloop.serving.compare import PROMOTE

    prepare_workspace(workspace)
    console.rule("ctloop demo", style="bold")
    build_base_model(workspace)
    config_path = workspace.root / "quickstart.yaml"
    write_quickstart_config(workspace, config_path)
    config = load_config(config_path)

    console.rule("cycle 1: Python and Perl packages (establishes the champion)")
    first = run_cycle(config, quickstart_file("old_domain.jsonl"), workspace)
    console.rule("cycle 2: a new domain - games, sound, graphics (with replay of cycle 1)")
    second = run_cycle(config, quickstart_file("new_domain.jsonl"), workspace)

    registry = open_registry(config.registry, workspace)
    shadow = shadow_html = production = None
    if second.passed:
        console.rule("shadow: serve the champion, mirror live traffic to the challenger, compare, decide")
        served_since = time.time()
        shadow, shadow_html, feedback = shadow_phase(config, workspace, registry)
        if shadow.decision == PROMOTE:
            promote(
                registry,
                by="ctloop demo",
                note="passed the gate in cycle 2 and the shadow comparison",
                publisher=make_publisher(config.publish, registry, workspace),
            )
        console.rule("production: feedback on served answers, drift of live traffic, harvest for the next cycle")
        production = production_phase(config, workspace, served_since, feedback)
    _print_story(first, second, registry, workspace, config_path, shadow, shadow_html, production)


def shadow_phase(config, workspace: Workspace, registry, requests: int = 120):
    """Start `ctloop serve` in this process, send it traffic from both domains over HTTP, let scripted
    users rate and correct some answers through /v1/feedback, stop it (the logs drain), then compare
    the logged pairs and log the report to MLflow. Returns the report, its HTML and the feedback counts."""
    import httpx

    from ctloop.registry.client import CHALLENGER, CHAMPION
    from ctloop.serving.compare import shadow_report
    from ctloop.serving.evidence import publish_shadow_report
    from ctloop.serving.server import create_app, serve_in_background

    examples = [
        example
        for name in ("new_domain.jsonl", "old_domain.jsonl")
        for example in _examples(quickstart_file(name))[-requests // 2 :]
    ]
    # The demo's process is its own: it may give the server a feedback token for its scripted users.
    token = os.environ.setdefault(config.serve.feedback_token_env, secrets.token_hex(16))
    answers = []
    with serve_in_background(create_app(config, workspace)) as url, httpx.Client(timeout=120) as http:
        with progress_bar("live requests", len(examples), unit="requests") as advance:
            for index, (prompt, reference) in enumerate(examples):
                response = http.post(
                    f"{url}/v1/completions",
                    json={"model": config.registry.model_name, "prompt": prompt, "max_tokens": 24},
                    headers={"x-request-id": f"demo-{index}"},
                )
                response.raise_for_status()
                answers.append((response.json()["id"], response.json()["choices"][0]["text"], reference))
                advance()
        feedback = scripted_feedback(http, url, token, answers)
    report, rows = shadow_report(
        config.shadow,
        workspace.shadow_store_url(config.shadow.store_url),
        registry.alias(CHAMPION),
        registry.alias(CHALLENGER),
        judge_settings=config.judge,
        model=config.model,
        workspace_root=workspace.root,
    )
    html = publish_shadow_report(registry, report, rows, workspace.root)
    console.print(report.summary())
    return report, html, feedback


def scripted_feedback(http, url: str, token: str, answers: list[tuple[str, str, str]]) -> dict[str, int]:
    """Every third answer gets feedback, as users would give it: a thumbs up when it matches the
    reference answer well (token F1 >= 0.5); otherwise a thumbs down, with the reference as the
    correction two times in three."""
    from ctloop.evaluation.textmetrics import token_f1

    counts = {"rated up": 0, "corrected": 0, "rated down": 0}
    for index, (response_id, answer, reference) in enumerate(answers[::3]):
        good = token_f1(answer, reference) >= 0.5
        body = {"request_id": response_id, "rating": 1 if good else -1, "user": f"demo-user-{index % 5}"}
        if not good and index % 3 != 2:
            body["correction"] = reference.strip()
        response = http.post(f"{url}/v1/feedback", json=body, headers={"authorization": f"Bearer {token}"})
        response.raise_for_status()
        counts["rated up" if good else "corrected" if "correction" in body else "rated down"] += 1
    console.print("feedback posted: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    return counts


def production_phase(config, workspace: Workspace, since: float, feedback: dict[str, int]) -> dict:
    """The production drift check on the traffic just served, and the harvest of its feedback."""
    from ctloop.cycle.production import check_production_drift
    from ctloop.data.harvest import harvest

    drift = check_production_drift(config, workspace, since)
    harvested = harvest(config, workspace, since)
    console.print(harvested.summary())
    return {"feedback": feedback, "drift": drift, "harvest": harvested}


def _examples(path: Path) -> list[tuple[str, str]]:
    """The (prompt, completion) pairs of a records file, skipping the rows that are broken on purpose."""
    examples = []
    for line in path.read_bytes().splitlines():
        try:
            row = json.loads(line.decode("utf-8"))
            prompt, completion = row["prompt"], row["completion"]
        except (UnicodeDecodeError, ValueError, KeyError, TypeError):
            continue
        if isinstance(prompt, str) and isinstance(completion, str) and prompt.strip() and completion.strip():
            examples.append((prompt, completion))
    return examples


def _print_story(
    first,
    second,
    registry,
    workspace: Workspace,
    config_path: Path,
    shadow,
    shadow_html: Path | None,
    production: dict | None,
) -> None:
    from rich.console import Console
    from rich.table import Table

    from ctloop.cycle.artifacts import Registration

    out = Console()
    losses = Table(
        "evaluation set",
        "reference",
        "reference loss",
        "candidate loss",
        "change",
        title="cycle 2: mean token loss, candidate vs champion (lower is better)",
    )
    for eval_set, label in (
        ("new_holdout", "new data (games/sound/graphics)"),
        ("replay_holdout", "old data (python/perl, forgetting)"),
    ):
        by_model = second.means.get(eval_set, {})
        reference = "champion" if "champion" in by_model else "base"
        if reference in by_model and "candidate" in by_model:
            before, after = by_model[reference], by_model["candidate"]
            losses.add_row(label, reference, f"{before:.3f}", f"{after:.3f}", f"{(after - before) / before:+.1%}")
    out.print(losses)
    gates = Table("cycle", "trigger", "gate", "reasons", title="trigger and gate decisions")
    for name, result in (("1", first), ("2", second)):
        gates.add_row(name, result.trigger, result.gate.get("outcome", "?"), "\n".join(result.gate.get("reasons", [])))
    out.print(gates)
    versions = Table(
        "version", "aliases", "cycle", "parent", "data fingerprint", title=f"registry: {registry.model_name}"
    )
    for v in registry.versions():
        versions.add_row(
            f"v{v.version}",
            ", ".join(v.aliases),
            v.tags.get("ctloop.cycle_id", ""),
            v.tags.get("ctloop.parent_version", ""),
            v.tags.get("ctloop.data_fingerprint", ""),
        )
    out.print(versions)
    quarantined = second.validation.get("bad_by_reason", {})
    out.print(
        f"cycle 2 quarantined {sum(quarantined.values())} bad rows {quarantined} -> "
        f"{second.validation.get('quarantine_path')}"
    )
    if shadow is not None:
        out.print(
            f"shadow: {shadow.counts['completed']} mirrored pairs, decision {shadow.decision}; champion is now "
            f"v{registry.alias('champion')}"
        )
    if production is not None:
        drift, harvested = production["drift"], production["harvest"]
        out.print("feedback: " + ", ".join(f"{k} {v}" for k, v in production["feedback"].items()))
        out.print(f"production drift: {drift['outcome']} ({drift['window']['requests']} requests served)")
        out.print(
            f"harvest: {harvested.kept} rows to learn from as written, {harvested.rejected} rated down (never supervised; "
            "train.objective kto learns from them) "
            f"-> {harvested.out_path}"
        )
    report = Registration.REPORT
    out.print(f"reports: {Path(first.cycle_dir) / report}\n         {Path(second.cycle_dir) / report}")
    if shadow_html is not None:
        out.print(f"         {shadow_html}")
    exe = _how_ctloop_was_called()
    out.print("next steps:")
    out.print(f"  {exe} status --workspace {workspace.root}")
    out.print(f"  {exe} serve --config {config_path}   # OpenAI-compatible, on http://127.0.0.1:8000/v1")
    out.print(f"  {exe} shadow report --config {config_path}")
    out.print(f"  {exe} run --config {config_path} --data your-data.jsonl --workspace {workspace.root}")
    out.print(
        f"  {exe} run --config {config_path} --from-production --since 1d   "
        f"# the next cycle on production feedback, once it holds data.min_rows rows"
    )
    mlflow = str(Path(exe).with_name("mlflow")) if "/" in exe else "mlflow"
    out.print(f"  {mlflow} ui --backend-store-uri {registry.tracking_uri}   # then open http://127.0.0.1:5000")


def _how_ctloop_was_called() -> str:
    """`.venv/bin/ctloop` when run from a venv that is not on PATH, else plain `ctloop`."""
    import os
    import shutil as sh
    import sys

    called = Path(sys.argv[0])
    if called.name != "ctloop" or sh.which("ctloop") == str(called.resolve()):
        return "ctloop"
    return os.path.relpath(called) if called.is_absolute() else str(called)
