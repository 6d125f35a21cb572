"""`ctloop harvest`: production's answers and their feedback -> the next cycle's records.

For every request logged in the window, its latest feedback decides (`harvest` settings):

- a correction becomes the completion (reason `correction`);
- an answer rated at least `min_rating` is kept as it was (`rated_up`);
- an answer rated below `rejected_below` without a correction is `rejected`: it joins the rejected
  set (<workspace>/harvest/rejected.jsonl, for review and the gate's rejected-answers rule) and the
  harvest file as a `rated_down` row, which preference objectives learn from and supervised
  training never does;
- a correction's original answer joins the rejected set too (`corrected_original`): it is the
  clearest negative there is, unless the correction only edits it;
- anything else is dropped with its reason (`no_feedback`, `middling_rating`, `empty`,
  `already_harvested`, `duplicate`, `overlaps_eval_set`).

Each row carries its request and feedback ids and its `feedback_kind` (`ctloop.data.preference`); `decisions.jsonl` records why every request
was kept or dropped, and the harvest's manifest (window, counts by reason) travels with the file
into the cycle's lineage. `--format dpo|kto` writes TRL's preference formats instead.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from ctloop.config import CtloopConfig, HarvestConfig
from ctloop.data.preference import CORRECTION, RATED_DOWN, RATED_UP, UNRATED, preference_set
from ctloop.data.records import Record
from ctloop.data.rejected_set import CORRECTED_ORIGINAL, too_old
from ctloop.errors import DataError
from ctloop.fileio import TIMESTAMP_FORMAT, atomic_path, read_json, strict_json, utc_now, write_json
from ctloop.logstore.writer import scrub, stored_id
from ctloop.threads import usable_cpus
from ctloop.workspace import Workspace

Format = Literal["records", "dpo", "kto"]
FEEDBACK_KIND = {"correction": CORRECTION, "rated_up": RATED_UP, "rejected": RATED_DOWN, "unrated": UNRATED}
MANIFEST_SUFFIX = ".manifest.json"
TRAFFIC_SUFFIX = ".traffic.jsonl"


@dataclass(frozen=True)
class Decision:
    request_id: str
    reason: str
    kept: bool
    feedback_id: str | None = None


@dataclass(frozen=True)
class HarvestReport:
    since: str
    until: str
    out_path: str
    counts: dict[str, int]
    kept: int
    rejected: int
    format: str = "records"
    rejected_path: str = ""
    decisions_path: str = ""
    created: str = field(default_factory=utc_now)
    # What this harvest took: committed to the ledger only when a cycle has trained on it
    # (`commit_harvest`), so a harvest whose cycle skips or fails leaves the rows for the next one.
    request_ids: tuple[str, ...] = ()
    content_keys: tuple[str, ...] = ()
    source: str = "ctloop"  # production.source: ctloop (the request log), mlflow (traces) or jsonl
    traffic_sample_path: str = ""  # harvest.audit_rows of the window's requests, rated or not: what traffic is
    traffic_sample_rows: int = 0
    corrected_originals: int = 0  # the answers behind corrections, added to the rejected set
    aged_out: int = 0  # rows dropped from the rejected set: older than eval.rejected_max_age_days

    def summary(self) -> str:
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(self.counts.items()))
        return (
            f"harvested {self.kept} rows to learn from as written and {self.rejected} rated down from production "
            f"feedback between {self.since} and {self.until} ({reasons}) -> {self.out_path}"
        )

    def lineage(self) -> str:
        return f"{self.kept} rows from production feedback ({self.source}) between {self.since} and {self.until}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def decide_rows(
    rows: list[dict[str, Any]], settings: HarvestConfig, seen: set[str], clean: Callable[[str], str] = scrub
) -> list[tuple[Decision, Record | None]]:
    """The decision for each logged request (with its latest `feedback`), and the record to train on
    (kept rows) or to keep as rejected (rejected rows). `seen` holds the content keys of earlier
    harvests and grows with this one. `clean` redacts a text (with `harvest.redact`): `scrub`, or
    the page's texts scrubbed ahead in worker processes (`_Redactor`)."""
    out: list[tuple[Decision, Record | None]] = []
    shared = {rid for rid, n in Counter(row["request_id"] for row in rows).items() if n > 1}
    for row in rows:
        if row["request_id"] in shared:  # a store from before the server generated every id
            out.append((Decision(row["request_id"], "ambiguous_request_id", False), None))
            continue
        feedback = row.get("feedback") or {}
        fid, score, correction = feedback.get("feedback_id"), feedback.get("score"), feedback.get("correction")
        prompt = row.get("prompt") or ""
        if correction:
            reason, completion = "correction", correction
        elif score is not None and score >= settings.min_rating:
            reason, completion = "rated_up", row.get("answer") or ""
        elif score is not None and score < settings.rejected_below:
            reason, completion = "rejected", row.get("answer") or ""
        elif score is None:
            reason, completion = (
                ("unrated", row.get("answer") or "") if settings.include_unrated else ("no_feedback", "")
            )
        else:
            reason, completion = "middling_rating", ""
        kept = reason in ("correction", "rated_up", "unrated", "rejected")
        if kept and not (prompt.strip() and completion.strip()):
            reason, kept = "empty", False
        record = None
        if kept:
            if settings.redact:
                prompt, completion = clean(prompt), clean(completion)
            key = content_key(prompt, completion)
            if key in seen:
                reason, kept = "duplicate", False
            else:
                seen.add(key)
                record = Record(
                    id=f"prod-{row['request_id']}",
                    prompt=prompt,
                    completion=completion,
                    source="production",
                    timestamp=time.strftime(TIMESTAMP_FORMAT, time.gmtime(row["created_at"])),
                    metadata={
                        "request_id": row["request_id"],
                        "feedback_id": fid or "",
                        "harvest_reason": reason,
                        "feedback_kind": FEEDBACK_KIND[reason],
                        **({"rating": float(score)} if score is not None else {}),
                        "model_version": row.get("model_version") or "",
                        **({"user": _clean(str(row["user"]), settings, clean)} if row.get("user") else {}),
                        **({"rejected_answer": _clean(row.get("answer") or "", settings, clean)} if correction else {}),
                    },
                )
        out.append((Decision(row["request_id"], reason, kept and reason != "rejected", fid), record))
    return out


