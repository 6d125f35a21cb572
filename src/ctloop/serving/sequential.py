"""Always-valid tests of a proportion, for a shadow decision that may be looked at again and again.

A shadow report is run while pairs arrive; a fixed-sample test re-run at every look spends its
alpha each time, so "HOLD, run it again later" would inflate the false-promotion rate. These tests
use e-values instead: the likelihood ratio of the observed successes, mixed over the alternative
with a uniform prior on its side of the boundary `p0`, against the boundary itself. Under any
proportion on the null side it is a nonnegative supermartingale in the number of pairs (each
alternative's ratio is, by monotone likelihood ratio), so by Ville's inequality the chance that it
*ever* reaches 1/alpha is at most alpha: rejecting whenever it does is valid however many times,
and whenever, the report is run. The price is power: with no failure at all, an error rate is shown
below 2% after about 225 pairs instead of the 133 a single planned look needs.

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
