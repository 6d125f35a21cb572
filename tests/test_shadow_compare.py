"""The shadow decision on logged pairs: PROMOTE, HOLD and REJECT, each for its reason."""

from __future__ import annotations

import math
import random
from dataclasses import replace

import numpy as np
import pytest

from ctloop.config import ShadowConfig
from ctloop.evaluation.judge import JudgeTrust
from ctloop.reports.shadow import write_shadow_report
from ctloop.serving.compare import HOLD, PROMOTE, REJECT, compare

# Failures taken as independent (one request per block) and no minimum duration: these tests pin the
# per-request arithmetic; the outage-aware defaults have their own tests at the end.
SETTINGS = ShadowConfig(min_pairs=50, embedding_similarity=False, error_block_s=0, min_duration_s=0)
# Simulated A/A-style checks at the limit: a test at its 5% level rejects Binomial(200, 0.05) times;
# 18 or more happens with probability 1.2% (a miscalibrated test rejects far more). Seeds are fixed.
TRIALS, MAX_FALSE_REJECTS = 200, 17
TRUSTED = JudgeTrust(True, "calibrated for the test", 0.8)


def _rows(
    n: int,
    *,
    status=lambda i: "completed",
    challenger_latency=lambda i, base: base,
    challenger_tokens=lambda i, base: base,
    challenger_text=lambda i: f"answer {i}",
    seed: int = 0,
):
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        latency = rng.uniform(20, 40)
        tokens = rng.randint(5, 30)
        rows.append(
            {
                "request_id": f"r{i}",
                "prompt": f"question {i}",
                "champion_output": f"answer {i}",
                "challenger_output": challenger_text(i),
                "status": status(i),
                "error": "",
                "champion_latency_ms": latency,
                "challenger_latency_ms": challenger_latency(i, latency),
                "champion_tokens": tokens,
                "challenger_tokens": challenger_tokens(i, tokens),
            }
        )
    return rows


def test_a_healthy_challenger_with_enough_pairs_is_promoted():
    # 0 failures in 300: the always-valid upper bound is 1.5% (0 in 200 is not yet enough: 2.2%).
    report = compare(_rows(300, challenger_latency=lambda i, b: b * 1.05), SETTINGS, "1", "2")
    assert report.decision == PROMOTE, report.reasons
    assert report.agreement["exact_match"] == 1.0 and report.counts["completed"] == 300
    # Effect sizes with their bounds: the latency ratio is exactly 1.05 on every pair.
    effects = report.to_dict()["effects"]
    assert effects["error_rate"] == {"estimate": 0.0, "lower": 0.0, "upper": pytest.approx(0.015, abs=0.002)}
    assert effects["latency_ratio"]["lower"] == pytest.approx(1.05) == effects["latency_ratio"]["upper"]
    assert (
        effects["length_ratio"]["estimate"] == 1.0
        and "effects, estimate (bounds): error_rate 0 (0 to 0.01" in report.summary()
    )


def test_too_few_pairs_hold():
    report = compare(_rows(20), SETTINGS, "1", "2")
    assert report.decision == HOLD and any("min_pairs=50" in r for r in report.reasons)
    assert compare([], SETTINGS, "1", "2").decision == HOLD


def test_a_failing_challenger_is_rejected():
    report = compare(_rows(200, status=lambda i: "timed_out" if i % 5 == 0 else "completed"), SETTINGS, "1", "2")
    assert report.decision == REJECT and any("error+timeout rate 20.0%" in r for r in report.reasons)


def test_cancelled_rows_are_not_the_challengers_fault():
    report = compare(_rows(330, status=lambda i: "cancelled" if i < 30 else "completed"), SETTINGS, "1", "2")
    assert report.decision == PROMOTE and report.error_rate == 0.0


def test_a_much_slower_challenger_is_rejected():
    report = compare(_rows(200, challenger_latency=lambda i, b: b * 3), SETTINGS, "1", "2")
    assert report.decision == REJECT and report.latency_ratio == pytest.approx(3.0)


def test_a_rambling_or_silent_challenger_is_rejected():
    longer = compare(_rows(200, challenger_tokens=lambda i, b: b * 4), SETTINGS, "1", "2")
    assert longer.decision == REJECT and any("length ratio" in r for r in longer.reasons)
    silent = compare(_rows(200, challenger_text=lambda i: "" if i % 4 == 0 else f"answer {i}"), SETTINGS, "1", "2")
    assert silent.decision == REJECT and any("McNemar" in r for r in silent.reasons)


