"""Files and times, one way each: atomic writes, JSON, and the UTC timestamp format ctloop stores."""

from __future__ import annotations

import calendar
import json
import math
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

TIMESTAMP_FORMAT = "%Y-%m-%dT%H:%M:%SZ"


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success it replaces `path` in one rename, so a
    reader (or a resumed run after a kill) sees the old file or the new one, never half of one.
    On an error the temporary file is removed and `path` is left as it was."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp{path.suffix}")
    try:
        yield tmp
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def strict_json(value: Any) -> Any:
    """`value` with every NaN or infinity as None: strict JSON (`null`), which JSON.parse, jq and
    other languages' parsers accept; bare `NaN` they reject. Readers that compute with such a
    number read None back as NaN (`nan_for_none`)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: strict_json(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(item) for item in value]
    return value


def nan_for_none(value: Any) -> Any:
    """The numbers `strict_json` wrote, with None read back as NaN (lists and dicts of them)."""
    if value is None:
        return math.nan
    if isinstance(value, dict):
        return {key: nan_for_none(item) for key, item in value.items()}
    if isinstance(value, list):
        return [nan_for_none(item) for item in value]
    return value


def write_json(path: Path, value: Any) -> None:
    write_text(path, json.dumps(strict_json(value), indent=2, sort_keys=True, default=str, allow_nan=False) + "\n")


def read_json(path: Path) -> Any:
    """The JSON in `path`; a file that is not JSON is a DataError naming it (one line, exit 2)."""
    from ctloop.errors import DataError

    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(
            f"{path} is not valid JSON ({exc}); restore it, or remove it if ctloop may recreate it"
        ) from None


def write_jsonl(path: Path, rows: list[dict]) -> None:
    write_text(path, "".join(json.dumps(strict_json(row), ensure_ascii=False, allow_nan=False) + "\n" for row in rows))


def utc_now() -> str:
    """Now, as ctloop stores times: `2026-11-29T15:43:53Z`."""
    return time.strftime(TIMESTAMP_FORMAT, time.gmtime())


def parse_utc(stamp: str) -> float:
    """Seconds since the epoch of a `utc_now()` string."""
    return calendar.timegm(time.strptime(stamp, TIMESTAMP_FORMAT))


DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_since(value: str, now: float | None = None) -> float:
    """The start of a window, as epoch seconds: a duration back from now (`90m`, `24h`, `7d`) or a
    time as ctloop writes them (`2026-11-29T15:43:53Z`). Raises ValueError naming both forms."""
    import re

    now = time.time() if now is None else now
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*", value)
    if match:
        return now - float(match.group(1)) * DURATION_UNITS[match.group(2)]
    try:
        return parse_utc(value.strip())
    except ValueError:
        raise ValueError(
            f"{value!r} is neither a duration (90m, 24h, 7d) nor a UTC time like 2026-11-29T15:43:53Z"
        ) from None


ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")


def adapter_digest(folder: Path) -> dict[str, str]:
    """sha256 of each adapter file in `folder` (the config and the weights; other files do not count)."""
    import hashlib

    digests = {}
    for name in ADAPTER_FILES:
        path = folder / name
        if path.is_file():
            digest = hashlib.sha256()
            with path.open("rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
            digests[name] = digest.hexdigest()
    return digests
