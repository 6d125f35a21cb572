"""The request log and feedback: the store on real SQLite and PostgreSQL, and the HTTP API of
`ctloop serve` in front of a real OpenAI-compatible upstream (an instant one, so thousands of
requests take seconds, not the tiny model's minutes)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from conftest import free_port
from ctloop.logstore.requests import FeedbackRecord, LogReader, RequestLog, RequestRecord
from ctloop.serving.server import create_app, serve_in_background
from ctloop.training.tinymodel import random_adapter
from ctloop.workspace import Workspace
from shadow_helpers import echo_upstream, register_versions, serving_config

TOKEN = "feedback-s3cret"


def _request(i: int, **fields) -> RequestRecord:
    return RequestRecord(
        request_id=f"r{i}", model_version="1", endpoint="completions", prompt=f"p{i}", answer=f"a{i}", **fields
    )


def test_requests_join_their_latest_feedback_and_retention_purges(log_store_url):
    writer = RequestLog(log_store_url)
    for i in range(3):
        writer.put(_request(i, user="u", request_metadata={"team": "x"}, created_at=1000.0 + i))
    writer.close()
    reader = LogReader(log_store_url)
    first = FeedbackRecord("r1", rating=-1, created_at=2000.0)
    second = FeedbackRecord("r1", rating=1, correction="better", created_at=2001.0)
    assert reader.add_feedback([first, second]) == 2
    rows = reader.requests()
    assert [r["request_id"] for r in rows] == ["r0", "r1", "r2"]
    assert rows[0]["feedback"] is None and rows[0]["request_metadata"] == {"team": "x"}
    assert rows[1]["feedback"]["correction"] == "better" and rows[1]["feedback"]["score"] == 1.0  # superseded
    assert reader.counts()["feedback"] == 2  # and both are kept
    assert [r["request_id"] for r in reader.requests(since=1001.0, until=1002.0)] == ["r1"]
    deleted = reader.purge(older_than=1001.5)
    assert deleted["request_log"] == 2 and deleted["feedback"] == 0
    assert [r["request_id"] for r in reader.requests()] == ["r2"]
    reader.close()


def test_a_thumbs_down_is_score_zero_and_redaction_keeps_ids_joinable(log_store_url):
    writer = RequestLog(log_store_url, redact_pii=True)
    writer.put(
        RequestRecord(
            request_id="id-of-jane@example.com",
            model_version="1",
            endpoint="completions",
            prompt="mail jane@example.com",
            answer="a",
            user="jane@example.com",
        )
    )
    writer.close()
    reader = LogReader(log_store_url, redact_pii=True)
    assert reader.has_request("id-of-jane@example.com")
    reader.add_feedback([FeedbackRecord("id-of-jane@example.com", rating=-1, comment="call +1 415 555 0100")])
    row = reader.requests()[0]
    assert "example.com" not in row["request_id"] and row["feedback"]["score"] == 0.0
    assert "555" not in row["feedback"]["comment"]
    reader.close()


@pytest.fixture(scope="module")
def adapters(tiny_base, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return [random_adapter(tiny_base, root / f"a{seed}", seed) for seed in (1, 2)]


@pytest.fixture()
def upstream():
    with serve_in_background(echo_upstream(["srv-v1", "srv-v2"])) as url:
        yield url


def _config(tiny_base, tmp_path, upstream: str, log_store_url: str | None = None, **serve):
    return serving_config(
        tiny_base,
        tmp_path / "ws",
        serve={"backend": "openai", "upstream_url": f"{upstream}/v1", **serve},
        shadow={"store_url": log_store_url, "enabled": False},
    )


def test_answers_are_logged_with_their_id_user_and_metadata(tiny_base, adapters, tmp_path, upstream, monkeypatch):
    config = _config(tiny_base, tmp_path, upstream)
    register_versions(config, adapters)
    with serve_in_background(create_app(config, Workspace(config.workspace))) as url:
        given = httpx.post(
            f"{url}/v1/completions",
            headers={"x-request-id": "client-7"},
            timeout=30,
            json={"model": "srv", "prompt": "hello world", "user": "u1", "metadata": {"team": "a"}},
        )
        fresh = httpx.post(
            f"{url}/v1/chat/completions",
            timeout=30,
            json={"model": "srv-v2", "messages": [{"role": "user", "content": "hi there"}]},
        )
        sampled_off = fresh.headers["x-request-id"]
    # #24 item 2: the server names every request; the client's X-Request-Id is kept beside it.
    server_id = given.headers["x-request-id"]
    assert server_id != "client-7" and given.headers["x-client-request-id"] == "client-7"
    assert given.json()["id"] == f"cmpl-{server_id}" and "x-client-request-id" not in fresh.headers
    assert fresh.json()["id"] == f"chatcmpl-{sampled_off}"
    reader = LogReader(Workspace(config.workspace).shadow_store_url())
    rows = {r["request_id"]: r for r in reader.requests()}
    assert rows[server_id]["answer"] == " dlrow" and rows[server_id]["user"] == "u1"
    assert rows[server_id]["client_request_id"] == "client-7" and rows[sampled_off]["client_request_id"] is None
    assert rows[server_id]["request_metadata"] == {"team": "a"} and rows[server_id]["model_version"] == "1"
    chat = rows[sampled_off]
    assert chat["messages"] == [{"role": "user", "content": "hi there"}] and chat["explicit_version"]
    assert chat["model_version"] == "2" and chat["prompt_tokens"] > 0 and chat["latency_ms"] > 0
    reader.close()


def test_feedback_api_authorises_validates_and_supersedes(tiny_base, adapters, tmp_path, upstream, monkeypatch):
    config = _config(tiny_base, tmp_path, upstream, max_correction_chars=100)
    register_versions(config, adapters)
    auth = {"authorization": f"Bearer {TOKEN}"}
    with serve_in_background(create_app(config, Workspace(config.workspace))) as url:
        rid = httpx.post(f"{url}/v1/completions", json={"model": "srv", "prompt": "x y"}, timeout=30).headers[
            "x-request-id"
        ]

        def post(body, headers=auth, raw: bytes | None = None):
            return httpx.post(
                f"{url}/v1/feedback",
                headers=headers,
                timeout=30,
                **({"content": raw} if raw is not None else {"json": body}),
            )

        assert post({"request_id": rid, "rating": 1}).status_code == 403  # no token configured: disabled
        monkeypatch.setenv("CTLOOP_FEEDBACK_TOKEN", TOKEN)
        assert post({"request_id": rid, "rating": 1}, headers={"authorization": "Bearer nope"}).status_code == 401
        refused = {
            "unknown id": (post({"request_id": "never-served", "rating": 1}), 404, "never-served"),
            "rating 2": (post({"request_id": rid, "rating": 2}), 400, "rating"),
            "rating true": (post({"request_id": rid, "rating": True}), 400, "rating"),
            "no content": (post({"request_id": rid}), 400, "rating, a correction"),
            "extra field": (post({"request_id": rid, "rating": 1, "stars": 5}), 400, "stars"),
            "not json": (post(None, raw=b"{oops"), 400, "not valid JSON"),
            "oversize": (post({"request_id": rid, "correction": "x" * 101}), 413, "max_correction_chars"),
        }
        for name, (response, status, needle) in refused.items():
            assert response.status_code == status, name
            error = response.json()["error"]
            assert needle in error["message"] and set(error) == {"message", "type", "param", "code"}, name
        first = post({"request_id": rid, "rating": -1, "comment": "wrong"})
        second = post({"request_id": f"cmpl-{rid}", "rating": 1, "correction": "the right answer", "user": "qa"})
        assert first.status_code == second.status_code == 201
        assert second.json()["object"] == "feedback" and second.json()["request_id"] == rid
        metrics = httpx.get(f"{url}/metrics").text
    assert 'ctloop_feedback_total{kind="rating"} 2.0' in metrics
    assert 'ctloop_feedback_total{kind="correction"} 1.0' in metrics
    reader = LogReader(Workspace(config.workspace).shadow_store_url())
    assert reader.counts()["feedback"] == 2  # nothing the refused posts sent was stored
    latest = reader.requests()[0]["feedback"]
    assert latest["correction"] == "the right answer" and latest["user"] == "qa"
    reader.close()


@pytest.mark.slow
def test_ten_thousand_requests_and_two_thousand_feedbacks_survive_a_sigterm(
    tiny_base, adapters, tmp_path, upstream, log_store_url
):
    config = _config(tiny_base, tmp_path, upstream, log_store_url)
    register_versions(config, adapters)
    raw = {
        "workspace": str(config.workspace),
        "model": {"base": str(tiny_base)},
        "registry": config.registry.model_dump(mode="json"),
        "serve": {**config.serve.model_dump(mode="json"), "port": 0},
        "shadow": {"store_url": log_store_url, "enabled": False},
    }
    (tmp_path / "serve.yaml").write_text(yaml.safe_dump(raw))
    port = free_port()
    env = {**os.environ, "CTLOOP_FEEDBACK_TOKEN": TOKEN, "OMP_NUM_THREADS": "1"}
    server = subprocess.Popen(
        [sys.executable, "-m", "ctloop", "serve", "--config", str(tmp_path / "serve.yaml"), "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_until_healthy(url, server)
        ok = asyncio.run(_load(url, requests=10_000, feedbacks=2_000))
    finally:
        server.send_signal(signal.SIGTERM)
        _, stderr = server.communicate(timeout=120)
    # uvicorn finishes its graceful shutdown, then re-raises SIGTERM (exit -15) as a signal-killed process would
    assert server.returncode in (0, -signal.SIGTERM) and "Application shutdown complete" in stderr, stderr[-2000:]
    assert ok == {"requests": 10_000, "feedback": 2_000}
    reader = LogReader(log_store_url)
    rows = reader.requests()
    assert len(rows) == 10_000 and len({r["request_id"] for r in rows}) == 10_000  # every request logged once
    rated = [r for r in rows if r["feedback"] is not None]
    assert len(rated) == 2_000 and all(r["feedback"]["correction"] == f"fixed {r['request_id']}" for r in rated)
    assert reader.counts()["feedback"] == 2_000
    reader.close()


def _wait_until_healthy(url: str, server: subprocess.Popen) -> None:
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        assert server.poll() is None, server.stderr.read()[-2000:]
        try:
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    pytest.fail("ctloop serve did not become healthy")


async def _load(url: str, requests: int, feedbacks: int) -> dict[str, int]:
    """Requests from 32 concurrent clients, then feedback on every fifth one; counts of 200/201 answers."""
    ok = {"requests": 0, "feedback": 0}
    ids = [f"load-{i}" for i in range(requests)]
    server_ids: dict[str, str] = {}  # the client's X-Request-Id -> the id the server gave the request
    limits = httpx.Limits(max_connections=32)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
        semaphore = asyncio.Semaphore(32)

        async def ask(rid: str) -> None:
            async with semaphore:
                response = await client.post(
                    "/v1/completions",
                    headers={"x-request-id": rid},
                    json={"model": "srv", "prompt": f"question {rid}", "max_tokens": 4},
                )
                ok["requests"] += response.status_code == 200
                server_ids[rid] = response.headers["x-request-id"]

        async def rate(rid: str) -> None:
            async with semaphore:
                response = await client.post(
                    "/v1/feedback",
                    headers={"authorization": f"Bearer {TOKEN}"},
                    json={"request_id": rid, "rating": -1, "correction": f"fixed {rid}"},
                )
                ok["feedback"] += response.status_code == 201

        await asyncio.gather(*(ask(rid) for rid in ids))
        await asyncio.gather(*(rate(server_ids[rid]) for rid in ids[:: requests // feedbacks]))
    return ok


def test_feedback_import_takes_jsonl_and_csv_and_reports_what_it_refused(tiny_base, tmp_path):
    url = f"sqlite:///{tmp_path / 'logs.db'}"
    writer = RequestLog(url)
    for i in range(3):
        writer.put(_request(i))
    writer.close()
    jsonl = tmp_path / "fb.jsonl"
    jsonl.write_text(
        "\n".join(
            json.dumps(r)
            for r in [
                {"request_id": "r0", "rating": 1},
                {"request_id": "r1", "rating": -1, "correction": "c1"},
                {"request_id": "zz", "rating": 1},
                {"request_id": "r2", "rating": 7},
            ]
        )
        + "\n{broken\n"
    )
    csv = tmp_path / "fb.csv"
    csv.write_text("request_id,rating,correction,comment,user\nr2,0.5,,ok,qa\n")
    from ctloop.logstore.feedback_import import import_feedback

    report = import_feedback(jsonl, url)
    assert report.imported == 2 and report.refused == {"unknown request id": 1, "invalid": 2}
    assert import_feedback(csv, url).imported == 1
    reader = LogReader(url)
    scores = {r["request_id"]: r["feedback"]["score"] for r in reader.requests() if r["feedback"]}
    assert scores == {"r0": 1.0, "r1": 0.0, "r2": 0.5}
    assert {f["source"] for f in reader.latest_feedback().values()} == {str(jsonl), str(csv)}
    reader.close()


def test_a_client_cannot_point_feedback_at_another_clients_answer(tiny_base, adapters, tmp_path, upstream, monkeypatch):
    """#24 item 2, the probe's hijack replayed: the attacker sends the victim's X-Request-Id, the
    prefixed `cmpl-<victim id>`, and a duplicate; the victim's correction, sent with its response id
    as the README shows, must stay with the victim's prompt, and ids the client chose name nothing."""
    from ctloop.data.harvest import harvest

    monkeypatch.setenv("CTLOOP_FEEDBACK_TOKEN", TOKEN)
    config = _config(tiny_base, tmp_path, upstream)
    register_versions(config, adapters)
    auth = {"authorization": f"Bearer {TOKEN}"}
    with serve_in_background(create_app(config, Workspace(config.workspace))) as url:

        def ask(prompt: str, client_id: str) -> httpx.Response:
            body = {"model": "srv", "prompt": prompt}
            return httpx.post(f"{url}/v1/completions", json=body, headers={"x-request-id": client_id}, timeout=30)

        victim = ask("victim-pkg describe", "victim-8584b7")
        attacks = [ask("attacker-pkg one", "victim-8584b7"), ask("attacker-pkg two", "cmpl-victim-8584b7")]
        attacks.append(ask("attacker-pkg three", victim.json()["id"]))  # even the victim's response id
        ids = {r.headers["x-request-id"] for r in [victim, *attacks]}
        assert len(ids) == 4  # four requests, four ids: a chosen id is never the stored one

        def feedback(request_id: str, correction: str) -> httpx.Response:
            body = {"request_id": request_id, "rating": -1, "correction": correction}
            return httpx.post(f"{url}/v1/feedback", json=body, headers=auth, timeout=30)

        for chosen in ("victim-8584b7", "cmpl-victim-8584b7"):
            assert feedback(chosen, "THE ATTACKER'S CORRECTION").status_code == 404
        landed = feedback(victim.json()["id"], "THE CORRECTION FOR THE VICTIM ONLY")
        assert landed.status_code == 201 and landed.json()["request_id"] == victim.headers["x-request-id"]
    report = harvest(config, Workspace(config.workspace), since=time.time() - 3600)
    records = [json.loads(line) for line in Path(report.out_path).read_text().splitlines()]
    corrected = [r for r in records if r["completion"] == "THE CORRECTION FOR THE VICTIM ONLY"]
    assert len(corrected) == 1 and corrected[0]["prompt"] == "victim-pkg describe"
    assert not any("ATTACKER" in r["completion"] for r in records)


