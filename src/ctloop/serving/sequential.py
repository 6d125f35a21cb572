"""Always-valid tests of a proportion, for a shadow decision that may be looked at again and again.

A shadow report is run while pairs arrive; a fixed-sample test re-run at every look spends its
alpha each time, so "HOLD, run it again later" would inflate the false-promotion rate. These tests
use e-values instead: the likelihood ratio of the observed successes, mixed over the alternative
with a uniform prior on its side of the boundary `p0`, against the boundary itself. Under any
proportion on the null side it is a nonnegative supermartingale in the number of pairs (each
alternative's ratio is, by monotone likelihood ratio), so by Ville's inequality the chance that it
*ever* reaches 1/alpha is at most alpha: rejecting whenever it does is valid however many times,
and whenever, the report is run. The price is power: with no failure at all, an error rate is shown
below 2% after 224 pairs instead of the 149 a single planned look needs.

`confidence_bound` inverts the test into a confidence sequence bound, and `pairs_for_power` says how
many pairs in all give the test a `power` chance to succeed at that look, if the true proportion
is the one observed so far (exact binomial probabilities, no approximation).
"""

from __future__ import annotations

import math

import numpy as np

_EDGE = 1e-12


def log_e_value(successes: float, n: float, p0: float, above: bool) -> float:
    """log of the mixture e-value for "the proportion is above p0" (or below it, `above=False`)."""
    from scipy.special import betainc, betaincc, betaln

    p0 = min(max(p0, _EDGE), 1 - _EDGE)
    a, b = successes + 1, n - successes + 1
    mass = betaincc(a, b, p0) if above else betainc(a, b, p0)  # the posterior mass on the alternative's side
    if mass <= 0:
        return -math.inf
    width = (1 - p0) if above else p0
    return (
        betaln(a, b) + math.log(mass) - math.log(width) - successes * math.log(p0) - (n - successes) * math.log(1 - p0)
    )


def anytime_p_value(successes: float, n: float, p0: float, above: bool) -> float:
    """min(1, 1 / e-value): valid at every look."""
    return min(1.0, math.exp(-log_e_value(successes, n, p0, above))) if n else 1.0


def shown(successes: float, n: float, p0: float, above: bool, confidence: float) -> bool:
    """Whether the data show the proportion above (below) p0 at this confidence, at any look."""
    return n > 0 and log_e_value(successes, n, p0, above) >= -math.log(1 - confidence)


def confidence_bound(successes: float, n: float, confidence: float, upper: bool) -> float:
    """The confidence sequence's bound: the smallest p0 shown to be above the proportion (upper), or
    the largest shown below it (lower). 1 (or 0) with no pairs."""
    if not n:
        return 1.0 if upper else 0.0
    low, high = (successes / n, 1.0) if upper else (0.0, successes / n)
    for _ in range(60):  # bisection: the evidence grows as p0 moves away from the observed share
        middle = (low + high) / 2
        clear = shown(successes, n, middle, not upper, confidence)
        if upper:
            low, high = (low, middle) if clear else (middle, high)
        else:
            low, high = (middle, high) if clear else (low, middle)
    return high if upper else low


def median_interval(values: np.ndarray, confidence: float) -> tuple[float, float]:
    """Bounds on the median, valid at every look: the values m for which neither "the share below m
    is above 1/2" nor "below 1/2" is shown (each side at `confidence`, the sign test inverted).
    With k values below m, m lies between the k-th and (k+1)-th smallest; -inf/inf when a side
    has too few pairs to bound it."""
    ordered = np.sort(np.asarray(values, dtype=float))
    n = len(ordered)
    if n == 0:
        return -math.inf, math.inf

    def first(predicate) -> int:  # the smallest k in 0..n+1 with predicate(k); predicate is monotone
        low, high = -1, n + 1
        while high - low > 1:
            middle = (low + high) // 2
            low, high = (low, middle) if predicate(middle) else (middle, high)
        return high

    lowest = first(lambda k: not shown(k, n, 0.5, False, confidence))  # fewer below: m is under the median
    highest = first(lambda k: shown(k, n, 0.5, True, confidence)) - 1  # more below: m is over the median
    return (
        float(ordered[lowest - 1]) if lowest >= 1 else -math.inf,
        float(ordered[highest]) if highest <= n - 1 else math.inf,
    )


