"""`ctloop feedback import FILE`: feedback gathered elsewhere (a labelling tool, a support desk),
in bulk, with the same rules as POST /v1/feedback: each record names a logged request, has a
valid rating and/or a correction, and nothing else."""

from __future__ import annotations

import csv
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from ctloop.errors import DataError
from ctloop.logstore.requests import FeedbackBody, FeedbackRecord, LogReader


@dataclass(frozen=True)
class FeedbackImport:
    imported: int
    refused: dict[str, int]
    problems: list[str] = field(default_factory=list)  # the first few, with their line numbers

    def summary(self) -> str:
        refused = sum(self.refused.values())
        details = ", ".join(f"{reason}: {n}" for reason, n in sorted(self.refused.items()))
        return f"imported {self.imported} feedback records; refused {refused}" + (f" ({details})" if details else "")


def import_feedback(
    path: Path, store_url: str, redact_pii: bool = False, max_correction_chars: int = 16384
) -> FeedbackImport:
    """Validate every record of a .jsonl or .csv file and store the valid ones in one transaction."""
    reader = LogReader(store_url, redact_pii=redact_pii)
    records: list[FeedbackRecord] = []
    refused: Counter[str] = Counter()
    problems: list[str] = []
    try:
        for line, fields in _rows(path):
            reason, problem = "invalid", ""
            try:
                body = FeedbackBody.model_validate(fields)
                if body.correction is not None and len(body.correction) > max_correction_chars:
                    problem = f"correction longer than {max_correction_chars} characters"
                else:
                    counts = {c: reader.requests_with_id(c) for c in body.request_id_candidates()}
                    found = next((c for c, n in counts.items() if n), None)
                    if found is None:
                        reason, problem = "unknown request id", f"no logged request has id {body.request_id!r}"
                    elif counts[found] > 1:
                        reason = "ambiguous request id"
                        problem = f"request id {found!r} names {counts[found]} logged requests; not attached to any"
                    else:
                        records.append(body.record(found, source=str(path)))
                        continue
            except ValidationError as exc:
                first = exc.errors()[0]
                problem = f"{'.'.join(str(p) for p in first['loc']) or 'record'}: {first['msg']}"
            except ValueError as exc:
                problem = str(exc)
            refused[reason] += 1
            if len(problems) < 20:
                problems.append(f"line {line}: {problem}")
        reader.add_feedback(records)
    finally:
        reader.close()
    return FeedbackImport(len(records), dict(refused), problems)


def _rows(path: Path) -> list[tuple[int, Any]]:
    if not path.is_file():
        raise DataError(f"{path}: no such file; pass a .jsonl or .csv file of feedback records")
    text = path.read_text(encoding="utf-8", errors="replace")
    if path.suffix.lower() == ".csv":
        rows = []
        for line, row in enumerate(csv.DictReader(text.splitlines()), start=2):
            fields: dict[str, Any] = {k: v for k, v in row.items() if k and v not in ("", None)}
            if "rating" in fields:  # CSV has no types: a number is a number
                try:
                    fields["rating"] = float(fields["rating"])
                except ValueError:
                    pass
            rows.append((line, fields))
        return rows
    if path.suffix.lower() not in (".jsonl", ".json"):
        raise DataError(f"{path}: unknown format {path.suffix!r}; use .jsonl or .csv")
    rows = []
    for line, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            rows.append((line, json.loads(raw)))
        except ValueError:
            rows.append((line, {"__invalid_json__": raw[:80]}))
    return rows
