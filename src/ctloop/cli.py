"""The command line: thin commands that parse, call one function, and format the result.

Heavy libraries (torch, transformers, peft, mlflow) are imported inside the commands that need
them, so `ctloop --help` stays instant.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from ctloop.console import console, error
from ctloop.errors import CtloopError
from ctloop.fileio import strict_json

if TYPE_CHECKING:
    from ctloop.config import ModelConfig

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
RequiredConfig = Annotated[Path, typer.Option("--config", "-c", help="ctloop YAML config")]
JsonOption = Annotated[bool, typer.Option("--json", help="machine-readable output: strict JSON on stdout")]


def _emit(payload: object, as_json: bool, *lines: str) -> None:
    """A command's result: with --json, strict JSON on stdout (a result object's `to_dict()`, or
    the dataclass as a dict); else its lines on the console (stderr, with the progress bars)."""
    import dataclasses

    if as_json:
        if hasattr(payload, "to_dict"):
            payload = payload.to_dict()
        elif dataclasses.is_dataclass(payload) and not isinstance(payload, type):
            payload = dataclasses.asdict(payload)
        print(json.dumps(strict_json(payload), indent=2, default=str, allow_nan=False, ensure_ascii=False))
        return
    for line in lines:
        console.print(line)


@app.command()
def run(
    config: Annotated[Path, typer.Option("--config", "-c", help="ctloop YAML config")],
    data: Annotated[Path | None, typer.Option("--data", "-d", help="new records: .jsonl, .parquet or .csv")] = None,
    from_production: Annotated[
        bool, typer.Option("--from-production", help="harvest the request log and feedback since --since first")
    ] = False,
    since: Annotated[str, typer.Option(help="with --from-production: window start (24h, 7d, or a UTC time)")] = "7d",
    workspace: WorkspaceOption = None,
    force: Annotated[bool, typer.Option("--force", help="train even without drift")] = False,
    as_json: JsonOption = False,
) -> None:
    """Run one cycle: validate, check drift, replay mix, train, evaluate, gate, register."""
    from ctloop.config import load_config
    from ctloop.cycle.run import run_cycle
    from ctloop.errors import DataError
    from ctloop.workspace import resolve_workspace

    if (data is None) == (not from_production):
        raise DataError("ctloop run needs --data FILE or --from-production (one of them)")
    cfg = load_config(config)
    if from_production:
        _check_since(since)
        cfg = cfg.model_copy(
            update={"orchestration": cfg.orchestration.model_copy(update={"production_window": since})}
        )
    result = run_cycle(cfg, data, resolve_workspace(workspace, cfg), force=force, from_production=from_production)
    _emit(result, as_json, result.summary())


@app.command()
def harvest(
    config: Annotated[Path, typer.Option("--config", "-c", help="ctloop YAML config")],
    since: Annotated[str, typer.Option(help="window start: a duration back from now (24h, 7d) or a UTC time")] = "7d",
    out: Annotated[
        Path | None, typer.Option(help="records file (default: <workspace>/harvest/harvest-<time>.jsonl)")
    ] = None,
    fmt: Annotated[str, typer.Option("--format", help="records (ctloop), dpo or kto (TRL's formats)")] = "records",
    workspace: WorkspaceOption = None,
    as_json: JsonOption = False,
) -> None:
    """Turn the request log and its feedback into the next cycle's records (corrections, well-rated
    answers), the rejected set and a record of why each request was kept or dropped."""
    from ctloop.config import load_config
    from ctloop.workspace import resolve_workspace

    cfg = load_config(config)
    report = _harvest(cfg, resolve_workspace(workspace, cfg), since, out, fmt)
    _emit(
        report,
        as_json,
        report.summary(),
        f"rejected answers: {report.rejected} more in {report.rejected_path}; decisions: {report.decisions_path}",
    )


def _harvest(cfg, ws, since: str, out: Path | None, fmt: str):
    from ctloop.data.harvest import harvest as harvest_log
    from ctloop.errors import DataError

    if fmt not in ("records", "dpo", "kto"):
        raise DataError(f"--format {fmt!r}: use records, dpo or kto")
    return harvest_log(cfg, ws, _check_since(since), out=out, fmt=fmt)  # type: ignore[arg-type]  # checked above


def _check_since(since: str) -> float:
    from ctloop.errors import DataError
    from ctloop.fileio import parse_since

    try:
        return parse_since(since)
    except ValueError as exc:
        raise DataError(f"--since {exc}") from None


@app.command()
def train(
    config: Annotated[Path, typer.Option("--config", "-c", help="ctloop YAML config")],
    cycle: Annotated[str, typer.Option(help="id of a prepared cycle (see `ctloop status`)")],
    workspace: WorkspaceOption = None,
    as_json: JsonOption = False,
) -> None:
    """Run only the training stage of a prepared cycle; scale out with
    `torchrun --nproc_per_node N -m ctloop train ...` (a re-run of the cycle then re-uses the adapter)."""
    from ctloop.config import load_config
    from ctloop.cycle.declaration import stage
    from ctloop.cycle.folder import StageContext
    from ctloop.cycle.run import run_stage
    from ctloop.workspace import resolve_workspace

    cfg = load_config(config)
    step = run_stage(stage("train"), StageContext(cfg, resolve_workspace(workspace, cfg), cycle))
    _emit(step, as_json)


SinceOption = Annotated[str, typer.Option(help="window start: a duration back from now (90m, 24h, 7d) or a UTC time")]
EXIT_NO_DRIFT, EXIT_DRIFT, EXIT_NOT_ENOUGH = 0, 3, 4


@app.command()
def drift(
    reference: Annotated[Path | None, typer.Option(help="reference records (.jsonl, .parquet, .csv)")] = None,
    current: Annotated[Path | None, typer.Option(help="current records to compare")] = None,
    production: Annotated[
        bool, typer.Option("--production", help="compare the prompts served since --since with the champion's data")
    ] = False,
    since: SinceOption = "24h",
    config: ConfigOption = None,
    workspace: WorkspaceOption = None,
    as_json: JsonOption = False,
    report: Annotated[Path | None, typer.Option(help="write an HTML report here")] = None,
    online: Annotated[bool, typer.Option(help="feed CURRENT row by row to the online detector")] = False,
    ert: Annotated[
        int, typer.Option(min=2, help="online: rows between false alarms with no drift, at least (on average)")
    ] = 500,
    window: Annotated[int, typer.Option(min=2, help="online: rows in the sliding window")] = 50,
) -> None:
    """Test whether CURRENT is distributed like REFERENCE, or (--production) whether live traffic is
    like the champion's training data. Exit 0: no drift, 3: drift, 4: too little data to decide, 2: error."""
    from ctloop.cycle.drift_check import check_files, check_stream
    from ctloop.errors import DataError

    if report is not None and not report.parent.is_dir():  # checked before minutes of embedding, not after
        raise DataError(f"--report {report}: the folder {report.parent} does not exist; create it or pick another")
    if production:
        if reference is not None or current is not None or online:
            raise DataError(
                "--production compares live traffic with the champion's data; drop --reference, "
                "--current and --online (or drop --production to compare two files)"
            )
        result = _production_drift(config, workspace, since, report.parent if report else None)
    elif reference is None or current is None:
        raise DataError("ctloop drift needs --reference FILE and --current FILE, or --production (with --config)")
    else:
        result = (
            check_stream(reference, current, config, ert, window)
            if online
            else check_files(reference, current, config, report)
        )
    _print_drift(result, as_json)