def test_request_ids_are_unique_and_an_older_store_with_duplicates_is_refused_not_merged(tmp_path):
    """The store refuses a second row under an id; a store written before ids were the server's may
    hold duplicates: it opens, and feedback import and the harvest refuse those ids."""
    import sqlite3

    from ctloop.config import HarvestConfig
    from ctloop.data.harvest import decide_rows
    from ctloop.logstore.feedback_import import import_feedback

    url = f"sqlite:///{tmp_path / 'logs.db'}"
    writer = RequestLog(url)
    writer.put(_request(1))
    writer.put(RequestRecord(request_id="r1", model_version="1", endpoint="completions", prompt="other", answer="b"))
    writer.close()
    reader = LogReader(url)
    assert reader.counts()["request_log"] == 1 and reader.requests_with_id("r1") == 1
    reader.close()

    old = tmp_path / "old.db"  # the request_log of an older ctloop: no client_request_id, ids not unique
    with sqlite3.connect(old) as connection:
        connection.execute(
            "CREATE TABLE request_log (id INTEGER PRIMARY KEY AUTOINCREMENT, request_id VARCHAR(128) NOT NULL, "
            "created_at FLOAT, model_version VARCHAR(64), explicit_version BOOLEAN, endpoint VARCHAR(32), "
            "prompt TEXT, messages TEXT, answer TEXT, finish_reason VARCHAR(32), prompt_tokens INTEGER, "
            "completion_tokens INTEGER, latency_ms FLOAT, user VARCHAR(256), request_metadata TEXT)"
        )
        for prompt in ("alpha-tool", "beta-game"):
            connection.execute(
                "INSERT INTO request_log (request_id, created_at, prompt, answer, request_metadata) "
                "VALUES ('dup-8584b7', 1.0, ?, 'a', '{}')",
                (prompt,),
            )
    old_url = f"sqlite:///{old}"
    feedback_file = tmp_path / "fb.jsonl"
    feedback_file.write_text(json.dumps({"request_id": "dup-8584b7", "correction": "FOR ALPHA ONLY"}) + "\n")
    imported = import_feedback(feedback_file, old_url)
    assert imported.imported == 0 and imported.refused == {"ambiguous request id": 1}
    reader = LogReader(old_url)
    rows = reader.requests()
    reader.close()
    assert len(rows) == 2 and all(r["client_request_id"] is None for r in rows)  # the column was added
    rows[0]["feedback"] = {"feedback_id": "f", "score": 0.0, "correction": "FOR ALPHA ONLY"}
    decided = decide_rows(rows, HarvestConfig(), set())
    assert [d.reason for d, _ in decided] == ["ambiguous_request_id"] * 2 and all(r is None for _, r in decided)


