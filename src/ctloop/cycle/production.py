"""Drift on live traffic: the prompts the server answered in a window, against the champion's
training prompts, with the same embedder, cache, detectors and report as any other drift check.
`ctloop drift --production`, `ctloop watch` and the drift-watch DAG use it."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

from ctloop.config import CtloopConfig
from ctloop.console import console
from ctloop.data.records import Record
from ctloop.errors import DataError
from ctloop.fileio import utc_now, write_json
from ctloop.workspace import Workspace

NOT_ENOUGH = "not_enough_data"


def served_prompts(
    config: CtloopConfig, workspace: Workspace, since: float, until: float | None = None
) -> tuple[list[Record], int]:
    """A seeded sample of at most `drift.max_rows` logged requests of [since, until), drawn in the
    database, as records (the prompt is what drift compares), and the window's size. Only the
    sample is read and embedded, however large the window."""
    from ctloop.data.sources import open_source

    source = open_source(config, workspace)  # production.source: the request log, MLflow traces, JSONL
    try:
        rows, total = source.sample(
            since, time.time() if until is None else until, config.drift.max_rows, config.drift.seed
        )
    finally:
        source.close()
    records = [Record(id=row["request_id"], prompt=row["prompt"] or "", completion=row["answer"] or "") for row in rows]
    return records, total


def check_production_drift(
    config: CtloopConfig, workspace: Workspace, since: float, report_dir: Path | None = None, watch: bool = False
) -> dict:
    """Served prompts since `since` vs the champion's training prompts. The result has the shape of
    `ctloop drift`'s, plus the window; with too few requests for `drift.min_rows` the outcome is
    `not_enough_data` and nothing is decided. Reports go to `report_dir` (default
    <workspace>/watch/).

    `watch`: this is one look of a repeated watch (`ctloop watch`, the drift-watch DAG). It tests at
    its share of `watch.false_alarm_budget` (see `ctloop.drift.budget`) instead of `drift.alpha`; a
    look without enough traffic decides nothing and spends nothing."""
    from ctloop.cycle.reference import champion_reference
    from ctloop.drift.budget import take_look
    from ctloop.drift.detectors import detect_drift
    from ctloop.drift.embed import embed_records, make_embedder, texts_of
    from ctloop.registry.client import CHAMPION, open_registry
    from ctloop.reports.drift import write_drift_report

    until = time.time()
    registry = open_registry(config.registry, workspace)
    champion = registry.alias(CHAMPION)
    if champion is None:
        raise DataError(
            "production drift compares live traffic with the champion's training data, and there is no "
            "champion yet; run a cycle first (`ctloop run`)"
        )
    current, total = served_prompts(config, workspace, since, until)
    reference = champion_reference(config, workspace, registry, champion)
    drift_config = config.drift.model_copy(update={"text": "prompt"})  # answers are outputs, not data
    embedder = make_embedder(drift_config, config.model)
    cache = workspace.root / "embeddings"
    ref_emb = embed_records(reference, embedder, "prompt", cache)
    cur_emb = embed_records(current, embedder, "prompt", cache) if current else ref_emb[:0]
    look = None
    if watch and min(len(ref_emb), len(cur_emb)) >= drift_config.min_rows:
        look = take_look(workspace.root / "watch" / "state.json", config.watch)
    if look is not None and look.spending == "lifetime":  # shares no permutation test can resolve
        from ctloop.config import LIFETIME_DETECTORS

        drift_config = drift_config.model_copy(
            update={"detectors": [d for d in drift_config.detectors if d in LIFETIME_DETECTORS]}
        )
    report = detect_drift(ref_emb, cur_emb, drift_config, alpha=look.alpha if look else None)
    if look is not None:
        only = f" (only the detector whose p-value holds that far in its tail: {', '.join(drift_config.detectors)})"
        report = replace(
            report, reasons=(*report.reasons, look.describe() + (only if look.spending == "lifetime" else ""))
        )
    if total > len(current):
        sampled = f"the window held {total} requests: a seeded sample of {len(current)} (drift.max_rows) was drawn in the log store"
        report = replace(report, reasons=(*report.reasons, sampled))
    window = {
        "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(since)),
        "until": utc_now(),
        "requests": total,
        "sampled": len(current),  # drawn in the database: at most drift.max_rows
        "champion": champion,
    }
    report_dir = report_dir or workspace.root / "watch"
    stem = report_dir / f"production-drift-{str(window['until']).replace(':', '')}"
    result = report.to_dict() | {
        "mode": "production",
        "window": window,
        "summary": report.summary(),
        "reasons": list(report.reasons),
    }
    if look is not None:
        result["watch"] = look.to_dict()
    if report.outcome == NOT_ENOUGH:
        result["summary"] = (
            f"production drift: not enough traffic to decide ({len(current)} requests since "
            f"{window['since']}; drift.min_rows={drift_config.min_rows})"
        )
    elif current:
        write_drift_report(stem.with_suffix(".html"), report, ref_emb, cur_emb, texts_of(current, "prompt"))
        result["report"] = str(stem.with_suffix(".html"))
    write_json(stem.with_suffix(".json"), result)
    console.print(result["summary"])
    return result


def watch_production(config_path: str | Path) -> bool:
    """One production drift check as an orchestrator's task runs it (the drift-watch DAG with
    `orchestration.source: production`): True when live traffic drifted; too few requests is False."""
    from ctloop.config import load_config
    from ctloop.fileio import parse_since
    from ctloop.logs import apply_process_defaults
    from ctloop.workspace import resolve_workspace, workspace_lock

    apply_process_defaults()
    config = load_config(config_path)
    workspace = resolve_workspace(None, config)
    since = parse_since(config.orchestration.production_window)
    with workspace_lock(
        workspace, "airflow ctloop_drift_watch: production drift", config.orchestration.lock_wait_seconds
    ):
        return bool(check_production_drift(config, workspace, since, watch=True)["drift"])
