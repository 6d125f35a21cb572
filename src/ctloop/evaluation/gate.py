"""The gate: a pure function from per-example losses and rules to PASS, FAIL or INCONCLUSIVE.

Scores are per-example mean token losses (lower is better) of the candidate and the reference on
the same examples. Changes are relative to the reference, defined as (candidate - reference) /
|reference| of the mean losses:
    improvement on new data = -change   must be >= min_new_improvement
    regression on old data  = change    must be <= max_old_regression
    regression on each golden set       must be <= max_golden_regression
A point estimate is not enough: a rule passes only when its one-sided paired-bootstrap confidence
bound (resampling examples, the same resample for both models) clears the margin, and that bound
also carries the training-seed noise (`gate.seed_spread`): without it, an A/A candidate (same data,
another seed) passed a margin-0 rule 25% of the time on the tiny model. Fewer than `min_examples` examples: INCONCLUSIVE.
The reference is the champion; with no champion, `first_cycle` decides: compare to the bare base
model, accept, or reject.

Regression could compound: every cycle may lose `max_old_regression` against the champion it
replaces. The anchor (the first champion, fixed for the model's life) bounds the sum: on the
anchor's own era (its cycle's new-data holdout, `ANCHOR_SET`) and on each golden set, the
candidate's regression against it must stay within `max_cumulative_regression`. Not on the replay
holdout: that mixes every past era, and the anchor never trained on the later ones, so its handicap
there masked a +7.6% regression on its own era as +0.19%. With no first champion recorded (the
alias set outside ctloop), the rule is not applied, and says so. A cycle with a champion but no old data to check is INCONCLUSIVE
(forgetting unchecked is not a pass), unless golden sets were checked.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from ctloop.config import GateConfig, GateRule
from ctloop.errors import ConfigError
from ctloop.evaluation.traffic import TrafficStrata

NEW_SET = "new_holdout"
OLD_SET = "replay_holdout"
REJECTED_SET = "rejected_answers"  # answers production rated down: the candidate must not move toward them
ANCHOR_SET = "anchor_holdout"  # the first champion's own era: its cycle's new-data holdout, fixed for life
CANDIDATE = "candidate"
ANCHOR = "anchor"  # the first champion, when it is not the champion itself
EPSILON = 1e-9
TOLERANCE = 1e-12  # bounds are inclusive; float noise must not turn 0.6 - 0.5 >= 0.1 into a failure
PASS, FAIL, INCONCLUSIVE = "PASS", "FAIL", "INCONCLUSIVE"
MIN_GROUPS = 10  # with eval.cluster_by, fewer groups than this cannot bound a change (few-cluster bootstrap)


@dataclass(frozen=True)
class RuleResult:
    name: str
    outcome: str
    reason: str
    estimate: float = float("nan")
    bound: float = float("nan")
    n: int = 0
    limit: float = float("nan")  # what the bound is checked against (a margin, a share); nan: none


@dataclass(frozen=True)
class GateDecision:
    outcome: str
    reference: str  # "champion", "base" or "none"
    reasons: tuple[str, ...]
    metrics: dict[str, float] = field(default_factory=dict)
    rules: tuple[RuleResult, ...] = ()

    @property
    def passed(self) -> bool:
        return self.outcome == PASS

    def summary(self) -> str:
        return f"gate {self.outcome} (vs {self.reference}): " + "; ".join(self.reasons)

    def to_dict(self) -> dict:
        return {**asdict(self), "passed": self.passed}

    @classmethod
    def from_dict(cls, stored: dict) -> GateDecision:
        """Read back what `to_dict` wrote (gate.json; a NaN estimate or bound is stored as null)."""
        return cls(
            stored["outcome"],
            stored["reference"],
            tuple(stored["reasons"]),
            _nan_for_null(stored.get("metrics", {})),
            tuple(RuleResult(**_nan_for_null(rule)) for rule in stored.get("rules", ())),
        )


def _nan_for_null(stored: dict[str, Any]) -> dict[str, Any]:
    return {k: math.nan if v is None else v for k, v in stored.items()}


def decide(
    losses: dict[str, dict[str, list[float]]],
    config: GateConfig,
    has_champion: bool,
    slices: dict[str, dict[str, list[int]]] | None = None,
    metrics: dict[str, dict[str, dict[str, list[float]]]] | None = None,
    anchor: str | None = None,
    anchor_recorded: bool = True,
    clusters: dict[str, list[str]] | None = None,
    extra: tuple[tuple[RuleResult, str], ...] = (),
    traffic: TrafficStrata | None = None,
    rated_only: bool = False,
    traffic_note: str = "",
) -> GateDecision:
    """Apply the gate rules to per-example `losses[eval_set][model]`; every rule adds one reason.

    `slices[eval_set][value]` lists example indices per slice; with `config.per_slice` the new-
    and old-data rules also apply to each slice holding at least `min_examples` examples. `anchor`
    names the model in `losses` that is the first champion (the champion itself when it is);
    `anchor_recorded=False` says the registry records none (the cumulative rule then says so).
    `clusters[eval_set]` gives each example's group (`eval.cluster_by`): the bootstrap resamples
    groups, since rows of one user or session are not independent. `extra` adds rules decided
    elsewhere (the preference rules, `preference_gate.py`), each with its metrics key.

    `traffic` places each new-data row in a stratum of production traffic (`evaluation/traffic.py`);
    with `gate.traffic_weighted`, the new-data rule is also checked weighted to traffic.
    `rated_only` says the new data are rated production rows without a traffic sample: the gate
    then says its new-data rule is about rated prompts only, and `traffic_note` why (a harvest
    without a traffic sample when empty)."""

    def groups(set_name: str, rows: list[int] | None = None) -> list[str] | None:
        labels = (clusters or {}).get(set_name)
        return None if labels is None else labels if rows is None else [labels[i] for i in rows]

    if has_champion:
        reference = "champion"
    elif config.first_cycle == "accept":
        return GateDecision(PASS, "none", ("first cycle (no champion yet): gate.first_cycle=accept",))
    elif config.first_cycle == "reject":
        return GateDecision(
            FAIL,
            "none",
            (
                "first cycle (no champion yet): gate.first_cycle=reject; "
                "register a champion by hand or change the policy",
            ),
        )
    else:
        reference = "base"

    new = losses.get(NEW_SET, {})
    if CANDIDATE not in new or reference not in new:
        raise ValueError(f"gate needs '{CANDIDATE}' and '{reference}' losses on '{NEW_SET}', got {sorted(new)}")
    rules = [
        _rule(
            "new data",
            new[reference],
            new[CANDIDATE],
            reference,
            config,
            sign=-1.0,
            margin=config.min_new_improvement,
            groups=groups(NEW_SET),
        )
    ]
    keys = ["new_improvement"]
    if config.traffic_weighted and traffic is not None:
        rules.append(_traffic_rule(new[reference], new[CANDIDATE], traffic, reference, config))
        keys.append("traffic_new_improvement")
    elif config.traffic_weighted and rated_only:
        rules.append(
            RuleResult(
                "new data, weighted to traffic",
                PASS,
                "new data, weighted to traffic: not checked - the new data are the prompts users rated, and users "
                "rate some prompts far more than others, so the new-data rule is about rated prompts only; "
                + (
                    traffic_note
                    or "keep a traffic sample with the harvest (harvest.audit_rows > 0) to weigh it to traffic"
                ),
            )
        )
        keys.append("traffic_unchecked")
    old = losses.get(OLD_SET, {})
    if CANDIDATE in old and reference in old and old[CANDIDATE]:
        rules.append(
            _rule(
                "old data",
                old[reference],
                old[CANDIDATE],
                reference,
                config,
                sign=1.0,
                margin=config.max_old_regression,
                groups=groups(OLD_SET),
            )
        )
    elif has_champion and not _goldens(losses):
        rules.append(
            RuleResult(
                "old data",
                INCONCLUSIVE,
                "old data: not checked - the replay holdout is empty, so forgetting is unchecked; enable replay "
                "(replay.enabled with replay.holdout_rows > 0) or add golden sets (eval.golden)",
            )
        )
    else:
        why = "checked on the golden sets instead" if has_champion else "first cycle"
        rules.append(RuleResult("old data", PASS, f"old data: not checked - no past held-out data yet ({why})"))
    keys.append("old_regression")
    rejected = losses.get(REJECTED_SET, {})
    if CANDIDATE in rejected and reference in rejected and rejected[CANDIDATE]:
        rules.append(_rejected_rule(rejected[reference], rejected[CANDIDATE], reference, config, groups(REJECTED_SET)))
        rules.append(_rejected_each_rule(rejected[reference], rejected[CANDIDATE], config))
        keys += ["rejected_gain", "rejected_moved_share"]
    for name in _goldens(losses):
        scores = losses[name]
        if CANDIDATE in scores and reference in scores:
            rules.append(
                _rule(
                    f"golden {name}",
                    scores[reference],
                    scores[CANDIDATE],
                    reference,
                    config,
                    sign=1.0,
                    margin=config.max_golden_regression,
                    groups=groups(name),
                )
            )
            keys.append(f"golden_{name}_regression")
    if has_champion and config.max_cumulative_regression is not None and (anchor is not None or not anchor_recorded):
        cumulative = _cumulative_rules(losses, config, anchor, clusters or {})
        rules += [rule for rule, _ in cumulative]
        keys += [key for _, key in cumulative]
    if config.per_slice and slices:
        for set_name, label, sign, margin in (
            (NEW_SET, "new data", -1.0, config.min_new_improvement),
            (OLD_SET, "old data", 1.0, config.max_old_regression),
        ):
            scores = losses.get(set_name, {})
            if CANDIDATE not in scores or reference not in scores:
                continue
            for value, rows in sorted(slices.get(set_name, {}).items()):
                name = f"{label} [{value}]"
                if len(rows) < config.min_examples:
                    rules.append(
                        RuleResult(
                            name,
                            PASS,
                            f"{name}: {len(rows)} examples < gate.min_examples, reported, not gated",
                            n=len(rows),
                        )
                    )
                else:
                    rules.append(
                        _rule(
                            name,
                            [scores[reference][i] for i in rows],
                            [scores[CANDIDATE][i] for i in rows],
                            reference,
                            config,
                            sign,
                            margin,
                            groups=groups(set_name, rows),
                        )
                    )
                keys.append(f"slice_{set_name}_{value}")
    for index, configured in enumerate(config.rules):
        rules.append(
            _configured_rule(configured, losses, metrics or {}, slices or {}, reference, config, clusters or {})
        )
        keys.append(f"rule{index}_{configured.metric}")
    rules += [rule for rule, _ in extra]
    keys += [key for _, key in extra]
    outcomes = {r.outcome for r in rules}
    outcome = FAIL if FAIL in outcomes else INCONCLUSIVE if INCONCLUSIVE in outcomes else PASS
    summary: dict[str, float] = {}
    for rule, key in zip(rules, keys, strict=True):
        if math.isfinite(rule.estimate):
            summary[key] = rule.estimate
        if math.isfinite(rule.bound):  # a rule that reports without gating has no bound
            summary[f"{key}_bound"] = rule.bound
    return GateDecision(outcome, reference, tuple(r.reason for r in rules), summary, tuple(rules))


def _goldens(losses: dict) -> list[str]:
    """The golden regression suites among the evaluated sets."""
    return sorted(
        name
        for name in set(losses) - {NEW_SET, OLD_SET, REJECTED_SET, ANCHOR_SET}
        if not name.startswith(("preference_", "agreement_"))
    )


def _cumulative_rules(
    losses: dict, config: GateConfig, anchor: str | None, clusters: dict[str, list[str]]
) -> list[tuple[RuleResult, str]]:
    """The candidate against the first champion on its own era and on each golden set."""
    name = "vs the first champion (cumulative)"
    if anchor is None:
        return [
            (
                RuleResult(
                    name,
                    PASS,
                    f"{name}: not checked - no first champion is recorded (the champion alias was set outside "
                    f"ctloop's promotion); promote through ctloop (`ctloop promote`) to record one, or set "
                    f"gate.max_cumulative_regression: null",
                ),
                "cumulative_unchecked",
            )
        ]
    out = []
    for set_name in [ANCHOR_SET, *_goldens(losses)]:
        scores = losses.get(set_name, {})
        if scores.get(CANDIDATE) and anchor in scores:
            label = "the first champion's own era" if set_name == ANCHOR_SET else set_name
            rule = _rule(
                f"{label} {name}",
                scores[anchor],
                scores[CANDIDATE],
                anchor,
                config,
                sign=1.0,
                margin=float(config.max_cumulative_regression or 0.0),
                groups=clusters.get(set_name),
            )
            out.append((rule, f"cumulative_{set_name}_regression"))
    if not out:
        reason = (
            f"{name}: not checked - the first champion's own holdout was not found (not in this workspace, not "
            f"in its MLflow run) and there is no golden set; add one (eval.golden)"
        )
        out.append((RuleResult(name, PASS, reason), "cumulative_unchecked"))
    return out


def _configured_rule(
    rule: GateRule,
    losses: dict,
    metrics: dict,
    slices: dict,
    reference: str,
    config: GateConfig,
    clusters: dict[str, list[str]] | None = None,
) -> RuleResult:
    """A `gate.rules` entry: absolute bounds on the candidate's mean, a change bound vs the reference."""
    scores = (
        losses.get(rule.set, {})
        if rule.metric == "loss"
        else {model: by_metric.get(rule.metric) for model, by_metric in metrics.get(rule.set, {}).items()}
    )
    if scores.get(CANDIDATE) is None or scores.get(reference) is None:
        raise ConfigError(
            "gate.rules",
            [
                f"a rule names metric '{rule.metric}' on set '{rule.set}', which this "
                f"evaluation did not produce (sets: {sorted(losses)}); fix the names, or "
                f"set eval.generate: true for generation metrics"
            ],
        )
    candidate, ref = np.asarray(scores[CANDIDATE], float), np.asarray(scores[reference], float)
    name = f"{rule.metric} on {rule.set}" + (f" [{rule.slice}]" if rule.slice else "")
    if rule.slice is not None:
        rows = slices.get(rule.set, {}).get(rule.slice)
        if rows is None:
            raise ConfigError(
                "gate.rules",
                [f"slice '{rule.slice}' of set '{rule.set}' does not exist; check eval.slice_by and the slice values"],
            )
        candidate, ref = candidate[rows], ref[rows]
    labels = (clusters or {}).get(rule.set)
    if labels is not None and rule.slice is not None:
        labels = [labels[i] for i in slices[rule.set][rule.slice]]
    if len(candidate) < config.min_examples:
        return RuleResult(
            name,
            INCONCLUSIVE,
            f"{name}: {len(candidate)} examples < gate.min_examples={config.min_examples}: inconclusive",
            n=len(candidate),
        )
    higher = rule.higher_is_better if rule.higher_is_better is not None else rule.metric != "loss"
    level, problems, parts = (
        config.confidence,
        [],
        [f"{name}: {reference} {ref.mean():.4f} -> candidate {candidate.mean():.4f}"],
    )
    replicates = _replicates(ref, candidate, config, labels)
    if rule.min is not None:
        low = float(np.quantile(replicates.candidate_means(), 1 - level))
        ok = low >= rule.min - TOLERANCE
        parts.append(f"{level:.0%} lower bound {low:.4f} {'>=' if ok else '<'} min {rule.min}")
        problems += [] if ok else ["min"]
    if rule.max is not None:
        high = float(np.quantile(replicates.candidate_means(), level))
        ok = high <= rule.max + TOLERANCE
        parts.append(f"{level:.0%} upper bound {high:.4f} {'<=' if ok else '>'} max {rule.max}")
        problems += [] if ok else ["max"]
    estimate = bound = float("nan")
    if rule.min_change is not None:
        if rule.change == "relative" and abs(ref.mean()) < EPSILON:
            return RuleResult(
                name,
                FAIL,
                f"{name}: {reference} value is ~0, relative change undefined; use change: absolute",
                n=len(candidate),
            )
        sign = 1.0 if higher else -1.0
        changes = sign * (replicates.relative_change() if rule.change == "relative" else replicates.absolute_change())
        point_denominator = abs(ref.mean()) if rule.change == "relative" else 1.0
        estimate = float(sign * (candidate.mean() - ref.mean()) / point_denominator)
        bound = float(np.quantile(changes, 1 - level))
        shown = "{:+.2%}" if rule.change == "relative" else "{:+.4f}"
        ok = bound >= rule.min_change - TOLERANCE
        parts.append(
            f"{rule.change} change {shown.format(estimate)} ({level:.0%} lower bound {shown.format(bound)})"
            f" {'>=' if ok else '<'} required {shown.format(rule.min_change)}"
        )
        problems += [] if ok else ["change"]
    return RuleResult(name, FAIL if problems else PASS, ", ".join(parts), estimate, bound, len(candidate))


