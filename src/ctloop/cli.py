"""The command line: thin commands that parse, call one function, and format the result.

Heavy libraries (torch, transformers, peft, mlflow) are imported inside the commands that need
them, so `ctloop --help` stays instant.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from ctloop.console import console
from ctloop.errors import CtloopError

app = typer.Typer(
    help="Continuous training of LLM LoRA adapters.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

WorkspaceOption = Annotated[
    Path | None,
    typer.Option("--workspace", "-w", help="workspace folder (default: the config's, else ./ctloop-workspace)"),
]
ConfigOption = Annotated[Path | None, typer.Option("--config", "-c", help="ctloop YAML config")]


@app.command()
def run(
    config: Annotated[Path, typer.Option("--config", "-c", help="ctloop YAML config")],
    data: Annotated[Path, typer.Option("--data", "-d", help="new records: .jsonl, .parquet or .csv")],
    workspace: WorkspaceOption = None,
    force: Annotated[bool, typer.Option("--force", help="train even without drift")] = False,
) -> None:
    """Run one cycle: validate, check drift, replay mix, train, evaluate, gate, register."""
    from ctloop.config import load_config
    from ctloop.cycle.run import run_cycle
    from ctloop.workspace import resolve_workspace

    cfg = load_config(config)
    result = run_cycle(cfg, data, resolve_workspace(workspace, cfg), force=force)
    console.print(result.summary())


@app.command()
def train(
    config: Annotated[Path, typer.Option("--config", "-c", help="ctloop YAML config")],
    cycle: Annotated[str, typer.Option(help="id of a prepared cycle (see `ctloop status`)")],
    workspace: WorkspaceOption = None,
) -> None:
    """Run only the training stage of a prepared cycle; scale out with
    `torchrun --nproc_per_node N -m ctloop train ...` (a re-run of the cycle then re-uses the adapter)."""
    from ctloop.config import load_config
    from ctloop.cycle.declaration import stage
    from ctloop.cycle.folder import StageContext
    from ctloop.cycle.run import run_stage
    from ctloop.workspace import resolve_workspace

    cfg = load_config(config)
    run_stage(stage("train"), StageContext(cfg, resolve_workspace(workspace, cfg), cycle))


@app.command()
def drift(
    reference: Annotated[Path, typer.Option(help="reference records (.jsonl, .parquet, .csv)")],
    current: Annotated[Path, typer.Option(help="current records to compare")],
    config: ConfigOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
    report: Annotated[Path | None, typer.Option(help="write an HTML report here")] = None,
    online: Annotated[bool, typer.Option(help="feed CURRENT row by row to the online detector")] = False,
    ert: Annotated[int, typer.Option(help="online: expected rows between false alarms")] = 500,
    window: Annotated[int, typer.Option(help="online: rows in the sliding window")] = 50,
) -> None:
    """Test whether CURRENT is distributed like REFERENCE. Exit 0: no drift, 3: drift, 2: error."""
    from ctloop.drift.check import check_files, check_stream

    result = (
        check_stream(reference, current, config, ert, window)
        if online
        else check_files(reference, current, config, report)
    )
    if as_json:
        print(json.dumps(result, indent=2))
    else:
        console.print(result["summary"])
        for reason in result["reasons"]:
            console.print(f"  {reason}")
    raise typer.Exit(3 if result["drift"] else 0)


@app.command()
def demo(workspace: WorkspaceOption = None) -> None:
    """The whole story on a tiny model: cycle 1 sets a champion, cycle 2 adapts to a new domain."""
    from ctloop.demo import run_demo
    from ctloop.workspace import resolve_workspace

    run_demo(resolve_workspace(workspace))


@app.command()
def status(
    config: ConfigOption = None,
    workspace: WorkspaceOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
) -> None:
    """Show the champion, the challenger, all versions and the last cycles."""
    from ctloop.cycle.status import collect_status, render_status

    info = collect_status(*_registry_context(config, workspace))
    if as_json:
        print(json.dumps(info, indent=2, default=str))
    else:
        render_status(info)


@app.command()
def promote(
    version: Annotated[int | None, typer.Option(help="version to promote (default: the challenger)")] = None,
    by: Annotated[str, typer.Option(help="who promotes")] = "cli",
    note: Annotated[str, typer.Option(help="why")] = "promoted by hand",
    require_shadow: Annotated[
        bool, typer.Option("--require-shadow", help="refuse unless `ctloop shadow report` decides PROMOTE")
    ] = False,
    config: ConfigOption = None,
    workspace: WorkspaceOption = None,
) -> None:
    """Move the `champion` alias to a version (the challenger by default)."""
    from ctloop.registry.promotion import promote as promote_version

    registry, ws = _registry_context(config, workspace)
    check = _shadow_check(config, ws, registry) if require_shadow else None
    console.print(promote_version(registry, version, by=by, note=note, shadow_check=check).summary())


@app.command()
def rollback(
    by: Annotated[str, typer.Option(help="who rolls back")] = "cli",
    config: ConfigOption = None,
    workspace: WorkspaceOption = None,
) -> None:
    """Move `champion` back to the previous champion."""
    from ctloop.registry.promotion import rollback as rollback_champion

    registry, _ = _registry_context(config, workspace)
    console.print(rollback_champion(registry, by=by).summary() + " (rolled back)")


@app.command()
def approve(
    version: Annotated[int, typer.Argument(help="the version to approve")],
    by: Annotated[str, typer.Option(help="who approves")],
    note: Annotated[str, typer.Option(help="why")],
    config: ConfigOption = None,
    workspace: WorkspaceOption = None,
) -> None:
    """Record a human approval; an approved version becomes the challenger (gate.require_approval)."""
    from ctloop.registry.client import CHAMPION
    from ctloop.registry.promotion import approve as approve_version

    registry, _ = _registry_context(config, workspace)
    approve_version(registry, version, by=by, note=note, promote_first=registry.alias(CHAMPION) is None)
    console.print(f"version {version} approved by {by}; champion v{registry.alias(CHAMPION)}")


@app.command()
def lineage(
    version: Annotated[int, typer.Argument(help="the version to trace")],
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
    config: ConfigOption = None,
    workspace: WorkspaceOption = None,
) -> None:
    """Print a version's lineage back to the first version: data, replay, base model, config, gate."""
    registry, _ = _registry_context(config, workspace)
    chain = registry.lineage(version)
    if as_json:
        print(json.dumps([v.to_dict() for v in chain], indent=2))
        return
    for info in chain:
        tags = info.tags
        print(
            f"v{info.version}  cycle {tags.get('ctloop.cycle_id', '?')}  gate {tags.get('ctloop.gate', '?')}"
            f"  parent {tags.get('ctloop.parent_version', 'None')}"
        )
        for key in (
            "base_model",
            "base_revision",
            "data_fingerprint",
            "replay_fingerprint",
            "config_hash",
            "seed",
            "ctloop_version",
            "approved_by",
            "promoted",
        ):
            if f"ctloop.{key}" in tags:
                print(f"    {key}: {tags[f'ctloop.{key}']}")


