"""Train/eval contamination: exact and near-duplicate evaluation rows are found and counted."""

from __future__ import annotations

from ctloop.data.contamination import find_contamination
from ctloop.data.records import Record


def rec(i: str, prompt: str, completion: str) -> Record:
    return Record(id=i, prompt=prompt, completion=completion)


TRAIN = [
    rec("t1", "Describe the Debian package 0ad:", " Real-time strategy game of ancient warfare"),
    rec("t2", "Describe the Debian package xmoto:", " 2D motocross platform game with realistic physics"),
]


def test_exact_and_near_duplicates_are_found_and_clean_rows_kept():
    eval_rows = [
        rec("e1", "describe the Debian package 0ad:", " Real-time strategy game of ancient warfare"),  # exact
        rec("e2", "Describe the Debian package 0ad-data:", " Real-time strategy game of ancient warfare"),  # near
        rec("e3", "Describe the Debian package lmms:", " Linux Multimedia Studio"),  # clean
    ]
    report = find_contamination(TRAIN, {"new_holdout": eval_rows}, ngram=3, max_overlap=0.5)["new_holdout"]
    assert (report.rows, report.exact, report.near) == (3, 1, 1)
    assert report.dropped_ids == ("e1", "e2")
    assert "2 of 3 rows overlap" in report.summary()


def test_the_overlap_threshold_decides_near_duplicates():
    row = rec("e", "Describe the Debian package 0ad-data:", " Real-time strategy game of ancient warfare (data)")
    strict = find_contamination(TRAIN, {"s": [row]}, ngram=3, max_overlap=0.95)["s"]
    loose = find_contamination(TRAIN, {"s": [row]}, ngram=3, max_overlap=0.3)["s"]
    assert strict.contaminated == 0 and loose.near == 1


def test_short_rows_compare_whole():
    short = rec("e", "hi", "there")
    assert find_contamination([rec("t", "hi", "there")], {"s": [short]}, ngram=8, max_overlap=0.5)["s"].exact == 1
    assert find_contamination([rec("t", "hi", "you")], {"s": [short]}, ngram=8, max_overlap=0.5)["s"].contaminated == 0


def test_a_shared_system_prompt_is_not_contamination_but_a_copied_row_still_is():
    """#23 item 6: one 40-word system prompt on every row made 200 of 200 unique held-out rows
    "near-duplicates" of the pooled training n-grams; they were dropped and the gate had nothing to
    score. Shared n-grams are left out and each row is compared with its best-matching training row."""
    import json

    from conftest import quickstart_rows

    system = (
        "You are a helpful assistant for the Debian package archive. Answer with one short line that says "
        "what the package is for, in plain words, without marketing, without a trailing period, and never "
        "mention the version number or the maintainer of the package in the answer."
    )
    rows = []
    for line in quickstart_rows("new_domain.jsonl", 400):  # the sample holds a few broken rows on purpose
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and isinstance(row.get("prompt"), str) and isinstance(row.get("completion"), str):
            rows.append(row)
    records = [rec(f"r{i}", f"{system}\n{r['prompt']}", r["completion"]) for i, r in enumerate(rows)]
    train, held_out = records[:200], records[200:]
    held_out = [r for r in held_out if r.completion not in {t.completion for t in train}][:150]
    copied = rec("copy", train[5].prompt, train[5].completion + " (updated)")
    report = find_contamination(train, {"holdout": [*held_out, copied]}, ngram=8, max_overlap=0.5)["holdout"]
    assert report.dropped_ids == ("copy",), report.summary()