def _rule(
    name: str,
    reference_losses: list[float],
    candidate_losses: list[float],
    reference: str,
    config: GateConfig,
    sign: float,
    margin: float,
    groups: list[str] | None = None,
) -> RuleResult:
    """One paired rule. sign=-1: the improvement (-change) must reach `margin` (checked on its lower
    bound); sign=+1: the regression (change) must stay within `margin` (checked on its upper bound)."""
    ref = np.asarray(reference_losses, dtype=np.float64)
    cand = np.asarray(candidate_losses, dtype=np.float64)
    if ref.shape != cand.shape:
        raise ValueError(f"{name}: candidate and {reference} were scored on different examples")
    n = len(ref)
    what = "improvement" if sign < 0 else "change"
    prefix = f"{name}: loss {ref.mean():.4f} -> {cand.mean():.4f}" if n else f"{name}: no examples"
    problem = _undefined(reference, float(ref.mean()) if n else float("nan"), float(cand.mean()) if n else 0.0)
    if n and problem:
        return RuleResult(name, FAIL, f"{name}: {problem}", n=n)
    if n < config.min_examples:
        return RuleResult(
            name,
            INCONCLUSIVE,
            f"{prefix}; {n} examples < gate.min_examples={config.min_examples}: inconclusive, collect a larger holdout",
            n=n,
        )
    estimate = sign * (cand.mean() - ref.mean()) / abs(ref.mean())
    replicates = _replicates(ref, cand, config, groups)
    if replicates.clusters is not None and replicates.clusters < MIN_GROUPS:
        return RuleResult(
            name,
            INCONCLUSIVE,
            f"{prefix}; {replicates.clusters} groups (eval.cluster_by) < {MIN_GROUPS}: too few to bound the change; "
            f"collect rows from more users or sessions",
            n=n,
        )
    samples = replicates.relative_change() * sign
    level = config.confidence
    if sign < 0:
        bound = float(np.quantile(samples, 1 - level))
        ok = bound >= margin
        verdict = f"{'>=' if ok else '<'} required {margin:+.2%}"
        side = "lower"
    else:
        bound = float(np.quantile(samples, level))
        ok = bound <= margin
        verdict = f"{'<=' if ok else '>'} allowed {margin:+.2%}"
        side = "upper"
    unit = f"n={n}" if replicates.clusters is None else f"n={n} in {replicates.clusters} groups"
    reason = f"{prefix}, {what} {estimate:+.2%} ({level:.0%} {side} bound {bound:+.2%}, {unit}) {verdict}"
    if not ok:
        reason += "; " + _power_note(replicates, sign, margin, float(estimate), n, config)
    return RuleResult(name, PASS if ok else FAIL, reason, float(estimate), bound, n, margin)