def _clean(text: str, settings: HarvestConfig, clean: Callable[[str], str] = scrub) -> str:
    return clean(text) if settings.redact else text


class _Redactor:
    """Redaction (`scrub`: the patterns and detect-secrets' detectors, about half of a large
    harvest's time) of each page's texts in worker processes, one per usable CPU, from the second
    page on: a harvest of one page never pays for starting them. The workers are forked, and only
    from a process running one thread (a fork copies only the calling thread, so another thread's
    locks could be held forever in the child); elsewhere the page is redacted here. Not spawned:
    a spawned worker imports the caller's main script, and runs it again when it has no main guard."""

    def __init__(self, settings: HarvestConfig, workers: int) -> None:
        self.settings, self.workers, self.pages = settings, workers, 0
        self.pool: Any = None

    def for_page(self, page: list[dict[str, Any]]) -> Callable[[str], str]:
        self.pages += 1
        import threading

        if not self.settings.redact or self.workers < 2 or self.pages < 2:
            return scrub
        if self.pool is None:
            if threading.active_count() > 1 or "fork" not in _start_methods():
                return scrub
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            self.pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("fork"))
        texts = list(dict.fromkeys(text for row in page for text in _redacted_texts(row) if text))
        done = dict(zip(texts, self.pool.map(scrub, texts, chunksize=64), strict=True))
        return lambda text: done[text] if text in done else scrub(text)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()


def _start_methods() -> list[str]:
    import multiprocessing

    return multiprocessing.get_all_start_methods()