@app.command()
def watch(
    config: Annotated[Path, typer.Option("--config", "-c", help="ctloop YAML config")],
    since: SinceOption = "24h",
    workspace: WorkspaceOption = None,
    as_json: JsonOption = False,
) -> None:
    """One drift check of live traffic (for cron): the prompts served since --since against the
    champion's training data; the report goes to <workspace>/watch/. Each look tests at its share
    of watch.false_alarm_budget, so false alarms stay within the budget however often it runs.
    Exit 0: no drift, 3: drift, 4: too few requests to decide, 2: error."""
    _print_drift(_production_drift(config, workspace, since, None, watch=True), as_json)


def _production_drift(
    config_path: Path | None, workspace: Path | None, since: str, report_dir: Path | None, watch: bool = False
) -> dict:
    from ctloop.config import load_config
    from ctloop.cycle.production import check_production_drift
    from ctloop.errors import DataError
    from ctloop.workspace import resolve_workspace

    if config_path is None:
        raise DataError("a production drift check needs --config (the model, drift and registry settings)")
    start = _check_since(since)
    cfg = load_config(config_path)
    return check_production_drift(cfg, resolve_workspace(workspace, cfg), start, report_dir, watch)


def _print_drift(result: dict, as_json: bool) -> None:
    if as_json:
        _emit(result, True)
    else:
        console.print(result["summary"])
        for reason in result["reasons"]:
            console.print(f"  {reason}")
    outcome = result.get("outcome")
    raise typer.Exit(EXIT_DRIFT if result["drift"] else EXIT_NOT_ENOUGH if outcome == "not_enough_data" else 0)


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
    as_json: JsonOption = False,
) -> None:
    """Show the champion, the challenger, all versions and the last cycles."""
    from ctloop.cycle.status import collect_status, render_status

    info = collect_status(*_registry_context(config, workspace))
    if as_json:
        _emit(info, True)
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
    as_json: JsonOption = False,
) -> None:
    """Move the `champion` alias to a version (the challenger by default)."""
    from ctloop.registry.promotion import promote as promote_version

    registry, ws = _registry_context(config, workspace)
    check = _shadow_check(config, ws, registry) if require_shadow else None
    change = promote_version(
        registry, version, by=by, note=note, shadow_check=check, publisher=_publisher(config, ws, registry)
    )
    _emit(change, as_json, change.summary())