POWER = 0.8  # what a failed rule's power note is about


def _power_note(
    replicates: _Replicates, sign: float, margin: float, estimate: float, n: int, config: GateConfig
) -> str:
    """What a failed rule's holdout can show, with 80% power (a normal approximation of the bound):
    the smallest true improvement it passes (or the largest regression), and how many rows would
    clear the margin at the change seen. The evaluation noise shrinks with more rows, the training-
    seed noise (`gate.seed_spread`) does not."""
    from statistics import NormalDist

    z = NormalDist().inv_cdf(config.confidence) + NormalDist().inv_cdf(POWER)
    evaluation = float(np.std(replicates.relative_change() - replicates.seed_noise))
    seed = config.seed_spread
    spread = math.hypot(evaluation, seed)
    unit = "rows" if replicates.clusters is None else "groups"
    size = n if replicates.clusters is None else replicates.clusters
    if sign < 0:
        reach = margin + z * spread
        shown = f"this holdout passes a true improvement of {reach:+.2%} or more with {POWER:.0%} power"
        gap = estimate - margin
    else:
        reach = margin - z * spread
        shown = (
            f"this holdout passes a true change of {reach:+.2%} or less with {POWER:.0%} power"
            if reach > -1
            else f"this holdout cannot show a change within {margin:+.2%} with {POWER:.0%} power"
        )
        gap = margin - sign * estimate
    if gap <= 0:
        return f"{shown} (the change seen does not clear the margin, so more rows alone would not)"
    room = (gap / z) ** 2 - seed**2
    if room <= 0 or evaluation == 0:
        return f"{shown}; at the change seen, the training-seed noise ({seed:.2%}) alone keeps it from clearing"
    needed = math.ceil(size * evaluation**2 / room)
    return f"{shown}; about {needed} {unit} would clear it at the change seen"


