"""One batched background writer per log table, and redaction before anything is stored.

The request path only puts a row on a bounded queue (never waits on the database); one thread
inserts what is waiting in batches, in one transaction each. A full queue drops and counts. A
database that stays down past the retries does not cost the batch when a spool is configured
(`spool_path`, `spool_bytes`): its rows go to a bounded local file, and are written back first,
in order and in one transaction, once the database takes writes again; only what exceeds the spool
is dropped (counted, logged, on /healthz). `close()` drains the queue, so a clean shutdown
(SIGTERM included) loses no row.
"""

from __future__ import annotations

import hashlib
import json
import logging
import queue
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ctloop.logstore.database import open_engine

log = logging.getLogger(__name__)

# Secrets first (their shapes, after the detectors of detect-secrets and the providers' documented
# token formats), then e-mail addresses, then phone numbers: a Slack token must be one [secret],
# not "xoxb-[phone]-...". Each pattern replaces the secret itself and keeps its label visible.
REDACTIONS = (
    (
        re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----.*?(-----END [A-Z ]*PRIVATE KEY-----|$)", re.DOTALL),
        "[private-key]",
    ),
    (re.compile(r"\b(?:AKIA|ASIA|AGPA|AIDA|AROA|ANPA|ANVA|AIPA)[0-9A-Z]{16}\b"), "[aws-key]"),
    (re.compile(r"\bgh[pousr]_[A-Za-z0-9]{30,}\b|\bgithub_pat_[A-Za-z0-9_]{40,}\b"), "[github-token]"),
    (re.compile(r"\bglpat-[A-Za-z0-9_\-]{20,}\b"), "[gitlab-token]"),
    (re.compile(r"\bxox[abposr]-[A-Za-z0-9-]{10,}\b"), "[slack-token]"),
    (re.compile(r"\b(?:sk|rk|pk)_(?:live|test)_[A-Za-z0-9]{16,}\b"), "[stripe-key]"),
    (re.compile(r"\bAIza[0-9A-Za-z_\-]{35}\b"), "[google-key]"),
    (re.compile(r"\bSG\.[A-Za-z0-9_\-]{16,}\.[A-Za-z0-9_\-]{16,}\b"), "[sendgrid-key]"),
    (re.compile(r"\bnpm_[A-Za-z0-9]{36}\b"), "[npm-token]"),
    (re.compile(r"\beyJ[A-Za-z0-9_\-]{8,}\.eyJ[A-Za-z0-9_\-]{8,}\.[A-Za-z0-9_\-]{8,}"), "[jwt]"),
    (re.compile(r"(?i)\b(bearer|basic)\s+[A-Za-z0-9._~+/\-]{16,}=*"), r"\1 [token]"),
    (re.compile(r"(?i)(://[^\s:/@]+:)[^\s@/]+(@)"), r"\1[password]\2"),
    (
        re.compile(
            r"(?i)\b((?:api[ _-]?key|apikey|secret|client[_-]?secret|access[_-]?token|auth[_-]?token|token|password|passwd|pwd)"
            r"[\"']?\s*[:=]\s*[\"']?)([^\s\"',;]{6,})"
        ),
        r"\1[secret]",
    ),
    (re.compile(r"\b(sk|pk|api|key|token)[-_][A-Za-z0-9_-]{12,}\b", re.IGNORECASE), "[key]"),
    # Bounded and anchored: an unbounded `[\w.+-]+@...` rescans to the end from every position (quadratic).
    (re.compile(r"(?<![\w.+-])[\w.+-]{1,64}@[\w-]{1,63}(?:\.[\w-]{1,63})+"), "[email]"),
    # A phone number has 9 or more digits; dates (2023-05-22) and version numbers do not.
    (re.compile(r"(?<!\w)\+?\d[\d ().-]{7,}\d(?!\w)"), lambda m: "[phone]" if _digits(m.group()) >= 9 else m.group()),
)


def _digits(text: str) -> int:
    return sum(c.isdigit() for c in text)


# "my password is hunter22", "the API key was 9f8e...": a secret named in words, not in key: value form.
SPOKEN_SECRET = re.compile(
    r"(?i)\b((?:password|passphrase|passwd|pwd|api[ _-]?key|secret key|access key|token)\s+(?:is|was|:)\s+[\"']?)"
    r"([^\s\"',;]{6,})"
)


def redact(text: str) -> str:
    """Replace secrets, e-mail addresses and phone numbers in `text`."""
    for pattern, replacement in REDACTIONS:
        if replacement == "[email]" and "@" not in text:
            continue
        text = pattern.sub(replacement, text)
    return text


