"""Comparison of logged shadow pairs and the decision: PROMOTE, HOLD or REJECT, with reasons.

Shadow traffic is paired (the same request went to both models), so the statistics are paired:
the challenger's error rate, discordant empty answers (McNemar), the medians of per-request log
latency and log length ratios (sign tests) and a judge's win rate are all proportions, each tested
against its limit. Agreement (exact match, token F1, embedding cosine) is reported for triage: a
different answer is not a worse one.

Every test is always valid (`sequential.py`: mixture e-values): the report may be run again and
again as pairs arrive, and a decision it reaches at any look keeps its error rate.

REJECT: the evidence shows the challenger is worse (error rate, empty answers, latency, length,
judge). PROMOTE: enough pairs and every bound clears its limit: the error rate's upper bound is at
most `max_error_rate`, the latency and length ratios are shown inside their limits, and a judge's
win rate is shown at its floor. Otherwise HOLD, with the pairs that 80% power needs at the rates
seen so far. PROMOTE is an intersection of one-sided tests, each at 1 - `confidence`: if any one
limit is truly broken, a PROMOTE happens with probability at most that, at any look.

Requests the challenger never answered count too: the ones its open circuit breaker skipped are
failures in the error rate, and when more than `max_dropped_share` of the mirrored requests were
dropped from a full queue, the pairs no longer stand for the traffic: HOLD.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ctloop.config import JudgeConfig, ModelConfig, ShadowConfig
from ctloop.evaluation.judge import JudgeTrust, both_ways
from ctloop.registry.promotion import HOLD, PROMOTE, REJECT  # one definition, with the promotion policy
from ctloop.serving.sequential import (
    anytime_p_value,
    block_bound,
    block_shares,
    block_shown,
    blocks_for_promote,
    confidence_bound,
    median_interval,
    pairs_for_power,
    shown,
)


@dataclass(frozen=True)
class ShadowReport:
    champion_version: str
    challenger_version: str
    decision: str
    reasons: list[str]
    counts: dict[str, int]
    error_rate: float
    latency_ms: dict[str, dict[str, float]] = field(default_factory=dict)
    latency_ratio: float = float("nan")
    length_ratio: float = float("nan")
    agreement: dict[str, float] = field(default_factory=dict)
    empty_answers: dict[str, int] = field(default_factory=dict)
    judge: dict[str, float] = field(default_factory=dict)
    # Effect sizes with their always-valid bounds (each side at shadow.confidence): estimate, lower, upper.
    effects: dict[str, dict[str, float]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        lines = [
            f"shadow v{self.champion_version} (champion) vs v{self.challenger_version} (challenger): {self.decision}",
            f"  pairs: {self.counts.get('completed', 0)} completed, {self.counts.get('timed_out', 0)} timed out, "
            f"{self.counts.get('errored', 0)} errored, {self.counts.get('cancelled', 0)} cancelled, "
            f"{self.counts.get('skipped_breaker', 0)} skipped by the open breaker, "
            f"{self.counts.get('dropped', 0)} dropped (queue full)",
        ]
        if self.latency_ms:
            lines.append(
                "  latency p50/p99 ms: "
                + ", ".join(f"{side} {v['p50']:.1f}/{v['p99']:.1f}" for side, v in self.latency_ms.items())
            )
        if self.agreement:
            lines.append("  agreement: " + ", ".join(f"{k} {v:.3f}" for k, v in self.agreement.items()))
        if self.effects:
            lines.append(
                "  effects, estimate (bounds): "
                + ", ".join(
                    f"{k} {v['estimate']:.3g} ({v['lower']:.3g} to {v['upper']:.3g})" for k, v in self.effects.items()
                )
            )
        lines += [f"  - {reason}" for reason in self.reasons]
        return "\n".join(lines)


def _percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    p50, p95, p99 = np.percentile(values, [50, 95, 99])
    return {"p50": float(p50), "p95": float(p95), "p99": float(p99), "mean": float(np.mean(values))}


def _more_pairs(needed: int | None, have: int) -> str:
    if needed is None:
        return (
            "at the rate seen so far (at, above or within a hair of the limit) no practical number of pairs clears it"
        )
    if needed <= have:  # an unlucky draw so far: more pairs will usually settle it
        return f"at the rate seen so far {needed} pairs clear it with 80% power; collect more"
    return f"about {needed - have} more pairs ({needed} in all) would clear it with 80% power at the rate seen so far"


def _signs(differences: np.ndarray) -> tuple[int, int]:
    """(differences above zero, non-zero differences): the counts of a sign test of the median. A sign
    test tests the median itself and assumes no symmetry (Wilcoxon's signed-rank test does neither,
    and rejected a median sitting exactly at the limit up to 94% of the time on skewed ratios)."""
    nonzero = differences[differences != 0]
    return int((nonzero > 0).sum()), len(nonzero)


def compare(
    rows: list[dict[str, Any]],
    settings: ShadowConfig,
    champion_version: str,
    challenger_version: str,
    judge: Any = None,
    embedder: Any = None,
    judge_trust: JudgeTrust | None = None,
) -> ShadowReport:
    """Compare one champion/challenger pair's logged rows and decide (a judge counts only when
    `judge_trust` trusts it)."""
    alpha = 1 - settings.confidence
    counts = {
        status: sum(r["status"] == status for r in rows)
        for status in ("completed", "timed_out", "errored", "cancelled", "skipped_breaker", "dropped")
    }
    done = [r for r in rows if r["status"] == "completed"]
    # Cancelled: our shutdown, not the challenger's fault. Skipped by the open breaker: it failed before.
    failures = counts["timed_out"] + counts["errored"] + counts["skipped_breaker"]
    attempted = counts["completed"] + failures
    error_rate = failures / attempted if attempted else 0.0
    reject: list[str] = []
    hold: list[str] = []
    passed: list[str] = []

    if not rows:
        hold.append(
            f"no logged pairs for v{champion_version} vs v{challenger_version}; send traffic to "
            f"`ctloop serve` (it mirrors to the challenger) and run the report again"
        )
    elif len(done) < settings.min_pairs:
        hold.append(f"{len(done)} completed pairs, a decision needs shadow.min_pairs={settings.min_pairs}")
    if rows and counts["dropped"] / len(rows) > settings.max_dropped_share:
        hold.append(
            f"{counts['dropped']} of {len(rows)} mirrored requests ({counts['dropped'] / len(rows):.1%}) were dropped "
            f"from a full shadow queue, above shadow.max_dropped_share={settings.max_dropped_share:.0%}: the pairs may "
            f"not stand for the traffic; raise shadow.queue_size or shadow.workers, or lower shadow.fraction"
        )

    confidence = settings.confidence
    tried = [r for r in rows if r["status"] in ("completed", "timed_out", "errored", "skipped_breaker")]
    times = np.array([float(r.get("created_at") or 0.0) for r in tried])
    duration = float(times.max() - times.min()) if len(times) else 0.0
    if rows and duration < settings.min_duration_s:
        hold.append(
            f"the pairs span {duration:.0f} s, a decision needs shadow.min_duration_s={settings.min_duration_s:.0f} s "
            f"(several circuit-breaker cycles: outages must have had time to show)"
        )
    if settings.error_block_s > 0 and attempted:
        failed = np.array([r["status"] != "completed" for r in tried])
        shares = block_shares(times, failed, settings.error_block_s)
        low = block_bound(shares, confidence, upper=False)
        high = block_bound(shares, confidence, upper=True)
        _block_error_rule(shares, error_rate, low, high, settings, reject, hold, passed)
        attempted = 0  # decided in blocks above
    else:
        low = confidence_bound(failures, attempted, confidence, upper=False)
        high = confidence_bound(failures, attempted, confidence, upper=True)
    if attempted:
        if shown(failures, attempted, settings.max_error_rate, True, confidence):
            reject.append(
                f"challenger error+timeout rate {error_rate:.1%} (lower bound {low:.1%}) is above "
                f"shadow.max_error_rate={settings.max_error_rate:.1%}"
            )
        elif not shown(failures, attempted, settings.max_error_rate, False, confidence):
            needed = pairs_for_power(error_rate, settings.max_error_rate, False, confidence)
            hold.append(
                f"challenger error+timeout rate {error_rate:.1%} ({failures} of {attempted}): its upper bound "
                f"{high:.1%} is not yet <= shadow.max_error_rate={settings.max_error_rate:.1%}; "
                + _more_pairs(needed, attempted)
            )
        else:
            passed.append(
                f"challenger error+timeout rate {error_rate:.1%} (upper bound {high:.1%} <= "
                f"{settings.max_error_rate:.1%})"
            )

    effects = {"error_rate": _effect(error_rate, low, high)} if counts["completed"] + failures else {}
    latency = {}
    latency_ratio = length_ratio = float("nan")
    agreement: dict[str, float] = {}
    empty = {"champion_only": 0, "challenger_only": 0}
    judged: dict[str, float] = {}
    if done:
        latency = {
            "champion": _percentiles([r["champion_latency_ms"] for r in done]),
            "challenger": _percentiles([r["challenger_latency_ms"] for r in done]),
        }
        log_latency = np.log(
            np.array([max(r["challenger_latency_ms"], 1e-3) for r in done])
            / np.array([max(r["champion_latency_ms"], 1e-3) for r in done])
        )
        latency_ratio = float(np.exp(np.median(log_latency)))
        effects["latency_ratio"] = _effect(latency_ratio, *np.exp(median_interval(log_latency, confidence)))
        # Each test asks "is the ratio above the limit?", not "is it above 1?".
        limit = math.log(settings.max_latency_ratio)
        _ratio_check(
            "median challenger/champion latency ratio",
            latency_ratio,
            settings.max_latency_ratio,
            _signs(log_latency - limit),
            _signs(limit - log_latency),
            settings.confidence,
            len(done),
            reject,
            hold,
            passed,
        )
        log_length = np.log(
            (np.array([r["challenger_tokens"] for r in done]) + 1.0)
            / (np.array([r["champion_tokens"] for r in done]) + 1.0)
        )
        length_ratio = float(np.exp(np.median(log_length)))
        effects["length_ratio"] = _effect(length_ratio, *np.exp(median_interval(log_length, confidence)))
        limit = math.log(settings.max_length_ratio)
        _ratio_check(
            "median output length ratio",
            length_ratio,
            settings.max_length_ratio,
            _signs(log_length - limit),
            _signs(limit - log_length),
            settings.confidence,
            len(done),
            reject,
            hold,
            passed,
        )
        _ratio_check(
            "median output length ratio (inverse)",
            1 / length_ratio,
            settings.max_length_ratio,
            _signs(-log_length - limit),
            _signs(log_length + limit),
            settings.confidence,
            len(done),
            reject,
            hold,
            passed,
        )
        empty = _empty_answers(done, alpha, reject, passed)
        agreement = _agreement(done, embedder)
        if judge_trust is not None and not judge_trust.trusted:
            hold.append(f"judge not counted: {judge_trust.reason}{_JUDGE_FIX}")  # not even asked
        elif judge is not None:
            trust = judge_trust or JudgeTrust(False, "no calibration was given", 0.0)
            judged = _judge(done, judge, trust, settings, reject, hold, passed)
            if judged["counted"]:
                effects["judge_win_rate"] = _effect(judged["win_rate"], judged["lower"], judged["upper"])

    decision = REJECT if reject else HOLD if hold else PROMOTE
    return ShadowReport(
        champion_version=champion_version,
        challenger_version=challenger_version,
        decision=decision,
        reasons=reject + hold + passed,
        counts={**counts, "rows": len(rows)},
        error_rate=error_rate,
        latency_ms=latency,
        latency_ratio=latency_ratio,
        length_ratio=length_ratio,
        agreement=agreement,
        empty_answers=empty,
        judge=judged,
        effects=effects,
    )


def _block_error_rule(
    shares: np.ndarray,
    error_rate: float,
    low: float,
    high: float,
    settings: ShadowConfig,
    reject: list[str],
    hold: list[str],
    passed: list[str],
) -> None:
    """The error rate tested in blocks of `shadow.error_block_s` (see `sequential.block_log_e_value`)."""
    limit, confidence = settings.max_error_rate, settings.confidence
    where = f"{len(shares)} blocks of {settings.error_block_s:g} s, mean block failure share {float(shares.mean()):.1%}"
    if block_shown(shares, limit, True, confidence):
        reject.append(
            f"challenger error+timeout rate {error_rate:.1%} ({where}; lower bound {low:.1%}) is above "
            f"shadow.max_error_rate={limit:.1%}"
        )
    elif block_shown(shares, limit, False, confidence):
        passed.append(
            f"challenger error+timeout rate {error_rate:.1%} ({where}; upper bound {high:.1%} <= {limit:.1%})"
        )
    else:
        hold.append(
            f"challenger error+timeout rate {error_rate:.1%} ({where}): its upper bound {high:.1%} is not yet <= "
            f"shadow.max_error_rate={limit:.1%}; failures come in outages, so the evidence grows with blocks of time, "
            f"not with requests (with no failure, {blocks_for_promote(limit, confidence)} blocks in all)"
        )


def _effect(estimate: float, lower: float, upper: float) -> dict[str, float]:
    return {"estimate": float(estimate), "lower": float(lower), "upper": float(upper)}


def _ratio_check(
    name: str,
    ratio: float,
    limit: float,
    above: tuple[int, int],
    below: tuple[int, int],
    confidence: float,
    pairs: int,
    reject: list[str],
    hold: list[str],
    passed: list[str],
) -> None:
    """REJECT when the median ratio is shown above `limit`, pass when shown below, HOLD in between.
    `above`/`below`: sign-test counts (pairs on that side, non-zero pairs)."""
    if shown(*above, 0.5, True, confidence):
        p = anytime_p_value(*above, 0.5, True)
        reject.append(
            f"{name}: more than half the pairs are above {limit:.2f} (median {ratio:.2f}; sign test, always-valid p={p:.3g})"
        )
    elif shown(*below, 0.5, True, confidence):
        p = anytime_p_value(*below, 0.5, True)
        passed.append(
            f"{name}: more than half the pairs are below {limit:.2f} (median {ratio:.2f}; sign test, always-valid p={p:.3g})"
        )
    else:
        count, nonzero = below
        share = count / nonzero if nonzero else 0.5
        needed = pairs_for_power(share, 0.5, True, confidence)
        hold.append(
            f"{name} {ratio:.2f} is not yet shown below {limit:.2f} ({share:.0%} of pairs below, always-valid "
            f"p={anytime_p_value(*below, 0.5, True):.3g}); " + _more_pairs(needed, pairs)
        )


def _empty_answers(done: list[dict], alpha: float, reject: list[str], passed: list[str]) -> dict[str, int]:
    """McNemar's test (always valid) on pairs where exactly one side answered nothing."""
    champion_only = sum(not r["challenger_output"].strip() and bool(r["champion_output"].strip()) for r in done)
    challenger_only = sum(not r["champion_output"].strip() and bool(r["challenger_output"].strip()) for r in done)
    discordant = champion_only + challenger_only
    p = anytime_p_value(champion_only, discordant, 0.5, True)
    if p <= alpha:
        reject.append(
            f"the challenger answers nothing where the champion answers in {champion_only} pairs "
            f"(vs {challenger_only} the other way; McNemar, always-valid p={p:.3g})"
        )
    else:
        passed.append(f"empty answers: challenger-only {champion_only}, champion-only {challenger_only}")
    return {"champion_only": challenger_only, "challenger_only": champion_only}