def _rejected_rule(
    reference_losses: list[float],
    candidate_losses: list[float],
    reference: str,
    config: GateConfig,
    groups: list[str] | None = None,
) -> RuleResult:
    """The answers users rated down: the candidate's loss on them may fall (the answer becoming
    likelier) by at most gate.max_rejected_gain, checked on the upper bound of that fall."""
    name = "rejected answers"
    ref = np.asarray(reference_losses, dtype=np.float64)
    cand = np.asarray(candidate_losses, dtype=np.float64)
    n = len(ref)
    prefix = f"{name}: loss {ref.mean():.4f} -> {cand.mean():.4f}"
    if n < config.min_examples:
        return RuleResult(name, PASS, f"{prefix}; {n} examples < gate.min_examples: reported, not gated", n=n)
    gain = float((ref.mean() - cand.mean()) / max(abs(ref.mean()), EPSILON))
    bound = float(np.quantile(-_replicates(ref, cand, config, groups).relative_change(), config.confidence))
    ok = bound <= config.max_rejected_gain
    verdict = f"{'<=' if ok else '>'} allowed {config.max_rejected_gain:+.2%}"
    reason = (
        f"{prefix}, moved toward them by {gain:+.2%} ({config.confidence:.0%} upper bound {bound:+.2%}, "
        f"n={n}) {verdict}"
    )
    return RuleResult(name, PASS if ok else FAIL, reason, gain, bound, n, config.max_rejected_gain)