@app.command()
def rollback(
    by: Annotated[str, typer.Option(help="who rolls back")] = "cli",
    config: ConfigOption = None,
    workspace: WorkspaceOption = None,
    as_json: JsonOption = False,
) -> None:
    """Move `champion` back to the previous champion."""
    from ctloop.registry.promotion import rollback as rollback_champion

    registry, ws = _registry_context(config, workspace)
    change = rollback_champion(registry, by=by, publisher=_publisher(config, ws, registry))
    _emit(change, as_json, change.summary() + " (rolled back)")


@app.command()
def approve(
    version: Annotated[int, typer.Argument(help="the version to approve")],
    by: Annotated[str, typer.Option(help="who approves")],
    note: Annotated[str, typer.Option(help="why")],
    config: ConfigOption = None,
    workspace: WorkspaceOption = None,
    as_json: JsonOption = False,
) -> None:
    """Record a human approval; an approved version becomes the challenger (gate.require_approval)."""
    from ctloop.registry.client import CHAMPION
    from ctloop.registry.promotion import approve as approve_version

    registry, ws, settings = _registry_settings(config, workspace)
    approve_version(
        registry,
        version,
        by=by,
        note=note,
        promote_first=settings.promote_first,  # the same rule as the register stage's (#22 item 4)
        publisher=_publisher(config, ws, registry),
    )
    champion = registry.alias(CHAMPION)
    _emit(
        {"version": version, "approved_by": by, "note": note, "champion": champion},
        as_json,
        f"version {version} approved by {by}; champion v{champion}",
    )


@app.command()
def lineage(
    version: Annotated[int | None, typer.Argument(help="the version to trace (default: the champion)")] = None,
    as_json: JsonOption = False,
    config: ConfigOption = None,
    workspace: WorkspaceOption = None,
) -> None:
    """Print a version's lineage back to the first version: data, replay, base model, config, gate."""
    from ctloop.errors import RegistryError
    from ctloop.registry.client import CHAMPION

    registry, _ = _registry_context(config, workspace)
    version = version if version is not None else registry.alias(CHAMPION)
    if version is None:
        raise RegistryError("there is no champion to trace; pass a version (`ctloop status` lists them)")
    chain = registry.lineage(version)
    if as_json:
        _emit([v.to_dict() for v in chain], True)
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
            "objective",
            "ctloop_version",
            "harvest",
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
    as_json: JsonOption = False,
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
        _emit(report, True)
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
    from ctloop.workspace import saved_judging_settings, saved_shadow_settings

    # Without --config: the settings the workspace's last cycle ran with (store URL, thresholds, judge).
    model: ModelConfig | None
    if config_path is not None:
        cfg = load_config(config_path)
        settings, judge_settings, model = cfg.shadow, cfg.judge, cfg.model
    else:
        settings = saved_shadow_settings(ws)
        judge_settings, model = saved_judging_settings(ws)
    champion = champion if champion is not None else registry.alias(CHAMPION)
    challenger = challenger if challenger is not None else registry.alias(CHALLENGER)
    if champion is None or challenger is None:
        raise RegistryError(
            "the shadow report needs a champion and a challenger; pass --champion N --challenger M "
            "(see `ctloop status`)"
        )
    return compare_logged(
        settings,
        ws.shadow_store_url(settings.store_url),
        champion,
        challenger,
        judge_settings=judge_settings,
        model=model,
        workspace_root=ws.root,
    )


