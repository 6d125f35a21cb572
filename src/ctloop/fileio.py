"""Files and times, one way each: atomic writes, JSON, and the UTC timestamp format ctloop stores."""

from __future__ import annotations

import calendar
import json
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


def write_json(path: Path, value: Any) -> None:
    write_text(path, json.dumps(value, indent=2, sort_keys=True, default=str) + "\n")


def read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def write_jsonl(path: Path, rows: list[dict]) -> None:
    write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def utc_now() -> str:
    """Now, as ctloop stores times: `2026-11-29T15:43:53Z`."""
    return time.strftime(TIMESTAMP_FORMAT, time.gmtime())


def parse_utc(stamp: str) -> float:
    """Seconds since the epoch of a `utc_now()` string."""
    return calendar.timegm(time.strptime(stamp, TIMESTAMP_FORMAT))
