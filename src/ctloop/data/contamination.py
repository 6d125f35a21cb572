"""Train/eval contamination: evaluation rows that the training set already contains, exactly or nearly.

An evaluation row is contaminated when its normalised prompt + completion equals a training row's
(exact), or when at least `max_overlap` of its word n-grams occur in the training set (near
duplicate: the same text with a changed name or a trailing note). Scoring a model on rows it
trained on flatters it, so they are dropped and counted, or the cycle fails, as configured.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

from ctloop.data.records import Record

WORD = re.compile(r"\w+", re.UNICODE)


@dataclass(frozen=True)
class ContaminationReport:
    eval_set: str
    rows: int
    exact: int
    near: int
    dropped_ids: tuple[str, ...]

    @property
    def contaminated(self) -> int:
        return self.exact + self.near

    def summary(self) -> str:
        return (
            f"{self.eval_set}: {self.contaminated} of {self.rows} rows overlap the training set "
            f"({self.exact} exact, {self.near} near-duplicate)"
        )

    def to_dict(self) -> dict:
        return {**asdict(self), "contaminated": self.contaminated}


def _words(record: Record) -> list[str]:
    return WORD.findall(f"{record.prompt} {record.completion}".lower())


def _ngrams(words: list[str], n: int) -> set[tuple[str, ...]]:
    if len(words) < n:
        return {tuple(words)} if words else set()
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


def find_contamination(
    train: list[Record], eval_sets: dict[str, list[Record]], ngram: int, max_overlap: float
) -> dict[str, ContaminationReport]:
    """For each evaluation set, which rows overlap the training set (exactly or nearly)."""
    exact_keys = {" ".join(_words(r)) for r in train}
    train_ngrams: set[tuple[str, ...]] = set()
    for record in train:
        train_ngrams |= _ngrams(_words(record), ngram)
    reports = {}
    for name, records in eval_sets.items():
        exact = near = 0
        dropped: list[str] = []
        for record in records:
            words = _words(record)
            if " ".join(words) in exact_keys:
                exact += 1
                dropped.append(record.id)
                continue
            grams = _ngrams(words, ngram)
            if grams and len(grams & train_ngrams) / len(grams) >= max_overlap:
                near += 1
                dropped.append(record.id)
        reports[name] = ContaminationReport(name, len(records), exact, near, tuple(dropped))
    return reports