@app.command()
def serve(
    config: Annotated[Path, typer.Option("--config", "-c", help="ctloop YAML config")],
    host: Annotated[str | None, typer.Option(help="bind address (default: serve.host)")] = None,
    port: Annotated[int | None, typer.Option(help="port (default: serve.port)")] = None,
    workspace: WorkspaceOption = None,
) -> None:
    """Serve the champion behind an OpenAI-compatible API and shadow the challenger."""
    from ctloop.config import load_config
    from ctloop.serving.server import serve as run_server
    from ctloop.workspace import resolve_workspace

    cfg = load_config(config)
    run_server(cfg, resolve_workspace(workspace, cfg), host, port)


shadow_app = typer.Typer(help="Shadow deployment: compare the challenger with the champion.", no_args_is_help=True)
app.add_typer(shadow_app, name="shadow")


@shadow_app.command("report")
def shadow_report(
    config: ConfigOption = None,
    workspace: WorkspaceOption = None,
    champion: Annotated[int | None, typer.Option(help="champion version (default: the alias)")] = None,
    challenger: Annotated[int | None, typer.Option(help="challenger version (default: the alias)")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
    html: Annotated[
        Path | None, typer.Option("--html", help="HTML report path (default: <workspace>/shadow/vN-vs-vM.html)")
    ] = None,
) -> None:
    """Compare the logged shadow pairs and decide PROMOTE / HOLD / REJECT. Exit 0: PROMOTE, 3: HOLD, 4: REJECT."""
    from ctloop.serving.evidence import publish_shadow_report

    registry, ws = _registry_context(config, workspace)
    report, rows = _shadow_report(config, ws, registry, champion, challenger)
    html = publish_shadow_report(registry, report, rows, ws.root, html)
    if as_json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        console.print(report.summary())
        console.print(f"report: {html} (also on the challenger's MLflow run)")
    raise typer.Exit({"PROMOTE": 0, "HOLD": 3, "REJECT": 4}[report.decision])


def _shadow_check(config_path: Path | None, ws, registry):
    """The shadow comparison for `promote --require-shadow`: (decision, reasons), with the summary printed."""

    def check(champion: int, challenger: int) -> tuple[str, str]:
        report = _shadow_report(config_path, ws, registry, champion, challenger)[0]
        console.print(report.summary())
        return report.decision, "; ".join(report.reasons)

    return check


def _shadow_report(config_path: Path | None, ws, registry, champion: int | None, challenger: int | None):
    from ctloop.config import load_config
    from ctloop.errors import RegistryError
    from ctloop.registry.client import CHALLENGER, CHAMPION
    from ctloop.serving.compare import shadow_report as compare_logged
    from ctloop.workspace import saved_shadow_settings

    # Without --config: the settings the workspace's last cycle ran with (store URL, thresholds, judge).
    settings = load_config(config_path).shadow if config_path is not None else saved_shadow_settings(ws)
    champion = champion if champion is not None else registry.alias(CHAMPION)
    challenger = challenger if challenger is not None else registry.alias(CHALLENGER)
    if champion is None or challenger is None:
        raise RegistryError(
            "the shadow report needs a champion and a challenger; pass --champion N --challenger M "
            "(see `ctloop status`)"
        )
    return compare_logged(settings, ws.shadow_store_url(settings.store_url), champion, challenger)


@app.command("validate-config")
def validate_config(path: Annotated[Path, typer.Argument(help="YAML config to check")]) -> None:
    """Check a config file and report every problem at once."""
    from ctloop.config import load_config

    load_config(path)
    console.print(f"{path}: valid")


def _registry_context(config_path: Path | None, workspace: Path | None):
    from ctloop.registry.client import open_registry
    from ctloop.workspace import resolve_workspace, saved_registry_settings

    if config_path is not None:
        from ctloop.config import load_config

        cfg = load_config(config_path)
        ws = resolve_workspace(workspace, cfg)
        settings = cfg.registry
    else:
        ws = resolve_workspace(workspace)
        settings = saved_registry_settings(ws)
    return open_registry(settings, ws), ws


def main() -> None:
    import os

    from ctloop.logs import configure_logging

    # The process is ctloop's here (an edge), so it may set MLflow's process-wide switches.
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    configure_logging()
    try:
        app()
    except CtloopError as exc:
        console.print(f"[red]error:[/red] {exc}")
        sys.exit(2)
    except KeyboardInterrupt:
        console.print("[red]interrupted[/red]")
        sys.exit(130)