def _rejected_each_rule(reference_losses: list[float], candidate_losses: list[float], config: GateConfig) -> RuleResult:
    """The answers users rated down, one by one. The mean rule above misses a candidate that makes
    some of them much likelier and the rest a little less likely: one that made a fifth of them
    twice as likely per token and the rest 10% less likely passed it in 175 of 200 simulated sets
    of 150 answers (this rule failed 196 of them). Here an answer whose loss falls by more than
    `gate.max_rejected_answer_gain` of the reference's loss on it is moved toward, and the rule
    fails when the share moved toward is shown above `gate.max_rejected_share`
    (the exact binomial test of that share: its Clopper-Pearson lower bound at `gate.confidence`).
    The burden of proof is on the evidence, so it gates a set of any size: 6 of 6 answers moved is
    a failure, 1 of 6 is not."""
    from scipy.stats import beta

    name = "rejected answers (each)"
    ref = np.asarray(reference_losses, dtype=np.float64)
    cand = np.asarray(candidate_losses, dtype=np.float64)
    n = len(ref)
    change = (ref - cand) / np.maximum(np.abs(ref), EPSILON)
    moved = int(np.sum(change > config.max_rejected_answer_gain + TOLERANCE))
    lower = float(beta.ppf(1 - config.confidence, moved, n - moved + 1)) if moved else 0.0
    ok = lower <= config.max_rejected_share + TOLERANCE
    verdict = f"{'<=' if ok else '>'} allowed {config.max_rejected_share:.0%}"
    reason = (
        f"{name}: {moved} of {n} made likelier by more than {config.max_rejected_answer_gain:.0%} of their loss "
        f"({config.confidence:.0%} lower bound of the share {lower:.1%}) {verdict}"
    )
    return RuleResult(
        name, PASS if ok else FAIL, reason, moved / n if n else float("nan"), lower, n, config.max_rejected_share
    )


