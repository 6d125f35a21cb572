"""What `ctloop status` shows: champion, challenger, versions with lineage, and the last cycles."""

from __future__ import annotations

from typing import Any

from ctloop.fileio import read_json
from ctloop.registry.client import CHALLENGER, CHAMPION, Registry
from ctloop.registry.promotion import VersionState, champion_history, version_state
from ctloop.registry.publishing import TAG_PREFIX
from ctloop.workspace import Workspace


def collect_status(registry: Registry, workspace: Workspace, last_cycles: int = 10) -> dict[str, Any]:
    versions = registry.versions()
    cycles = []
    for path in workspace.cycles_dir.glob("*/cycle.json"):
        state = read_json(path)
        result = state.get("result", {})
        cycles.append(
            {
                "cycle_id": state.get("cycle_id"),
                "data": state.get("data"),
                "started": state.get("started"),
                "finished": state.get("finished"),
                "status": state.get("status", "unfinished"),
                "version": result.get("version"),
                "gate": result.get("gate", {}).get("outcome"),
            }
        )
    cycles.sort(key=lambda c: c["started"] or "")
    aliases = {CHAMPION: registry.alias(CHAMPION), CHALLENGER: registry.alias(CHALLENGER)}
    history = champion_history(registry)
    return {
        "workspace": str(workspace.root),
        "tracking_uri": registry.tracking_uri,
        "model_name": registry.model_name,
        "aliases": aliases,
        "champion_history": history,
        "versions": [
            _version(v.to_dict(), version_state(registry, v.version, v.tags, aliases, history)) for v in versions
        ],
        "cycles": cycles[-last_cycles:],
    }


def render_status(info: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    console = Console(markup=False, highlight=False)  # stdout; text as written
    aliases = info["aliases"]
    console.print(Text.assemble((str(info["model_name"]), "bold"), f" in {info['tracking_uri']}"))
    pending = (
        f"{_v(aliases['challenger'])} (awaiting shadow evidence and promotion)"
        if aliases["challenger"] is not None
        else "none pending"
    )
    console.print(f"champion: {_v(aliases['champion'])}   challenger: {pending}")
    console.print(f"champion history: {' -> '.join(_v(v) for v in info['champion_history']) or '-'}")
    for v in (v for v in info["versions"] if v.get("awaiting_approval")):
        console.print(f"awaiting approval: {_v(v['version'])} (ctloop approve {v['version']} --by NAME --note TEXT)")
    versions = Table("version", "state", "gate", "cycle", "data", "parent", "published", title="versions")
    for v in info["versions"]:
        tags = v["tags"]
        versions.add_row(
            _v(v["version"]),
            v["state"],
            tags.get("ctloop.gate", ""),
            tags.get("ctloop.cycle_id", ""),
            tags.get("ctloop.data_fingerprint", ""),
            tags.get("ctloop.parent_version", ""),
            _published(tags),
        )
    console.print(versions)
    cycles = Table("cycle", "started", "status", "gate", "version", "data", title="last cycles")
    for c in info["cycles"]:
        cycles.add_row(
            c["cycle_id"], c["started"] or "", c["status"], c["gate"] or "", _v(c["version"]), c["data"] or ""
        )
    console.print(cycles)


BULKY_TAGS = ("ctloop.adapter_config",)  # the adapter's whole config: `ctloop lineage` and the registry have it


def _version(info: dict[str, Any], state: VersionState) -> dict[str, Any]:
    """A version as status shows it: its tags without the bulky ones, its state, and whether it
    awaits approval."""
    tags = {k: v for k, v in info["tags"].items() if k not in BULKY_TAGS}
    return info | {"tags": tags, "state": str(state), "awaiting_approval": state == VersionState.PENDING_APPROVAL}


def _v(version: int | None) -> str:
    return f"v{version}" if version is not None else "-"


def _published(tags: dict[str, str]) -> str:
    """'2/2 replicas', or which replicas failed, from the outcomes `ctloop publish` recorded."""
    outcomes = {k.removeprefix(TAG_PREFIX): v for k, v in tags.items() if k.startswith(TAG_PREFIX)}
    if not outcomes:
        return "-"
    failed = [target for target, outcome in outcomes.items() if not outcome.startswith("ok")]
    ok = len(outcomes) - len(failed)
    return f"{ok}/{len(outcomes)} replicas" + (f"; failed: {', '.join(failed)}" if failed else "")
