"""Everything ctloop writes as JSON is strict JSON (#29): NaN and infinity are `null`, which
JSON.parse and jq accept, and the numbers that carry meaning as NaN read back as NaN."""

from __future__ import annotations

import json
import math

from ctloop.config import GateConfig
from ctloop.evaluation.evaluate import EvalReport
from ctloop.evaluation.gate import decide
from ctloop.fileio import nan_for_none, read_json, write_json, write_jsonl


def _strict(text: str):
    def refuse(constant: str):
        raise ValueError(f"non-standard JSON constant {constant}")

    return json.loads(text, parse_constant=refuse)


def test_nan_and_infinity_are_written_as_null(tmp_path):
    value = {"estimate": float("nan"), "bounds": [float("inf"), -float("inf"), 1.5], "nested": {"x": (float("nan"),)}}
    write_json(tmp_path / "a.json", value)
    assert _strict((tmp_path / "a.json").read_text()) == {
        "estimate": None,
        "bounds": [None, None, 1.5],
        "nested": {"x": [None]},
    }
    write_jsonl(tmp_path / "a.jsonl", [value])
    assert _strict((tmp_path / "a.jsonl").read_text())["estimate"] is None


def test_a_diverged_candidate_still_fails_the_gate_after_its_losses_went_through_json(tmp_path):
    n = 40
    write_json(
        tmp_path / "eval.json",
        {
            "ids": {"new_holdout": [str(i) for i in range(n)]},
            "losses": {"new_holdout": {"candidate": [float("nan")] * n, "base": [2.0] * n}},
        },
    )
    stored = read_json(tmp_path / "eval.json")
    assert stored["losses"]["new_holdout"]["candidate"][0] is None
    report = EvalReport.from_dict(stored)
    assert math.isnan(report.losses["new_holdout"]["candidate"][0])
    decision = decide(nan_for_none(stored["losses"]), GateConfig(), has_champion=False)
    assert decision.outcome == "FAIL" and "training diverged" in decision.reasons[0]
    write_json(tmp_path / "gate.json", decision.to_dict())  # estimates the rule could not compute: null
    gate = _strict((tmp_path / "gate.json").read_text())
    assert gate["rules"][0]["estimate"] is None


def test_nan_for_none_restores_numbers():
    assert math.isnan(nan_for_none(None))
    assert math.isnan(nan_for_none([None, 1.0])[0]) and nan_for_none([None, 1.0])[1] == 1.0
    assert math.isnan(nan_for_none({"a": [None]})["a"][0])


def test_a_diverged_trainings_losses_read_back_as_nan(tmp_path):
    from ctloop.training.trainer import TrainResult

    trained = TrainResult("a", 2, 10, 100, 50, 1.0, [(1, 2.5), (2, float("nan"))], [(1, 0.1), (2, 0.05)])
    write_json(tmp_path / "training.json", trained.to_dict())
    back = TrainResult.from_dict(read_json(tmp_path / "training.json"))
    assert math.isnan(back.final_loss) and back.losses[0] == (1, 2.5)
    assert "final loss nan" in back.summary()
