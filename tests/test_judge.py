"""A judge of answer pairs is trusted only once it agrees with users' labels and is not swayed by the
answers' places (#28 item 3, #23 item 9): calibration, its statistics, and the likelihood judge."""

from __future__ import annotations

import json
import math
import random
import subprocess
import sys
from dataclasses import replace

import pytest

from conftest import quickstart_rows
from ctloop.config import JudgeConfig, ModelConfig
from ctloop.data.records import Record
from ctloop.errors import ConfigError
from ctloop.evaluation.judge import (
    JudgeCalibration,
    LabelledPair,
    LikelihoodJudge,
    both_ways,
    calibrate,
    judge_identity,
    judge_trust,
    labelled_pairs,
    load_calibration,
)

SETTINGS = JudgeConfig()


def _pairs(n: int, seed: int = 0) -> list[LabelledPair]:
    rng = random.Random(seed)
    return [
        LabelledPair(f"p{i}", f"question {i}", f"good {rng.random()}", f"bad {rng.random()}", "correction")
        for i in range(n)
    ]


def _merit_judge(agree: float, seed: int = 0, position_bias: float = 0.0):
    """Names the answer users preferred with probability `agree`; with `position_bias`, says 'a' instead."""
    rng = random.Random(seed)

    def judge(prompt, a, b):
        if rng.random() < position_bias:
            return "a"
        good_is_a = a.startswith("good")
        right = rng.random() < agree
        return "a" if good_is_a == right else "b"

    return judge


def test_labelled_pairs_come_from_corrections_and_same_prompt_ratings():
    records = [
        Record("c1", "p1", "the fixed answer", metadata={"feedback_kind": "correction", "rejected_answer": "wrong"}),
        Record("c2", "p2", "same", metadata={"feedback_kind": "correction", "rejected_answer": "same"}),  # no change
        Record("c3", "p3", "x", metadata={"feedback_kind": "correction"}),  # original unknown
        Record("u1", "p4", "liked", metadata={"feedback_kind": "rated_up"}),
        Record("d1", "p4", "disliked", metadata={"feedback_kind": "rated_down"}),
        Record("d2", "p4", "disliked again", metadata={"feedback_kind": "rated_down"}),  # no second up to pair
        Record("u2", "p5", "alone", metadata={"feedback_kind": "rated_up"}),  # no down for this prompt
        Record("c1", "p1", "the fixed answer", metadata={"feedback_kind": "correction", "rejected_answer": "wrong"}),
    ]
    pairs = labelled_pairs(records)
    assert [(p.prompt, p.preferred, p.other, p.source) for p in pairs] == [
        ("p1", "the fixed answer", "wrong", "correction"),
        ("p4", "liked", "disliked", "ratings"),
    ]


def test_a_judge_that_agrees_is_calibrated_and_one_that_answers_by_position_or_coin_is_not():
    pairs = _pairs(60)
    good = calibrate(_merit_judge(1.0), "good", pairs, SETTINGS)
    assert good.calibrated and good.kappa == 1.0 and good.accuracy == 1.0 and good.consistency == 1.0

    by_position = calibrate(lambda p, a, b: "a", "first", pairs, SETTINGS)
    assert not by_position.calibrated
    assert by_position.kappa == 0.0 and by_position.accuracy == 0.5 and by_position.consistency == 0.0
    assert any("judges by position" in reason for reason in by_position.reasons)

    coin = calibrate(_merit_judge(0.5, seed=3), "coin", pairs, SETTINGS)
    assert not coin.calibrated and coin.kappa_interval[0] < 0 < coin.kappa_interval[1]

    ties = calibrate(lambda p, a, b: "tie", "ties", pairs, SETTINGS)
    assert not ties.calibrated and ties.kappa == 0.0 and ties.tie_share == 1.0 and ties.consistency == 1.0

    few = calibrate(_merit_judge(1.0), "good", _pairs(10), SETTINGS)
    assert not few.calibrated and any("judge.min_pairs" in reason for reason in few.reasons)


@pytest.mark.parametrize("p", [0.75, 0.6])
def test_the_kappa_interval_covers_the_true_agreement(p):
    """A judge right with probability p in each order has kappa 2p - 1; over 300 calibrations of
    100 pairs, the bootstrap's 95% interval holds it at about its level (seeded: 292 and 284 of 300)."""
    n, runs = 100, 300
    covered = 0
    for run in range(runs):
        result = calibrate(_merit_judge(p, seed=run), "j", _pairs(n, run), JudgeConfig(seed=run))
        covered += result.kappa_interval[0] <= 2 * p - 1 <= result.kappa_interval[1]
    assert covered >= 270, covered  # 90%: percentile bootstraps at n=100 run a little narrow


