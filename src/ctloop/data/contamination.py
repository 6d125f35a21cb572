"""Train/eval contamination: evaluation rows that the training set already contains, exactly or nearly.

An evaluation row is contaminated when its normalised prompt + completion equals a training row's
(exact), or when at least `max_overlap` of its word n-grams occur in one training row (near
duplicate: the same text with a changed name or a trailing note). Scoring a model on rows it
trained on flatters it, so they are dropped and counted, or the cycle fails, as configured.

Two choices keep shared text from reading as contamination: the overlap is measured against the
single best-matching training row (not the pool of every training row's n-grams, where any text
made of common phrases finds its n-grams somewhere), and n-grams in more than `BOILERPLATE_SHARE`
of the training rows (a system prompt, a template) are left out on both sides. With one shared
40-word system prompt, the pooled check made 200 of 200 unique held-out rows "near-duplicates".
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import asdict, dataclass

from ctloop.data.records import Record

WORD = re.compile(r"\w+", re.UNICODE)
BOILERPLATE_SHARE = 0.5  # an n-gram in more than this share of the training rows is shared text


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


def text_overlap(text: str, other: str, n: int = 3) -> float:
    """The share of `text`'s word n-grams that occur in `other` (1.0 for the same words)."""
    mine = _ngrams(WORD.findall(text.lower()), n)
    return len(mine & _ngrams(WORD.findall(other.lower()), n)) / len(mine) if mine else 1.0


def find_contamination(
    train: list[Record], eval_sets: dict[str, list[Record]], ngram: int, max_overlap: float
) -> dict[str, ContaminationReport]:
    """For each evaluation set, which rows overlap the training set (exactly, or nearly with one row)."""
    return OverlapIndex(train, ngram).check(eval_sets, max_overlap)


class OverlapIndex:
    """The rows' exact keys and n-gram index (boilerplate n-grams left out), built once and checked
    against any number of sets (the harvest checks each page against the golden sets)."""

    def __init__(self, train: list[Record], ngram: int) -> None:
        self.ngram = ngram
        self.exact_keys = {" ".join(_words(r)) for r in train}
        grams_of = [_ngrams(_words(record), ngram) for record in train]
        spread = Counter(gram for grams in grams_of for gram in grams)
        self.boilerplate = (
            {gram for gram, rows in spread.items() if rows > BOILERPLATE_SHARE * len(train)}
            if len(train) > 2
            else set()
        )
        self.index: dict[tuple[str, ...], list[int]] = {}
        for row, grams in enumerate(grams_of):
            for gram in grams - self.boilerplate:
                self.index.setdefault(gram, []).append(row)

    def check(self, eval_sets: dict[str, list[Record]], max_overlap: float) -> dict[str, ContaminationReport]:
        return {name: self._report(name, records, max_overlap) for name, records in eval_sets.items()}

    def _report(self, name: str, records: list[Record], max_overlap: float) -> ContaminationReport:
        exact_keys, boilerplate, index, ngram = self.exact_keys, self.boilerplate, self.index, self.ngram
        exact = near = 0
        dropped: list[str] = []
        for record in records:
            words = _words(record)
            if " ".join(words) in exact_keys:
                exact += 1
                dropped.append(record.id)
                continue
            grams = _ngrams(words, ngram) - boilerplate
            hits = Counter(row for gram in grams for row in index.get(gram, ()))
            best = max(hits.values(), default=0)
            if grams and best / len(grams) >= max_overlap:
                near += 1
                dropped.append(record.id)
        return ContaminationReport(name, len(records), exact, near, tuple(dropped))
