"""Hostile but fair input (#17): every bad request gets a 4xx in the OpenAI error shape before any
work, every status is counted, and bad CLI arguments are one-line errors before any computation."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import time

import httpx
import pytest

from ctloop.config import config_from_dict
from ctloop.errors import ConfigError
from ctloop.serving.server import create_app, serve_in_background
from ctloop.training.tinymodel import random_adapter
from ctloop.workspace import Workspace
from shadow_helpers import register_versions, serving_config

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tiny_base, tmp_path_factory):
    root = tmp_path_factory.mktemp("hardening")
    config = serving_config(
        tiny_base, root / "ws", serve={"max_body_bytes": 4096, "max_tokens": 32, "header_timeout_s": 3}
    )
    register_versions(config, [random_adapter(tiny_base, root / "a1", 1)])
    with serve_in_background(create_app(config, Workspace(config.workspace))) as url:
        yield url


def _is_openai_error(response: httpx.Response) -> bool:
    return set(response.json()) == {"error"} and set(response.json()["error"]) == {"message", "type", "param", "code"}


def test_a_prompt_longer_than_the_context_is_400_naming_both_numbers(server):
    long_prompt = " ".join(["package"] * 600)  # far beyond the tiny model's context
    response = httpx.post(
        f"{server}/v1/completions", json={"model": "srv", "prompt": long_prompt[:3900], "max_tokens": 8}, timeout=60
    )
    assert response.status_code == 400 and _is_openai_error(response)
    message = response.json()["error"]["message"]
    assert re.search(
        r"the prompt has \d+ tokens and max_tokens is 8: \d+ tokens, over the model's context of \d+", message
    )


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ('{"model": "srv", "prompt": "a\\ud800b"}', "surrogate"),
        ('{"model": "' + "9" * 5000 + '", "prompt": "x"}', None),
    ],
    ids=["lone-surrogate", "5000-digit-model"],
)
def test_inputs_that_used_to_raise_are_4xx(server, body, needle):
    response = httpx.post(
        f"{server}/v1/completions", content=body.encode(), timeout=60, headers={"content-type": "application/json"}
    )
    assert 400 <= response.status_code < 500 and _is_openai_error(response)
    if needle:
        assert needle in response.json()["error"]["message"]


def test_a_huge_body_is_refused_by_its_declared_length_before_it_is_read(server):
    host, port = server.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 150000000\r\n\r\n{"
        )  # declares 150 MB, sends one byte
        answer = sock.recv(4096).decode()
    assert answer.startswith("HTTP/1.1 413") and "max_body_bytes" in answer


def test_a_chunked_body_stops_being_read_at_the_cap(server):
    def chunks():
        yield b'{"model": "srv", "prompt": "'
        for _ in range(100):
            yield b"x" * 1000

    response = httpx.post(f"{server}/v1/completions", content=chunks(), timeout=60)
    assert response.status_code == 413 and _is_openai_error(response)


def test_every_status_code_is_counted(server):
    httpx.post(f"{server}/v1/completions", json={"model": "gpt-4", "prompt": "x"}, timeout=60)  # 404
    metrics = httpx.get(f"{server}/metrics").text
    assert 'code="404"' in metrics and 'code="413"' in metrics and 'code="400"' in metrics


def test_a_config_that_refuses_every_request_is_invalid():
    with pytest.raises(ConfigError, match="default_max_tokens=64 is above serve.max_tokens=32"):
        config_from_dict({"model": {"base": "x"}, "serve": {"max_tokens": 32}})


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--online", "--window", "0"], "--window"),
        (["--report", "/nonexistent-dir/x.html"], "does not exist"),
    ],
    ids=["window-0", "report-folder-missing"],
)
def test_bad_drift_arguments_are_one_line_errors(tmp_path, args, needle):
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "a", "completion": "b"}\n')
    result = subprocess.run(
        [sys.executable, "-m", "ctloop", "drift", "--reference", str(data), "--current", str(data), *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2 and needle in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "body",
    [
        {"model": "srv", "prompt": "x", "max_tokens": "5"},
        {"model": "srv", "prompt": "x", "max_tokens": True},
        {"model": "srv", "prompt": "x", "stream": "yes"},
    ],
    ids=["string-number", "bool-number", "string-bool"],
)
def test_request_fields_are_not_coerced(server, body):
    response = httpx.post(f"{server}/v1/completions", json=body, timeout=60)
    assert response.status_code == 400 and _is_openai_error(response)


def test_unknown_paths_and_methods_answer_in_the_openai_error_shape(server):
    missing = httpx.get(f"{server}/v1/nothing-here")
    wrong_method = httpx.get(f"{server}/v1/completions")
    assert (missing.status_code, wrong_method.status_code) == (404, 405)
    assert _is_openai_error(missing) and _is_openai_error(wrong_method)


def test_each_failed_run_keeps_its_own_quarantine(tiny_base, tmp_path):
    """Two files without a single good row land in the same (empty) cycle; neither quarantine is lost."""
    import yaml

    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"model": {"base": str(tiny_base)}, "workspace": str(tmp_path / "ws")}))
    kept = []
    for name, rows in (("a.jsonl", "{broken\n" * 18), ("b.jsonl", '{"prompt": 1}\n' * 5)):
        (tmp_path / name).write_text(rows)
        result = subprocess.run(
            [sys.executable, "-m", "ctloop", "run", "--config", str(config), "--data", str(tmp_path / name)],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert result.returncode == 2 and "Traceback" not in result.stderr
        kept.append(sorted((tmp_path / "ws" / "quarantine").glob("*.jsonl")))
    assert len(kept[-1]) == 2
    assert sorted(len(p.read_text().splitlines()) for p in kept[-1]) == [5, 18]


def test_a_folder_given_as_data_is_named_as_a_folder(tiny_base, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "ctloop", "drift", "--reference", str(tmp_path), "--current", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2 and "is a folder" in result.stderr and "--data" not in result.stderr


def test_a_body_trickling_in_is_cut_off_with_408(tiny_base, tmp_path):
    config = serving_config(tiny_base, tmp_path / "ws", serve={"body_timeout_s": 1.0})
    register_versions(config, [random_adapter(tiny_base, tmp_path / "a1", 1)])
    with serve_in_background(create_app(config, Workspace(config.workspace))) as url:
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=20) as sock:
            sock.sendall(
                b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Content-Length: 40\r\n\r\n{"
            )
            started = time.monotonic()
            answer = sock.recv(4096).decode()
        assert answer.startswith("HTTP/1.1 408") and time.monotonic() - started < 10


def test_an_unexpected_error_is_a_counted_500_in_the_openai_shape(tiny_base, tmp_path):
    config = serving_config(tiny_base, tmp_path / "ws")
    register_versions(config, [random_adapter(tiny_base, tmp_path / "a1", 1)])
    app = create_app(config, Workspace(config.workspace))

    def broken(requested: str):
        raise RuntimeError("a bug")

    with serve_in_background(app) as url:
        app.state.serving.resolve = broken  # a bug on the request path
        response = httpx.post(f"{url}/v1/completions", json={"model": "srv", "prompt": "x"}, timeout=60)
        metrics = httpx.get(f"{url}/metrics").text
    assert response.status_code == 500 and _is_openai_error(response)
    assert "RuntimeError" in response.json()["error"]["message"] and "a bug" not in response.json()["error"]["message"]
    assert 'code="500",path="/v1/completions"' in metrics


def test_an_idle_keep_alive_connection_outlives_the_clients_pool_expiry(server):
    """httpx (and so the OpenAI SDK) drops idle pooled connections after 5 s; a server closing its
    side at the same moment races a client reusing it (CI saw a ReadError under load). The server
    keeps them longer (serve.keep_alive_s, 65 s), so a request after 6 idle seconds still lands."""
    host, port = server.removeprefix("http://").split(":")
    request = f"GET /healthz HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        reader = sock.makefile("rb")
        statuses = []
        for pause in (0, 6):
            time.sleep(pause)
            sock.sendall(request)
            statuses.append(reader.readline())  # b"" if the server closed the connection
            length = 0
            while (line := reader.readline()) not in (b"\r\n", b""):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            reader.read(length)  # the whole answer, so the next read starts at the next one
    assert statuses == [b"HTTP/1.1 200 OK\r\n"] * 2, statuses


def test_a_client_that_never_finishes_its_headers_is_disconnected(server, monkeypatch):
    host, port = server.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")  # and then nothing more
        started = time.monotonic()
        closed = sock.recv(1024) == b""  # the server hangs up
    assert closed and time.monotonic() - started < 20  # serve.header_timeout_s is 3 here


@pytest.mark.parametrize(
    ("headers", "what"),
    [(b"X-Request-Id: " + b"x" * 200_000 + b"\r\n", "a 200 KB header"), (b"X-H: v\r\n" * 200_000, "200,000 headers")],
    ids=["huge-header", "many-headers"],
)
def test_an_oversized_request_head_is_431_and_the_connection_closed(server, headers, what):
    """#24 item 5: httptools has no head limit; a 64 MB X-Request-Id and 200,000 headers were both
    answered 200. Past serve.max_head_bytes (64 KiB) or serve.max_headers (100): 431, then close."""
    host, port = server.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(f"GET /healthz HTTP/1.1\r\nHost: {host}\r\n".encode())
        try:
            sock.sendall(headers + b"\r\n")
        except OSError:
            pass  # the server may close before it has read everything
        answer = sock.recv(65536).decode()
    assert answer.startswith("HTTP/1.1 431"), (what, answer[:200])
    assert "serve.max_head_bytes" in answer
    # a keep-alive connection: an ordinary request first, then an oversized one on the same connection
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        reader = sock.makefile("rb")
        sock.sendall(f"GET /healthz HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        assert reader.readline() == b"HTTP/1.1 200 OK\r\n"
        length = 0
        while (line := reader.readline()) not in (b"\r\n", b""):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":")[1])
        reader.read(length)
        sock.sendall(f"GET /healthz HTTP/1.1\r\nHost: {host}\r\n".encode() + b"X-Pad: " + b"y" * 70_000 + b"\r\n\r\n")
        assert reader.readline().startswith(b"HTTP/1.1 431")
    assert httpx.get(f"{server}/healthz", headers={"x-request-id": "ok"}).status_code == 200


def test_small_input_defects_are_refused(tmp_path):
    """#24 item 12: a whitespace-only correction, a negative look in the watch state, log_fraction
    true and a DPO pair whose correction repeats the answer."""
    import json

    from ctloop.config import HarvestConfig, ServeConfig, WatchConfig
    from ctloop.data.harvest import _export, decide_rows
    from ctloop.drift.budget import take_look
    from ctloop.errors import DataError
    from ctloop.logstore.requests import FeedbackBody

    with pytest.raises(ValueError, match="correction is empty or whitespace"):
        FeedbackBody.model_validate({"request_id": "r", "correction": "  \n "})
    with pytest.raises(ValueError, match="log_fraction"):
        ServeConfig(log_fraction=True)
    state = tmp_path / "state.json"
    state.write_text(
        json.dumps({"period": 1, "look": -3, "period_looks": 168, "false_alarm_budget": 0.05, "period_started": "x"})
    )
    with pytest.raises(DataError, match="look -3 of 168"):
        take_look(state, WatchConfig())
    row = {"request_id": "r", "prompt": "q", "answer": "same", "created_at": 0.0}
    row["feedback"] = {"feedback_id": "f", "score": 0.0, "correction": "same "}
    [(_, record)] = decide_rows([row], HarvestConfig(), set())
    assert _export(record, "dpo") is None  # chosen == rejected teaches nothing


def test_corrupt_workspace_files_are_one_line_errors(tmp_path):
    """#24 item 12: a corrupt rejected.jsonl, ledger.json or shadow.db gave 150-line tracebacks
    with exit 1; each is one line naming the file, exit 2."""
    import subprocess
    import sys

    import yaml

    workspace = tmp_path / "ws"
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"workspace": str(workspace), "model": {"base": "unused"}}))

    def harvest():
        return subprocess.run(
            [sys.executable, "-m", "ctloop", "harvest", "--since", "1h", "--config", str(config)],
            capture_output=True,
            text=True,
            timeout=120,
        )

    (workspace / "harvest").mkdir(parents=True)
    (workspace / "harvest" / "ledger.json").write_text("{not json")
    broken = harvest()
    assert broken.returncode == 2 and "ledger.json is not valid JSON" in broken.stderr + broken.stdout
    assert "Traceback" not in broken.stderr
    (workspace / "harvest" / "ledger.json").unlink()
    (workspace / "shadow.db").write_bytes(b"this is not a database" * 100)
    broken = harvest()
    assert broken.returncode == 2 and "may be corrupt" in broken.stderr + broken.stdout
    assert "Traceback" not in broken.stderr