def test_feedback_import_keeps_every_character_refuses_by_line_and_never_imports_twice(tmp_path):
    """#24 item 10 and #26: quoted newlines, U+2028, long CSV fields and a BOM arrive as sent; a line
    that is not UTF-8 is refused with its number; the import goes in chunks, and a second run of the
    same file adds nothing."""
    from ctloop.logstore import feedback_import

    url = f"sqlite:///{tmp_path / 'logs.db'}"
    writer = RequestLog(url)
    for i in range(5):
        writer.put(_request(i))
    writer.close()
    long = "x" * 140_000  # over csv's default field limit of 131,072
    csv_file = tmp_path / "fb.csv"
    csv_file.write_bytes(
        b"\xef\xbb\xbfrequest_id,rating,correction\n"
        + 'r0,-1,"two\nlines \u2028 kept"\n'.encode()
        + f"r1,-1,{long}\n".encode()
    )
    jsonl = tmp_path / "fb.jsonl"
    jsonl.write_bytes(
        json.dumps({"request_id": "r2", "rating": -1, "correction": "sep\u2028arated"}, ensure_ascii=False).encode()
        + b"\n"
        + b'{"request_id": "r3", "rating": 1, "comment": "caf\xe9"}\n'  # Latin-1, not UTF-8
        + json.dumps({"request_id": "r4", "rating": 1}).encode()
        + b"\n"
    )
    first = feedback_import.import_feedback(csv_file, url, max_correction_chars=200_000)
    assert first.imported == 2 and first.refused == {}
    monkey_chunk = feedback_import.CHUNK
    feedback_import.CHUNK = 1  # one record per transaction: the chunked path
    try:
        second = feedback_import.import_feedback(jsonl, url)
    finally:
        feedback_import.CHUNK = monkey_chunk
    assert second.imported == 2 and second.refused == {"invalid": 1}
    assert second.problems == ["line 2: not valid UTF-8 (byte 50); re-encode the file as UTF-8"]
    reader = LogReader(url)
    corrections = {r["request_id"]: r["feedback"]["correction"] for r in reader.requests() if r["feedback"]}
    reader.close()
    assert corrections["r0"] == "two\nlines \u2028 kept" and corrections["r1"] == long
    assert corrections["r2"] == "sep\u2028arated" and corrections["r4"] is None
    again = feedback_import.import_feedback(csv_file, url, max_correction_chars=200_000)
    assert again.imported == 0 and again.refused == {"already imported": 2}


