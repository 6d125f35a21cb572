"""The shadow comparison as evidence on the registry: its HTML report and metrics on the
challenger's MLflow run, and its decision as a version tag, so the registry shows why a version
was or was not promoted."""

from __future__ import annotations

from pathlib import Path

from ctloop.registry.client import Registry


def log_shadow_report(registry: Registry, report, html_path: Path) -> None:
    """The shadow comparison on the challenger's MLflow run (metrics + HTML report) and its decision
    as a version tag, so the registry shows why a version was or was not promoted."""
    version = int(report.challenger_version)
    run_id = registry.version(version).run_id
    prefix = f"shadow_vs_v{report.champion_version}"
    figures = {
        "completed_pairs": report.counts.get("completed", 0),
        "error_rate": report.error_rate,
        "latency_ratio": report.latency_ratio,
        "length_ratio": report.length_ratio,
        **report.agreement,
    }
    registry.log_metrics(run_id, {f"{prefix}_{k}": v for k, v in figures.items() if v == v})  # NaN: no pairs yet
    registry.log_artifact(run_id, html_path, f"shadow/v{report.champion_version}")
    registry.set_version_tags(
        version,
        {
            "ctloop.shadow_decision": f"{report.decision} vs v{report.champion_version} "
            f"({report.counts.get('completed', 0)} pairs)"
        },
    )


def publish_shadow_report(
    registry: Registry, report, rows: list[dict], workspace_root: Path, html_path: Path | None = None
) -> Path:
    """Write the shadow report's HTML (default: <workspace>/shadow/vN-vs-vM.html) and log it to MLflow."""
    from ctloop.reports.shadow import write_shadow_report

    html_path = html_path or (
        workspace_root / "shadow" / f"v{report.champion_version}-vs-v{report.challenger_version}.html"
    )
    html_path.parent.mkdir(parents=True, exist_ok=True)
    log_shadow_report(registry, report, write_shadow_report(report, rows, html_path))
    return html_path