def _agreement(done: list[dict], embedder: Any) -> dict[str, float]:
    from ctloop.evaluation.textmetrics import exact_match, token_f1

    champion = [r["champion_output"] for r in done]
    challenger = [r["challenger_output"] for r in done]
    out = {
        "exact_match": float(np.mean([exact_match(a, b) for a, b in zip(challenger, champion, strict=True)])),
        "token_f1": float(np.mean([token_f1(a, b) for a, b in zip(challenger, champion, strict=True)])),
    }
    if embedder is not None:
        a, b = embedder.embed(champion), embedder.embed(challenger)
        a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
        b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
        out["embedding_cosine"] = float(np.mean(np.sum(a * b, axis=1)))
    return out


_JUDGE_FIX = (
    "; its verdicts do not count (fix the judge, calibrate it with `ctloop judge calibrate`, or remove shadow.judge)"
)


def _judge(
    done: list[dict],
    judge: Any,
    trust: JudgeTrust,
    settings: ShadowConfig,
    reject: list[str],
    hold: list[str],
    passed: list[str],
) -> dict[str, float]:
    """Each pair judged twice with the answers swapped; disagreeing verdicts count as a tie. The
    verdicts count only for a trusted judge (calibrated against users' labels) that is not shown to
    judge by position on these pairs; otherwise HOLD, since the evidence the config asks for is
    missing."""
    wins = ties = consistent = 0
    for row in done:
        as_a, as_b = both_ways(judge, row["prompt"], row["challenger_output"], row["champion_output"])
        if as_a == as_b:
            consistent += 1
            wins += as_a == "first"
            ties += as_a == "tie"
        else:
            ties += 1
    n = len(done)
    score = wins + 0.5 * ties
    win_rate = score / n
    low = confidence_bound(score, n, settings.confidence, upper=False)
    high = confidence_bound(score, n, settings.confidence, upper=True)
    consistency_high = confidence_bound(consistent, n, settings.confidence, upper=True)
    out = {"win_rate": win_rate, "lower": low, "upper": high, "consistency": consistent / n, "counted": 0.0}
    if not trust.trusted:
        hold.append(f"judge not counted: {trust.reason}{_JUDGE_FIX}")
        return out
    if shown(consistent, n, trust.min_consistency, False, settings.confidence):
        hold.append(
            f"judge not counted: its verdict changed when the answers swapped places in {1 - consistent / n:.1%} "
            f"of pairs (consistency upper bound {consistency_high:.1%} < judge.min_consistency "
            f"{trust.min_consistency:.0%}): it judges by position{_JUDGE_FIX}"
        )
        return out
    out["counted"] = 1.0
    floor = settings.min_judge_win_rate
    if shown(score, n, floor, False, settings.confidence):
        reject.append(f"judge: challenger win rate {win_rate:.1%} (upper bound {high:.1%}) is below {floor:.1%}")
    elif not shown(score, n, floor, True, settings.confidence):
        needed = pairs_for_power(win_rate, floor, True, settings.confidence)
        hold.append(
            f"judge: challenger win rate {win_rate:.1%}, lower bound {low:.1%} not yet >= {floor:.1%}; "
            + _more_pairs(needed, n)
        )
    else:
        passed.append(f"judge: challenger win rate {win_rate:.1%} (lower bound {low:.1%} >= {floor:.1%})")
    return out


