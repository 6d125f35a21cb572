"""The canary after shadow (#28): live traffic through `ctloop serve` (openai backend) with two
versions; a candidate that fails 10% of its requests, or that users rate down, is rolled back on
its own before its share passes 25%; a healthy one advances through every step and becomes
champion."""

from __future__ import annotations

import itertools
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from ctloop.registry.client import CHAMPION
from ctloop.serving.rollout import ADVANCE, HOLD, ROLLBACK, Rollout, active, decide, start, takes_candidate
from ctloop.serving.server import create_app, serve_in_background
from ctloop.workspace import Workspace
from shadow_helpers import register_versions, serving_config

TOKEN = "rollout-token"


def test_a_user_stays_in_the_candidates_arm_as_its_share_grows():
    users = [f"user-{i}" for i in range(4000)]
    for small, large in itertools.pairwise((0.05, 0.25, 0.5, 1.0)):
        inside = {u for u in users if takes_candidate(u, small)}
        assert inside <= {u for u in users if takes_candidate(u, large)}
        assert abs(len(inside) / len(users) - small) < 0.03


def _counts(n_cand, k_cand, n_champ, k_champ, key="errors"):
    zero = {"errors": 0, "negative": 0, "corrections": 0, "slow": 0}
    return {
        "candidate": zero | {"requests": n_cand, key: k_cand},
        "champion": zero | {"requests": n_champ, key: k_champ},
    }


def test_each_look_rolls_back_holds_or_advances_on_the_bounds():
    from ctloop.config import RolloutConfig

    config = RolloutConfig(min_requests_per_step=100)
    rollout = Rollout(2, 1, tuple(config.steps))
    assert decide(rollout, _counts(100, 10, 1900, 2), config).decision == ROLLBACK  # 10% vs 0.1%
    held = decide(rollout, _counts(100, 0, 1900, 0), config)
    assert held.decision == HOLD and held.more_needed > 0  # 0 errors, but too few to bound it within 1%
    assert decide(rollout, _counts(5000, 5, 95000, 90), config).decision == ADVANCE
    down = decide(rollout, _counts(200, 40, 3800, 80, key="negative"), config)  # 20% rated down vs 2%
    assert down.decision == ROLLBACK and "negative-feedback rate" in down.reasons[0]
    slow = _counts(400, 80, 7600, 380, key="slow")  # 20% of answers over the SLO vs 5%
    assert decide(rollout, slow, config).decision != ROLLBACK  # latency not checked without an SLO
    with_slo = RolloutConfig(min_requests_per_step=100, latency_slo_ms=800)
    slower = decide(rollout, slow, with_slo)
    assert slower.decision == ROLLBACK and "slower than rollout.latency_slo_ms" in slower.reasons[0]


def test_feedback_rates_count_only_answers_old_enough_to_have_been_rated(tmp_path):
    """#28: a step advanced on answers nobody had had time to rate, so late thumbs down never
    counted. Feedback rates are now out of the answers at least rollout.feedback_settle_s old (a
    real SQLite store); errors count at once."""
    from ctloop.config import RolloutConfig, config_from_dict
    from ctloop.logstore.requests import FeedbackRecord, LogReader, RequestLog, RequestRecord
    from ctloop.serving.rollout import arm_counts

    now = time.time()
    url = f"sqlite:///{tmp_path / 'log.db'}"
    writer = RequestLog(url)
    for i in range(6):
        old = i < 4  # answered ten minutes ago, or just now
        writer.put(
            RequestRecord(
                request_id=f"r{i}",
                model_version="2",
                endpoint="completions",
                prompt="q",
                answer="a",
                finish_reason="error" if i == 5 else "stop",
                latency_ms=900.0 if i in (1, 2, 5) else 100.0,  # the failed one (5) is an error, not slow
                created_at=now - 600 if old else now,
            )
        )
    writer.close()
    reader = LogReader(url)
    reader.add_feedback([FeedbackRecord("r0", rating=-1), FeedbackRecord("r4", rating=-1, correction="b")])
    rollout_settings = {"feedback_settle_s": 300, "latency_slo_ms": 500}
    config = config_from_dict({"model": {"base": "unused"}, "rollout": rollout_settings})
    rollout = Rollout(2, 1, (0.05, 1.0), step_started=now - 3600)
    counts = arm_counts(reader, rollout, config, now=now)["candidate"]
    assert counts == {"requests": 6, "errors": 1, "settled": 4, "negative": 1, "corrections": 0, "slow": 2}
    everything = reader.arm_counts(now - 3600, {"candidate": "2"}, 0.5)["candidate"]
    assert everything == {"requests": 6, "errors": 1, "settled": 6, "negative": 2, "corrections": 1, "slow": 0}
    reader.close()

    settings = RolloutConfig(min_requests_per_step=100)
    fresh = {
        "candidate": {"requests": 5000, "errors": 5, "settled": 50, "negative": 0, "corrections": 0},
        "champion": {"requests": 95000, "errors": 90, "settled": 950, "negative": 0, "corrections": 0},
    }
    held = decide(Rollout(2, 1, tuple(settings.steps)), fresh, settings)
    assert held.decision == HOLD and "rollout.feedback_settle_s" in " ".join(held.reasons)