@app.command("calibrate-seeds")
def calibrate_seeds(
    config: RequiredConfig,
    cycle: Annotated[
        str | None, typer.Option(help="the cycle whose training and held-out rows to use (default: the newest)")
    ] = None,
    seeds: Annotated[int, typer.Option(help="adapters to train, one seed each (4 or more: a usable upper limit)")] = 4,
    workspace: WorkspaceOption = None,
    as_json: JsonOption = False,
) -> None:
    """Measure the training-seed noise of this model and recipe: a cycle's training rows trained
    with several seeds, each scored on its held-out rows. The spread between two seeds, and its
    upper limit, go to the registered model; the gate's bounds carry that limit from the next cycle
    on, instead of the assumed gate.seed_spread."""
    from ctloop.config import load_config
    from ctloop.cycle.artifacts import Holdouts, TrainingSet
    from ctloop.data.records import read_parquet
    from ctloop.errors import DataError
    from ctloop.registry.client import open_registry
    from ctloop.training.seeds import EVENT, measure, recipe_key
    from ctloop.workspace import resolve_workspace

    cfg = load_config(config)
    ws = resolve_workspace(workspace, cfg)

    def prepared(folder: Path) -> bool:  # the two files it reads (a cycle of any ctloop version has them)
        return (folder / TrainingSet.TRAIN).is_file() and (folder / Holdouts.NEW).is_file()

    folders = sorted((p for p in ws.cycles_dir.glob("*") if prepared(p)), key=lambda p: p.stat().st_mtime)
    chosen = ws.cycles_dir / cycle if cycle else (folders[-1] if folders else None)
    if chosen is None or not prepared(chosen):
        raise DataError(
            f"no cycle with training and held-out rows in {ws.cycles_dir}"
            + (f" named {cycle!r}" if cycle else "")
            + "; run a cycle first (ctloop run), or pass --cycle ID"
        )
    if seeds < 2:
        raise DataError("--seeds: at least 2 (4 or more give a usable upper limit)")
    train_rows, holdout = read_parquet(chosen / TrainingSet.TRAIN)[0], read_parquet(chosen / Holdouts.NEW)[0]
    result = measure(cfg, train_rows, holdout, seeds, ws.root / "seed-calibration" / recipe_key(cfg))
    open_registry(cfg.registry, ws).add_model_event(EVENT, result.to_dict())
    if as_json:
        _emit(result, True)
    else:
        console.print(result.summary())
        console.print(f"recorded on the registered model; the gate carries {result.upper:.3%} from the next cycle on")


judge_app = typer.Typer(help="A judge of answer pairs, checked against users' labels.", no_args_is_help=True)
app.add_typer(judge_app, name="judge")


@judge_app.command("calibrate")
def judge_calibrate(
    config: ConfigOption = None,
    data: Annotated[
        list[Path] | None,
        typer.Option(help="records with feedback kinds (default: every harvest file in <workspace>/harvest)"),
    ] = None,
    judge: Annotated[str | None, typer.Option(help="the judge to calibrate (default: shadow.judge)")] = None,
    workspace: WorkspaceOption = None,
    as_json: JsonOption = False,
) -> None:
    """Measure a judge's agreement with what users said (a correction over the answer it corrected; an
    answer rated up over one to the same prompt rated down), each pair judged in both orders, and
    record whether its verdicts count in the shadow comparison. Exit 0: calibrated, 3: not calibrated."""
    from ctloop.config import load_config
    from ctloop.console import progress_bar
    from ctloop.data.records import read_records
    from ctloop.errors import DataError
    from ctloop.evaluation.judge import JudgeCalibration, calibrate, judge_identity, labelled_pairs, load_judge
    from ctloop.workspace import resolve_workspace, saved_judging_settings, saved_shadow_settings

    cfg = load_config(config) if config is not None else None
    ws = resolve_workspace(workspace, cfg)
    model: ModelConfig | None
    if cfg is not None:
        spec, settings, model = judge or cfg.shadow.judge, cfg.judge, cfg.model
    else:
        settings, model = saved_judging_settings(ws)
        spec = judge or saved_shadow_settings(ws).judge
    if not spec:
        raise DataError("no judge to calibrate: set shadow.judge (for example 'likelihood') or pass --judge")
    files = data or sorted((ws.root / "harvest").glob("harvest-*.jsonl"))
    if not files:
        raise DataError(
            f"no labelled data: no harvest files in {ws.root / 'harvest'}; run `ctloop harvest` or pass --data"
        )
    pairs = labelled_pairs(record for path in files for record in read_records(path)[0])
    if not pairs:
        raise DataError(
            f"no labelled pairs in {len(files)} file(s): the labels are corrections (with the answer they "
            "corrected) and answers to the same prompt rated up and down; harvest more feedback"
        )
    identity = judge_identity(spec, settings, model)
    judge_function = load_judge(spec, settings, model)
    with progress_bar("judging labelled pairs in both orders", 2 * len(pairs), unit="verdicts") as advance:

        def counted(prompt: str, answer_a: str, answer_b: str) -> str:
            verdict = judge_function(prompt, answer_a, answer_b)
            advance()
            return verdict

        result = calibrate(counted, spec, pairs, settings, identity)
    path = JudgeCalibration.path(ws.root, identity)
    result.save(path)
    if as_json:
        _emit(result, True)
    else:
        console.print(result.summary())
        console.print(f"recorded in {path} (the shadow comparison reads it for this judge)")
    raise typer.Exit(0 if result.calibrated else 3)