def test_a_judge_at_the_floor_is_trusted_rarely():
    """The error the agreement floor bounds: a judge whose true kappa is exactly judge.min_agreement
    (0.3) clearing it. Seeded, 600 calibrations each at 30, 50 and 100 pairs: 26, 18 and 28 (the
    README's figures). The percentile bootstrap's one-sided level is 2.5%; it runs a little over
    that here. (This judge errs in each order independently, so its consistency, about 55%, fails
    the consistency floor too; the kappa bound alone is what is counted.)"""
    for n, seen in ((30, 26), (50, 18), (100, 28)):
        cleared = sum(
            calibrate(_merit_judge(0.65, seed=r), "j", _pairs(n, r), JudgeConfig(seed=r)).kappa_interval[0]
            >= SETTINGS.min_agreement
            for r in range(600)
        )
        assert cleared == seen and cleared / 600 < 0.05, (n, cleared)


def test_trust_needs_a_passing_calibration_of_the_very_judge_configured(tmp_path):
    assert not judge_trust(None, "mod:judge", SETTINGS).trusted
    assert judge_trust(None, "mod:judge", SETTINGS.model_copy(update={"require_calibration": False})).trusted

    result = calibrate(_merit_judge(0.95), "mod:judge", _pairs(80), SETTINGS, "mod:judge[abc]")
    result.save(JudgeCalibration.path(tmp_path, "mod:judge[abc]"))
    loaded = load_calibration(tmp_path, "mod:judge[abc]")
    assert loaded == result and judge_trust(loaded, "mod:judge[abc]", SETTINGS).trusted
    assert load_calibration(tmp_path, "mod:other") is None  # one file per judge: calibrating another keeps this
    other = judge_trust(loaded, "mod:judge[def]", SETTINGS)  # the function's source changed
    assert not other.trusted and "ctloop judge calibrate" in other.reason
    stricter = judge_trust(loaded, "mod:judge[abc]", SETTINGS.model_copy(update={"min_agreement": 0.99}))
    assert not stricter.trusted and "judge.min_agreement" in stricter.reason
    JudgeCalibration.path(tmp_path, "mod:judge[abc]").write_text('{"judge": "x"}')
    assert load_calibration(tmp_path, "mod:judge[abc]") is None  # unreadable: not trusted, no crash


def test_the_likelihood_judge_is_its_model_instruction_and_margin():
    model = ModelConfig(base="/models/a")
    same = judge_identity("likelihood", SETTINGS, model)
    assert same == judge_identity("likelihood", SETTINGS, ModelConfig(base="/models/a"))
    assert same != judge_identity("likelihood", SETTINGS, ModelConfig(base="/models/b"))
    assert same != judge_identity("likelihood", SETTINGS, model.model_copy(update={"revision": "v2"}))
    assert same != judge_identity("likelihood", SETTINGS.model_copy(update={"margin": 0.1}), model)
    assert same != judge_identity("likelihood", SETTINGS.model_copy(update={"instruction": "Be brief."}), model)
    assert judge_identity("json:dumps", SETTINGS, None).startswith("json:dumps[")  # with its source's hash


def test_a_verdict_that_is_not_a_b_or_tie_is_an_error():
    assert both_ways(lambda p, a, b: " A ", "q", "x", "y") == ("first", "second")
    with pytest.raises(ConfigError, match="must return 'a', 'b' or 'tie'"):
        both_ways(lambda p, a, b: "first", "q", "x", "y")


def test_an_empty_calibration_is_strict_json_and_reads_back(tmp_path):
    result = calibrate(lambda p, a, b: "a", "j", [], SETTINGS)
    assert not result.calibrated and math.isnan(result.kappa)
    result.save(tmp_path / "c.json")
    json.loads((tmp_path / "c.json").read_text(), parse_constant=lambda c: pytest.fail(f"bare {c}"))
    assert math.isnan(JudgeCalibration.load(tmp_path / "c.json").kappa)


def _garbled(text: str, seed: int) -> str:
    """The same characters in a random order: what no language model finds likely."""
    chars = list(text)
    random.Random(seed).shuffle(chars)
    return "".join(chars)