def scrub(text: str) -> str:
    """`redact`, then what detect-secrets' detectors find (its keyword detector for `"password":
    "..."` in JSON-like text, Azure storage keys, Slack webhooks, and its token detectors), and
    secrets named in words ("my password is ..."). For text that becomes training data (the
    harvest): slower than `redact`, which the request path uses."""
    text = SPOKEN_SECRET.sub(r"\1[secret]", redact(text))
    found: set[str] = set()
    detectors = _secret_detectors()
    for line in set(text.splitlines()):
        lowered = line.casefold()  # as re.IGNORECASE matches: "ſ" is an "s" to the detector too
        for detector, needs in detectors:
            if needs is not None and not any(stem in lowered for stem in needs):
                continue  # none of the words this detector's patterns all contain: it cannot fire
            found.update(s.secret_value for s in detector.analyze_line(filename="text", line=line) if s.secret_value)
    for secret in sorted(found, key=len, reverse=True):  # the longest first: a key inside a URL goes whole
        if len(secret) >= 6:
            text = text.replace(secret, "[secret]")
    return text


_DETECTORS: list[tuple[Any, tuple[str, ...] | None]] = []
KEYWORD_STEMS = ("key", "pass", "pwd", "secret", "contrase")  # each of the keyword detector's keywords has one


def _secret_detectors() -> list[tuple[Any, tuple[str, ...] | None]]:
    """detect-secrets' line detectors, once per process, each with the words a line must hold for it
    to fire, or None. Its entropy detectors (quoted strings only, and noisy on prose) and public-IP
    detector are left out. The keyword detector's patterns all contain one of its keywords
    (`DENYLIST`: password, secret, api_key, ...), each holding one of KEYWORD_STEMS, so a line
    without any stem is skipped: that detector cost more than every other together (the harvest of
    a 10M-row log spent most of its time there). Should a later detect-secrets add a keyword
    without one of the stems, the detector runs on every line again."""
    if not _DETECTORS:
        from detect_secrets.core.plugins.util import get_mapping_from_secret_type_to_class
        from detect_secrets.plugins.keyword import DENYLIST, KeywordDetector

        covered = all(any(stem in keyword for stem in KEYWORD_STEMS) for keyword in DENYLIST)
        keywords = KEYWORD_STEMS if covered else None
        skip = {"Base64HighEntropyString", "HexHighEntropyString", "IPPublicDetector"}
        plugins: list[Any] = list(get_mapping_from_secret_type_to_class().values())
        _DETECTORS.extend(
            (plugin(), keywords if plugin is KeywordDetector else None)
            for plugin in plugins
            if plugin.__name__ not in skip
        )
    return _DETECTORS


SQLITE_MAGIC = b"SQLite format 3\x00"


def store_file_problem(url: str) -> str:
    """'' when the store's file is sound; else what is wrong. A SQLite file truncated or replaced
    under a running server goes on accepting writes into its WAL (the rows are lost at the next
    checkpoint), so each write checks the file's header. Other databases: ''."""
    if not url.startswith("sqlite:///"):
        return ""
    path = url.removeprefix("sqlite:///")
    try:
        with open(path, "rb") as handle:
            head = handle.read(len(SQLITE_MAGIC))
    except OSError as exc:
        return f"the log store file {path} cannot be read ({exc.__class__.__name__}); restore it and restart the server"
    if head != SQLITE_MAGIC:
        return (
            f"the log store file {path} is no longer a SQLite database (truncated or replaced while the server ran); "
            f"rows written since are lost: restore the file (or point shadow.store_url elsewhere) and restart"
        )
    return ""


def clean_text(value: str, redact_pii: bool, max_chars: int | None = None) -> str:
    """What a text field becomes in the store: valid UTF-8 (no lone surrogates), no NUL (PostgreSQL
    refuses both, which would cost the whole batch), redacted when asked, and cut to its column."""
    value = value.encode("utf-8", "replace").decode("utf-8").replace("\x00", "")
    value = redact(value) if redact_pii else value
    return value[:max_chars] if max_chars is not None else value


def stored_id(request_id: str, redact_pii: bool) -> str:
    """A request id as the log store keeps it: as given, unless redaction would change it (an id
    holding an e-mail address, a phone-like number): then a hash of it, which is unique, stable
    (feedback finds its request) and reveals nothing. Never longer than its column."""
    cleaned = clean_text(request_id, redact_pii)
    if cleaned == request_id and len(request_id) <= ID_CHARS:
        return request_id
    return "rid-" + hashlib.sha256(request_id.encode("utf-8", "replace")).hexdigest()[:40]