def test_a_store_file_broken_under_a_running_server_shows_on_healthz_and_refuses_feedback(
    tiny_base, adapters, tmp_path, upstream, monkeypatch
):
    """#24 item 11: after the SQLite store was truncated under a running server, /healthz stayed
    "ok", writes were counted as written (into a WAL that would be lost) and feedback got 500."""
    monkeypatch.setenv("CTLOOP_FEEDBACK_TOKEN", TOKEN)
    config = _config(tiny_base, tmp_path, upstream)
    register_versions(config, adapters)
    with serve_in_background(create_app(config, Workspace(config.workspace))) as url:
        first = httpx.post(f"{url}/v1/completions", json={"model": "srv", "prompt": "a b"}, timeout=30)
        assert httpx.get(f"{url}/healthz").json()["status"] == "ok"
        store = Path(Workspace(config.workspace).shadow_store_url().removeprefix("sqlite:///"))
        with store.open("r+b") as handle:
            handle.truncate(0)
        httpx.post(f"{url}/v1/completions", json={"model": "srv", "prompt": "c d"}, timeout=30)
        deadline = time.monotonic() + 60  # until the writer's next batch has met the broken file
        while (health := httpx.get(f"{url}/healthz")).json()["writers"]["request_log"]["dropped"] < 1:
            assert time.monotonic() < deadline, health.json()
            time.sleep(0.1)
        feedback = httpx.post(
            f"{url}/v1/feedback",
            json={"request_id": first.json()["id"], "rating": 1},
            headers={"authorization": f"Bearer {TOKEN}"},
        )
    assert health.status_code == 503 and health.json()["status"] == "log_store_failing"
    assert "no longer a SQLite database" in health.json()["store_problem"]
    assert health.json()["writers"]["request_log"]["dropped"] >= 1
    assert feedback.status_code == 503 and "restore the file" in feedback.json()["error"]["message"]