def _redacted_texts(row: dict[str, Any]) -> tuple[str, ...]:
    """The texts `decide_rows` may redact in a row: prompt, answer, correction, user."""
    feedback = row.get("feedback") or {}
    return (
        row.get("prompt") or "",
        row.get("answer") or "",
        feedback.get("correction") or "",
        str(row.get("user") or ""),
    )


def content_key(prompt: str, completion: str) -> str:
    normalised = json.dumps([" ".join(prompt.split()).lower(), " ".join(completion.split()).lower()])
    return hashlib.sha256(normalised.encode()).hexdigest()[:24]


def harvest(
    config: CtloopConfig,
    workspace: Workspace,
    since: float,
    until: float | None = None,
    out: Path | None = None,
    fmt: Format = "records",
) -> HarvestReport:
    """Harvest the log store's window [since, until) into `out` (default
    <workspace>/harvest/harvest-<time>.jsonl); rejected answers join <workspace>/harvest/rejected.jsonl.

    Only the requests with feedback leave the database (in pages), and with `harvest.include_unrated`
    the unrated ones in pages after them. Each page is decided and written out before the next is
    read, so memory holds a page and the ids of what was harvested, whatever the window or the
    number of rated rows. What earlier harvests' cycles used is looked up in the ledger table by key."""
    from ctloop.data.sources import open_source
    from ctloop.logstore.requests import LogReader

    until = time.time() if until is None else until
    folder = workspace.root / "harvest"
    stamp = utc_now().replace(":", "")
    out = out or folder / f"harvest-{stamp}.jsonl"
    rejected_path = folder / "rejected.jsonl"
    decisions_path = out.with_name(out.stem + ".decisions.jsonl")
    traffic_path = out.with_name(out.stem + TRAFFIC_SUFFIX)
    known: set[str] = set()  # ids in the rejected set: a harvest repeated before its cycle ran adds nothing twice
    now = time.time()
    golden = _golden_index(config)
    seen: set[str] = set()  # content keys of this harvest
    redactor = _Redactor(config.harvest, usable_cpus())
    counts: Counter[str] = Counter()
    taken: list[str] = []  # request ids kept or rejected: the ledger's, once a cycle trains on them
    taken_keys: set[str] = set()  # and their content keys
    kept = rejected = looked_at = originals = aged_out = 0
    with (
        atomic_path(out) as out_tmp,
        atomic_path(decisions_path) as decisions_tmp,
        atomic_path(rejected_path) as rejected_tmp,
        _spare(out) as rejected_rows_tmp,
        _spare(traffic_path) as traffic_tmp,  # moved into place only when the whole harvest succeeds
    ):
        traffic_rows = 0
        if rejected_path.is_file():
            known, aged_out = _copy_recent(rejected_path, rejected_tmp, config, now)
        # Opened once the rejected set has been read: a corrupt one stops the harvest before them.
        source = open_source(config, workspace)  # production.source: the request log, MLflow traces, JSONL
        reader = LogReader(workspace.shadow_store_url(config.shadow.store_url), redact_pii=config.serve.redact)
        with (
            out_tmp.open("w", encoding="utf-8") as records_file,
            rejected_rows_tmp.open("w", encoding="utf-8") as rated_down_file,
            decisions_tmp.open("w", encoding="utf-8") as decisions_file,
            rejected_tmp.open("a", encoding="utf-8") as rejected_file,
        ):
            try:
                _migrate_json_ledger(folder, reader)  # the ledger lives in the workspace's log store
                window = source.count(since, until)
                unusable = Counter({f"unusable_{reason}": n for reason, n in source.problems.items()})
                pages = [source.rated(since, until)]
                if config.harvest.include_unrated:
                    pages.append(source.unrated(since, until))
                if config.harvest.audit_rows:
                    traffic_rows = _write_traffic_sample(source, since, until, config.harvest, traffic_tmp)
                for rows in pages:
                    for page in rows:
                        looked_at += len(page)
                        page_decisions = _decide_page(page, config.harvest, seen, reader, redactor)
                        decided = _without_eval_overlap(config, golden, page_decisions)
                        for decision, record in decided:
                            counts[decision.reason] += 1
                            decisions_file.write(_line(asdict(decision)))
                            if record is None or not (decision.kept or decision.reason == "rejected"):
                                continue
                            taken.append(decision.request_id)
                            taken_keys.add(content_key(record.prompt, record.completion))
                            if decision.kept:
                                kept += 1
                                _write_export(records_file, record, fmt)
                                original = _corrected_original(record, config.eval.max_overlap)
                                if original is not None and original.id not in known:
                                    if not too_old(original, config.eval, now):
                                        known.add(original.id)
                                        originals += 1
                                        rejected_file.write(_line(_row(original)))
                            else:
                                rejected += 1
                                if fmt != "dpo":
                                    _write_export(rated_down_file, record, fmt)
                                if record.id not in known and not too_old(record, config.eval, now):
                                    known.add(record.id)
                                    rejected_file.write(_line(_row(record)))
            finally:
                redactor.close()
                reader.close()
                source.close()
        with (
            rejected_rows_tmp.open("r", encoding="utf-8") as rated_down,
            out_tmp.open("a", encoding="utf-8") as records,
        ):
            shutil.copyfileobj(rated_down, records)  # kept rows first, then the rated-down ones
        counts += unusable
        if window > looked_at:  # never left the database: counted, not listed
            counts["no_feedback"] += window - looked_at
        report = HarvestReport(
            since=time.strftime(TIMESTAMP_FORMAT, time.gmtime(since)),
            until=time.strftime(TIMESTAMP_FORMAT, time.gmtime(until)),
            out_path=str(out),
            counts=dict(counts),
            kept=kept,
            rejected=rejected,
            format=fmt,
            rejected_path=str(rejected_path),
            decisions_path=str(decisions_path),
            request_ids=tuple(taken),
            content_keys=tuple(sorted(taken_keys)),
            source=source.name,
            traffic_sample_path=str(traffic_path.resolve()) if traffic_rows else "",
            traffic_sample_rows=traffic_rows,
            corrected_originals=originals,
            aged_out=aged_out,
        )
        if traffic_rows:  # a failed harvest leaves no sample behind, as it leaves no records
            traffic_tmp.replace(traffic_path)
        # The manifest first, then the records (each moved into place atomically as the block ends):
        # records never lack their manifest.
        write_json(out.with_name(out.name + MANIFEST_SUFFIX), report.to_dict())
    return report


