"""`ctloop feedback import FILE`: feedback gathered elsewhere (a labelling tool, a support desk),
in bulk, with the same rules as POST /v1/feedback: each record names a logged request, has a
valid rating and/or a correction, and nothing else."""

from __future__ import annotations

import csv
import hashlib
import io
import json
from collections import Counter
from dataclasses import dataclass, field, replace
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


CHUNK = 2000  # records per round trip and per transaction


def import_feedback(
    path: Path, store_url: str, redact_pii: bool = False, max_correction_chars: int = 16384
) -> FeedbackImport:
    """Validate every record of a .jsonl or .csv file and store the valid ones, CHUNK records per
    lookup and per transaction: a crash loses no chunk already committed, and importing the file
    again adds nothing twice (an imported record's id is a hash of its content)."""
    reader = LogReader(store_url, redact_pii=redact_pii)
    refused: Counter[str] = Counter()
    problems: list[str] = []
    imported = 0

    def refuse(line: int, reason: str, problem: str) -> None:
        refused[reason] += 1
        if len(problems) < 20:
            problems.append(f"line {line}: {problem}")

    try:
        chunk: list[tuple[int, FeedbackBody]] = []
        for line, fields in _rows(path):
            if isinstance(fields, str):  # the line could not be read as a record
                refuse(line, "invalid", fields)
                continue
            try:
                body = FeedbackBody.model_validate(fields)
            except ValidationError as exc:
                first = exc.errors()[0]
                refuse(line, "invalid", f"{'.'.join(str(p) for p in first['loc']) or 'record'}: {first['msg']}")
                continue
            if body.correction is not None and len(body.correction) > max_correction_chars:
                refuse(line, "invalid", f"correction longer than {max_correction_chars} characters")
                continue
            chunk.append((line, body))
            if len(chunk) >= CHUNK:
                imported += _store(chunk, reader, path, refuse)
                chunk = []
        imported += _store(chunk, reader, path, refuse)
    finally:
        reader.close()
    return FeedbackImport(imported, dict(refused), problems)


def _store(chunk: list[tuple[int, FeedbackBody]], reader: LogReader, path: Path, refuse: Any) -> int:
    """One chunk: the request ids looked up in one query, the new records stored in one transaction.
    A record imported before (the same content, so the same id) is refused as `already imported`."""
    if not chunk:
        return 0
    counts = reader.requests_with_ids([c for _, body in chunk for c in body.request_id_candidates()])
    records: list[tuple[int, FeedbackRecord]] = []
    for line, body in chunk:
        found = next((c for c in body.request_id_candidates() if counts.get(reader.stored_id(c))), None)
        matches = counts.get(reader.stored_id(found), 0) if found is not None else 0
        if found is None:
            refuse(line, "unknown request id", f"no logged request has id {body.request_id!r}")
        elif matches > 1:
            refuse(line, "ambiguous request id", f"request id {found!r} names {matches} logged requests; not attached")
        else:
            content = json.dumps([found, body.rating, body.correction, body.comment, body.user], ensure_ascii=False)
            record = body.record(found, source=str(path))
            records.append(
                (line, replace(record, feedback_id="imp-" + hashlib.sha256(content.encode()).hexdigest()[:40]))
            )
    fresh = reader.new_feedback_ids([r.feedback_id for _, r in records])
    new: list[FeedbackRecord] = []
    for line, record in records:
        if record.feedback_id in fresh:
            fresh.discard(record.feedback_id)  # a record repeated within the file counts once
            new.append(record)
        else:
            refuse(line, "already imported", "the same record was imported before")
    reader.add_feedback(new)
    return len(new)


def _rows(path: Path) -> list[tuple[int, Any]]:
    """(line number, fields) per record, every character as sent: a line that is not valid UTF-8
    or not JSON gives (line, the reason) instead. A UTF-8 byte-order mark is skipped; JSONL lines
    end at "\\n" only (U+2028 inside a string is text); CSV fields keep their quoted newlines."""
    if not path.is_file():
        raise DataError(f"{path}: no such file; pass a .jsonl or .csv file of feedback records")
    data = path.read_bytes().removeprefix(b"\xef\xbb\xbf")
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return _csv_rows(path, data)
    if suffix not in (".jsonl", ".json"):
        raise DataError(f"{path}: unknown format {path.suffix!r}; use .jsonl or .csv")
    rows: list[tuple[int, Any]] = []
    for line, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        try:
            text = raw.removesuffix(b"\r").decode("utf-8")
        except UnicodeDecodeError as exc:
            rows.append((line, f"not valid UTF-8 (byte {exc.start + 1}); re-encode the file as UTF-8"))
            continue
        try:
            rows.append((line, json.loads(text)))
        except ValueError as exc:
            rows.append((line, f"not valid JSON ({exc})"))
    return rows


def _csv_rows(path: Path, data: bytes) -> list[tuple[int, Any]]:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise DataError(f"{path}: line {line} is not valid UTF-8; re-encode the file as UTF-8") from None
    csv.field_size_limit(max(csv.field_size_limit(), 1 << 26))  # a long correction is refused by its rule, not here
    reader = csv.DictReader(io.StringIO(text, newline=""))
    rows: list[tuple[int, Any]] = []
    line = reader.line_num + 1
    for row in reader:
        fields: dict[str, Any] = {k: v for k, v in row.items() if k and v not in ("", None)}
        if "rating" in fields:  # CSV has no types: a number is a number
            try:
                fields["rating"] = float(fields["rating"])
            except ValueError:
                pass
        rows.append((line, fields))
        line = reader.line_num + 1
    return rows