def _faulty_upstream(fail_every: int | None):
    """Serves srv-v1 and srv-v2 at once; v2 fails every `fail_every`-th request (None: never)."""
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse

    app = FastAPI()
    calls = itertools.count(1)

    @app.get("/v1/models")
    async def listed():
        return {"object": "list", "data": [{"id": m, "object": "model"} for m in ("srv-v1", "srv-v2")]}

    @app.post("/v1/completions")
    async def complete(body: dict):
        if body["model"] == "srv-v2" and fail_every is not None and next(calls) % fail_every == 0:
            return JSONResponse({"error": {"message": "engine fault"}}, status_code=500)
        usage = {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}
        choice = {"index": 0, "text": " ok", "finish_reason": "stop"}
        return {"id": "up", "object": "text_completion", "model": body["model"], "choices": [choice], "usage": usage}

    return app


def _drive(url: str, registry, *, rate_down: str | None = None, limit: int = 8000) -> list[Rollout]:
    """Live requests from distinct users until the rollout stops running (or `limit`); with
    `rate_down`, every answer from that model is rated down. The states seen, in order."""
    seen: list[Rollout] = []
    with httpx.Client(timeout=30) as client:
        for i in range(limit):
            answer = client.post(
                f"{url}/v1/completions", json={"model": "srv", "prompt": "Package: x", "user": f"u{i}"}
            )
            if rate_down is not None and answer.status_code == 200 and answer.json()["model"] == rate_down:
                feedback = {"request_id": answer.headers["x-request-id"], "rating": -1}
                assert (
                    client.post(
                        f"{url}/v1/feedback", json=feedback, headers={"authorization": f"Bearer {TOKEN}"}
                    ).status_code
                    == 201
                )
            if i % 50 == 0:
                tag = registry.version(2).tags.get("ctloop.rollout")
                state = Rollout.from_tag(tag)
                if not seen or seen[-1] != state:
                    seen.append(state)
                if state.state != "running":
                    break
    return seen


def _config(tiny_base, tmp_path, upstream: str, **rollout):
    settings = {
        "steps": [0.05, 0.25, 0.5, 1.0],
        "min_requests_per_step": 50,
        "look_every_s": 0.2,
        "feedback_settle_s": 0,  # the scripted users rate at once
    } | rollout
    return serving_config(
        tiny_base,
        tmp_path / "ws",
        serve={"backend": "openai", "upstream_url": f"{upstream}/v1"},
        shadow={"enabled": False},
        rollout=settings,
    )


@pytest.fixture(scope="module")
def adapters(tiny_base, tmp_path_factory):
    from ctloop.training.tinymodel import random_adapter

    root = tmp_path_factory.mktemp("adapters")
    return [random_adapter(tiny_base, root / f"a{seed}", seed) for seed in (1, 2)]


@pytest.mark.slow
def test_a_candidate_that_fails_10_percent_of_requests_is_rolled_back_before_25_percent(tiny_base, adapters, tmp_path):
    with serve_in_background(_faulty_upstream(fail_every=10)) as upstream:
        config = _config(tiny_base, tmp_path, upstream)
        registry = register_versions(config, adapters)
        start(registry, config.rollout, skip_shadow=True)
        with serve_in_background(create_app(config, Workspace(config.workspace))) as url:
            seen = _drive(url, registry)
    final = seen[-1]
    assert final.state == "rolled_back", final
    assert max(s.share for s in seen if s.state == "running") <= 0.25  # never past 25%
    assert registry.alias(CHAMPION) == 1  # it never became champion
    assert "error rate" in registry.version(2).tags["ctloop.rollout_decision"]
    assert active(registry) is None
    # Its report, written when it ended: the decision in words first, every look's bounds per metric.
    page = (Path(config.workspace) / "rollout" / "v2.html").read_text()
    assert "the rollout was rolled back" in page and "error rate: upper bound of the gap" in page
    assert page.index("the rollout was rolled back") < page.index("gap, lower bound")
    run_id = registry.version(2).run_id
    assert [a.path for a in registry.client.list_artifacts(run_id, "rollout")] == ["rollout/v2.html"]