def test_rows_the_store_cannot_take_are_spooled_and_written_back_in_order_once(log_store_url, tmp_path):
    """#26 item 2: stopping PostgreSQL for 21 s lost every row acknowledged meanwhile (counted, not
    kept). The store goes away here (its table renamed by another connection, so every insert fails
    at once, on SQLite and PostgreSQL alike) and comes back: nothing is lost or written twice."""
    from sqlalchemy import create_engine, text

    writer = RequestLog(log_store_url, spool_path=tmp_path / "spool" / "request_log.jsonl", spool_bytes=1 << 20)
    admin = create_engine(log_store_url)
    for i in range(10):
        writer.put(_request(i, created_at=1000.0 + i))
    deadline = time.monotonic() + 30
    while writer.written < 10:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    with admin.begin() as connection:  # the outage
        connection.execute(text("ALTER TABLE request_log RENAME TO request_log_away"))
    for i in range(10, 40):
        writer.put(_request(i, created_at=1000.0 + i))
    while writer.spooled < 30:
        assert time.monotonic() < deadline + 60, writer.health()
        time.sleep(0.1)
    assert not writer.health()["ok"] and writer.health()["spool_bytes"] > 0 and writer.dropped == 0
    with admin.begin() as connection:  # the store is back
        connection.execute(text("ALTER TABLE request_log_away RENAME TO request_log"))
    for i in range(40, 45):
        writer.put(_request(i, created_at=1000.0 + i))
    writer.close()
    admin.dispose()
    reader = LogReader(log_store_url)
    rows = reader.requests()
    reader.close()
    assert [r["request_id"] for r in rows] == [f"r{i}" for i in range(45)]  # all, once, in order
    assert writer.dropped == 0 and writer.health()["ok"] and not (tmp_path / "spool" / "request_log.jsonl").exists()