def _traffic_rule(
    reference_losses: list[float],
    candidate_losses: list[float],
    traffic: TrafficStrata,
    reference: str,
    config: GateConfig,
) -> RuleResult:
    """The new-data rule with each held-out row weighted so that its stratum of prompts counts as
    much as its share of traffic (post-stratification), not as often as users rate it."""
    name = "new data, weighted to traffic"
    ref = np.asarray(reference_losses, dtype=np.float64)
    cand = np.asarray(candidate_losses, dtype=np.float64)
    n = len(ref)
    if len(traffic.strata) != n:
        raise ValueError(f"{name}: {len(traffic.strata)} strata for {n} held-out rows; evaluate the cycle again")
    least = config.min_stratum_rows
    uncovered = traffic.uncovered_share(least)
    if n < config.min_examples:
        return RuleResult(name, INCONCLUSIVE, f"{name}: {n} examples < gate.min_examples", n=n)
    if uncovered > config.max_unweighed_traffic + TOLERANCE:
        return RuleResult(
            name,
            INCONCLUSIVE,
            f"{name}: {uncovered:.0%} of traffic is in prompt clusters with fewer than {least} held-out rated rows "
            f"(gate.min_stratum_rows; > gate.max_unweighed_traffic {config.max_unweighed_traffic:.0%}); users rate "
            f"too narrow a part of traffic to judge it: collect feedback on more kinds of prompt",
            n=n,
        )
    replicates, point_ref, point_cand = _stratified_replicates(ref, cand, traffic, config)
    problem = _undefined(reference, point_ref, point_cand)
    if problem:
        return RuleResult(name, FAIL, f"{name}: {problem}", n=n)
    estimate = -(point_cand - point_ref) / abs(point_ref)
    bound = float(np.quantile(-replicates.relative_change(), 1 - config.confidence))
    ok = bound >= config.min_new_improvement - TOLERANCE
    verdict = f"{'>=' if ok else '<'} required {config.min_new_improvement:+.2%}"
    strata = len(traffic.weighed(least))
    not_weighed = (
        f"; {uncovered:.0%} of traffic in clusters with fewer than {least} rated rows, not weighed" if uncovered else ""
    )
    reason = (
        f"{name}: loss {point_ref:.4f} -> {point_cand:.4f}, improvement {estimate:+.2%} "
        f"({config.confidence:.0%} lower bound {bound:+.2%}, n={n} in {strata} of {len(traffic.counts)} traffic "
        f"strata, {sum(traffic.counts)} sampled requests{not_weighed}) {verdict}"
    )
    return RuleResult(name, PASS if ok else FAIL, reason, float(estimate), bound, n, config.min_new_improvement)