logs_app = typer.Typer(help="The log store: served requests, feedback, shadow pairs.", no_args_is_help=True)
app.add_typer(logs_app, name="logs")
feedback_app = typer.Typer(help="Feedback on served answers.", no_args_is_help=True)
app.add_typer(feedback_app, name="feedback")


@logs_app.command("purge")
def logs_purge(
    config: Annotated[Path, typer.Option("--config", "-c", help="ctloop YAML config")],
    older_than_days: Annotated[
        float | None, typer.Option(help="delete rows older than this (default: serve.log_retention_days)")
    ] = None,
    workspace: WorkspaceOption = None,
    as_json: JsonOption = False,
) -> None:
    """Delete log store rows (requests, feedback, shadow pairs) past the retention period."""
    import time

    from ctloop.config import load_config
    from ctloop.errors import ConfigError
    from ctloop.logstore.requests import LogReader
    from ctloop.workspace import resolve_workspace

    cfg = load_config(config)
    days = older_than_days if older_than_days is not None else cfg.serve.log_retention_days
    if days is None or days <= 0:
        raise ConfigError(str(config), ["serve.log_retention_days is null (keep forever); pass --older-than-days N"])
    reader = LogReader(resolve_workspace(workspace, cfg).shadow_store_url(cfg.shadow.store_url))
    try:
        deleted = reader.purge(time.time() - days * 86400)
    finally:
        reader.close()
    _emit(
        {"older_than_days": days, "deleted": deleted},
        as_json,
        f"purged rows older than {days:g} days: " + ", ".join(f"{k} {v}" for k, v in deleted.items()),
    )


def _log_reader(config: Path, workspace: Path | None):
    from ctloop.config import load_config
    from ctloop.logstore.requests import LogReader
    from ctloop.workspace import resolve_workspace

    cfg = load_config(config)
    return LogReader(resolve_workspace(workspace, cfg).shadow_store_url(cfg.shadow.store_url), cfg.serve.redact)


def _listed(rows: list[dict], as_json: bool, title: str) -> None:
    from rich.table import Table

    from ctloop.fileio import TIMESTAMP_FORMAT

    if as_json:
        _emit(rows, True)
        return
    table = Table("time", "request id", "version", "user", "finish", "rating", "prompt", "answer", title=title)
    for row in rows:
        feedback = row.get("feedback") or {}
        rating = "" if not feedback else "corrected" if feedback.get("correction") else f"{feedback.get('score')}"
        table.add_row(
            time.strftime(TIMESTAMP_FORMAT, time.gmtime(row["created_at"])),
            row["request_id"],
            str(row["model_version"]),
            row.get("user") or "",
            row.get("finish_reason") or "",
            rating,
            (row.get("prompt") or "")[:60],
            (row.get("answer") or "")[:60],
        )
    console.print(table)


OptionalSince = Annotated[str | None, typer.Option("--since", help="only the last 30m, 24h, 7d, ... (default: all)")]


@logs_app.command("list")
def logs_list(
    config: RequiredConfig,
    since: OptionalSince = None,
    user: Annotated[str | None, typer.Option("--user", help="one user's requests")] = None,
    version: Annotated[int | None, typer.Option("--version", help="answered by this version")] = None,
    rated: Annotated[
        str | None, typer.Option("--rated", help="up, down, corrected, any (some feedback) or none")
    ] = None,
    limit: Annotated[int, typer.Option("--limit", min=1, max=100_000)] = 20,
    as_json: JsonOption = False,
    workspace: WorkspaceOption = None,
) -> None:
    """The newest served requests, with their latest feedback."""
    from ctloop.errors import ConfigError
    from ctloop.fileio import parse_since

    if rated is not None and rated not in ("up", "down", "corrected", "any", "none"):
        raise ConfigError("--rated", [f"got {rated!r}; use up, down, corrected, any or none"])
    reader = _log_reader(config, workspace)
    try:
        rows = reader.recent_requests(
            parse_since(since) if since else None,
            user,
            None if version is None else str(version),
            rated,
            limit,
        )
    finally:
        reader.close()
    _listed(rows, as_json, f"the newest {len(rows)} requests")


