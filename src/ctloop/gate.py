"""The gate: a pure function from evaluation means and rules to a decision with reasons.

Scores are mean token losses (lower is better). Changes are relative to the reference:
    improvement on new data  = (reference - candidate) / reference   must be >= min_new_improvement
    regression on old data   = (candidate - reference) / reference   must be <= max_old_regression
The reference is the champion; with no champion, `first_cycle` decides: compare to the bare base
model, accept, or reject.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from ctloop.config import GateConfig

NEW_SET = "new_holdout"
OLD_SET = "replay_holdout"
CANDIDATE = "candidate"
EPSILON = 1e-9


@dataclass(frozen=True)
class GateDecision:
    passed: bool
    reference: str  # "champion", "base" or "none"
    reasons: tuple[str, ...]
    metrics: dict[str, float] = field(default_factory=dict)

    @property
    def outcome(self) -> str:
        return "PASS" if self.passed else "FAIL"

    def summary(self) -> str:
        return f"gate {self.outcome} (vs {self.reference}): " + "; ".join(self.reasons)

    def to_dict(self) -> dict:
        return {**asdict(self), "outcome": self.outcome}


def decide(means: dict[str, dict[str, float]], config: GateConfig, has_champion: bool) -> GateDecision:
    """Apply the gate rules to `means[eval_set][model]`; every rule adds one reason."""
    if has_champion:
        reference = "champion"
    elif config.first_cycle == "accept":
        return GateDecision(True, "none", ("first cycle (no champion yet): gate.first_cycle=accept",))
    elif config.first_cycle == "reject":
        return GateDecision(False, "none", ("first cycle (no champion yet): gate.first_cycle=reject; "
                                            "register a champion by hand or change the policy",))
    else:
        reference = "base"

    reasons: list[str] = []
    metrics: dict[str, float] = {}
    passed = True

    new = means.get(NEW_SET, {})
    if CANDIDATE not in new or reference not in new:
        raise ValueError(f"gate needs '{CANDIDATE}' and '{reference}' scores on '{NEW_SET}', got {new}")
    change, problem = _relative_change(reference, new[reference], new[CANDIDATE])
    if problem:
        passed = False
        reasons.append(f"new data: {problem}")
    else:
        improvement = -change
        metrics["new_improvement"] = improvement
        ok = improvement >= config.min_new_improvement
        passed &= ok
        reasons.append(f"new data: loss {new[reference]:.4f} -> {new[CANDIDATE]:.4f}, improvement "
                       f"{improvement:+.2%} {'>=' if ok else '<'} required {config.min_new_improvement:+.2%}")

    old = means.get(OLD_SET, {})
    if CANDIDATE not in old or reference not in old:
        reasons.append("old data: not checked - no past held-out data yet (first cycle, or replay disabled)")
    else:
        change, problem = _relative_change(reference, old[reference], old[CANDIDATE])
        if problem:
            passed = False
            reasons.append(f"old data: {problem}")
        else:
            metrics["old_regression"] = change
            ok = change <= config.max_old_regression
            passed &= ok
            reasons.append(f"old data: loss {old[reference]:.4f} -> {old[CANDIDATE]:.4f}, change {change:+.2%} "
                           f"{'<=' if ok else '>'} allowed {config.max_old_regression:+.2%}")
    return GateDecision(passed, reference, tuple(reasons), metrics)


def _relative_change(name: str, reference: float, candidate: float) -> tuple[float, str]:
    """(candidate - reference) / |reference|, or a problem that makes it undefined."""
    if not math.isfinite(candidate):
        return 0.0, f"candidate loss is {candidate}; training diverged - lower train.learning_rate"
    if not math.isfinite(reference):
        return 0.0, f"{name} loss is {reference}; check the {name} model and the evaluation set"
    if abs(reference) < EPSILON:
        return 0.0, f"{name} loss is ~0, relative change undefined; check the evaluation set"
    return (candidate - reference) / abs(reference), ""