def _stratified_replicates(
    ref: np.ndarray, cand: np.ndarray, traffic: TrafficStrata, config: GateConfig
) -> tuple[_Replicates, float, float]:
    """Post-stratified means (sum over strata of traffic share x the stratum's mean) over the
    strata with at least `gate.min_stratum_rows` held-out rows, bootstrapped the stratified way: each
    stratum's rows resampled within it (its size fixed), and the traffic shares drawn again from the
    sample's counts (a multinomial), so the bound carries both. Resampling across strata instead let
    a stratum of one or two rows keep its share of traffic with almost no spread: at no true change,
    20-48% of candidates passed (against 5%) with such strata."""
    rng = np.random.default_rng(config.seed)
    labels = np.asarray(traffic.strata)
    counts = np.asarray(traffic.counts, dtype=np.float64)
    weighed = sorted(traffic.weighed(config.min_stratum_rows))
    members = [np.flatnonzero(labels == k) for k in weighed]
    point_ref = np.array([ref[rows].mean() for rows in members])
    point_cand = np.array([cand[rows].mean() for rows in members])
    share = counts[weighed] / counts[weighed].sum()
    total = int(counts.sum())
    ref_means = np.empty(config.bootstrap_samples)
    cand_means = np.empty(config.bootstrap_samples)
    for start in range(0, config.bootstrap_samples, 256):
        stop = min(start + 256, config.bootstrap_samples)
        b = stop - start
        ref_strata = np.empty((b, len(weighed)))
        cand_strata = np.empty((b, len(weighed)))
        for j, rows in enumerate(members):
            picks = rows[rng.integers(0, len(rows), size=(b, len(rows)))]
            # A resampled mean of m rows spreads sqrt((m - 1) / m) too little; put it back.
            widen = math.sqrt(len(rows) / (len(rows) - 1))
            ref_strata[:, j] = point_ref[j] + (ref[picks].mean(axis=1) - point_ref[j]) * widen
            cand_strata[:, j] = point_cand[j] + (cand[picks].mean(axis=1) - point_cand[j]) * widen
        drawn = rng.multinomial(total, counts / counts.sum(), size=b)[:, weighed].astype(np.float64)
        shares = drawn / np.maximum(drawn.sum(axis=1, keepdims=True), 1.0)
        ref_means[start:stop] = (shares * ref_strata).sum(axis=1)
        cand_means[start:stop] = (shares * cand_strata).sum(axis=1)
    replicates = _Replicates(ref_means, cand_means, _seed_noise(rng, config))
    return replicates, float(share @ point_ref), float(share @ point_cand)