def _line(row: dict[str, Any]) -> str:
    return json.dumps(strict_json(row), ensure_ascii=False, allow_nan=False) + "\n"


def _write_export(handle: Any, record: Record, fmt: Format) -> None:
    row = _export(record, fmt)
    if row is not None:
        handle.write(_line(row))


@contextmanager
def _spare(path: Path) -> Iterator[Path]:
    """A scratch file next to `path`, removed afterwards."""
    spare = path.with_name(f".{path.name}.{os.getpid()}.rated-down")
    try:
        yield spare
    finally:
        spare.unlink(missing_ok=True)


def _write_traffic_sample(source: Any, since: float, until: float, settings: HarvestConfig, path: Path) -> int:
    """A seeded sample of `harvest.audit_rows` of the window's requests, rated or not, drawn by the
    source (in the database for the request log): their prompts, redacted. The gate weighs the
    new-data rule to traffic with it. Returns how many rows it holds."""
    sample, _ = source.sample(since, until, settings.audit_rows, seed=0)
    rows = []
    for row in sample:
        prompt = _clean(row.get("prompt") or "", settings)
        if prompt.strip():  # the id as the log store keeps it: hashed where it holds personal data
            rows.append(
                {
                    "request_id": stored_id(row["request_id"], settings.redact),
                    "created_at": row["created_at"],
                    "prompt": prompt,
                }
            )
    if rows:  # an empty window leaves no file
        with path.open("w", encoding="utf-8") as handle:
            handle.writelines(_line(row) for row in rows)
    return len(rows)