def test_the_judge_is_called_both_ways_and_decides():
    def prefers_challenger(prompt, a, b):
        return "b" if b.startswith("better") else "a" if a.startswith("better") else "tie"

    def prefers_champion(prompt, a, b):
        return "a" if a.startswith("answer") else "b"

    rows = _rows(300, challenger_text=lambda i: f"better answer {i}")
    settings = SETTINGS.model_copy(update={"min_judge_win_rate": 0.5})
    won = compare(rows, settings, "1", "2", judge=prefers_challenger, judge_trust=TRUSTED)
    assert won.decision == PROMOTE and won.judge["win_rate"] == 1.0 and won.judge["consistency"] == 1.0
    lost = compare(rows, settings, "1", "2", judge=prefers_champion, judge_trust=TRUSTED)
    assert lost.decision == REJECT and lost.judge["win_rate"] == 0.0

    def always_first(prompt, a, b):  # position bias: inconsistent, counted as ties, and not counted
        return "a"

    biased = compare(rows, settings, "1", "2", judge=always_first, judge_trust=TRUSTED)
    assert biased.judge["consistency"] == 0.0 and biased.judge["win_rate"] == 0.5
    assert biased.decision == HOLD and biased.judge["counted"] == 0.0
    assert any("judges by position" in r for r in biased.reasons)


def test_an_uncalibrated_judge_does_not_count():
    """#28 item 3: without a calibration that trusts it, the judge's verdicts move no decision; the
    comparison holds and says how to calibrate it."""
    rows = _rows(300, challenger_text=lambda i: f"better answer {i}")

    def prefers_challenger(p, a, b):  # would PROMOTE if counted
        return "a" if a.startswith("better") else "b"

    assert compare(rows, SETTINGS, "1", "2", judge=prefers_challenger, judge_trust=TRUSTED).decision == PROMOTE
    report = compare(rows, SETTINGS, "1", "2", judge=prefers_challenger)
    assert report.decision == HOLD and report.judge["counted"] == 0.0 and "judge_win_rate" not in report.effects
    assert any("ctloop judge calibrate" in r for r in report.reasons)
    untrusted = JudgeTrust(False, "kappa's lower bound 0.05 is below judge.min_agreement=0.3", 0.8)
    asked = []
    held = compare(rows, SETTINGS, "1", "2", judge=lambda *a: asked.append(a) or "a", judge_trust=untrusted)
    assert held.decision == HOLD and any("judge.min_agreement" in r for r in held.reasons)
    assert asked == []  # an untrusted judge is not even asked


def test_a_position_biased_judge_no_longer_promotes_a_worse_challenger():
    """#23 item 9: a judge that answers by position 85% of the time, for a challenger truly preferred
    40% of the time. Split verdicts counted as ties pulled its win rate to about 0.5, above the 0.47
    floor (15/20 runs PROMOTEd at 20,000 pairs); its consistency on the pairs now refuses it, while
    an unbiased judge of the same challenger REJECTs it."""
    rows = _rows(20_000, challenger_text=lambda i: f"answer {i} again")

    def judge(bias: float, seed: int):
        rng = random.Random(seed)
        challenger_better = {}

        def verdict(prompt, a, b):
            if rng.random() < bias:
                return "a"
            if prompt not in challenger_better:
                challenger_better[prompt] = rng.random() < 0.4
            challenger_is_a = a.endswith("again")
            return "a" if challenger_is_a == challenger_better[prompt] else "b"

        return verdict

    for seed in range(3):
        biased = compare(rows, SETTINGS, "1", "2", judge=judge(0.85, seed), judge_trust=TRUSTED)
        assert biased.decision == HOLD and biased.judge["counted"] == 0.0, biased.reasons
        assert 0.45 < biased.judge["win_rate"] < 0.5  # what used to clear the floor
        honest = compare(rows, SETTINGS, "1", "2", judge=judge(0.0, seed), judge_trust=TRUSTED)
        assert honest.decision == REJECT and honest.judge["counted"] == 1.0


def test_the_html_report_has_the_decision_and_plots(tmp_path):
    rows = _rows(300)
    report = compare(rows, SETTINGS, "1", "2")
    html = write_shadow_report(report, rows, tmp_path / "shadow.html").read_text()
    assert "PROMOTE" in html and "<svg" in html and "latency" in html and "latency_ratio" in html


def test_report_texts_are_escaped_but_charts_are_not(tmp_path):
    rows = _rows(20)
    report = replace(compare(rows, SETTINGS, "1", "2"), reasons=["error rate <= 2% <script>x</script>"])
    html = write_shadow_report(report, rows, tmp_path / "shadow.html").read_text()
    assert "error rate &lt;= 2% &lt;script&gt;" in html and "<script>" not in html
    assert "<svg" in html