def test_feedback_on_a_purged_request_is_404_and_utf8_client_ids_are_kept(
    tiny_base, adapters, tmp_path, upstream, monkeypatch
):
    """#24 item 12: feedback on a purged request got 201 and left an orphan row; a UTF-8
    X-Request-Id was stored garbled."""
    from ctloop.serving import production_log

    monkeypatch.setenv("CTLOOP_FEEDBACK_TOKEN", TOKEN)
    monkeypatch.setattr(production_log, "RECENT_S", 0.0)  # the store is always asked
    config = _config(tiny_base, tmp_path, upstream)
    register_versions(config, adapters)
    with serve_in_background(create_app(config, Workspace(config.workspace))) as url:
        answer = httpx.post(
            f"{url}/v1/completions",
            json={"model": "srv", "prompt": "a b"},
            headers={"x-request-id": "café-请求-7".encode()},  # UTF-8 bytes on the wire
            timeout=30,
        )
        rid = answer.headers["x-request-id"]
        reader = LogReader(Workspace(config.workspace).shadow_store_url())
        deadline = time.monotonic() + 30
        while not reader.has_request(rid):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        [row] = [r for r in reader.requests() if r["request_id"] == rid]
        assert row["client_request_id"] == "café-请求-7"
        reader.purge(time.time() + 1)  # retention takes it
        reader.close()
        late = httpx.post(
            f"{url}/v1/feedback",
            json={"request_id": answer.json()["id"], "rating": 1},
            headers={"authorization": f"Bearer {TOKEN}"},
        )
    assert late.status_code == 404


