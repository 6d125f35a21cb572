"""The rejected set (<workspace>/harvest/rejected.jsonl): answers production gave that users did
not want, which the gate's rejected-answers rules check the candidate does not move toward.

Two kinds of rows join it at harvest time: answers rated below `harvest.rejected_below` without a
correction (`harvest_reason: rejected`), and the original answers behind corrections
(`harvest_reason: corrected_original`), the clearest negatives of all. The gate uses only the
recent ones (`eval.rejected_max_age_days`, counted back from the cycle's start) given by the newest
model versions (`eval.rejected_versions`): what a version retired long ago said is not what the
champion says, and the set would otherwise grow forever.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from ctloop.config import EvalConfig
from ctloop.data.records import Record
from ctloop.fileio import parse_utc

CORRECTED_ORIGINAL = "corrected_original"
DAY = 86400.0


@dataclass(frozen=True)
class RejectedSelection:
    """The rows the gate uses, and how many were left out, by reason."""

    records: list[Record]
    left_out: dict[str, int]


def _seconds(timestamp: str) -> float | None:
    try:
        return float(parse_utc(timestamp))
    except (TypeError, ValueError):
        return None


def too_old(record: Record, settings: EvalConfig, now: float) -> bool:
    """Whether the answer was given more than `eval.rejected_max_age_days` before `now`."""
    if settings.rejected_max_age_days is None:
        return False
    given = _seconds(record.timestamp or "")
    return given is not None and given < now - settings.rejected_max_age_days * DAY


def _version_order(versions: set[str], newest_given: dict[str, float]) -> list[str]:
    """Versions newest first: by number when every one is a number (registry versions are), else
    by the newest answer each gave."""
    if all(v.isdigit() for v in versions):
        return sorted(versions, key=int, reverse=True)
    return sorted(versions, key=lambda v: newest_given.get(v, 0.0), reverse=True)


def select_rejected(records: list[Record], settings: EvalConfig, now: float) -> RejectedSelection:
    """The rejected answers the gate checks at `now` (the cycle's start, epoch seconds)."""
    left_out: Counter[str] = Counter()
    recent = []
    for record in records:
        if too_old(record, settings, now):
            left_out["older_than_eval.rejected_max_age_days"] += 1
        else:
            recent.append(record)
    if settings.rejected_versions is not None:
        newest_given: dict[str, float] = {}
        for record in recent:
            version = str(record.metadata.get("model_version") or "")
            given = _seconds(record.timestamp or "") or 0.0
            newest_given[version] = max(newest_given.get(version, 0.0), given)
        kept_versions = set(_version_order(set(newest_given), newest_given)[: settings.rejected_versions])
        chosen = [r for r in recent if str(r.metadata.get("model_version") or "") in kept_versions]
        if len(chosen) < len(recent):
            left_out["older_versions_than_eval.rejected_versions"] += len(recent) - len(chosen)
        recent = chosen
    return RejectedSelection(recent, dict(left_out))