@logs_app.command("show")
def logs_show(
    request_id: Annotated[str, typer.Argument(help="the id the server gave (X-Request-Id of its answer)")],
    config: RequiredConfig,
    workspace: WorkspaceOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="accepted for uniformity: the output is JSON anyway")] = False,
) -> None:
    """One served request in full, with every feedback it got (JSON)."""
    from ctloop.errors import DataError

    reader = _log_reader(config, workspace)
    try:
        row = reader.request_row(request_id)
    finally:
        reader.close()
    if row is None:
        raise DataError(f"no logged request has id {request_id!r}; `ctloop logs list` shows the newest ids")
    _emit(row, True)


@feedback_app.command("list")
def feedback_list(
    config: RequiredConfig,
    since: OptionalSince = None,
    rated: Annotated[str, typer.Option("--rated", help="up, down, corrected or any")] = "any",
    version: Annotated[int | None, typer.Option("--version", help="answers of this version")] = None,
    limit: Annotated[int, typer.Option("--limit", min=1, max=100_000)] = 20,
    as_json: JsonOption = False,
    workspace: WorkspaceOption = None,
) -> None:
    """The newest answers that got feedback, with the feedback."""
    logs_list(config, since, None, version, rated, limit, as_json, workspace)


@feedback_app.command("export")
def feedback_export(
    out: Annotated[Path, typer.Argument(help="the JSONL file to write: one answer and its latest feedback a line")],
    config: RequiredConfig,
    since: OptionalSince = None,
    limit: Annotated[int, typer.Option("--limit", min=1)] = 1_000_000,
    workspace: WorkspaceOption = None,
    as_json: JsonOption = False,
) -> None:
    """Write answers that got feedback, newest first, with the request and its latest feedback."""
    from ctloop.fileio import parse_since, write_jsonl

    reader = _log_reader(config, workspace)
    try:
        rows = reader.recent_requests(parse_since(since) if since else None, rated="any", limit=limit)
    finally:
        reader.close()
    write_jsonl(out, [json.loads(json.dumps(row, default=str)) for row in rows])
    _emit({"out": str(out), "answers": len(rows)}, as_json, f"wrote {len(rows)} answers with their feedback to {out}")


@feedback_app.command("import")
def feedback_import(
    path: Annotated[Path, typer.Argument(help="feedback records: .jsonl or .csv with request_id, rating, ...")],
    config: Annotated[Path, typer.Option("--config", "-c", help="ctloop YAML config")],
    workspace: WorkspaceOption = None,
    as_json: JsonOption = False,
) -> None:
    """Store feedback gathered elsewhere, with the rules of POST /v1/feedback. Exit 0: all imported,
    3: some records refused (listed)."""
    from ctloop.config import load_config
    from ctloop.logstore.feedback_import import import_feedback
    from ctloop.workspace import resolve_workspace

    cfg = load_config(config)
    url = resolve_workspace(workspace, cfg).shadow_store_url(cfg.shadow.store_url)
    report = import_feedback(path, url, cfg.serve.redact, cfg.serve.max_correction_chars)
    _emit(report, as_json, report.summary(), *(f"  {problem}" for problem in report.problems))
    raise typer.Exit(3 if report.refused else 0)


replay_app = typer.Typer(help="The replay buffer: past registered cycles' data.", no_args_is_help=True)
app.add_typer(replay_app, name="replay")


@replay_app.command("drop")
def replay_drop(
    cycle_id: Annotated[
        str, typer.Argument(help="the cycle whose rows leave the buffer (`ctloop status` lists cycles)")
    ],
    workspace: WorkspaceOption = None,
    as_json: JsonOption = False,
) -> None:
    """Remove a cycle's rows from the replay buffer, so no later cycle replays or evaluates on them."""
    from ctloop.data.replay import ReplayBuffer
    from ctloop.workspace import resolve_workspace

    ws = resolve_workspace(workspace)
    dropped = ReplayBuffer(ws.replay_dir).drop_cycle(cycle_id)
    _emit(
        {"cycle_id": cycle_id, "dropped": dropped, "replay_dir": str(ws.replay_dir)},
        as_json,
        f"dropped {dropped} rows of cycle {cycle_id} from the replay buffer in {ws.replay_dir}",
    )


rollout_app = typer.Typer(
    help="The canary after shadow: the candidate answers a growing share of live traffic.", no_args_is_help=True
)
app.add_typer(rollout_app, name="rollout")


