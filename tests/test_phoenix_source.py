"""#26 item 3: traffic that Arize Phoenix collected feeds the harvest and production drift.

A real Phoenix server (its own virtual environment: Phoenix pins other FastAPI releases than
ctloop's) runs on loopback. The official `openai` SDK, instrumented by
openinference-instrumentation-openai, sends the same requests through `ctloop serve`, so each
request is both in ctloop's request log and an OpenInference span in Phoenix; the same feedback
goes to both (POST /v1/feedback, and HUMAN span annotations through the Phoenix client). The
harvests from the two must give the same training rows, and production drift reads both.

Phoenix's environment: `make phoenix-venv` (.venv-phoenix), or CTLOOP_PHOENIX_PYTHON naming its
python. Without one the test skips, unless CTLOOP_REQUIRE_PHOENIX=1 (CI), where it fails.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from conftest import REPO, free_port
from ctloop.config import config_from_dict
from ctloop.cycle.production import served_prompts
from ctloop.data.harvest import harvest
from ctloop.serving.server import create_app, serve_in_background
from ctloop.training.tinymodel import random_adapter
from ctloop.workspace import Workspace
from shadow_helpers import echo_upstream, register_versions, serving_config

pytestmark = pytest.mark.slow
TOKEN = "phoenix-s3cret"
PROMPTS = [f"describe package number {i} delta{i}" for i in range(8)]
FEEDBACK = [(0, False, "THE RIGHT ANSWER"), (1, True, None), (2, True, None), (3, False, None)]

CLIENT = """
import json, sys, time
from openai import OpenAI
from openinference.instrumentation.openai import OpenAIInstrumentor
from phoenix.client import Client
from phoenix.otel import register

phoenix, server, spec = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
provider = register(project_name="production", endpoint=f"{phoenix}/v1/traces", batch=False, verbose=False)
OpenAIInstrumentor().instrument(tracer_provider=provider)
client = OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)
answers = [client.completions.create(model="srv", prompt=p, max_tokens=8) for p in spec["prompts"]]
provider.force_flush()
phoenix_client = Client(base_url=phoenix)
by_prompt = {}
for _ in range(240):  # Phoenix ingests spans in the background: wait until it lists every one
    try:
        spans = phoenix_client.spans.get_spans(project_identifier="production", span_kind="LLM", limit=100)
    except Exception:  # the project appears with its first span
        spans = []
    by_prompt = {json.loads(s["attributes"]["input.value"])["prompt"]: s["context"]["span_id"] for s in spans}
    if len(by_prompt) == len(spec["prompts"]):
        break
    time.sleep(0.25)
for index, thumb, correction in spec["feedback"]:
    span = by_prompt[spec["prompts"][index]]
    phoenix_client.spans.add_span_annotation(
        span_id=span, annotation_name="user_feedback", annotator_kind="HUMAN",
        label="thumbs_up" if thumb else "thumbs_down", score=1.0 if thumb else 0.0, sync=True,
    )
    if correction:
        phoenix_client.spans.add_span_annotation(
            span_id=span, annotation_name="expected_response", annotator_kind="HUMAN", explanation=correction, sync=True
        )
    # an LLM judge's annotation on every rated span: not human feedback, never read as it
    phoenix_client.spans.add_span_annotation(
        span_id=span, annotation_name="user_feedback", annotator_kind="LLM", label="thumbs_up", score=1.0,
        identifier="judge", sync=True,
    )