def _seed_noise(rng: np.random.Generator, config: GateConfig) -> np.ndarray:
    """Per replicate, the training-seed noise (`gate.seed_spread`, Gaussian, relative)."""
    noise = rng.normal(0.0, config.seed_spread, size=config.bootstrap_samples) if config.seed_spread else 0.0
    return np.broadcast_to(noise, (config.bootstrap_samples,))


@dataclass(frozen=True)
class _Replicates:
    """The paired bootstrap behind every rule's bound: per replicate, the reference's and the
    candidate's means over one resample of the examples (the same resample for both; of groups of
    examples, with `eval.cluster_by`), and a draw of the training-seed noise (`gate.seed_spread`,
    Gaussian, relative): two runs on the same data differ by that much before any example is
    resampled. Built-in and configured rules read their bounds from here, so none can leave the seed
    noise, or the groups, out."""

    reference: np.ndarray
    candidate: np.ndarray
    seed_noise: np.ndarray
    clusters: int | None = None  # groups resampled; None: rows

    def relative_change(self) -> np.ndarray:
        """(candidate - reference) / |reference| per replicate, seed noise included."""
        return (self.candidate - self.reference) / np.maximum(np.abs(self.reference), EPSILON) + self.seed_noise

    def absolute_change(self) -> np.ndarray:
        """candidate - reference per replicate, the seed noise scaled to the reference's mean."""
        return self.candidate - self.reference + self.seed_noise * np.abs(self.reference)

    def candidate_means(self) -> np.ndarray:
        """The candidate's mean per replicate, the seed noise scaled to it (another seed, another mean)."""
        return self.candidate + self.seed_noise * np.abs(self.candidate)


def _replicates(ref: np.ndarray, cand: np.ndarray, config: GateConfig, groups: list[str] | None = None) -> _Replicates:
    rng = np.random.default_rng(config.seed)
    n = len(ref)
    ref_means = np.empty(config.bootstrap_samples)
    cand_means = np.empty(config.bootstrap_samples)
    clusters = None
    if groups is not None and len(set(groups)) < n:
        # Rows of one user, session or document move together: resample the groups. The spread of
        # a mean over K resampled groups is low by a factor sqrt((K - 1) / K); put it back.
        labels, index = np.unique(np.asarray(groups), return_inverse=True)
        clusters = len(labels)
        ref_sums, cand_sums = np.bincount(index, ref, clusters), np.bincount(index, cand, clusters)
        sizes = np.bincount(index, minlength=clusters).astype(np.float64)
        widen = math.sqrt(clusters / max(clusters - 1, 1))
        ref_point, cand_point = ref.mean(), cand.mean()
        for start in range(0, config.bootstrap_samples, 256):
            stop = min(start + 256, config.bootstrap_samples)
            idx = rng.integers(0, clusters, size=(stop - start, clusters))
            size = sizes[idx].sum(axis=1)
            ref_means[start:stop] = ref_point + (ref_sums[idx].sum(axis=1) / size - ref_point) * widen
            cand_means[start:stop] = cand_point + (cand_sums[idx].sum(axis=1) / size - cand_point) * widen
    else:
        for start in range(0, config.bootstrap_samples, 256):
            stop = min(start + 256, config.bootstrap_samples)
            idx = rng.integers(0, n, size=(stop - start, n))
            ref_means[start:stop] = ref[idx].mean(axis=1)
            cand_means[start:stop] = cand[idx].mean(axis=1)
    return _Replicates(ref_means, cand_means, _seed_noise(rng, config), clusters)


def _undefined(name: str, reference: float, candidate: float) -> str:
    """Why a relative change cannot be computed, or '' when it can."""
    if not math.isfinite(candidate):
        return f"candidate loss is {candidate}; training diverged - lower train.learning_rate"
    if not math.isfinite(reference):
        return f"{name} loss is {reference}; check the {name} model and the evaluation set"
    if abs(reference) < EPSILON:
        return f"{name} loss is ~0, relative change undefined; check the evaluation set"
    return ""