def test_a_damaged_spool_never_stops_the_writer(tmp_path):
    """A spool whose last line a crash cut short, and one holding a row the store already has: the
    readable rows are written back, the damaged one and the duplicate are counted, and the writer
    goes on writing (a dead writer thread left every later row queued, with /healthz ok)."""
    url = f"sqlite:///{tmp_path / 'logs.db'}"
    spool = tmp_path / "spool" / "request_log.jsonl"
    writer = RequestLog(url, spool_path=spool, spool_bytes=1 << 20)
    writer.put(_request(0))
    writer.close()
    row = RequestLog.__new__(RequestLog)
    row.redact_pii = False
    lines = [json.dumps(row._row(_request(i)), default=str) for i in (0, 1, 2)]  # r0 is already stored
    spool.parent.mkdir(parents=True, exist_ok=True)
    spool.write_text("\n".join(lines) + '\n{"request_id": "r9", "crea')
    writer = RequestLog(url, spool_path=spool, spool_bytes=1 << 20)
    writer.put(_request(3))
    writer.close()
    reader = LogReader(url)
    ids = [r["request_id"] for r in reader.requests()]
    reader.close()
    assert ids == ["r0", "r1", "r2", "r3"] and not spool.exists() and writer.dropped == 2


def _pg_ctl(action: str) -> None:
    """Stop or start the PostgreSQL server scripts/with_postgres.sh runs (as its owner when root)."""
    ctl, data = os.environ["CTLOOP_TEST_POSTGRES_CTL"], os.environ["CTLOOP_TEST_POSTGRES_DATA"]
    command = [ctl, "-D", data, "-w", "-t", "60"]
    if action == "stop":
        command += ["-m", "fast", "stop"]
    else:
        command += [
            "-l",
            str(Path(data).parent / "server.log"),
            "-o",
            os.environ["CTLOOP_TEST_POSTGRES_OPTIONS"],
            "start",
        ]
    if os.getuid() == 0:
        command = ["runuser", "-u", "postgres", "--", *command]
    subprocess.run(command, check=True, capture_output=True, timeout=90)