@rollout_app.command("start")
def rollout_start(
    config: RequiredConfig,
    version: Annotated[int | None, typer.Option("--version", help="the candidate (default: the challenger)")] = None,
    skip_shadow: Annotated[
        bool, typer.Option("--skip-shadow", help="start without a shadow PROMOTE (recorded in the rollout)")
    ] = False,
    as_json: JsonOption = False,
) -> None:
    """Start routing rollout.steps[0] of live traffic to the candidate; `ctloop serve` looks every
    rollout.look_every_s and advances, holds or rolls back."""
    from ctloop.config import load_config
    from ctloop.serving.rollout import start

    cfg = load_config(config)
    registry, _ = _registry_context(config, None)
    started = start(registry, cfg.rollout, version, skip_shadow)
    _emit(started, as_json, started.summary())


@rollout_app.command("status")
def rollout_status(config: RequiredConfig, as_json: JsonOption = False) -> None:
    """The running rollout, and what a look would decide now (without acting on it)."""
    from ctloop.config import load_config
    from ctloop.serving.rollout import active, decide

    cfg = load_config(config)
    registry, ws = _registry_context(config, None)
    rollout = active(registry)
    if rollout is None:
        _emit({"rollout": None}, as_json, "no rollout is running")
        raise typer.Exit(0)
    result = decide(rollout, _arm_counts(cfg, ws, rollout), cfg.rollout)
    if as_json:
        _emit({"rollout": rollout.to_dict(), "look": result.__dict__}, as_json)
        return
    console.print(rollout.summary())
    console.print(
        f"now: {result.decision}" + (f" ({result.more_needed} more candidate answers)" if result.more_needed else "")
    )
    for reason in result.reasons:
        console.print(f"  {reason}")


@rollout_app.command("check")
def rollout_check(config: RequiredConfig, as_json: JsonOption = False) -> None:
    """One look: advance, hold or roll back the running rollout (what `ctloop serve` does every
    rollout.look_every_s; for cron or a DAG when no server looks). Exit 0: advanced or holding,
    3: rolled back."""
    from ctloop.config import load_config
    from ctloop.registry.publishing import make_publisher
    from ctloop.serving.rollout import ROLLBACK, look

    cfg = load_config(config)
    registry, ws = _registry_context(config, None)
    outcome = look(
        registry,
        cfg,
        lambda r: _arm_counts(cfg, ws, r),
        make_publisher(cfg.publish, registry, ws),
        workspace_root=ws.root,
    )
    if outcome is None:
        _emit({"rollout": None}, as_json, "no rollout is running")
        return
    rollout, result = outcome
    _emit(
        {"rollout": rollout.to_dict(), "look": result.__dict__},
        as_json,
        f"{result.decision}: {rollout.summary()}",
        *(f"  {reason}" for reason in result.reasons),
    )
    raise typer.Exit(3 if result.decision == ROLLBACK else 0)


@rollout_app.command("report")
def rollout_report(
    config: RequiredConfig,
    version: Annotated[int | None, typer.Option("--version", help="the candidate (default: the challenger)")] = None,
    as_json: JsonOption = False,
) -> None:
    """Write the rollout's HTML report (its decision, each step, every look's bounds per metric) and
    log it on the candidate's MLflow run; a finished rollout writes it by itself."""
    from ctloop.errors import RegistryError
    from ctloop.registry.client import CHALLENGER
    from ctloop.serving.rollout import report

    registry, ws = _registry_context(config, None)
    candidate = version if version is not None else registry.alias(CHALLENGER)
    if candidate is None:
        raise RegistryError("there is no challenger; pass --version N")
    path = report(registry, ws.root, candidate)
    _emit({"candidate": candidate, "report": str(path)}, as_json, f"rollout report: {path}")


@rollout_app.command("abort")
def rollout_abort(
    config: RequiredConfig,
    by: Annotated[str, typer.Option("--by", help="who stops it")] = "ctloop rollout abort",
    as_json: JsonOption = False,
) -> None:
    """Stop the running rollout: the candidate's share goes to 0 at the servers' next role poll."""
    from ctloop.serving.rollout import abort

    registry, _ = _registry_context(config, None)
    stopped = abort(registry, by)
    _emit(stopped, as_json, stopped.summary())


def _arm_counts(cfg, ws, rollout) -> dict:
    from ctloop.logstore.requests import LogReader
    from ctloop.serving.rollout import arm_counts

    reader = LogReader(ws.shadow_store_url(cfg.shadow.store_url), redact_pii=cfg.serve.redact)
    try:
        return arm_counts(reader, rollout, cfg)
    finally:
        reader.close()


workspace_app = typer.Typer(help="The workspace folder.", no_args_is_help=True)
app.add_typer(workspace_app, name="workspace")


