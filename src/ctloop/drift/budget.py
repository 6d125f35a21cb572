"""Repeated drift tests over time: the drift watch spends a false-alarm budget across its looks.

A watch that tests every hour at alpha raises a false alarm about once per 1/alpha looks (every 20
hours at 0.05). Here each period of `watch.period_looks` looks shares `watch.false_alarm_budget`:
look k of a period tests at budget / period_looks. By the union bound (Bonferroni), the chance that
any look in a period raises a false alarm is at most the budget, whatever the dependence between
looks (their windows may overlap). The state, which period and which look, is one small JSON file;
a look is counted before its test runs, so a crash during the test cannot hand its alpha out twice.
"""

from __future__ import annotations

import fcntl
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from ctloop.config import WatchConfig
from ctloop.errors import DataError
from ctloop.fileio import utc_now, write_json


@dataclass(frozen=True)
class WatchLook:
    period: int  # 1-based count of budget periods
    look: int  # 1-based position of this look in its period
    period_looks: int
    false_alarm_budget: float
    period_started: str
    new_period_reason: str = ""  # why this look opened a new period, when it did

    @property
    def alpha(self) -> float:
        return self.false_alarm_budget / self.period_looks

    def describe(self) -> str:
        return (
            f"watch look {self.look} of {self.period_looks} in period {self.period} (started "
            f"{self.period_started}): tested at alpha {self.alpha:.3g} = {self.false_alarm_budget} / "
            f"{self.period_looks}, so the chance of any false alarm in this period is at most "
            f"{self.false_alarm_budget} (Bonferroni over the period's looks, valid however their windows overlap)"
        )

    def to_dict(self) -> dict:
        return asdict(self) | {"alpha": self.alpha, "control": "bonferroni_per_period"}


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
    budget, period_looks = settings.false_alarm_budget, settings.period_looks
    if previous is None:
        return WatchLook(1, 1, period_looks, budget, utc_now(), "first look")
    if (previous.false_alarm_budget, previous.period_looks) != (budget, period_looks):
        reason = (
            f"watch settings changed (budget {previous.false_alarm_budget} -> {budget}, period_looks "
            f"{previous.period_looks} -> {period_looks})"
        )
        return WatchLook(previous.period + 1, 1, period_looks, budget, utc_now(), reason)
    if previous.look >= period_looks:
        return WatchLook(
            previous.period + 1, 1, period_looks, budget, utc_now(), "the previous period's looks are spent"
        )
    return WatchLook(previous.period, previous.look + 1, period_looks, budget, previous.period_started)


def _read(state_file: Path) -> WatchLook | None:
    if not state_file.exists():
        return None
    try:
        raw = json.loads(state_file.read_text(encoding="utf-8"))
        look = WatchLook(
            **{k: raw[k] for k in ("period", "look", "period_looks", "false_alarm_budget", "period_started")}
        )
        counts = (look.period, look.look, look.period_looks)
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in counts):
            raise ValueError("period, look and period_looks must be whole numbers")
        if look.period < 1 or not 1 <= look.look <= look.period_looks:
            raise ValueError(f"look {look.look} of {look.period_looks} in period {look.period} is not a look there is")
        if not 0 < float(look.false_alarm_budget) < 1:
            raise ValueError(f"false_alarm_budget {look.false_alarm_budget} is not in (0, 1)")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(
            f"the drift watch's state {state_file} is unreadable ({exc.__class__.__name__}: {exc}); delete it "
            "to start a new budget period (the looks already taken in this period are then not counted)"
        ) from exc
    return look