@pytest.mark.slow
@pytest.mark.serial  # it stops the PostgreSQL server every other test shares: run alone, after the rest
def test_postgresql_stopped_for_30_s_under_20_requests_a_second_loses_no_acknowledged_request(
    tiny_base, adapters, tmp_path, upstream
):
    """#26 item 5: stopping PostgreSQL for 21 s lost all 383 rows acknowledged meanwhile. Here the
    real server is stopped for 30 s while clients send 20 requests a second through `ctloop serve`:
    every request answered 200 is in the log afterwards, once."""
    from conftest import postgres_database

    if "CTLOOP_TEST_POSTGRES_CTL" not in os.environ:
        if os.environ.get("CTLOOP_REQUIRE_POSTGRES") == "1":
            pytest.fail(
                "CTLOOP_REQUIRE_POSTGRES=1 but scripts/with_postgres.sh did not export CTLOOP_TEST_POSTGRES_CTL"
            )
        pytest.skip("needs the PostgreSQL server of scripts/with_postgres.sh, which this test stops and restarts")
    acknowledged: list[str] = []
    refused = 0

    def send_for(client: httpx.Client, seconds: float) -> None:
        nonlocal refused
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            started = time.monotonic()
            response = client.post("/v1/completions", json={"model": "srv", "prompt": "q", "max_tokens": 2})
            if response.status_code == 200:
                acknowledged.append(response.headers["x-request-id"])  # the id the log keeps
            else:
                refused += 1
            time.sleep(max(0.0, 0.05 - (time.monotonic() - started)))  # 20 a second

    with postgres_database("outage") as store_url:
        config = _config(tiny_base, tmp_path, upstream, store_url)
        register_versions(config, adapters)
        with (
            serve_in_background(create_app(config, Workspace(config.workspace))) as url,
            httpx.Client(base_url=url, timeout=30) as client,
        ):
            send_for(client, 5)
            _pg_ctl("stop")
            try:
                before = len(acknowledged)
                send_for(client, 30)
                during = len(acknowledged) - before
            finally:
                _pg_ctl("start")
            send_for(client, 5)
            deadline = time.monotonic() + 120  # until the spool is written back
            while (writer := client.get("/healthz").json()["writers"]["request_log"])["spool_bytes"] or not writer[
                "ok"
            ]:
                assert time.monotonic() < deadline, writer
                time.sleep(0.2)
        # the server has drained its writers
        reader = LogReader(store_url)
        logged = [r["request_id"] for r in reader.requests()]
        reader.close()
    print(f"acknowledged {len(acknowledged)}, {during} of them while PostgreSQL was stopped; logged {len(logged)}")
    assert during > 300 and refused == 0, (during, refused)  # about 600 answered while the store was away
    assert sorted(logged) == sorted(acknowledged) and len(set(logged)) == len(logged)