@workspace_app.command("relocate")
def workspace_relocate(workspace: WorkspaceOption = None, as_json: JsonOption = False) -> None:
    """After copying or moving a workspace: point its embedded MLflow database at this folder's
    artifacts (never the original's)."""
    from ctloop.registry.client import relocate_embedded
    from ctloop.workspace import resolve_workspace

    ws = resolve_workspace(workspace)
    changed = relocate_embedded(ws)
    _emit(
        {"workspace": str(ws.root), **changed},
        as_json,
        f"{ws.root}: artifact locations now point here ({changed['experiments']} experiments, "
        f"{changed['runs']} runs updated)",
    )


@app.command()
def doctor(config: RequiredConfig, workspace: WorkspaceOption = None, as_json: JsonOption = False) -> None:
    """Check a config and its environment, each with its fix: the workspace writable, the registry
    and the log store reachable, the device, the base model loadable, the tokens set. Exit 0: no
    check failed (warnings allowed), 3: some did."""
    import dataclasses
    import os

    from ctloop.config import load_config
    from ctloop.doctor import FAIL, run_checks
    from ctloop.workspace import resolve_workspace

    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # an unreachable server: seconds, not minutes
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    cfg = load_config(config)
    checks = run_checks(cfg, resolve_workspace(workspace, cfg))
    failed = [c.name for c in checks if c.status == FAIL]
    _emit(
        {"checks": [dataclasses.asdict(c) for c in checks], "failed": failed},
        as_json,
        *(check.line() for check in checks),
        f"{len(checks) - len(failed)} of {len(checks)} checks passed"
        + (f"; failed: {', '.join(failed)}" if failed else ""),
    )
    raise typer.Exit(3 if failed else 0)


@app.command("validate-config")
def validate_config(
    path: Annotated[Path, typer.Argument(help="YAML config to check")], as_json: JsonOption = False
) -> None:
    """Check a config file and report every problem at once; warn about settings that can never
    decide (a holdout too small for the gate) or train too little to learn."""
    from ctloop.config import config_warnings, load_config

    config = load_config(path)
    warnings = config_warnings(config)
    if as_json:
        _emit({"path": str(path), "valid": True, "warnings": warnings}, as_json)
        return
    for warning in warnings:
        console.print(f"warning: {warning}", style="yellow")
    console.print(f"{path}: valid" + (f", with {len(warnings)} warning(s)" if warnings else ""))


@app.command()
def publish(
    version: Annotated[int, typer.Argument(help="the version to publish to every target")],
    config: ConfigOption = None,
    workspace: WorkspaceOption = None,
    as_json: JsonOption = False,
) -> None:
    """Load a version on every publish target (retrying what failed before); moves no alias.
    Exit 0: publish.require met, 3: not met (the failing replicas are listed)."""
    from ctloop.errors import ConfigError

    registry, ws = _registry_context(config, workspace)
    publisher = _publisher(config, ws, registry)
    if not publisher.active:
        raise ConfigError(str(config or "the workspace's settings"), ["publish.targets is empty; list the targets"])
    registry.version(version)  # a clear error for a version that does not exist
    result = publisher.publish(version)
    _emit(result, as_json, result.summary())
    raise typer.Exit(0 if result.enough(publisher.config.require) else 3)


def _publisher(config_path: Path | None, ws, registry):
    from ctloop.registry.publishing import make_publisher
    from ctloop.workspace import saved_publish_settings

    if config_path is not None:
        from ctloop.config import load_config

        settings = load_config(config_path).publish
    else:
        settings = saved_publish_settings(ws)
    return make_publisher(settings, registry, ws)


def _registry_context(config_path: Path | None, workspace: Path | None):
    registry, ws, _ = _registry_settings(config_path, workspace)
    return registry, ws


def _registry_settings(config_path: Path | None, workspace: Path | None):
    """(registry, workspace, registry settings): from the config, else the workspace's saved ones."""
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
    return open_registry(settings, ws), ws, settings


def main() -> None:
    from ctloop.logs import apply_process_defaults, configure_logging

    apply_process_defaults()
    configure_logging()
    try:
        app()
    except CtloopError as exc:
        error(str(exc))
        sys.exit(2)
    except PermissionError as exc:  # a read-only workspace, a file owned by someone else
        error(f"cannot write {exc.filename}: permission denied; check the workspace's permissions")
        sys.exit(2)
    except Exception as exc:
        from sqlalchemy.exc import DatabaseError

        if not isinstance(exc, DatabaseError):
            raise
        first = str(exc.orig if exc.orig is not None else exc).splitlines()[0][:300]
        error(
            f"the log store refused the command ({first}); if it is a SQLite file, it may be "
            f"corrupt: restore it from a backup, or move it away to start a new one"
        )
        sys.exit(2)
    except KeyboardInterrupt:
        console.print("interrupted", style="red")
        sys.exit(130)