def read_traffic_sample(path: Path) -> list[Record]:
    """A harvest's traffic sample as records (prompt only), for embedding."""
    with path.open(encoding="utf-8") as handle:
        rows = [json.loads(line) for line in handle if line.strip()]
    return [Record(id=str(row["request_id"]), prompt=row["prompt"], completion="") for row in rows]


def _corrected_original(record: Record, max_overlap: float) -> Record | None:
    """The answer a correction replaced, as a rejected-set row (None for other rows). Not when the
    correction is a small edit of it (at least `max_overlap` of the original's word 3-grams kept,
    `eval.max_overlap`): the cycle trains on the correction, which makes most of such an original
    likelier too, so the rejected-answers rules would fail a healthy candidate on it."""
    from ctloop.data.contamination import text_overlap

    original = record.metadata.get("rejected_answer") or ""
    if record.metadata.get("harvest_reason") != "correction" or not original.strip():
        return None
    if text_overlap(original, record.completion) >= max_overlap:
        return None
    keep = ("request_id", "feedback_id", "model_version", "user")
    metadata = {k: record.metadata[k] for k in keep if k in record.metadata}
    return Record(
        id=f"{record.id}-original",
        prompt=record.prompt,
        completion=original,
        source=record.source,
        timestamp=record.timestamp,
        metadata=metadata | {"harvest_reason": CORRECTED_ORIGINAL, "feedback_kind": RATED_DOWN},
    )


def _copy_recent(path: Path, into: Path, config: CtloopConfig, now: float) -> tuple[set[str], int]:
    """Copy the rejected set, leaving out rows older than eval.rejected_max_age_days; return the
    ids of every row it held (a harvest repeated before its cycle ran adds nothing twice) and how
    many were left out."""
    ids: set[str] = set()
    dropped = 0
    with path.open(encoding="utf-8") as rows, into.open("w", encoding="utf-8") as out:
        for number, line in enumerate(rows, start=1):
            try:
                row = json.loads(line)
                record = Record(id=row["id"], prompt="", completion="", timestamp=row.get("timestamp") or "")
            except (ValueError, KeyError, TypeError):
                raise DataError(f"{path} line {number} is not a valid row; fix or remove that line") from None
            ids.add(record.id)
            if too_old(record, config.eval, now):
                dropped += 1
            else:
                out.write(line if line.endswith("\n") else line + "\n")  # a hand-edited file may lack it
    return ids, dropped


def _decide_page(
    page: list[dict[str, Any]], settings: HarvestConfig, seen: set[str], reader: Any, redactor: _Redactor
) -> list[tuple[Decision, Record | None]]:
    """One page of requests: those whose id a committed harvest used are `already_harvested`; the
    others are decided, and a kept row whose content a committed harvest used is a `duplicate`."""
    if settings.redact:  # an id holding an e-mail address becomes a hash of it (stable, unique)
        page = [{**row, "request_id": stored_id(row["request_id"], True)} for row in page]
    used = reader.ledger_holds([LEDGER_REQUEST + row["request_id"] for row in page])
    fresh = [row for row in page if LEDGER_REQUEST + row["request_id"] not in used]
    out: list[tuple[Decision, Record | None]] = [
        (Decision(row["request_id"], "already_harvested", False), None)
        for row in page
        if LEDGER_REQUEST + row["request_id"] in used
    ]
    decided = decide_rows(fresh, settings, seen, redactor.for_page(fresh))
    keys = {id(r): LEDGER_CONTENT + content_key(r.prompt, r.completion) for _, r in decided if r is not None}
    known = reader.ledger_holds(sorted(set(keys.values())))
    for decision, record in decided:
        if record is not None and keys.get(id(record)) in known:
            out.append((Decision(decision.request_id, "duplicate", False, decision.feedback_id), None))
        else:
            out.append((decision, record))
    return out


