"""Records: the schema, readers for JSONL / Parquet / CSV, Parquet storage, and dataset fingerprints.

A record is `prompt` + `completion`, or `messages` in chat form (a list of {role, content} whose
last message is the assistant's answer), with optional `id`, `timestamp`, `source`, `metadata`.
Reading never drops a row: each row comes back either parsed or with the reason it is bad.
"""

from __future__ import annotations

import csv
import datetime
import hashlib
import io
import json
import unicodedata
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ctloop.errors import DataError
from ctloop.fileio import atomic_path

OPTIONAL_TEXT_FIELDS = ("id", "timestamp", "source")
KNOWN_FIELDS = {"prompt", "completion", "messages", "metadata", *OPTIONAL_TEXT_FIELDS}


@dataclass(frozen=True)
class Record:
    id: str
    prompt: str
    completion: str
    source: str = ""
    timestamp: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)

    def digest(self) -> str:
        """Content hash of the normalised record (used for fingerprints and duplicate checks)."""
        payload = [
            self.id,
            _norm(self.prompt),
            _norm(self.completion),
            self.source,
            self.timestamp,
            json.dumps(self.metadata, sort_keys=True, ensure_ascii=False),
        ]
        return hashlib.sha256(json.dumps(payload, ensure_ascii=False).encode()).hexdigest()

    def content_key(self) -> str:
        """What makes two rows duplicates: the same normalised prompt and completion."""
        return hashlib.sha256(f"{_norm(self.prompt)}\x00{_norm(self.completion)}".encode()).hexdigest()


@dataclass(frozen=True)
class RawRow:
    """One row as read from a file: `fields` when it parsed, else `reason` and `detail`."""

    location: str
    raw: str
    fields: dict[str, Any] | None = None
    reason: str = ""
    detail: str = ""