def pairs_for_power(observed: float, p0: float, above: bool, confidence: float, power: float = 0.8) -> int | None:
    """Pairs in all for the test "above (below) p0" to succeed with probability `power` at that
    look, if the true proportion is `observed`; None when `observed` is not on that side of p0
    (no number of pairs would do), or when more than a million would be needed."""
    from scipy.stats import binom

    if (observed <= p0) if above else (observed >= p0):
        return None

    def chance(n: int) -> float:
        # The fewest (most) successes shown above (below) p0 at n pairs: the evidence is monotone in them.
        if not shown(n if above else 0, n, p0, above, confidence):
            return 0.0
        low, high = (-1, n) if above else (0, n + 1)  # above: shown at high, not at low; below: at low, not high
        while high - low > 1:
            middle = (low + high) // 2
            if shown(middle, n, p0, above, confidence) == above:
                high = middle
            else:
                low = middle
        return float(binom.sf(high - 1, n, observed) if above else binom.cdf(low, n, observed))

    high = 8
    while chance(high) < power:
        high *= 2
        if high > 1_000_000:
            return None
    low = high // 2
    while high - low > max(1, high // 100):  # to 1%
        middle = (low + high) // 2
        low, high = (middle, high) if chance(middle) < power else (low, middle)
    return high


# -- failures that come in outages: blocks of time as the unit -------------------------------------
#
# A challenger's failures are not independent: they come in outages (timeouts, then the calls its
# open breaker skips). Counted per request, one outage looks like many independent failures, and a
# long-run error rate of 3% passed a 2% limit at some look in 66% of simulated runs. Grouped into
# blocks of time longer than an outage, the blocks' failure shares are close to independent, so the
# tests below bet on them: for "the mean block failure share is below p0", the wealth
# prod_t (1 + lam * (p0 - x_t)) is a nonnegative supermartingale under any mean >= p0 (each factor
# has expectation <= 1 given the past), and so is an average of such wealths over a grid of lam: by
# Ville's inequality it ever reaches 1/alpha with chance <= alpha, at any look. Each block adds at
# most log(1 + p0 / (1 - p0)) of evidence, so with no failure at all a 2% limit needs about 200
# blocks (`blocks_for_promote`): what not assuming independence costs.

# Fractions of the largest bet that keeps every factor > 0, and their prior weights: most on the
# boldest, which wins fastest when the challenger rarely fails, some on the others, for rates nearer p0.
_BETS = ((0.9, 0.5), (0.7, 0.25), (0.5, 0.25))


def block_log_e_value(shares: np.ndarray, p0: float, above: bool) -> float:
    """log of the betting e-value for "the mean of the blocks' failure shares is above p0" (or below)."""
    x = np.asarray(shares, dtype=float)
    if not len(x):
        return -math.inf
    p0 = min(max(p0, _EDGE), 1 - _EDGE)
    step = (x - p0) if above else (p0 - x)
    largest = 1 / p0 if above else 1 / (1 - p0)
    logs = [(float(np.log1p(f * largest * step).sum()), w) for f, w in _BETS]
    top = max(v for v, _ in logs)
    return top + math.log(sum(w * math.exp(v - top) for v, w in logs))


def blocks_for_promote(p0: float, confidence: float) -> int:
    """The fewest blocks, none with a failure, that show the mean failure share below p0."""
    low, high = 0, 1
    while not block_shown(np.zeros(high), p0, False, confidence):
        low, high = high, high * 2
        if high > 1 << 20:
            return high
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (low, middle) if block_shown(np.zeros(middle), p0, False, confidence) else (middle, high)
    return high


def block_shown(shares: np.ndarray, p0: float, above: bool, confidence: float) -> bool:
    return block_log_e_value(shares, p0, above) >= -math.log(1 - confidence)


def block_bound(shares: np.ndarray, confidence: float, upper: bool) -> float:
    """The confidence sequence's bound on the mean block failure share (1 or 0 with no blocks)."""
    x = np.asarray(shares, dtype=float)
    if not len(x):
        return 1.0 if upper else 0.0
    mean = float(x.mean())
    low, high = (mean, 1.0) if upper else (0.0, mean)
    for _ in range(50):
        middle = (low + high) / 2
        clear = block_shown(x, middle, not upper, confidence)
        if upper:
            low, high = (low, middle) if clear else (middle, high)
        else:
            low, high = (middle, high) if clear else (low, middle)
    return high if upper else low


def block_shares(times: np.ndarray, failed: np.ndarray, block_s: float) -> np.ndarray:
    """Failure share per block of `block_s` seconds from the first request (blocks with no request
    leave no entry); `block_s` 0: every request its own block (failures taken as independent)."""
    times, failed = np.asarray(times, dtype=float), np.asarray(failed, dtype=float)
    if not len(times):
        return np.zeros(0)
    if block_s <= 0:
        return failed
    blocks = np.floor((times - times.min()) / block_s).astype(np.int64)
    _, index = np.unique(blocks, return_inverse=True)
    return np.bincount(index, weights=failed) / np.bincount(index)