@pytest.mark.slow
def test_judge_calibrate_measures_the_likelihood_judge_on_the_tiny_base_model(tiny_base, tmp_path):
    """The command end to end: harvested corrections of garbled answers, the base model scores both
    answers, the calibration is recorded and trusts the judge; the same answers with the labels
    flipped (users preferring the garbled text) are not calibrated."""
    rows = [json.loads(line) for line in quickstart_rows("new_domain.jsonl", 40)]
    workspace = tmp_path / "ws"
    (workspace / "harvest").mkdir(parents=True)
    with (workspace / "harvest" / "harvest-1.jsonl").open("w") as out:
        for i, row in enumerate(rows):
            meta = {"feedback_kind": "correction", "rejected_answer": _garbled(row["completion"], i)}
            out.write(
                json.dumps({"id": f"h{i}", "prompt": row["prompt"], "completion": row["completion"], "metadata": meta})
                + "\n"
            )
    flipped = tmp_path / "flipped.jsonl"
    with flipped.open("w") as out:
        for i, row in enumerate(rows):
            meta = {"feedback_kind": "correction", "rejected_answer": row["completion"]}
            out.write(
                json.dumps(
                    {
                        "id": f"f{i}",
                        "prompt": row["prompt"],
                        "completion": _garbled(row["completion"], i),
                        "metadata": meta,
                    }
                )
                + "\n"
            )
    config = tmp_path / "c.yaml"
    config.write_text(
        f"model:\n  base: {tiny_base}\n  device: cpu\nshadow:\n  judge: likelihood\nworkspace: {workspace}\n"
    )

    def calibrate_cli(*extra: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "ctloop", "judge", "calibrate", "--config", str(config), "--json", *extra],
            capture_output=True,
            text=True,
            timeout=300,
        )

    done = calibrate_cli()
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["calibrated"] and result["pairs"] == 40 and result["consistency"] == 1.0
    assert result["kappa_interval"][0] >= SETTINGS.min_agreement
    identity = judge_identity("likelihood", SETTINGS, ModelConfig(base=str(tiny_base), device="cpu"))
    assert result["identity"] == identity
    assert judge_trust(load_calibration(workspace, identity), identity, SETTINGS).trusted

    refused = calibrate_cli("--data", str(flipped))
    assert refused.returncode == 3, refused.stderr
    assert not json.loads(refused.stdout)["calibrated"]
    assert not judge_trust(load_calibration(workspace, identity), identity, SETTINGS).trusted


def test_the_likelihood_judge_fits_long_contexts_into_the_model(tiny_base):
    """The tiny model has 128 positions: a request far longer loses its oldest tokens, and an answer
    that alone does not fit is a tie, never an index error."""
    judge = LikelihoodJudge.from_config(ModelConfig(base=str(tiny_base), device="cpu"), SETTINGS)
    assert judge.max_tokens == 128
    long_prompt = "a long request about audio libraries " * 60
    good, garbled = "an audio library", _garbled("an audio library for python", 1)
    scores = judge.scores(long_prompt, [good, garbled])
    assert all(math.isfinite(s) for s in scores)
    assert judge(long_prompt, "package " * 200, good) == "tie"


def test_calibrate_without_labels_says_where_they_come_from(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(f"model:\n  base: nowhere\nshadow:\n  judge: likelihood\nworkspace: {tmp_path / 'ws'}\n")
    done = subprocess.run(
        [sys.executable, "-m", "ctloop", "judge", "calibrate", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and "ctloop harvest" in done.stderr and "Traceback" not in done.stderr


def prefers_challenger(prompt: str, answer_a: str, answer_b: str) -> str:
    """A judge for the shadow test below: the challenger answers 'b' in shadow_record."""
    return "a" if answer_a == "b" else "b"


def test_the_shadow_report_counts_the_judge_once_its_calibration_is_in_the_workspace(tmp_path):
    from ctloop.config import ShadowConfig
    from ctloop.logstore.shadow import ShadowStore
    from ctloop.serving.compare import HOLD, PROMOTE, shadow_report
    from shadow_helpers import shadow_record

    url = f"sqlite:///{tmp_path / 'shadow.db'}"
    store = ShadowStore(url)
    for i in range(300):  # enough pairs for the error rate's bound to clear 2%
        same_cost = {"challenger_latency_ms": 1.5, "challenger_tokens": 3}  # only the judge tells them apart
        store.put(replace(shadow_record(i, prompt=f"q{i}"), **same_cost))
    store.close()
    spec = "test_judge:prefers_challenger"
    settings = ShadowConfig(judge=spec, min_pairs=50, embedding_similarity=False, error_block_s=0, min_duration_s=0)
    before, _ = shadow_report(settings, url, 1, 2, workspace_root=tmp_path)
    assert before.decision == HOLD and any("ctloop judge calibrate" in r for r in before.reasons)

    identity = judge_identity(spec, SETTINGS, None)
    pairs = [LabelledPair(f"p{i}", f"q{i}", "b", "a", "correction") for i in range(40)]  # users agree with it
    calibrate(prefers_challenger, spec, pairs, SETTINGS, identity).save(JudgeCalibration.path(tmp_path, identity))
    after, _ = shadow_report(settings, url, 1, 2, workspace_root=tmp_path)
    assert after.decision == PROMOTE and after.judge["counted"] == 1.0 and after.judge["win_rate"] == 1.0
