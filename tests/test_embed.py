"""Embedding records for drift checks: text selection and the per-text on-disk cache."""

from __future__ import annotations

import numpy as np
import pytest

from ctloop.data.records import Record
from ctloop.drift.embed import embed_records, texts_of


class CharCountEmbedder:
    """A real (if crude) Embedder: counts of a few characters, plus the length. Counts its calls."""

    CHARS = "aeiou -"

    def __init__(self, name: str = "char-counts"):
        self.name = name
        self.calls: list[list[str]] = []

    def embed(self, texts: list[str]) -> np.ndarray:
        self.calls.append(list(texts))
        return np.array([[text.count(c) for c in self.CHARS] + [len(text)] for text in texts], dtype=np.float64)


RECORDS = [
    Record(id="b-2", prompt="Describe the package aaa:", completion=" an editor"),
    Record(id="a-1", prompt="Describe the package oo:", completion=" a music player - for you"),
    Record(id="c-3", prompt="Describe:", completion=" u"),
    Record(id="a-0", prompt="Describe the package eeeeee-eee:", completion=" tools"),
]


def expected(records: list[Record], which: str) -> np.ndarray:
    return CharCountEmbedder().embed(texts_of(records, which)).astype(np.float32)


@pytest.mark.parametrize(
    ("which", "texts"),
    [
        ("prompt", ["Describe the package aaa:", "Describe:"]),
        ("completion", [" an editor", " u"]),
        ("both", ["Describe the package aaa: an editor", "Describe: u"]),
    ],
    ids=["prompt", "completion", "both"],
)
def test_texts_of(which, texts):
    assert texts_of([RECORDS[0], RECORDS[2]], which) == texts


def test_without_a_cache_rows_follow_the_callers_order(tmp_path):
    embedder = CharCountEmbedder()
    out = embed_records(RECORDS, embedder, "prompt", None)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, expected(RECORDS, "prompt"))
    assert len(embedder.calls) == 1
    assert list(tmp_path.iterdir()) == []


def test_second_call_is_served_from_the_cache(tmp_path):
    embedder = CharCountEmbedder()
    first = embed_records(RECORDS, embedder, "prompt", tmp_path / "cache")
    second = embed_records(RECORDS, embedder, "prompt", tmp_path / "cache")
    assert len(embedder.calls) == 1
    np.testing.assert_array_equal(first, second)
    np.testing.assert_array_equal(second, expected(RECORDS, "prompt"))
    assert "rows.sqlite" in {p.name for p in (tmp_path / "cache").iterdir()}


@pytest.mark.parametrize(
    "order",
    [[3, 2, 1, 0], [1, 3, 0, 2], [2, 0, 3, 1]],
    ids=["reversed", "shuffled", "shuffled-2"],
)
def test_cache_hits_whatever_the_record_order(tmp_path, order):
    embedder = CharCountEmbedder()
    embed_records(RECORDS, embedder, "both", tmp_path)
    reordered = [RECORDS[i] for i in order]
    out = embed_records(reordered, embedder, "both", tmp_path)
    assert len(embedder.calls) == 1
    np.testing.assert_array_equal(out, expected(reordered, "both"))


@pytest.mark.parametrize(
    ("first", "second"),
    [("prompt", "completion"), ("prompt", "both"), ("completion", "both")],
    ids=["prompt-vs-completion", "prompt-vs-both", "completion-vs-both"],
)
def test_each_text_field_has_its_own_cache_entry(tmp_path, first, second):
    embedder = CharCountEmbedder()
    a = embed_records(RECORDS, embedder, first, tmp_path)
    b = embed_records(RECORDS, embedder, second, tmp_path)
    assert len(embedder.calls) == 2
    np.testing.assert_array_equal(a, expected(RECORDS, first))
    np.testing.assert_array_equal(b, expected(RECORDS, second))
    embed_records(RECORDS, embedder, first, tmp_path)
    embed_records(RECORDS, embedder, second, tmp_path)
    assert len(embedder.calls) == 2


@pytest.mark.parametrize(
    "change",
    ["embedder", "records"],
    ids=["other-embedder-name", "edited-record"],
)
def test_cache_misses_when_the_embedder_or_the_data_change(tmp_path, change):
    embedder = CharCountEmbedder()
    embed_records(RECORDS, embedder, "prompt", tmp_path)
    if change == "embedder":
        other, records = CharCountEmbedder(name="char-counts-v2"), RECORDS
    else:
        other = embedder
        records = [*RECORDS[:-1], Record(id="a-0", prompt="Describe the package zz:", completion=" tools")]
    out = embed_records(records, other, "prompt", tmp_path)
    assert len(other.calls) == (1 if change == "embedder" else 2)
    np.testing.assert_array_equal(out, expected(records, "prompt"))


def test_cache_order_with_duplicate_ids(tmp_path):
    embedder = CharCountEmbedder()
    twins = [Record(id="same", prompt="aaaa", completion="x"), Record(id="same", prompt="e", completion="y")]
    embed_records(twins, embedder, "prompt", tmp_path)
    swapped = twins[::-1]
    np.testing.assert_array_equal(embed_records(swapped, embedder, "prompt", tmp_path), expected(swapped, "prompt"))


@pytest.mark.slow
def test_default_minilm_embedder_loads_offline_and_ranks_similarity():
    from ctloop.drift.embed import SentenceTransformerEmbedder

    embedder = SentenceTransformerEmbedder("minilm")
    vectors = embedder.embed(
        ["The cat sat on the mat.", "A cat was sitting on a rug.", "Quarterly tax filings are due in April."]
    )
    assert vectors.shape == (3, 384)
    assert np.isfinite(vectors).all()
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    similar, unrelated = float(unit[0] @ unit[1]), float(unit[0] @ unit[2])
    assert similar > unrelated + 0.3, (similar, unrelated)


def test_a_sliding_window_embeds_only_its_new_rows(tmp_path):
    """#26: the cache is per text, so the next look at a sliding window embeds only what is new."""
    embedder = CharCountEmbedder()
    embed_records(RECORDS[:3], embedder, "prompt", tmp_path)
    out = embed_records(RECORDS[1:], embedder, "prompt", tmp_path)
    assert embedder.calls[-1] == [RECORDS[3].prompt]
    np.testing.assert_array_equal(out, expected(RECORDS[1:], "prompt"))