LEDGER_REQUEST, LEDGER_CONTENT = "r:", "c:"


def commit_harvest(workspace: Workspace, manifest: dict[str, Any], store_url: str | None = None) -> None:
    """Record a harvest's rows as used (after its cycle finished), so later harvests skip them: its
    request ids and content keys go to the log store's ledger table (idempotent)."""
    from ctloop.logstore.requests import LogReader

    reader = LogReader(workspace.shadow_store_url(store_url))
    try:
        _migrate_json_ledger(workspace.root / "harvest", reader)
        keys = [LEDGER_REQUEST + r for r in manifest.get("request_ids", ())]
        keys += [LEDGER_CONTENT + k for k in manifest.get("content_keys", ())]
        reader.ledger_add(keys, manifest.get("out_path", ""))
    finally:
        reader.close()


def _migrate_json_ledger(folder: Path, reader: Any) -> None:
    """An older ctloop kept the ledger as harvest/ledger.json: move it into the table, once."""
    path = folder / "ledger.json"
    if not path.is_file():
        return
    ledger = read_json(path)
    keys = [LEDGER_REQUEST + r for r in ledger.get("request_ids", [])]
    keys += [LEDGER_CONTENT + k for k in ledger.get("content_keys", [])]
    reader.ledger_add(keys, str(path))
    path.rename(path.with_name("ledger.json.migrated"))


def harvest_manifest(data_path: Path) -> dict[str, Any] | None:
    """The manifest a harvest wrote next to its records file, if `data_path` is one."""
    path = data_path.with_name(data_path.name + MANIFEST_SUFFIX)
    return read_json(path) if path.is_file() else None


def _golden_index(config: CtloopConfig) -> Any:
    """The evaluation sets' (eval.golden) overlap index, built once per harvest; None without any."""
    from ctloop.data.contamination import OverlapIndex
    from ctloop.data.records import read_records

    golden = [record for path in config.eval.golden.values() for record in read_records(path)[0]]
    if not golden or config.eval.contamination == "off":
        return None
    return OverlapIndex(golden, config.eval.ngram)


def _without_eval_overlap(config: CtloopConfig, golden: Any, decided: list[tuple[Decision, Record | None]]):
    """Drop harvested rows that overlap an evaluation set (eval.golden), exactly or nearly."""
    candidates = [record for decision, record in decided if decision.kept and record is not None]
    if golden is None or not candidates:
        return decided
    report = golden.check({"harvest": candidates}, config.eval.max_overlap)
    dirty = set(report["harvest"].dropped_ids)
    return [
        (Decision(d.request_id, "overlaps_eval_set", False, d.feedback_id), None)
        if record is not None and record.id in dirty
        else (d, record)
        for d, record in decided
    ]


def _row(record: Record) -> dict[str, Any]:
    return {
        "id": record.id,
        "prompt": record.prompt,
        "completion": record.completion,
        "source": record.source,
        "timestamp": record.timestamp,
        "metadata": record.metadata,
    }


def _export(record: Record, fmt: Format) -> dict[str, Any] | None:
    """One row in the chosen format: ctloop records (rated-down rows included, marked), TRL's DPO
    (prompt, chosen, rejected: corrected answers only) or TRL's KTO (prompt, completion, label: kept
    answers true, rejected ones false)."""
    if fmt == "records":
        return _row(record)
    if fmt == "dpo":
        pairs = preference_set([record], "dpo").pairs  # none: nothing rejected, or the "correction" repeats it
        return {"prompt": record.prompt, "chosen": pairs[0].chosen, "rejected": pairs[0].rejected} if pairs else None
    reason = record.metadata["harvest_reason"]
    return {"prompt": record.prompt, "completion": record.completion, "label": reason in ("correction", "rated_up")}