ID_CHARS = 128


class BatchedWriter:
    """Rows for one table of the log store, written in batches by a background thread."""

    def __init__(
        self,
        url: str,
        table_name: str,
        to_row: Callable[[Any], dict[str, Any]],
        batch_size: int = 200,
        queue_size: int = 10_000,
        flush_seconds: float = 0.2,
        spool_path: Path | None = None,
        spool_bytes: int = 0,
    ):
        from sqlalchemy import MetaData, Table

        self.url = url
        self.engine = open_engine(url)
        self.table = Table(table_name, MetaData(), autoload_with=self.engine)
        self.to_row = to_row
        self.batch_size = batch_size
        self.flush_seconds = flush_seconds
        self.queue: queue.Queue[Any] = queue.Queue(maxsize=queue_size)
        self.written = 0
        self.dropped = 0
        self.last_error = ""  # the last failure; cleared once a batch is written again
        self.write_errors = 0
        self.failing = 0  # batches that failed since the last one written: 0 is healthy
        self.spool_path = spool_path if spool_bytes > 0 else None
        self.spool_bytes = spool_bytes
        self.spooled = 0  # rows set aside in the spool while the database was down (replayed since, or waiting)
        self._closing = False
        self._writer = threading.Thread(target=self._run, name=f"ctloop-{table_name}-writer", daemon=True)
        self._writer.start()

    def put(self, record: Any) -> bool:
        """Queue a row for the writer; False (and counted) when the queue is full."""
        try:
            self.queue.put_nowait(record)
            return True
        except queue.Full:
            self.dropped += 1
            return False

    def _run(self) -> None:
        batch: list[Any] = []
        stopping = False
        retried = time.monotonic()
        while not stopping:
            try:
                item = self.queue.get(timeout=self.flush_seconds)
                if item is None:
                    stopping = True
                else:
                    batch.append(item)
                    while len(batch) < self.batch_size:  # take what is already waiting
                        item = self.queue.get_nowait()
                        if item is None:
                            stopping = True
                            break
                        batch.append(item)
            except queue.Empty:
                if self._spool_waiting() and time.monotonic() - retried > 2.0:  # idle: try the spool again
                    retried = time.monotonic()
                    self._guarded(self._replay_spool)
            if batch:
                self._guarded(self._insert, batch)
                batch = []
        if self._spool_waiting():
            self._guarded(self._replay_spool)  # one last try; what stays is written back by the next start

    def _guarded(self, step: Callable[..., Any], *args: Any) -> None:
        """Run one step of the writer thread; whatever it raises (a full disk, a bug) is counted and
        logged, and the thread goes on: a dead writer would leave every later row queued unseen."""
        try:
            step(*args)
        except Exception as exc:  # noqa: BLE001 - the thread must survive anything one batch does
            self.write_errors += 1
            self.failing += 1
            self.last_error = f"{exc.__class__.__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:500]
            log.exception("the %s writer's step failed", self.table.name)

    def _insert(self, batch: list[Any], attempts: int = 3) -> None:
        try:
            rows = [self.to_row(record) for record in batch]
        except Exception as exc:  # noqa: BLE001 - a row that cannot be built costs its batch, never the thread
            self._drop(len(batch), f"{exc.__class__.__name__}: {exc}")
            return
        if self._spool_waiting() and not self._replay_spool():
            self._spool(rows)  # the spool's rows go first: this batch waits behind them, in order
            return
        self._write(rows, attempts)

    def _write(self, rows: list[dict[str, Any]], attempts: int) -> None:
        from sqlalchemy.exc import DataError, IntegrityError, SQLAlchemyError

        for attempt in range(attempts):
            try:
                with self.engine.begin() as connection:
                    connection.execute(self.table.insert(), rows)
                broken = store_file_problem(self.url)
                if broken:  # the insert "worked" on a file that is gone: those rows are not kept
                    self.write_errors += 1
                    self.failing += 1
                    self._drop(len(rows), broken)
                    return
                self.written += len(rows)
                self.failing, self.last_error = 0, ""
                return
            except (DataError, IntegrityError) as exc:  # a bad row: the rest of the batch still goes in
                self.last_error = f"{exc.__class__.__name__}: {str(exc).splitlines()[0]}"
                self._insert_one_by_one(rows)
                return
            except Exception as exc:  # noqa: BLE001 - the database is down or locked: retry, then drop
                if not isinstance(exc, SQLAlchemyError | UnicodeError):
                    log.exception("unexpected error writing %s rows", self.table.name)
                self.write_errors += 1
                self.failing += 1
                self.last_error = f"{exc.__class__.__name__}: {str(exc).splitlines()[0]}"
                log.warning(
                    "writing %d %s rows failed (attempt %d of %d): %s",
                    len(rows),
                    self.table.name,
                    attempt + 1,
                    attempts,
                    self.last_error,
                )
                time.sleep(0.5 * 2**attempt)
        if self.spool_path is not None:
            self._spool(rows)
        else:
            self._drop(len(rows), self.last_error)

    # -- the spool: rows kept on local disk while the database is down ----------------------------

    def _spool_waiting(self) -> bool:
        return self.spool_path is not None and self.spool_path.is_file() and self.spool_path.stat().st_size > 0

    def _spool(self, rows: list[dict[str, Any]]) -> None:
        """Append rows to the spool file, as far as `spool_bytes` allows; drop (and count) the rest."""
        assert self.spool_path is not None
        self.spool_path.parent.mkdir(parents=True, exist_ok=True)
        size = self.spool_path.stat().st_size if self.spool_path.is_file() else 0
        lines = [json.dumps(row, ensure_ascii=False, default=str) + "\n" for row in rows]
        kept = 0
        with self.spool_path.open("a", encoding="utf-8") as handle:
            for line in lines:
                if size + len(line.encode()) > self.spool_bytes:
                    break
                handle.write(line)
                size += len(line.encode())
                kept += 1
        self.spooled += kept
        if kept < len(rows):
            self._drop(
                len(rows) - kept, f"the spool is full (serve.log_spool_bytes={self.spool_bytes}); {self.last_error}"
            )
        else:
            log.warning("the database is down: %d %s rows spooled to %s", kept, self.table.name, self.spool_path)

    def _replay_spool(self) -> bool:
        """Write the spooled rows back, in order, in one transaction (all or none: never twice);
        True when the spool is empty afterwards."""
        from sqlalchemy.exc import IntegrityError

        assert self.spool_path is not None
        rows = []
        for line in self.spool_path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                rows.append(json.loads(line))
            except ValueError:  # a line cut short by a crash while spooling: that row is lost, counted
                self._drop(1, f"an unreadable line in the spool {self.spool_path}")
        try:
            with self.engine.begin() as connection:
                connection.execute(self.table.insert(), rows)
            self.written += len(rows)
        except IntegrityError:
            # A row already in the store (its commit went through, its answer was lost): write the
            # rest one by one, so one duplicate never blocks the spool.
            self._insert_one_by_one(rows)
        except Exception as exc:  # noqa: BLE001 - still down: the rows stay spooled
            self.failing += 1
            self.last_error = f"{exc.__class__.__name__}: {str(exc).splitlines()[0]}"
            return False
        self.failing, self.last_error = 0, ""
        self.spool_path.unlink()
        log.info("%d spooled %s rows written back", len(rows), self.table.name)
        return True

    def _insert_one_by_one(self, rows: list[dict[str, Any]]) -> None:
        for row in rows:
            try:
                with self.engine.begin() as connection:
                    connection.execute(self.table.insert(), [row])
                self.written += 1
            except Exception as exc:  # noqa: BLE001 - this row alone is lost, counted and logged
                self.write_errors += 1
                self._drop(1, f"{exc.__class__.__name__}: {str(exc).splitlines()[0]}")

    def _drop(self, n: int, reason: str) -> None:
        self.dropped += n
        self.last_error = reason[:500]
        log.error("dropped %d %s rows: %s", n, self.table.name, self.last_error)

    def health(self) -> dict[str, Any]:
        """For /healthz: healthy unless the last batches failed; the queue's depth; the last error."""
        return {
            "ok": self.failing == 0 and (self._writer.is_alive() or self._closing),
            "queued": self.queue.qsize(),
            "written": self.written,
            "dropped": self.dropped,
            "spooled": self.spooled,
            "spool_bytes": self.spool_path.stat().st_size if self._spool_waiting() and self.spool_path else 0,
            "last_error": self.last_error,
        }

    def close(self, timeout: float = 30.0) -> None:
        """Stop after writing every queued row."""
        self._closing = True
        try:
            self.queue.put(None, timeout=timeout)
        except queue.Full:
            raise TimeoutError(f"the {self.table.name} writer is not draining its queue; rows still queued") from None
        self._writer.join(timeout)
        if self._writer.is_alive():
            raise TimeoutError(
                f"the {self.table.name} writer did not finish within {timeout} s; "
                f"{self.queue.qsize()} rows still queued"
            )
        self.engine.dispose()