@pytest.mark.slow
def test_a_healthy_candidate_advances_through_every_step_and_becomes_champion(tiny_base, adapters, tmp_path):
    with serve_in_background(_faulty_upstream(fail_every=None)) as upstream:
        config = _config(
            tiny_base,
            tmp_path,
            upstream,
            steps=[0.25, 0.5, 1.0],
            min_requests_per_step=40,
            max_error_rate_increase=0.15,
            max_negative_rate_increase=0.15,
            max_correction_rate_increase=0.15,
        )
        registry = register_versions(config, adapters)
        start(registry, config.rollout, skip_shadow=True)
        with serve_in_background(create_app(config, Workspace(config.workspace))) as url:
            seen = _drive(url, registry)
    assert seen[-1].state == "completed", seen[-1]
    assert [s.share for s in seen if s.state == "running"] == [0.25, 0.5]  # the step to 100% is the promotion
    assert registry.alias(CHAMPION) == 2
    assert "completed" in registry.version(2).tags["ctloop.rollout"]


@pytest.mark.slow
def test_a_candidate_users_rate_down_is_rolled_back_on_feedback_alone(tiny_base, adapters, tmp_path, monkeypatch):
    monkeypatch.setenv("CTLOOP_FEEDBACK_TOKEN", TOKEN)
    with serve_in_background(_faulty_upstream(fail_every=None)) as upstream:
        config = _config(tiny_base, tmp_path, upstream, steps=[0.25, 1.0])
        registry = register_versions(config, adapters)
        start(registry, config.rollout, skip_shadow=True)
        with serve_in_background(create_app(config, Workspace(config.workspace))) as url:
            seen = _drive(url, registry, rate_down="srv-v2")
    assert seen[-1].state == "rolled_back", seen[-1]
    decision = registry.version(2).tags["ctloop.rollout_decision"]
    assert "negative-feedback rate" in decision and "error rate: candidate 0/" in decision
    assert registry.alias(CHAMPION) == 1


@pytest.mark.slow
def test_a_rollout_needs_a_shadow_promote_unless_told_to_skip_it(tiny_base, adapters, tmp_path):
    from ctloop.errors import RegistryError

    config = _config(tiny_base, tmp_path, "http://127.0.0.1:9")
    registry = register_versions(config, adapters)
    with pytest.raises(RegistryError, match="no shadow PROMOTE against champion v1"):
        start(registry, config.rollout)
    registry.set_version_tags(2, {"ctloop.shadow_decision": "PROMOTE vs v1 (120 pairs)"})
    rollout = start(registry, config.rollout)
    assert rollout.share == 0.05 and not rollout.skip_shadow and active(registry) == rollout
    path = tmp_path / "ctloop.yaml"
    path.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    status = subprocess.run(
        [sys.executable, "-m", "ctloop", "rollout", "status", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "rollout of v2 against v1: step 1/4 at 5%" in status.stderr, status.stderr
    assert "now: HOLD" in status.stderr and "0 candidate answers of rollout.min_requests_per_step=50" in status.stderr
    aborted = subprocess.run(
        [sys.executable, "-m", "ctloop", "rollout", "abort", "--config", str(path), "--by", "alice"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert aborted.returncode == 0 and active(registry) is None
    assert "aborted by alice" in registry.version(2).tags["ctloop.rollout"]


@pytest.mark.slow
def test_the_admin_api_starts_shows_and_aborts_a_rollout(tiny_base, adapters, tmp_path, monkeypatch):
    monkeypatch.setenv("CTLOOP_ADMIN_TOKEN", "s3cret")
    admin = {"authorization": "Bearer s3cret"}
    with serve_in_background(_faulty_upstream(fail_every=None)) as upstream:
        config = _config(tiny_base, tmp_path, upstream)
        registry = register_versions(config, adapters)
        with serve_in_background(create_app(config, Workspace(config.workspace))) as url:
            refused = httpx.post(f"{url}/admin/rollout/start", json={}, headers=admin, timeout=30)
            assert refused.status_code == 409 and "no shadow PROMOTE" in refused.json()["error"]["message"]
            started = httpx.post(f"{url}/admin/rollout/start", json={"skip_shadow": True}, headers=admin, timeout=30)
            assert started.status_code == 200 and started.json()["rollout"]["share"] == 0.05, started.text
            shown = httpx.get(f"{url}/admin/rollout", headers=admin, timeout=30).json()
            assert shown["rollout"]["candidate"] == 2 and shown["look"]["decision"] == "HOLD"
            aborted = httpx.post(f"{url}/admin/rollout/abort", json={"by": "bob"}, headers=admin, timeout=30)
            assert aborted.status_code == 200 and aborted.json()["rollout"]["state"] == "aborted"
            assert httpx.get(f"{url}/admin/rollout", headers=admin, timeout=30).json() == {"rollout": None}
    assert registry.alias(CHAMPION) == 1


def test_a_version_awaiting_approval_cannot_start_a_rollout(tiny_base, adapters, tmp_path):
    from ctloop.errors import RegistryError
    from ctloop.registry.promotion import APPROVAL_TAG

    config = _config(tiny_base, tmp_path, "http://127.0.0.1:9")
    registry = register_versions(config, adapters)
    registry.set_version_tags(2, {APPROVAL_TAG: "pending"})
    with pytest.raises(RegistryError, match="v2 awaits approval"):
        start(registry, config.rollout, skip_shadow=True)