class BadRow(Exception):
    """A row that breaks the record schema; `reason` is a stable code, `detail` says what and how to fix."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def _norm(text: str) -> str:
    return unicodedata.normalize("NFC", text).strip()


def detect_format(path: Path) -> str:
    suffix = path.suffix.lower().lstrip(".")
    fmt = {
        "jsonl": "jsonl",
        "ndjson": "jsonl",
        "json": "jsonl",
        "parquet": "parquet",
        "pq": "parquet",
        "csv": "csv",
    }.get(suffix)
    if fmt is None:
        raise DataError(
            f"{path}: cannot tell the format from the extension '.{suffix}'; rename it to .jsonl, .parquet or .csv"
        )
    return fmt


def read_raw_rows(path: str | Path) -> Iterator[RawRow]:
    """Yield every row of a JSONL, Parquet or CSV file, parsed or marked bad; never skip one."""
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{path} is a folder; pass one records file (.jsonl, .parquet or .csv)")
    if not path.is_file():
        raise DataError(f"{path}: no such file; check the path")
    fmt = detect_format(path)
    if fmt == "jsonl":
        yield from _read_jsonl(path)
    elif fmt == "csv":
        yield from _read_csv(path)
    else:
        yield from _read_parquet(path)


def _read_jsonl(path: Path) -> Iterator[RawRow]:
    with path.open("rb") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path.name}:{number}"
            shown = line.rstrip(b"\r\n").decode("utf-8", errors="backslashreplace")
            try:
                text = line.decode("utf-8-sig" if number == 1 else "utf-8")  # tolerate a byte-order mark
            except UnicodeDecodeError as exc:
                yield RawRow(
                    where,
                    shown,
                    reason="invalid_utf8",
                    detail=f"byte {exc.start} is not valid UTF-8; re-encode the file as UTF-8",
                )
                continue
            try:
                value = json.loads(text)
            except json.JSONDecodeError as exc:
                yield RawRow(where, shown, reason="invalid_json", detail=f"{exc.msg} at column {exc.colno}")
                continue
            if not isinstance(value, dict):
                yield RawRow(
                    where,
                    shown,
                    reason="not_an_object",
                    detail=f"each line must be a JSON object, got {type(value).__name__}",
                )
                continue
            yield RawRow(where, shown, fields=value)


def _read_csv(path: Path) -> Iterator[RawRow]:
    # surrogateescape keeps undecodable bytes visible as lone surrogates, so a bad row is caught
    # and quarantined instead of failing the whole file.
    text = path.read_bytes().decode("utf-8", errors="surrogateescape").removeprefix("\ufeff")
    reader = csv.DictReader(io.StringIO(text, newline=""))
    for row in reader:
        where = f"{path.name}:{reader.line_num}"
        shown = (
            json.dumps(row, ensure_ascii=False, default=str)
            .encode("utf-8", "surrogateescape")
            .decode("utf-8", "backslashreplace")
        )
        if None in row:
            yield RawRow(where, shown, reason="invalid_csv", detail="more cells than header columns")
            continue
        if any(_has_surrogates(v) for v in row.values() if isinstance(v, str)):
            yield RawRow(where, shown, reason="invalid_utf8", detail="a cell is not valid UTF-8; re-encode the file")
            continue
        # An empty cell means "absent", except for the texts, where empty is its own problem.
        fields: dict[str, Any] = {k: v for k, v in row.items() if v != "" or k in ("prompt", "completion")}
        for key in ("messages", "metadata"):
            if isinstance(fields.get(key), str):
                try:
                    fields[key] = json.loads(fields[key])
                except json.JSONDecodeError as exc:
                    yield RawRow(where, shown, reason="invalid_json", detail=f"column '{key}': {exc.msg}")
                    break
        else:
            yield RawRow(where, shown, fields=fields)


def _read_parquet(path: Path) -> Iterator[RawRow]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several types for corrupt files
        raise DataError(f"{path}: not a readable Parquet file ({exc}); re-export it") from exc
    for number, row in enumerate(table.to_pylist(), start=1):
        where = f"{path.name}:row {number}"
        shown = json.dumps(row, ensure_ascii=False, default=repr)
        bad = next((k for k, v in row.items() if isinstance(v, bytes) and not _is_utf8(v)), None)
        if bad is not None:
            yield RawRow(where, shown, reason="invalid_utf8", detail=f"column '{bad}' is not valid UTF-8")
            continue
        yield RawRow(where, shown, fields={k: v.decode() if isinstance(v, bytes) else v for k, v in row.items()})


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _has_surrogates(text: str) -> bool:
    return any("\udc80" <= ch <= "\udcff" for ch in text)


def record_from_fields(fields: dict[str, Any], render_chat: Any = None) -> Record:
    """Check one parsed row against the schema; raise BadRow naming the field and the fix.
    `render_chat(messages) -> (prompt, completion)` renders chat rows (default: the plain format;
    the cycle passes the base model's chat template, `ctloop.model.chat`); a third item, a dict,
    joins the record's metadata (the assistant turns' spans of `train.chat_loss: all_assistant`)."""
    unknown = sorted(set(fields) - KNOWN_FIELDS)
    if unknown:
        raise BadRow("unknown_field", f"unknown field(s) {unknown}; allowed: {sorted(KNOWN_FIELDS)}")
    # Columnar files (CSV, Parquet) give every row every column: null or "" there means "absent".
    rendered: list[Any] = []
    if fields.get("messages") is not None:
        if any(fields.get(name) not in (None, "") for name in ("prompt", "completion")):
            raise BadRow("ambiguous_form", "give either prompt+completion or messages, not both")
        prompt, completion, *rendered = _from_messages(fields["messages"], render_chat)
    else:
        for name in ("prompt", "completion"):
            if name not in fields or fields[name] is None:
                raise BadRow(
                    "missing_field", f"'{name}' is missing; every row needs prompt and completion (or messages)"
                )
            if not isinstance(fields[name], str):
                raise BadRow("wrong_type", f"'{name}' must be a string, got {type(fields[name]).__name__}")
        prompt, completion = fields["prompt"], fields["completion"]
    optional: dict[str, str] = {}
    for name in OPTIONAL_TEXT_FIELDS:
        value = fields.get(name)
        if value is None:
            continue
        if isinstance(value, (datetime.date, datetime.time)):  # native Parquet timestamps
            value = value.isoformat()
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            raise BadRow("wrong_type", f"'{name}' must be a string, got {type(value).__name__}")
        optional[name] = str(value)
    metadata = fields.get("metadata") or {}
    if not isinstance(metadata, dict):
        raise BadRow("wrong_type", f"'metadata' must be an object, got {type(metadata).__name__}")
    if rendered and rendered[0]:
        metadata = {**metadata, **rendered[0]}
    record_id = (
        optional.pop("id", "")
        or "r-" + hashlib.sha256(f"{_norm(prompt)}\x00{_norm(completion)}".encode()).hexdigest()[:16]
    )
    return Record(id=record_id, prompt=prompt, completion=completion, metadata=metadata, **optional)


def _from_messages(messages: Any, render_chat: Any = None) -> tuple[Any, ...]:
    """Render chat turns as the prompt; the last assistant message is the completion."""
    if not isinstance(messages, list) or not messages:
        raise BadRow("invalid_messages", "'messages' must be a non-empty list of {role, content}")
    for message in messages:
        if not (
            isinstance(message, dict)
            and isinstance(message.get("role"), str)
            and isinstance(message.get("content"), str)
        ):
            raise BadRow("invalid_messages", "each message needs a string 'role' and a string 'content'")
    if messages[-1]["role"] != "assistant":
        raise BadRow("invalid_messages", "the last message must have role 'assistant' (the completion to learn)")
    if render_chat is not None:
        return render_chat(messages)
    return chat_prompt(messages[:-1]), " " + messages[-1]["content"]


def chat_prompt(messages: list[dict[str, str]]) -> str:
    """The plain chat format ("role: content" lines, then "assistant:"): the fallback for tokenizers
    without a chat template (`ctloop.model.chat` renders with the template where there is one)."""
    turns = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
    return f"{turns}assistant:"


def fingerprint(records: Iterable[Record]) -> str:
    """Stable content hash of a dataset: independent of row order, sensitive to any field change."""
    digests = sorted(record.digest() for record in records)
    return hashlib.sha256("\n".join(digests).encode()).hexdigest()[:16]


# -- Parquet storage of validated records (training sets, holdouts, the replay buffer) ------------


def write_parquet(path: Path, records: list[Record], extra: dict[str, list[Any]] | None = None) -> None:
    """Write records (plus optional extra columns) atomically: a crash never leaves half a file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns: dict[str, list[Any]] = {
        "id": [r.id for r in records],
        "prompt": [r.prompt for r in records],
        "completion": [r.completion for r in records],
        "source": [r.source for r in records],
        "timestamp": [r.timestamp for r in records],
        "metadata": [json.dumps(r.metadata, sort_keys=True, ensure_ascii=False) for r in records],
    }
    columns.update(extra or {})
    with atomic_path(path) as tmp:
        pq.write_table(pa.table(columns), tmp)


def read_parquet(path: Path) -> tuple[list[Record], dict[str, list[Any]]]:
    """Read records written by `write_parquet`, with their extra columns."""
    import pyarrow.parquet as pq

    table = pq.read_table(path).to_pydict()
    base = ("id", "prompt", "completion", "source", "timestamp", "metadata")
    records = [
        Record(id=i, prompt=p, completion=c, source=s, timestamp=t, metadata=json.loads(m))
        for i, p, c, s, t, m in zip(*(table[name] for name in base), strict=True)
    ]
    return records, {k: v for k, v in table.items() if k not in base}


def read_records(path: str | Path) -> tuple[list[Record], int]:
    """Every schema-valid record of a file, and how many rows were not (for read-only uses such as
    a drift check; the training path validates and quarantines instead)."""
    records: list[Record] = []
    skipped = 0
    for row in read_raw_rows(path):
        try:
            if row.fields is None:
                raise BadRow(row.reason, row.detail)
            records.append(record_from_fields(row.fields))
        except BadRow:
            skipped += 1
    return records, skipped