def shadow_report(
    settings: ShadowConfig,
    store_url: str,
    champion_version: int,
    challenger_version: int,
    agreement_embeddings: bool = True,
    judge_settings: JudgeConfig | None = None,
    model: ModelConfig | None = None,
    workspace_root: Path | None = None,
) -> tuple[ShadowReport, list[dict[str, Any]]]:
    """Read one pair's rows from the log store and compare them with the configured judge and embedder
    (the embedder only scores agreement, which the decision does not use; a server skips it). The
    judge is trusted by the workspace's calibration (`ctloop judge calibrate`) at `judge_settings`;
    the likelihood judge is built from `model`."""
    from ctloop.evaluation.judge import judge_identity, judge_trust, load_calibration, load_judge
    from ctloop.logstore.shadow import read_rows

    rows = read_rows(store_url, str(champion_version), str(challenger_version))
    judge = embedder = trust = None
    if settings.judge:
        judge_settings = judge_settings or JudgeConfig()
        identity = judge_identity(settings.judge, judge_settings, model)
        calibration = load_calibration(workspace_root, identity) if workspace_root is not None else None
        trust = judge_trust(calibration, identity, judge_settings)
        if trust.trusted:  # an untrusted judge is not even loaded (the likelihood judge is a model)
            judge = load_judge(settings.judge, judge_settings, model)
    if settings.embedding_similarity and agreement_embeddings and rows:
        from ctloop.drift.embed import SentenceTransformerEmbedder

        embedder = SentenceTransformerEmbedder("minilm")
    report = compare(rows, settings, str(champion_version), str(challenger_version), judge, embedder, trust)
    return report, rows
