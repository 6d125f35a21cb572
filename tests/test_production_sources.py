"""#26 item 3: the drift watch and the harvest read traffic where teams already log it.

The same requests go through `ctloop serve` (openai backend, a real upstream on loopback) with the
official `openai` SDK under `mlflow.openai.autolog()`, so each request is in ctloop's request log
AND is an MLflow trace; the same feedback goes to both (POST /v1/feedback; mlflow.log_feedback and
an `expected_response` expectation) and to a gateway-style JSONL file. Harvests from the three
sources must give the same training rows, and production drift reads each.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import pytest

from ctloop.config import config_from_dict
from ctloop.cycle.production import served_prompts
from ctloop.data.harvest import harvest
from ctloop.data.sources import JsonlSource
from ctloop.serving.server import create_app, serve_in_background
from ctloop.training.tinymodel import random_adapter
from ctloop.workspace import Workspace
from shadow_helpers import echo_upstream, register_versions, serving_config

pytestmark = pytest.mark.slow
TOKEN = "sources-s3cret"
PROMPTS = [f"describe package number {i} gamma{i}" for i in range(8)]
# (index, thumbs, correction): 0 corrected, 1 and 2 thumbs up, 3 thumbs down, the rest unrated
FEEDBACK = [(0, False, "THE RIGHT ANSWER"), (1, True, None), (2, True, None), (3, False, None)]


def _rows(report) -> set[tuple[str, str]]:
    return {(r["prompt"], r["completion"]) for r in map(json.loads, Path(report.out_path).read_text().splitlines())}


def test_harvests_from_the_request_log_mlflow_traces_and_jsonl_give_the_same_rows(tiny_base, tmp_path, monkeypatch):
    import mlflow
    from mlflow.entities import AssessmentSource
    from openai import OpenAI

    monkeypatch.setenv("CTLOOP_FEEDBACK_TOKEN", TOKEN)
    tracking = f"sqlite:///{tmp_path / 'traces.db'}"
    mlflow.set_tracking_uri(tracking)  # process-wide, and exported as MLFLOW_TRACKING_URI: unset below
    # The traces' artifacts in the temp folder too: by default they go to ./mlruns, in the checkout.
    mlflow.create_experiment("production-traffic", artifact_location=(tmp_path / "artifacts").as_uri())
    mlflow.set_experiment("production-traffic")
    mlflow.openai.autolog()
    exchanges = []
    try:
        with serve_in_background(echo_upstream(["srv-v1"])) as upstream:
            config = serving_config(
                tiny_base,
                tmp_path / "ws",
                serve={"backend": "openai", "upstream_url": f"{upstream}/v1"},
                shadow={"enabled": False},
            )
            register_versions(config, [random_adapter(tiny_base, tmp_path / "a1", 1)])
            with serve_in_background(create_app(config, Workspace(config.workspace))) as url:
                client = OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
                for prompt in PROMPTS:  # autolog makes each call a trace whose root span is the call
                    answer = client.completions.create(model="srv", prompt=prompt, max_tokens=8)
                    exchanges.append((prompt, answer, mlflow.get_last_active_trace_id()))
                mlflow.flush_trace_async_logging()
                for index, thumb, correction in FEEDBACK:
                    prompt, answer, trace_id = exchanges[index]
                    body = {"request_id": answer.id, "rating": 1 if thumb else -1}
                    if correction:
                        body["correction"] = correction
                    auth = {"authorization": f"Bearer {TOKEN}"}
                    assert httpx.post(f"{url}/v1/feedback", json=body, headers=auth).status_code == 201
                    human = AssessmentSource(source_type="HUMAN", source_id="qa")
                    mlflow.log_feedback(trace_id=trace_id, name="thumbs", value=thumb, source=human)
                    if correction:
                        mlflow.log_expectation(
                            trace_id=trace_id, name="expected_response", value=correction, source=human
                        )
    finally:
        mlflow.openai.autolog(disable=True)
        mlflow.set_tracking_uri(None)  # unsets MLFLOW_TRACKING_URI too, which every later registry would use
        monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    gateway = tmp_path / "gateway.jsonl"
    with gateway.open("w") as handle:
        for index, (prompt, answer, _) in enumerate(exchanges):
            given = {i: (t, c) for i, t, c in FEEDBACK}.get(index)
            line = {
                "id": answer.id,
                "created_at": time.time() - 60,
                "request": {"model": "srv", "prompt": prompt},
                "response": answer.model_dump(),
                **({"feedback": {"rating": 1 if given[0] else -1, "correction": given[1]}} if given else {}),
            }
            handle.write(json.dumps(line) + "\n")
        handle.write('{"id": "broken", "created_at": 1, "request": {"prompt": "x"}}\n')  # old and without a response
        handle.write(json.dumps({"id": "no-answer", "created_at": time.time() - 30, "request": {"prompt": "x"}}) + "\n")

    since = time.time() - 3600
    reports = {}
    for source, extra in (
        ("ctloop", {}),
        ("mlflow", {"experiment": "production-traffic", "tracking_uri": tracking}),
        ("jsonl", {"path": str(gateway)}),
    ):
        workspace = Workspace(tmp_path / f"ws-{source}")
        raw = config.model_dump(mode="json") | {"workspace": str(workspace.root)}
        raw["production"] = {"source": source, **extra}
        if source == "ctloop":
            raw["workspace"], workspace = str(config.workspace), Workspace(config.workspace)
        cfg = config_from_dict(raw)
        reports[source] = harvest(cfg, workspace.create(), since=since, out=tmp_path / f"{source}.jsonl")
        prompts, total = served_prompts(cfg, workspace, since)  # what production drift reads
        assert total == len(PROMPTS) and sorted(r.prompt for r in prompts) == sorted(PROMPTS), source
    # index 3 was rated down: in the file as a rated_down row (#27)
    expected = {(PROMPTS[0], "THE RIGHT ANSWER"), *((PROMPTS[i], exchanges[i][1].choices[0].text) for i in (1, 2, 3))}
    for source, report in reports.items():
        assert _rows(report) == expected, source
        assert report.rejected == 1 and report.counts["no_feedback"] == 4 and report.source == source, report.counts
    assert reports["jsonl"].counts["unusable_no_response"] == 1  # counted with its reason, the harvest went on
    assert "(mlflow)" in reports["mlflow"].lineage()


def test_a_jsonl_source_reads_chat_and_iso_times_and_counts_what_it_cannot_use(tmp_path):
    path = tmp_path / "exchanges.jsonl"
    lines = [
        {
            "id": "c1",
            "created_at": "2026-12-01T10:00:00Z",
            "request": {"model": "m", "messages": [{"role": "user", "content": "hi"}]},
            "response": {"choices": [{"message": {"role": "assistant", "content": "hello"}}]},
            "feedback": {"rating": True},
        },
        {"id": "c2", "created_at": "2026-12-01T10:00:01Z", "request": {"prompt": "p"}, "response": {"choices": []}},
        {"id": "c3", "created_at": "yesterday", "request": {"prompt": "p"}, "response": {}},
    ]
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n{not json\n")
    source = JsonlSource(str(tmp_path / "*.jsonl"))
    [[row]] = list(source.rated(0, 2e9))
    assert row["prompt"] == "user: hi\nassistant:" and row["answer"] == "hello" and row["feedback"]["score"] == 1.0
    assert source.problems == {"no_answer": 1, "bad_created_at": 1, "invalid_json": 1}
    sample, total = source.sample(0, 2e9, 10, seed=0)
    assert total == 1 and sample[0]["request_id"] == "c1"


def test_assessments_read_over_http_count_although_their_valid_flag_is_unset():
    """MLflow's SQL store sets `valid` on assessments; read through a tracking server it is None.
    None is not invalid: the rating and the correction still count."""
    from types import SimpleNamespace

    from mlflow.entities import AssessmentSource, Expectation, Feedback

    from ctloop.registry.traces import MlflowTraceSource

    human = AssessmentSource(source_type="HUMAN", source_id="qa")
    assessments = [
        Feedback(name="thumbs", value=False, source=human),
        Expectation(name="expected_response", value="THE RIGHT ANSWER", source=human),
    ]
    for assessment in assessments:
        assessment.valid = None  # as from_proto leaves it
    trace = SimpleNamespace(
        info=SimpleNamespace(trace_id="tr-1", request_time=1_796_000_000_000, assessments=assessments),
        data=SimpleNamespace(
            request=json.dumps({"model": "m", "prompt": "p"}), response=json.dumps({"choices": [{"text": " a"}]})
        ),
    )
    source = MlflowTraceSource.__new__(MlflowTraceSource)
    source.rating_names, source.correction_name = set(), "expected_response"
    row = source._row(trace)
    assert row["feedback"]["score"] == 0.0 and row["feedback"]["correction"] == "THE RIGHT ANSWER"


def test_a_phoenix_annotation_with_an_unknown_label_erases_no_rating():
    from ctloop.data.sources import PhoenixSource

    source = PhoenixSource("http://127.0.0.1:9", "p", [], "expected_response", None)
    request = {"model": "m", "prompt": "q"}
    response = {"choices": [{"text": "a"}]}
    span = {
        "context": {"span_id": "s1"},
        "start_time": "2026-12-01T10:00:00+00:00",
        "attributes": {"input.value": json.dumps(request), "output.value": json.dumps(response)},
    }
    annotations = [
        {"name": "user_feedback", "annotator_kind": "HUMAN", "result": {"label": "thumbs_up"}, "updated_at": "1"},
        {"name": "user_feedback", "annotator_kind": "HUMAN", "result": {"label": "neutral"}, "updated_at": "2"},
        {"name": "user_feedback", "annotator_kind": "LLM", "result": {"score": 0.0}, "updated_at": "3"},
    ]
    row = source._row(span, annotations)
    source.close()
    assert row["feedback"]["score"] == 1.0 and row["prompt"] == "q" and row["answer"] == "a"
