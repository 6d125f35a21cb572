"""Validation of incoming records: schema, empty or over-long texts, duplicates, volume.

Bad rows are never dropped silently: each goes to the quarantine file with one reason, and the
report counts them by reason. The caller decides what a failed report means (the pipeline stops).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from ctloop.config import DataConfig
from ctloop.data.records import BadRow, RawRow, Record, fingerprint, record_from_fields
from ctloop.fileio import write_jsonl

TokenCounter = Callable[[list[str]], list[int]]


@dataclass(frozen=True)
class ValidationReport:
    source: str
    total_rows: int
    good_rows: int
    bad_by_reason: dict[str, int]
    quarantine_path: str
    fingerprint: str
    passed: bool
    reasons: tuple[str, ...] = ()
    metrics: dict[str, float] = field(default_factory=dict)

    @property
    def bad_rows(self) -> int:
        return self.total_rows - self.good_rows

    def summary(self) -> str:
        counts = ", ".join(f"{reason}: {n}" for reason, n in sorted(self.bad_by_reason.items())) or "none"
        text = (
            f"validation {'passed' if self.passed else 'FAILED'}: {self.good_rows} good of {self.total_rows} "
            f"rows; quarantined {self.bad_rows} ({counts}) -> {self.quarantine_path}"
        )
        return text if self.passed else text + "\nthe cycle stops: " + "; ".join(self.reasons)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, stored: dict) -> ValidationReport:
        """Read back what `to_dict` wrote (validation.json)."""
        names = {f.name for f in fields(cls)}
        known: dict[str, Any] = {k: v for k, v in stored.items() if k in names}
        return cls(**known | {"reasons": tuple(stored.get("reasons", ()))})


def validate_records(
    rows: Iterable[RawRow],
    *,
    source: str,
    config: DataConfig,
    max_seq_tokens: int,
    count_tokens: TokenCounter,
    quarantine_path: Path,
    render_chat: Any = None,
) -> tuple[list[Record], ValidationReport]:
    """Split rows into good records and quarantined bad ones; check volume limits."""
    quarantined: list[dict] = []
    candidates: list[tuple[RawRow, Record]] = []

    def quarantine(row: RawRow, reason: str, detail: str) -> None:
        quarantined.append({"location": row.location, "reason": reason, "detail": detail, "raw": row.raw})

    total = 0
    for row in rows:
        total += 1
        if row.fields is None:
            quarantine(row, row.reason, row.detail)
            continue
        try:
            record = record_from_fields(row.fields, render_chat)
        except BadRow as bad:
            quarantine(row, bad.reason, bad.detail)
            continue
        empty = [name for name in ("prompt", "completion") if not getattr(record, name).strip()]
        if empty:
            quarantine(row, "empty_text", f"'{empty[0]}' is empty or whitespace; fill it or remove the row")
            continue
        candidates.append((row, record))

    lengths = record_lengths(count_tokens, [r for _, r in candidates])
    good: list[Record] = []
    seen_content: set[str] = set()
    seen_ids: set[str] = set()
    for (row, record), n_tokens in zip(candidates, lengths, strict=True):
        if n_tokens > max_seq_tokens:
            quarantine(
                row,
                "too_long",
                f"{n_tokens} tokens > model.max_seq_tokens={max_seq_tokens}; shorten the row or raise the limit",
            )
        elif config.drop_duplicates and record.content_key() in seen_content:
            quarantine(row, "duplicate", "same prompt and completion as an earlier row")
        elif record.id in seen_ids:
            quarantine(row, "duplicate_id", f"id '{record.id}' is used by an earlier row; ids must be unique")
        else:
            seen_content.add(record.content_key())
            seen_ids.add(record.id)
            good.append(record)

    write_jsonl(quarantine_path, quarantined)
    reasons = _limit_violations(total, len(good), config)
    report = ValidationReport(
        source=source,
        total_rows=total,
        good_rows=len(good),
        bad_by_reason=dict(Counter(q["reason"] for q in quarantined)),
        quarantine_path=str(quarantine_path),
        fingerprint=fingerprint(good),
        passed=not reasons,
        reasons=tuple(reasons),
        metrics={
            "bad_fraction": (total - len(good)) / total if total else 0.0,
            "mean_tokens": sum(lengths) / len(lengths) if lengths else 0.0,
        },
    )
    return good, report


def record_lengths(count_tokens: TokenCounter, records: list[Record]) -> list[int]:
    """Prompt + completion tokens of each record, plus the two special tokens the trainer adds."""
    if not records:
        return []
    prompts = count_tokens([r.prompt for r in records])
    completions = count_tokens([r.completion for r in records])
    return [p + c + 2 for p, c in zip(prompts, completions, strict=True)]


def _limit_violations(total: int, good: int, config: DataConfig) -> list[str]:
    reasons = []
    if total == 0:
        return ["the input has no rows; check the --data path and file contents"]
    bad_fraction = (total - good) / total
    if bad_fraction > config.max_bad_fraction:
        reasons.append(
            f"{bad_fraction:.1%} of rows are bad, above data.max_bad_fraction="
            f"{config.max_bad_fraction}; fix the rows listed in the quarantine file or raise the limit"
        )
    if good < config.min_rows:
        reasons.append(
            f"only {good} good rows, below data.min_rows={config.min_rows}; collect more data or lower the limit"
        )
    return reasons