def test_a_challenger_exactly_at_the_latency_limit_is_rarely_rejected():
    """The test asks whether the ratio exceeds the limit, not whether it exceeds 1: at a true ratio
    equal to the limit, REJECT must stay near the 5% level (testing against 1 rejected ~50%)."""
    rejects = 0
    for seed in range(TRIALS):
        rng = random.Random(10_000 + seed)
        rows = _rows(150, seed=seed, challenger_latency=lambda i, b, rng=rng: b * 1.5 * math.exp(rng.gauss(0, 0.5)))
        rejects += compare(rows, SETTINGS, "1", "2").decision == REJECT
    assert rejects <= MAX_FALSE_REJECTS


def test_skewed_ratios_whose_median_is_exactly_the_limit_are_rarely_rejected():
    """#16 item 1: the median of the latency ratio sits exactly at max_latency_ratio but the log ratios
    are skewed (a long right tail). Wilcoxon's signed-rank test rejected this 51% of the time at
    n=100; a test of the median itself must stay near its 5% level."""
    rejects = 0
    for seed in range(TRIALS):
        rng = random.Random(1000 + seed)

        def latency(i, base, rng=rng):
            skewed = rng.expovariate(1.0) - math.log(2)  # median 0, mean 0.31: a long right tail
            return base * 1.5 * math.exp(skewed)

        rejects += compare(_rows(100, seed=seed, challenger_latency=latency), SETTINGS, "1", "2").decision == REJECT
    assert rejects <= MAX_FALSE_REJECTS  # Wilcoxon's ~51% would be ~100 of 200


def test_a_point_estimate_under_the_error_limit_is_not_enough_to_promote():
    """#16 item 2: 2 failures in 101 (1.98%) is under max_error_rate 2%, but its upper bound is not:
    HOLD, saying how many pairs would do."""
    rows = _rows(101, status=lambda i: "errored" if i in (10, 60) else "completed")
    report = compare(rows, SETTINGS, "1", "2")
    assert report.decision == HOLD, report.reasons
    assert any("upper bound" in r and "no practical number of pairs" in r for r in report.reasons)
    one_in_200 = compare(_rows(200, status=lambda i: "errored" if i == 7 else "completed"), SETTINGS, "1", "2")
    assert one_in_200.decision == HOLD and any("more pairs" in r for r in one_in_200.reasons)
    assert compare(_rows(300), SETTINGS, "1", "2").decision == PROMOTE  # 0 of 300: upper bound 1.5%


def test_a_ratio_under_its_limit_but_not_significantly_holds():
    rng = random.Random(5)
    rows = _rows(200, challenger_latency=lambda i, b: b * 1.45 * math.exp(rng.gauss(0, 0.5)))
    report = compare(rows, SETTINGS, "1", "2")
    assert report.decision == HOLD and any("not yet shown below 1.50" in r for r in report.reasons)


def test_error_rate_exactly_at_the_limit_rarely_promotes():
    """A challenger whose true error rate is max_error_rate must be promoted at most ~5% of the time
    (promoting on the point estimate did so about half the time)."""
    promotes = 0
    for seed in range(TRIALS):
        rng = random.Random(20_000 + seed)
        rows = _rows(400, seed=seed, status=lambda i, rng=rng: "errored" if rng.random() < 0.02 else "completed")
        promotes += compare(rows, SETTINGS, "1", "2").decision == PROMOTE
    assert promotes <= MAX_FALSE_REJECTS


def test_a_latency_ratio_exactly_at_the_limit_rarely_promotes():
    promotes = 0
    for seed in range(TRIALS):
        rng = random.Random(30_000 + seed)
        rows = _rows(200, seed=seed, challenger_latency=lambda i, b, rng=rng: b * 1.5 * math.exp(rng.gauss(0, 0.3)))
        promotes += compare(rows, SETTINGS, "1", "2").decision == PROMOTE
    assert promotes <= MAX_FALSE_REJECTS


def test_requests_the_challenger_never_answered_count_against_it():
    """#16 item 3: calls the open breaker skipped are failures; a large share dropped from a full queue
    holds the decision. Both show in the report."""
    skipped = _rows(300, status=lambda i: "skipped_breaker" if i % 10 == 0 else "completed")
    report = compare(skipped, SETTINGS, "1", "2")
    assert report.decision == REJECT and report.counts["skipped_breaker"] == 30
    assert "30 skipped by the open breaker" in report.summary()
    dropped = _rows(300, status=lambda i: "dropped" if i % 10 == 0 else "completed")
    report = compare(dropped, SETTINGS, "1", "2")
    assert report.decision == HOLD and any("max_dropped_share" in r for r in report.reasons)
    assert report.error_rate == 0.0 and "30 dropped (queue full)" in report.summary()


