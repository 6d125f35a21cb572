"""The production loop at production volume: harvest, production drift's window read, feedback
import and the retention purge, ctloop against the approach it replaced, side by side in one run.

    OMP_NUM_THREADS=1 python benchmarks/production_scale.py [--rows 100000 1000000] [--store sqlite|postgresql]
    # postgresql: set CTLOOP_TEST_POSTGRES_URL (scripts/with_postgres.sh does)

The store is filled through a bulk path that builds every row with the request log writer's own
row builder (`RequestLog._row`) and inserts 5,000 rows per statement: prompts of 200-2,000
characters, answers, metadata; 90% of the rows in the last 24 h, 1% with feedback. Each measured
operation runs in a fresh Python process, so its peak RSS is its own (`ru_maxrss`; the largest of its
worker processes, the harvest's redaction workers, is `worker_peak_mb`):

- harvest --since 24h: `ctloop.data.harvest.harvest` (rated rows only, in pages; ledger table) vs
  the old approach (every row of the window loaded with its latest feedback, then decided);
- production drift's read of a 24 h window: a seeded sample of drift.max_rows drawn in the store vs
  every row of the window loaded (embedding is left out of both: the old code embedded every row
  of the window, ctloop embeds at most drift.max_rows);
- feedback import of 100k records: chunks of 2,000 per lookup and per transaction vs one lookup
  per record and one transaction at the end (the old loop);
- purge of expired rows (a tenth of the store's size added 35 days old before each run): batches
  of 2,000 vs one DELETE per table, with a writer inserting a row every 10 ms meanwhile; the
  longest wait of that writer is printed.

It prints seconds and peak MB per operation and the ratio old / ctloop.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DAY = 86400.0
WORDS = "package library python perl tool editor audio game graphics driver network server client data".split()


def fill(url: str, rows: int, seed: int = 0) -> None:
    from ctloop.logstore.requests import FeedbackRecord, LogReader, RequestLog, RequestRecord

    rng = random.Random(seed)
    now = time.time()
    writer = RequestLog.__new__(RequestLog)  # the writer's row builder, without its thread
    writer.redact_pii = False
    feedback: list[FeedbackRecord] = []

    def requests():
        for i in range(rows):
            recent = rng.random() < 0.9
            created = now - rng.uniform(0, DAY) if recent else now - rng.uniform(DAY, 29 * DAY)
            prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(30, 300)))[: rng.randint(200, 2000)]
            record = RequestRecord(
                request_id=f"req-{i:09d}",
                model_version="1",
                endpoint="completions",
                prompt=prompt,
                answer=" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 60))),
                prompt_tokens=len(prompt) // 4,
                completion_tokens=20,
                latency_ms=rng.uniform(20, 400),
                user=f"user-{rng.randint(0, 5000)}",
                request_metadata={"team": rng.choice("abc")},
                created_at=created,
            )
            if rng.random() < 0.01:
                rating = rng.choice([1, -1, -1])
                correction = "a better answer " + rng.choice(WORDS) if rating == -1 and rng.random() < 0.5 else None
                feedback.append(
                    FeedbackRecord(record.request_id, rating=rating, correction=correction, created_at=created + 60)
                )
            yield writer._row(record)

    _bulk_insert(url, requests())
    reader = LogReader(url)
    for start in range(0, len(feedback), 5000):
        reader.add_feedback(feedback[start : start + 5000])
    reader.close()


def _bulk_insert(url: str, rows) -> None:
    """Rows into request_log, 5,000 per statement and transaction."""
    from ctloop.logstore.database import open_engine, tables

    engine = open_engine(url)
    request_log = tables()[2]
    batch: list[dict] = []
    for row in rows:
        batch.append(row)
        if len(batch) == 5000:
            with engine.begin() as connection:
                connection.execute(request_log.insert(), batch)
            batch = []
    if batch:
        with engine.begin() as connection:
            connection.execute(request_log.insert(), batch)
    engine.dispose()


# -- the operations, each run in its own process ---------------------------------------------------


def op_harvest_ctloop(url: str, workdir: Path) -> dict:
    from ctloop.config import config_from_dict
    from ctloop.data.harvest import harvest
    from ctloop.workspace import Workspace

    workspace = Workspace(workdir / "ws").create()
    config = config_from_dict(
        {"workspace": str(workspace.root), "model": {"base": "unused"}, "shadow": {"store_url": url}}
    )
    report = harvest(config, workspace, since=time.time() - DAY)
    return {"kept": report.kept, "rejected": report.rejected}


def op_harvest_old(url: str, workdir: Path) -> dict:
    from ctloop.config import HarvestConfig
    from ctloop.data.harvest import decide_rows
    from ctloop.logstore.requests import LogReader

    reader = LogReader(url)
    rows = reader.requests(since=time.time() - DAY)  # the old read: the whole window, with feedback
    reader.close()
    decided = decide_rows(rows, HarvestConfig(), set())
    kept = sum(1 for d, r in decided if d.kept)
    return {"kept": kept, "rejected": sum(1 for d, _ in decided if d.reason == "rejected"), "window": len(rows)}


def op_drift_read_ctloop(url: str, workdir: Path) -> dict:
    from ctloop.logstore.requests import LogReader

    reader = LogReader(url)
    rows, total = reader.sample_requests(time.time() - DAY, time.time(), 5000, seed=0)
    reader.close()
    return {"rows": len(rows), "window": total}


def op_drift_read_old(url: str, workdir: Path) -> dict:
    from ctloop.logstore.requests import LogReader

    reader = LogReader(url)
    rows = reader.requests(since=time.time() - DAY, until=time.time())
    reader.close()
    return {"rows": len(rows), "window": len(rows)}


def _feedback_file(url: str, workdir: Path, n: int) -> Path:
    from sqlalchemy import text

    from ctloop.logstore.database import open_engine

    engine = open_engine(url)
    with engine.connect() as connection:
        ids = list(connection.execute(text(f"SELECT request_id FROM request_log ORDER BY id LIMIT {n}")).scalars())
    engine.dispose()
    path = workdir / "feedback.jsonl"
    path.write_text("".join(json.dumps({"request_id": r, "rating": 1, "comment": "imported"}) + "\n" for r in ids))
    return path


def op_import_ctloop(url: str, workdir: Path) -> dict:
    from ctloop.logstore.feedback_import import import_feedback

    return {"imported": import_feedback(workdir / "feedback.jsonl", url).imported}


def op_import_old(url: str, workdir: Path) -> dict:
    from ctloop.logstore.requests import FeedbackBody, LogReader

    reader = LogReader(url)
    records = []
    for line in (workdir / "feedback.jsonl").read_text().splitlines():  # the old loop: a lookup per record
        body = FeedbackBody.model_validate(json.loads(line))
        found = next((c for c in body.request_id_candidates() if reader.has_request(c)), None)
        if found is not None:
            records.append(body.record(found, source="old"))
    reader.add_feedback(records)  # one transaction at the end
    reader.close()
    return {"imported": len(records)}


def _purge_with_writer(url: str, purge) -> dict:
    import threading

    from ctloop.logstore.database import open_engine, tables

    engine = open_engine(url)
    _, _, request_log, _, _ = tables()
    waits: list[float] = []
    stop = threading.Event()

    def write() -> None:
        i = 0
        while not stop.is_set():
            started = time.perf_counter()
            with engine.begin() as connection:
                connection.execute(
                    request_log.insert(),
                    [
                        {
                            "request_id": f"live-{os.getpid()}-{i}",
                            "created_at": time.time(),
                            "prompt": "p",
                            "answer": "a",
                        }
                    ],
                )
            waits.append(time.perf_counter() - started)
            i += 1
            time.sleep(0.01)

    thread = threading.Thread(target=write)
    thread.start()
    deleted = purge()
    stop.set()
    thread.join()
    engine.dispose()
    return {"deleted": deleted, "writer_max_wait_s": round(max(waits), 3), "writes": len(waits)}


def op_purge_ctloop(url: str, workdir: Path) -> dict:
    from ctloop.logstore.requests import LogReader

    reader = LogReader(url)
    result = _purge_with_writer(url, lambda: sum(reader.purge(time.time() - 30 * DAY).values()))
    reader.close()
    return result


def op_purge_old(url: str, workdir: Path) -> dict:
    from ctloop.logstore.requests import LogReader

    reader = LogReader(url)

    def one_delete() -> int:
        deleted = 0
        with reader.engine.begin() as connection:
            for table in (reader.request_log, reader.feedback, reader.shadow_log):
                deleted += connection.execute(
                    table.delete().where(table.c.created_at < time.time() - 30 * DAY)
                ).rowcount
        return deleted

    result = _purge_with_writer(url, one_delete)
    reader.close()
    return result


OPS = {name.removeprefix("op_"): fn for name, fn in globals().items() if name.startswith("op_")}


def measure(op: str, url: str, workdir: Path) -> dict:
    """Run one operation in a fresh interpreter: its seconds, its peak RSS, and what it returned."""
    code = (
        "import json, resource, sys, time; from pathlib import Path; sys.path.insert(0, 'benchmarks');"
        "import production_scale as b; t = time.perf_counter();"
        f"out = b.OPS[{op!r}]({url!r}, Path({str(workdir)!r}));"
        "out['seconds'] = round(time.perf_counter() - t, 2);"
        "out['peak_mb'] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024);"
        "children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss;"
        "out.update({'worker_peak_mb': round(children / 1024)} if children else {});"
        "print(json.dumps(out))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=os.environ | {"OMP_NUM_THREADS": "1"}
    )
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1][:200] if done.stderr.strip() else "failed"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--store", choices=["sqlite", "postgresql"], default="sqlite")
    parser.add_argument("--import-records", type=int, default=100_000)
    parser.add_argument(
        "--old-window-max-rows",
        type=int,
        default=2_000_000,
        help="above this many rows, the old harvest and drift read (which load the whole window, about 3.5 GB "
        "per million rows) are not run: on this machine they would run out of memory",
    )
    parser.add_argument(
        "--ops", nargs="+", choices=["harvest", "drift_read", "import", "purge"], default=None, help="default: all"
    )
    args = parser.parse_args()
    print(
        f"store: {args.store}; rows: {args.rows}; cpu: {os.cpu_count()} cores; OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}"
    )
    for rows in args.rows:
        with tempfile.TemporaryDirectory(prefix="ctloop-scale-") as tmp:
            workdir = Path(tmp)
            if args.store == "sqlite":
                url = f"sqlite:///{workdir / 'logs.db'}"
            else:
                from sqlalchemy import create_engine, text

                admin_url = os.environ["CTLOOP_TEST_POSTGRES_URL"]
                name = f"scale_{rows}"
                admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
                with admin.connect() as connection:
                    connection.execute(text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                    connection.execute(text(f"CREATE DATABASE {name}"))
                admin.dispose()
                url = admin_url.rsplit("/", 1)[0] + f"/{name}"
            started = time.perf_counter()
            fill(url, rows)
            print(f"\n== {rows:,} rows ({args.store}), filled in {time.perf_counter() - started:.0f} s")
            _feedback_file(url, workdir, min(args.import_records, rows))
            for pair in args.ops or ("harvest", "drift_read", "import", "purge"):
                results = {}
                for who in ("old", "ctloop"):
                    if who == "old" and pair in ("harvest", "drift_read") and rows > args.old_window_max_rows:
                        results[who] = {"skipped": "loads the whole window; over --old-window-max-rows"}
                        continue
                    if pair == "import" and who == "ctloop":
                        _clear_imported(url)
                    if pair == "purge":  # the same expired rows for both: a tenth of the store, 35 days old
                        add_expired(url, rows)
                    results[who] = measure(f"{pair}_{who}", url, workdir)
                old, new = results["old"], results["ctloop"]
                ratio = (
                    f"{old['seconds'] / max(new['seconds'], 0.01):.1f}x time, {old['peak_mb'] / max(new['peak_mb'], 1):.1f}x memory"
                    if "seconds" in old and "seconds" in new
                    else "n/a"
                )
                print(f"{pair:<11} old {old}\n{'':<11} ctloop {new}\n{'':<11} old / ctloop: {ratio}")


def _clear_imported(url: str) -> None:
    from sqlalchemy import text

    from ctloop.logstore.database import open_engine

    engine = open_engine(url)
    with engine.begin() as connection:
        connection.execute(text("DELETE FROM feedback WHERE source = 'old'"))
    engine.dispose()


def add_expired(url: str, rows: int) -> None:
    """Add rows//10 rows past a 30-day retention (the store's own rows are all younger)."""
    old = time.time() - 35 * DAY
    _bulk_insert(
        url,
        (
            {
                "request_id": f"expired-{time.time_ns()}-{i}",
                "created_at": old,
                "prompt": "p" * 500,
                "answer": "a",
                "request_metadata": "{}",
            }
            for i in range(rows // 10)
        ),
    )


if __name__ == "__main__":
    main()