print(json.dumps([a.id for a in answers]))
"""


def _phoenix_python() -> Path | None:
    given = os.environ.get("CTLOOP_PHOENIX_PYTHON")
    path = Path(given) if given else REPO / ".venv-phoenix" / "bin" / "python"
    if path.is_file():
        return path
    if os.environ.get("CTLOOP_REQUIRE_PHOENIX") == "1":
        pytest.fail(f"no Phoenix environment at {path}: run `make phoenix-venv` or set CTLOOP_PHOENIX_PYTHON")
    pytest.skip(f"no Phoenix environment at {path} (`make phoenix-venv`); CI requires it")
    return None


def test_harvests_from_phoenix_spans_and_from_the_request_log_give_the_same_rows(tiny_base, tmp_path, monkeypatch):
    python = _phoenix_python()
    monkeypatch.setenv("CTLOOP_FEEDBACK_TOKEN", TOKEN)
    port = free_port()
    env = os.environ | {
        "PHOENIX_PORT": str(port),
        "PHOENIX_HOST": "127.0.0.1",
        "PHOENIX_GRPC_PORT": str(free_port()),
        "PHOENIX_WORKING_DIR": str(tmp_path / "phoenix"),
        "PHOENIX_TELEMETRY_ENABLED": "false",
    }
    phoenix_url = f"http://127.0.0.1:{port}"
    log = (tmp_path / "phoenix.log").open("w")
    phoenix = subprocess.Popen([str(python), "-m", "phoenix.server.main", "serve"], env=env, stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 180  # Phoenix takes about 25 s to start on these cores
        while True:
            assert phoenix.poll() is None, (tmp_path / "phoenix.log").read_text()[-3000:]
            try:
                if httpx.get(f"{phoenix_url}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, (tmp_path / "phoenix.log").read_text()[-3000:]
            time.sleep(0.5)
        with serve_in_background(echo_upstream(["srv-v1"])) as upstream:
            config = serving_config(
                tiny_base,
                tmp_path / "ws",
                serve={"backend": "openai", "upstream_url": f"{upstream}/v1"},
                shadow={"enabled": False},
            )
            register_versions(config, [random_adapter(tiny_base, tmp_path / "a1", 1)])
            with serve_in_background(create_app(config, Workspace(config.workspace))) as url:
                spec = json.dumps({"prompts": PROMPTS, "feedback": FEEDBACK})
                sent = subprocess.run(
                    [str(python), "-c", CLIENT, phoenix_url, url, spec], capture_output=True, text=True, timeout=300
                )
                assert sent.returncode == 0, sent.stderr[-3000:]
                ids = json.loads(sent.stdout.strip().splitlines()[-1])
                for index, thumb, correction in FEEDBACK:
                    body = {"request_id": ids[index], "rating": 1 if thumb else -1}
                    if correction:
                        body["correction"] = correction
                    auth = {"authorization": f"Bearer {TOKEN}"}
                    assert httpx.post(f"{url}/v1/feedback", json=body, headers=auth).status_code == 201
        since = time.time() - 3600
        reports = {}
        for source in ("ctloop", "phoenix"):
            raw = config.model_dump(mode="json")
            raw["production"] = {"source": source, "phoenix_url": phoenix_url, "project": "production"}
            if source == "phoenix":
                raw["production"]["rating_names"] = ["user_feedback"]
                raw["workspace"] = str(tmp_path / "ws-phoenix")
            cfg = config_from_dict(raw)
            workspace = Workspace(cfg.workspace).create()
            reports[source] = harvest(cfg, workspace, since=since, out=tmp_path / f"{source}.jsonl")
            prompts, total = served_prompts(cfg, workspace, since)  # what production drift reads
            assert total == len(PROMPTS) and sorted(r.prompt for r in prompts) == sorted(PROMPTS), source
        rows = {
            source: {
                (r["prompt"], r["completion"], r["metadata"]["feedback_kind"])
                for r in map(json.loads, Path(report.out_path).read_text().splitlines())
            }
            for source, report in reports.items()
        }
        assert rows["phoenix"] == rows["ctloop"] and len(rows["ctloop"]) == len(FEEDBACK)
        assert ("describe package number 0 delta0", "THE RIGHT ANSWER", "correction") in rows["phoenix"]
        assert reports["phoenix"].source == "phoenix" and "(phoenix)" in reports["phoenix"].lineage()
    finally:
        phoenix.terminate()
        phoenix.wait(timeout=60)