@pytest.mark.slow
def test_running_the_report_again_and_again_keeps_the_false_promotion_rate():
    """#16 item 4: the report looked at every 10 pairs from 50 to 400 (36 looks), with the latency ratio
    exactly at its limit. Fixed-sample tests re-run at each look promoted 14 of these 100 runs; the
    always-valid tests must stay within the 5% level over all the looks together."""
    promotes = 0
    for seed in range(TRIALS // 2):
        rng = random.Random(40_000 + seed)
        rows = _rows(400, seed=seed, challenger_latency=lambda i, b, rng=rng: b * 1.5 * math.exp(rng.gauss(0, 0.3)))
        promotes += any(compare(rows[:n], SETTINGS, "1", "2").decision == PROMOTE for n in range(50, 401, 10))
    assert promotes <= 10  # Binomial(100, 0.05) exceeds 10 with probability 1.1%


def test_the_median_interval_covers_the_median_and_narrows_with_pairs():
    """The sign test inverted: the bounds hold the true median (here 0) about as often as promised,
    and shrink as pairs arrive."""
    from ctloop.serving.sequential import median_interval

    rng = np.random.default_rng(0)
    misses = 0
    for _ in range(200):
        low, high = median_interval(rng.standard_exponential(300) - math.log(2), 0.95)  # skewed, median 0
        misses += not (low <= 0.0 <= high)
    assert misses <= 10  # two sides at 95% each (always valid, so conservative): at most 10% expected
    narrow = median_interval(rng.normal(size=2000), 0.95)
    wide = median_interval(rng.normal(size=100), 0.95)
    assert narrow[1] - narrow[0] < (wide[1] - wide[0]) / 3
    assert median_interval(np.array([1.0]), 0.95) == (-math.inf, math.inf)


# -- failures in outages (#23 item 3) --------------------------------------------------------------


def _outages(rng, n: int, rate: float, mean_length: int = 20, per_second: float = 10.0):
    """n requests at `per_second`, failing in outages of `mean_length` requests on average (timeouts,
    then the open breaker's skips), with a long-run failure rate of `rate`."""
    start = rate / (mean_length * (1 - rate))
    failed = np.zeros(n, dtype=bool)
    i = 0
    while i < n:
        if rng.random() < start:
            length = int(rng.geometric(1 / mean_length))
            failed[i : i + length] = True
            i += length
        else:
            i += 1
    return np.arange(n) / per_second, failed


def test_outages_do_not_pass_a_challenger_whose_error_rate_is_over_the_limit():
    """3% long-run failures against a 2% limit, in outages of 20 requests on average, looked at every
    500 requests up to 20,000: counted per request, the error rate passed at some look in 66% of the
    audit's runs; tested in blocks of time, it must pass at most at the test's 5% level. A challenger
    failing 0.5% of the time in the same outages must still get through."""
    from ctloop.serving.sequential import block_shares, block_shown, shown

    rng = np.random.default_rng(7)

    def ever_passes(rate: float) -> tuple[int, int]:
        per_request = in_blocks = 0
        for _ in range(100):
            times, failed = _outages(rng, 20_000, rate)
            looks = range(500, 20_001, 500)
            per_request += any(shown(failed[:k].sum(), k, 0.02, False, 0.95) for k in looks)
            in_blocks += any(block_shown(block_shares(times[:k], failed[:k], 5.0), 0.02, False, 0.95) for k in looks)
        return per_request, in_blocks

    per_request, in_blocks = ever_passes(0.03)
    assert per_request >= 40  # the defect: the per-request test believes the outages are independent
    assert in_blocks <= 12  # 100 runs at a valid 5% level: 12 or more has probability 0.6%
    _, healthy = ever_passes(0.005)
    assert healthy >= 60  # the price is time, not the decision: 0.5% still passes in most runs


def test_the_report_tests_the_error_rate_in_blocks_and_over_a_minimum_duration():
    rows = _rows(600)
    for i, row in enumerate(rows):  # 10 minutes at one request a second, one outage of 12 requests
        row["created_at"] = 1_000.0 + i
        if 300 <= i < 312:
            row["status"] = "timed_out" if i < 303 else "skipped_breaker"
    settings = SETTINGS.model_copy(update={"max_error_rate": 0.05})
    iid = compare(rows, settings, "1", "2")
    assert iid.decision == PROMOTE  # 12 of 600 counted as independent requests: shown below 5%
    blocks = compare(rows, settings.model_copy(update={"error_block_s": 30.0, "min_duration_s": 600.0}), "1", "2")
    assert blocks.decision == HOLD
    assert any("20 blocks of 30 s" in reason and "74 blocks in all" in reason for reason in blocks.reasons), (
        blocks.reasons
    )
    short = compare(rows[:300], settings.model_copy(update={"min_duration_s": 600.0}), "1", "2")
    assert short.decision == HOLD and any("shadow.min_duration_s=600" in reason for reason in short.reasons)
