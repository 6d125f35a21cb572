"""Feedback kinds, and the preference data each training objective learns from.

A harvested row carries its `feedback_kind` in its metadata:

- `correction`: a user rewrote the answer; the completion is the correction, `rejected_answer` the
  answer it replaced;
- `rated_up`: an answer rated at least `harvest.min_rating`, kept as it was;
- `rated_down`: an answer rated below `harvest.rejected_below`; never a supervised row;
- `unrated`: an answer nobody rated (`harvest.include_unrated`).

Rows of other files have no kind and are supervised rows. From the kinds:

- supervised (sft) rows: every row but `rated_down`;
- DPO pairs: each correction (chosen) against the answer it corrected (rejected);
- KTO answers: rated up and corrections desirable; rated down and corrected answers undesirable.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from ctloop.data.records import Record

CORRECTION, RATED_UP, RATED_DOWN, UNRATED, SUPERVISED = "correction", "rated_up", "rated_down", "unrated", "supervised"
_FROM_HARVEST_REASON = {"correction": CORRECTION, "rated_up": RATED_UP, "rejected": RATED_DOWN, "unrated": UNRATED}
PREFERENCE_KINDS = (CORRECTION, RATED_UP, RATED_DOWN)


@dataclass(frozen=True)
class AnswerPair:
    """A DPO pair: the same prompt, the answer preferred and the one it was preferred to."""

    id: str
    prompt: str
    chosen: str
    rejected: str


@dataclass(frozen=True)
class RatedAnswer:
    """A KTO example: one answer to its prompt, desirable or not."""

    id: str
    prompt: str
    completion: str
    desirable: bool


@dataclass(frozen=True)
class PreferenceSet:
    """What a preference objective trains (or is gated) on."""

    objective: str  # dpo or kto
    pairs: tuple[AnswerPair, ...] = ()
    answers: tuple[RatedAnswer, ...] = ()
    from_corrections: int = 0  # kto: answers that came from a correction (both its sides)

    def __len__(self) -> int:
        return len(self.pairs) if self.objective == "dpo" else len(self.answers)

    @property
    def desirable(self) -> int:
        return sum(a.desirable for a in self.answers)

    def describe(self) -> str:
        if self.objective == "dpo":
            return f"dpo on {len(self.pairs)} corrections against the answers they corrected"
        up, down = self.desirable, len(self.answers) - self.desirable
        corrections = f"; {self.from_corrections} from corrections" if self.from_corrections else ""
        return f"kto on {len(self.answers)} rated answers ({up} up, {down} down{corrections})"

    def to_dict(self) -> dict:
        out: dict = {"objective": self.objective, "rows": len(self), "described": self.describe()}
        if self.objective == "kto":
            out |= {"desirable": self.desirable, "undesirable": len(self.answers) - self.desirable}
        return out


def feedback_kind(record: Record) -> str:
    """The row's kind; harvests from before kinds were written carry it as `harvest_reason`."""
    kind = record.metadata.get("feedback_kind")
    if isinstance(kind, str) and kind:
        return kind
    return _FROM_HARVEST_REASON.get(str(record.metadata.get("harvest_reason", "")), SUPERVISED)


def supervised_rows(records: Iterable[Record]) -> list[Record]:
    """Rows an answer can be learned from as it stands: every kind but rated down."""
    return [r for r in records if feedback_kind(r) != RATED_DOWN]


def preference_rows(records: Iterable[Record]) -> list[Record]:
    """Rows that carry a preference: corrections, and answers rated up or down."""
    return [r for r in records if feedback_kind(r) in PREFERENCE_KINDS]


def preference_kind(objective: str) -> str | None:
    """dpo or kto for a preference objective (sft+dpo included), None for sft."""
    return objective.rpartition("+")[2] if objective.endswith(("dpo", "kto")) else None


def preference_set(records: Iterable[Record], kind: str) -> PreferenceSet:
    """The DPO pairs (`kind` dpo) or KTO answers (`kind` kto) the rows hold, in their order."""
    rows = list(records)
    if kind == "dpo":
        return PreferenceSet("dpo", pairs=tuple(p for r in rows if (p := _pair(r)) is not None))
    answers: list[RatedAnswer] = []
    from_corrections = 0
    for r in rows:
        kind_of_row = feedback_kind(r)
        if kind_of_row in (RATED_UP, RATED_DOWN):
            answers.append(RatedAnswer(r.id, r.prompt, r.completion, kind_of_row == RATED_UP))
        elif (pair := _pair(r)) is not None:
            answers.append(RatedAnswer(f"{r.id}:chosen", r.prompt, pair.chosen, True))
            answers.append(RatedAnswer(f"{r.id}:rejected", r.prompt, pair.rejected, False))
            from_corrections += 2
    return PreferenceSet("kto", answers=tuple(answers), from_corrections=from_corrections)


def _pair(record: Record) -> AnswerPair | None:
    """A correction and the answer it corrected; None when there is nothing to prefer it to."""
    if feedback_kind(record) != CORRECTION:
        return None
    rejected = str(record.metadata.get("rejected_answer") or "")
    if not rejected.strip() or rejected.strip() == record.completion.strip():
        return None  # the original answer is unknown, or the "correction" repeats it
    return AnswerPair(record.id, record.prompt, record.completion, rejected)
