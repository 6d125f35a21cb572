"""Binomial rates as the benchmarks print them: k/n with the exact (Clopper-Pearson) 95% interval."""

from __future__ import annotations


def interval(k: int, n: int) -> str:
    from scipy.stats import binomtest

    ci = binomtest(k, n).proportion_ci(method="exact")
    return f"{k}/{n} = {k / n:.3f} [95% CI {ci.low:.3f}, {ci.high:.3f}]"
