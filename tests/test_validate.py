"""Validation: quarantine of bad rows with one reason each, counts, and the volume limits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ctloop.config import DataConfig
from ctloop.data.records import RawRow, fingerprint, read_raw_rows
from ctloop.data.validation import validate_records

REPO = Path(__file__).resolve().parents[1]
BROKEN = REPO / "examples" / "broken.jsonl"
LENIENT = DataConfig(min_rows=1, max_bad_fraction=0.5)


def words(texts: list[str]) -> list[int]:
    return [len(t.split()) for t in texts]


def _validate(path: Path, tmp_path: Path, config: DataConfig = LENIENT, max_seq_tokens: int = 512):
    quarantine = tmp_path / "q" / "quarantine.jsonl"
    good, report = validate_records(
        read_raw_rows(path),
        source=str(path),
        config=config,
        max_seq_tokens=max_seq_tokens,
        count_tokens=words,
        quarantine_path=quarantine,
    )
    lines = quarantine.read_text(encoding="utf-8").splitlines()
    return good, report, [json.loads(line) for line in lines]


def _jsonl(tmp_path: Path, rows: list[dict], name: str = "data.jsonl") -> Path:
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


# -- the shipped broken example ------------------------------------------------------------------

BROKEN_BAD = {
    "broken.jsonl:21": "invalid_json",
    "broken.jsonl:22": "missing_field",
    "broken.jsonl:23": "wrong_type",
    "broken.jsonl:24": "empty_text",
    "broken.jsonl:25": "invalid_utf8",
    "broken.jsonl:26": "duplicate",
}


def test_broken_example_counts(tmp_path):
    good, report, _ = _validate(BROKEN, tmp_path)
    assert report.total_rows == 26
    assert report.good_rows == 20
    assert report.bad_rows == 6
    assert report.bad_by_reason == {
        "invalid_json": 1,
        "missing_field": 1,
        "wrong_type": 1,
        "empty_text": 1,
        "invalid_utf8": 1,
        "duplicate": 1,
    }
    assert [r.id for r in good] == [f"broken-{i:05d}" for i in range(20)]
    assert report.good_rows + sum(report.bad_by_reason.values()) == report.total_rows
    assert report.fingerprint == fingerprint(good)
    assert report.passed is True
    assert report.reasons == ()
    assert report.metrics["bad_fraction"] == pytest.approx(6 / 26)


def test_broken_example_quarantine_file(tmp_path):
    good, report, quarantined = _validate(BROKEN, tmp_path)
    assert report.quarantine_path == str(tmp_path / "q" / "quarantine.jsonl")
    assert len(quarantined) == report.bad_rows == 6
    assert all(set(q) == {"location", "reason", "detail", "raw"} for q in quarantined)
    assert {q["location"]: q["reason"] for q in quarantined} == BROKEN_BAD
    assert all(q["detail"] for q in quarantined)
    lines = BROKEN.read_bytes().splitlines()
    by_location = {q["location"]: q for q in quarantined}
    assert by_location["broken.jsonl:21"]["raw"] == lines[20].decode()
    assert by_location["broken.jsonl:22"]["detail"].startswith("'completion' is missing")
    assert by_location["broken.jsonl:23"]["detail"] == "'completion' must be a string, got int"
    assert by_location["broken.jsonl:24"]["detail"].startswith("'completion' is empty")
    assert "caf\\xe9" in by_location["broken.jsonl:25"]["raw"]
    assert by_location["broken.jsonl:26"]["raw"] == lines[25].decode()
    assert sorted(p.name for p in (tmp_path / "q").iterdir()) == ["quarantine.jsonl"]  # no temp file left


def test_too_long_with_small_max_seq_tokens(tmp_path):
    # whitespace words of prompt + completion, + 2 special tokens: lines 2, 7, 11, 14 and 16 are > 14
    good, report, quarantined = _validate(BROKEN, tmp_path, max_seq_tokens=14)
    too_long = sorted(q["location"] for q in quarantined if q["reason"] == "too_long")
    assert too_long == ["broken.jsonl:11", "broken.jsonl:14", "broken.jsonl:16", "broken.jsonl:2", "broken.jsonl:7"]
    assert report.bad_by_reason["too_long"] == 5
    assert report.good_rows == 15
    assert report.total_rows == 26
    detail = next(q["detail"] for q in quarantined if q["location"] == "broken.jsonl:7")
    assert detail.startswith("20 tokens > model.max_seq_tokens=14")


def test_exactly_max_seq_tokens_is_kept(tmp_path):
    path = _jsonl(tmp_path, [{"prompt": "a b c", "completion": "d e"}, {"prompt": "a b c", "completion": "d e f"}])
    good, report, quarantined = _validate(path, tmp_path, max_seq_tokens=7)  # 3 + 2 + 2 = 7 fits
    assert [r.completion for r in good] == ["d e"]
    assert [(q["location"], q["reason"]) for q in quarantined] == [("data.jsonl:2", "too_long")]


# -- duplicates ----------------------------------------------------------------------------------

DUPLICATE_ROWS = [
    {"id": "a", "prompt": "p1", "completion": "c1"},
    {"id": "a", "prompt": "p2", "completion": "c2"},  # same id, other content
    {"id": "b", "prompt": " p1", "completion": "c1 "},  # other id, same normalised content
    {"id": "c", "prompt": "p3", "completion": "c3"},
]


def test_duplicate_ids_and_content(tmp_path):
    good, report, quarantined = _validate(_jsonl(tmp_path, DUPLICATE_ROWS), tmp_path)
    assert [r.id for r in good] == ["a", "c"]
    assert report.bad_by_reason == {"duplicate_id": 1, "duplicate": 1}
    assert {q["location"]: q["reason"] for q in quarantined} == {
        "data.jsonl:2": "duplicate_id",
        "data.jsonl:3": "duplicate",
    }
    assert "id 'a' is used by an earlier row" in quarantined[0]["detail"]


def test_duplicate_content_kept_when_drop_duplicates_off(tmp_path):
    config = DataConfig(min_rows=1, max_bad_fraction=0.5, drop_duplicates=False)
    good, report, _ = _validate(_jsonl(tmp_path, DUPLICATE_ROWS), tmp_path, config=config)
    assert [r.id for r in good] == ["a", "b", "c"]
    assert report.bad_by_reason == {"duplicate_id": 1}


# -- limits --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("config", "fragments"),
    [
        (DataConfig(min_rows=1, max_bad_fraction=0.2), ["23.1% of rows are bad, above data.max_bad_fraction=0.2"]),
        (DataConfig(min_rows=21, max_bad_fraction=0.5), ["only 20 good rows, below data.min_rows=21"]),
        (DataConfig(min_rows=21, max_bad_fraction=0.1), ["above data.max_bad_fraction=0.1", "below data.min_rows=21"]),
    ],
    ids=["max_bad_fraction", "min_rows", "both"],
)
def test_limits_fail_the_report(tmp_path, config, fragments):
    good, report, _ = _validate(BROKEN, tmp_path, config=config)
    assert report.passed is False
    assert len(report.reasons) == len(fragments)
    for reason, fragment in zip(report.reasons, fragments, strict=True):
        assert fragment in reason
    assert len(good) == 20  # limits never change which rows are good
    summary = report.summary()
    assert "validation FAILED" in summary
    assert all(reason in summary for reason in report.reasons)


@pytest.mark.parametrize(
    "config",
    [DataConfig(min_rows=20, max_bad_fraction=6 / 26), DataConfig(min_rows=20, max_bad_fraction=1.0)],
    ids=["bad-fraction-at-limit", "min-rows-at-limit"],
)
def test_limits_at_the_boundary_pass(tmp_path, config):
    _, report, _ = _validate(BROKEN, tmp_path, config=config)
    assert report.passed is True
    summary = report.summary()
    assert "validation passed" in summary
    assert "20 good of 26 rows" in summary
    assert (
        "quarantined 6 (duplicate: 1, empty_text: 1, invalid_json: 1, invalid_utf8: 1, missing_field: 1, "
        "wrong_type: 1)" in summary
    )


def test_default_limits_fail_on_broken_example(tmp_path):
    _, report, _ = _validate(BROKEN, tmp_path, config=DataConfig())
    assert report.passed is False
    assert any("data.max_bad_fraction=0.1" in r for r in report.reasons)


# -- empty input ---------------------------------------------------------------------------------


@pytest.mark.parametrize("content", [b"", b"\n\n  \n"], ids=["empty-file", "blank-lines"])
def test_empty_input(tmp_path, content):
    path = tmp_path / "empty.jsonl"
    path.write_bytes(content)
    good, report, quarantined = _validate(path, tmp_path)
    assert good == []
    assert quarantined == []
    assert report.total_rows == 0
    assert report.bad_by_reason == {}
    assert report.passed is False
    assert report.reasons == ("the input has no rows; check the --data path and file contents",)
    assert report.metrics == {"bad_fraction": 0.0, "mean_tokens": 0.0}


def test_rows_without_fields_keep_reader_reason(tmp_path):
    rows = [
        RawRow("x:1", "raw", reason="invalid_csv", detail="more cells than header columns"),
        RawRow("x:2", "{}", fields={"prompt": "a b", "completion": "c"}),
    ]
    quarantine = tmp_path / "quarantine.jsonl"
    good, report = validate_records(
        rows, source="x", config=LENIENT, max_seq_tokens=10, count_tokens=words, quarantine_path=quarantine
    )
    assert [r.prompt for r in good] == ["a b"]
    assert json.loads(quarantine.read_text()) == {
        "location": "x:1",
        "reason": "invalid_csv",
        "detail": "more cells than header columns",
        "raw": "raw",
    }
    assert report.metrics["mean_tokens"] == 5.0  # 2 + 1 + 2 special tokens
