"""Repeated drift tests over time: the drift watch spends a false-alarm budget across its looks.

A watch that tests every hour at alpha raises a false alarm about once per 1/alpha looks (every 20
hours at 0.05). Here each period of `watch.period_looks` looks shares `watch.false_alarm_budget`:
look k of a period tests at budget / period_looks. By the union bound (Bonferroni), the chance that
any look in a period raises a false alarm is at most the budget, whatever the dependence between
looks (their windows may overlap). The state, which period and which look, is one small JSON file;
a look is counted before its test runs, so a crash during the test cannot hand its alpha out twice.

With `watch.alpha_spending: lifetime` there is one period, the watch's life, and look k tests at
budget / (S (k+1) ln^2(k+1)), where S = sum over k >= 1 of 1 / ((k+1) ln^2(k+1)) = 2.1097428...
(rounded up here): the shares sum to at most the budget however many looks come, so the chance of
any false alarm ever is at most the budget. The shares fall slowly for a convergent series (look 1:
0.0247 of a 0.05 budget, look 168: 5.3e-6, look 8,760: 3.3e-8), but far below what a permutation
test can resolve, so such a watch runs only pca_ks, whose p-value (the KS distribution, combined
over components by Simes) is analytic; the bound holds as far as that p-value holds in its tail.
"""

from __future__ import annotations

import fcntl
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

from ctloop.config import WatchConfig
from ctloop.errors import DataError
from ctloop.fileio import utc_now, write_json

LIFETIME_SUM = 2.10975  # sum_{k>=1} 1 / ((k+1) ln^2(k+1)) = 2.1097428012..., rounded up (tests/test_watch_budget.py)


@dataclass(frozen=True)
class WatchLook:
    period: int  # 1-based count of budget periods
    look: int  # 1-based position of this look in its period
    period_looks: int
    false_alarm_budget: float
    period_started: str
    new_period_reason: str = ""  # why this look opened a new period, when it did
    spending: str = "period"  # watch.alpha_spending: period, or lifetime (one period, never ending)

    @property
    def alpha(self) -> float:
        if self.spending == "lifetime":
            return self.false_alarm_budget / (LIFETIME_SUM * (self.look + 1) * math.log(self.look + 1) ** 2)
        return self.false_alarm_budget / self.period_looks

    def describe(self) -> str:
        if self.spending == "lifetime":
            return (
                f"watch look {self.look} of its lifetime (started {self.period_started}): tested at alpha "
                f"{self.alpha:.3g} = {self.false_alarm_budget} / ({LIFETIME_SUM} x {self.look + 1} x "
                f"ln^2 {self.look + 1}), so the chance of any false alarm over the watch's whole life is at most "
                f"{self.false_alarm_budget} (the shares sum to the budget over unboundedly many looks)"
            )
        return (
            f"watch look {self.look} of {self.period_looks} in period {self.period} (started "
            f"{self.period_started}): tested at alpha {self.alpha:.3g} = {self.false_alarm_budget} / "
            f"{self.period_looks}, so the chance of any false alarm in this period is at most "
            f"{self.false_alarm_budget} (Bonferroni over the period's looks, valid however their windows overlap)"
        )

    def to_dict(self) -> dict:
        control = "lifetime_spending" if self.spending == "lifetime" else "bonferroni_per_period"
        return asdict(self) | {"alpha": self.alpha, "control": control}


def take_look(state_file: Path, settings: WatchConfig) -> WatchLook:
    """Count one look and return the alpha it may spend. Concurrent watches take distinct looks (a
    file lock around the read and the write)."""
    state_file.parent.mkdir(parents=True, exist_ok=True)
    with open(state_file.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            previous = _read(state_file)
            look = _next_look(previous, settings)
            write_json(state_file, asdict(look))
            return look
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _next_look(previous: WatchLook | None, settings: WatchConfig) -> WatchLook:
    budget, spending = settings.false_alarm_budget, settings.alpha_spending
    period_looks = settings.period_looks if spending == "period" else 0  # a lifetime has no end
    if previous is None:
        return WatchLook(1, 1, period_looks, budget, utc_now(), "first look", spending)
    was = (previous.false_alarm_budget, previous.period_looks, previous.spending)
    if was != (budget, period_looks, spending):
        reason = (
            f"watch settings changed (budget {previous.false_alarm_budget} -> {budget}, period_looks "
            f"{previous.period_looks} -> {period_looks}, alpha_spending {previous.spending} -> {spending})"
        )
        return WatchLook(previous.period + 1, 1, period_looks, budget, utc_now(), reason, spending)
    if spending == "period" and previous.look >= period_looks:
        return WatchLook(
            previous.period + 1, 1, period_looks, budget, utc_now(), "the previous period's looks are spent", spending
        )
    return WatchLook(previous.period, previous.look + 1, period_looks, budget, previous.period_started, "", spending)


def _read(state_file: Path) -> WatchLook | None:
    if not state_file.exists():
        return None
    try:
        raw = json.loads(state_file.read_text(encoding="utf-8"))
        look = WatchLook(
            **{k: raw[k] for k in ("period", "look", "period_looks", "false_alarm_budget", "period_started")},
            spending=raw.get("spending", "period"),  # state files from before lifetime spending
        )
        counts = (look.period, look.look, look.period_looks)
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in counts):
            raise ValueError("period, look and period_looks must be whole numbers")
        if look.spending not in ("period", "lifetime"):
            raise ValueError(f"spending {look.spending!r} is not period or lifetime")
        ceiling = look.period_looks if look.spending == "period" else look.look
        if look.period < 1 or not 1 <= look.look <= ceiling:
            raise ValueError(f"look {look.look} of {look.period_looks} in period {look.period} is not a look there is")
        if not 0 < float(look.false_alarm_budget) < 1:
            raise ValueError(f"false_alarm_budget {look.false_alarm_budget} is not in (0, 1)")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(
            f"the drift watch's state {state_file} is unreadable ({exc.__class__.__name__}: {exc}); delete it "
            "to start a new budget period (the looks already taken in this period are then not counted)"
        ) from exc
    return look
