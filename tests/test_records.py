"""Records: readers for JSONL / CSV / Parquet, the schema, fingerprints and Parquet storage."""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ctloop.data.records import (
    BadRow,
    Record,
    detect_format,
    fingerprint,
    read_parquet,
    read_raw_rows,
    record_from_fields,
    write_parquet,
)
from ctloop.errors import DataError

CHAT = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "hi"},
    {"role": "assistant", "content": "hello"},
]


# -- JSONL ---------------------------------------------------------------------------------------


def test_jsonl_rows_good_and_bad(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_bytes(
        b'{"prompt": "p1", "completion": "c1"}\n'
        b"\n"
        b"   \n"
        b'{"prompt": "p2", "completion": \n'
        b"[1, 2, 3]\n"
        b'{"prompt": "caf\xe9", "completion": "x"}\n'
        b'{"prompt": "p3", "completion": "c3"}'  # no trailing newline
    )
    rows = list(read_raw_rows(path))
    assert [r.location for r in rows] == [
        "data.jsonl:1",
        "data.jsonl:4",
        "data.jsonl:5",
        "data.jsonl:6",
        "data.jsonl:7",
    ]
    assert [r.reason for r in rows] == ["", "invalid_json", "not_an_object", "invalid_utf8", ""]
    assert rows[0].fields == {"prompt": "p1", "completion": "c1"}
    assert rows[4].fields == {"prompt": "p3", "completion": "c3"}
    assert all(r.fields is None for r in rows[1:4])
    assert "at column" in rows[1].detail
    assert rows[2].detail == "each line must be a JSON object, got list"
    assert rows[3].detail.startswith("byte 15 is not valid UTF-8")
    assert rows[3].raw == '{"prompt": "caf\\xe9", "completion": "x"}'
    assert rows[1].raw == '{"prompt": "p2", "completion": '


def test_jsonl_crlf_line_endings(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_bytes(b'{"prompt": "a", "completion": "b"}\r\n{"prompt": "c", "completion": "d"}\r\n')
    rows = list(read_raw_rows(path))
    assert [r.fields for r in rows] == [{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": "d"}]
    assert rows[0].raw == '{"prompt": "a", "completion": "b"}'


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("a.jsonl", "jsonl"),
        ("a.NDJSON", "jsonl"),
        ("a.json", "jsonl"),
        ("a.parquet", "parquet"),
        ("a.pq", "parquet"),
        ("a.csv", "csv"),
    ],
    ids=["jsonl", "ndjson-upper", "json", "parquet", "pq", "csv"],
)
def test_detect_format(name, expected):
    assert detect_format(Path(name)) == expected


def test_unknown_extension_and_missing_file(tmp_path):
    with pytest.raises(DataError, match="rename it to .jsonl, .parquet or .csv"):
        detect_format(Path("data.txt"))
    with pytest.raises(DataError, match="no such file"):
        list(read_raw_rows(tmp_path / "missing.jsonl"))


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("bom.csv", b"\xef\xbb\xbfid,prompt,completion\na,p,c\n"),
        ("bom.jsonl", b'\xef\xbb\xbf{"id": "a", "prompt": "p", "completion": "c"}\n'),
    ],
    ids=["csv", "jsonl"],
)
def test_utf8_bom_is_ignored(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content)
    (row,) = read_raw_rows(path)
    assert row.fields == {"id": "a", "prompt": "p", "completion": "c"}


# -- CSV -----------------------------------------------------------------------------------------


def test_csv_rows(tmp_path):
    path = tmp_path / "data.csv"
    messages = json.dumps(CHAT).replace('"', '""')
    path.write_bytes(
        b"id,messages,source,metadata\n"
        b'r1,"' + messages.encode() + b'",web,"{""k"": 1}"\n'
        b"r2,not json,,\n"
        b'r3,"[]",caf\xe9,\n'
        b"r4,[],a,b,extra\n"
        b'r5,"' + messages.encode() + b'",,\n'
    )
    rows = list(read_raw_rows(path))
    assert [r.location for r in rows] == ["data.csv:2", "data.csv:3", "data.csv:4", "data.csv:5", "data.csv:6"]
    assert [r.reason for r in rows] == ["", "invalid_json", "invalid_utf8", "invalid_csv", ""]
    assert rows[0].fields == {"id": "r1", "messages": CHAT, "source": "web", "metadata": {"k": 1}}
    # empty optional cells are absent, not empty strings
    assert rows[4].fields == {"id": "r5", "messages": CHAT}
    assert rows[1].detail.startswith("column 'messages':")
    assert rows[2].detail == "a cell is not valid UTF-8; re-encode the file"
    assert "caf\\xe9" in rows[2].raw
    assert rows[3].detail == "more cells than header columns"
    record = record_from_fields(rows[0].fields)
    assert (record.id, record.prompt, record.completion) == ("r1", "system: be brief\nuser: hi\nassistant:", " hello")
    assert record.metadata == {"k": 1}


def test_csv_empty_text_cells_are_kept_as_empty_strings(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text("prompt,completion,source\nhello,,\n", encoding="utf-8")
    (row,) = read_raw_rows(path)
    assert row.fields == {"prompt": "hello", "completion": ""}


def test_csv_quoted_multiline_cell(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text('prompt,completion\n"line one\nline two",done\nq,a\n', encoding="utf-8")
    rows = list(read_raw_rows(path))
    assert [r.fields for r in rows] == [
        {"prompt": "line one\nline two", "completion": "done"},
        {"prompt": "q", "completion": "a"},
    ]
    assert [r.location for r in rows] == ["data.csv:3", "data.csv:4"]


# -- Parquet -------------------------------------------------------------------------------------


def test_parquet_rows(tmp_path):
    path = tmp_path / "data.parquet"
    pq.write_table(
        pa.table(
            {
                "id": ["a", None, "c"],
                "prompt": ["p1", "p2", "p3"],
                "completion": ["c1", "c2", "c3"],
                "source": pa.array([b"web", b"caf\xe9", b"x"], type=pa.binary()),
            }
        ),
        path,
    )
    rows = list(read_raw_rows(path))
    assert [r.location for r in rows] == ["data.parquet:row 1", "data.parquet:row 2", "data.parquet:row 3"]
    assert [r.reason for r in rows] == ["", "invalid_utf8", ""]
    assert rows[0].fields == {"id": "a", "prompt": "p1", "completion": "c1", "source": "web"}
    assert rows[1].detail == "column 'source' is not valid UTF-8"
    assert rows[1].fields is None
    assert record_from_fields(rows[2].fields) == Record(id="c", prompt="p3", completion="c3", source="x")


def test_parquet_null_id_gets_auto_id(tmp_path):
    path = tmp_path / "data.parquet"
    pq.write_table(pa.table({"id": [None], "prompt": ["p"], "completion": ["c"]}), path)
    (row,) = read_raw_rows(path)
    assert record_from_fields(row.fields).id.startswith("r-")


def test_corrupt_parquet_raises_data_error(tmp_path):
    path = tmp_path / "data.parquet"
    path.write_bytes(b"this is not parquet")
    with pytest.raises(DataError, match="not a readable Parquet file"):
        list(read_raw_rows(path))


@pytest.mark.parametrize("fmt", ["parquet", "csv", "jsonl"], ids=["parquet", "csv", "jsonl-nulls"])
def test_mixed_forms_in_one_file(tmp_path, fmt):
    """Columnar files give every row every column: null or "" there means the field is absent."""
    if fmt == "jsonl":
        path = tmp_path / "mixed.jsonl"
        path.write_text(
            json.dumps({"prompt": "p", "completion": "c", "messages": None})
            + "\n"
            + json.dumps({"prompt": None, "completion": None, "messages": CHAT})
            + "\n",
            encoding="utf-8",
        )
    elif fmt == "parquet":
        path = tmp_path / "mixed.parquet"
        pq.write_table(pa.table({"prompt": ["p", None], "completion": ["c", None], "messages": [None, CHAT]}), path)
    else:
        path = tmp_path / "mixed.csv"
        cell = json.dumps(CHAT).replace('"', '""')
        path.write_text(f'prompt,completion,messages\np,c,\n,,"{cell}"\n', encoding="utf-8")
    records = [record_from_fields(row.fields) for row in read_raw_rows(path)]
    assert [r.completion for r in records] == ["c", " hello"]


# -- the schema ----------------------------------------------------------------------------------


def test_prompt_completion_record():
    record = record_from_fields(
        {
            "id": 7,
            "prompt": "Q:",
            "completion": " A",
            "source": "s",
            "timestamp": "2024-01-01",
            "metadata": {"lang": "en"},
        }
    )
    assert record == Record(
        id="7", prompt="Q:", completion=" A", source="s", timestamp="2024-01-01", metadata={"lang": "en"}
    )


def test_chat_record():
    record = record_from_fields({"messages": CHAT})
    assert record.prompt == "system: be brief\nuser: hi\nassistant:"
    assert record.completion == " hello"


@pytest.mark.parametrize(
    ("fields", "reason", "fragment"),
    [
        ({"prompt": "p"}, "missing_field", "'completion' is missing"),
        ({"completion": "c"}, "missing_field", "'prompt' is missing"),
        ({"prompt": None, "completion": "c"}, "missing_field", "'prompt' is missing"),
        ({"prompt": "p", "completion": 42}, "wrong_type", "'completion' must be a string, got int"),
        ({"prompt": ["p"], "completion": "c"}, "wrong_type", "'prompt' must be a string, got list"),
        ({"prompt": "p", "completion": "c", "id": True}, "wrong_type", "'id' must be a string, got bool"),
        ({"prompt": "p", "completion": "c", "source": 1.5}, "wrong_type", "'source' must be a string, got float"),
        ({"prompt": "p", "completion": "c", "metadata": [1]}, "wrong_type", "'metadata' must be an object"),
        ({"prompt": "p", "completion": "c", "answer": "x"}, "unknown_field", "unknown field(s) ['answer']"),
        ({"prompt": "p", "completion": "c", "messages": CHAT}, "ambiguous_form", "not both"),
        ({"messages": CHAT, "completion": "c"}, "ambiguous_form", "not both"),
        ({"messages": []}, "invalid_messages", "non-empty list"),
        ({"messages": "hi"}, "invalid_messages", "non-empty list"),
        ({"messages": [{"role": "user"}]}, "invalid_messages", "string 'role' and a string 'content'"),
        ({"messages": [{"role": "user", "content": 3}]}, "invalid_messages", "string 'content'"),
        ({"messages": CHAT[:2]}, "invalid_messages", "last message must have role 'assistant'"),
    ],
    ids=[
        "no-completion",
        "no-prompt",
        "null-prompt",
        "int-completion",
        "list-prompt",
        "bool-id",
        "float-source",
        "list-metadata",
        "unknown-field",
        "both-forms",
        "both-forms-partial",
        "empty-messages",
        "messages-not-list",
        "message-no-content",
        "message-int-content",
        "last-not-assistant",
    ],
)
def test_bad_rows(fields, reason, fragment):
    with pytest.raises(BadRow) as exc_info:
        record_from_fields(fields)
    assert exc_info.value.reason == reason
    assert fragment in exc_info.value.detail


def test_auto_id_is_content_derived():
    a = record_from_fields({"prompt": "Q", "completion": "A", "source": "one"})
    b = record_from_fields({"prompt": "  Q ", "completion": "A\n", "source": "two"})  # same normalised text
    c = record_from_fields({"prompt": "Q", "completion": "B"})
    expected = "r-" + hashlib.sha256(b"Q\x00A").hexdigest()[:16]
    assert a.id == b.id == expected
    assert c.id != a.id
    assert record_from_fields({"id": "", "prompt": "Q", "completion": "A"}).id == expected
    assert record_from_fields({"id": "mine", "prompt": "Q", "completion": "A"}).id == "mine"


def test_auto_id_nfc_normalised():
    composed = record_from_fields({"prompt": "caf\u00e9", "completion": "x"})
    decomposed = record_from_fields({"prompt": "cafe\u0301", "completion": "x"})
    assert composed.id == decomposed.id
    assert composed.content_key() == decomposed.content_key()


# -- fingerprints --------------------------------------------------------------------------------

RECORDS = [
    Record(id=f"id{i}", prompt=f"p{i}", completion=f"c{i}", source="s", timestamp="t", metadata={"n": i})
    for i in range(4)
]


def test_fingerprint_is_order_independent():
    shuffled = RECORDS[::2] + RECORDS[1::2]
    assert fingerprint(RECORDS) == fingerprint(list(reversed(RECORDS))) == fingerprint(iter(shuffled))
    assert len(fingerprint(RECORDS)) == 16


@pytest.mark.parametrize(
    "change",
    [
        {"id": "other"},
        {"prompt": "p9"},
        {"completion": "c9"},
        {"source": "s2"},
        {"timestamp": "t2"},
        {"metadata": {"n": 99}},
    ],
    ids=["id", "prompt", "completion", "source", "timestamp", "metadata"],
)
def test_fingerprint_changes_with_any_field(change):
    changed = [replace(RECORDS[0], **change), *RECORDS[1:]]
    assert fingerprint(changed) != fingerprint(RECORDS)


def test_fingerprint_changes_when_a_row_is_added_or_removed():
    assert fingerprint(RECORDS[:3]) != fingerprint(RECORDS)
    assert fingerprint(RECORDS + RECORDS[:1]) != fingerprint(RECORDS)
    assert fingerprint([]) == fingerprint([])


# -- Parquet storage -----------------------------------------------------------------------------


def test_parquet_round_trip_with_extra_columns(tmp_path):
    records = [*RECORDS, Record(id="u", prompt="caf\u00e9 \u2603", completion="\n", metadata={"nested": {"a": [1, 2]}})]
    path = tmp_path / "sub" / "set.parquet"
    extra = {"cycle_id": ["c1"] * 5, "n_tokens": [1, 2, 3, 4, 5]}
    write_parquet(path, records, extra=extra)
    back, back_extra = read_parquet(path)
    assert back == records
    assert back_extra == extra
    assert sorted(p.name for p in path.parent.iterdir()) == ["set.parquet"]  # no temp file left behind


def test_parquet_round_trip_without_extra(tmp_path):
    path = tmp_path / "set.parquet"
    write_parquet(path, RECORDS)
    back, extra = read_parquet(path)
    assert back == RECORDS
    assert extra == {}
    assert fingerprint(back) == fingerprint(RECORDS)


def test_write_parquet_overwrites(tmp_path):
    path = tmp_path / "set.parquet"
    write_parquet(path, RECORDS)
    write_parquet(path, RECORDS[:1])
    assert read_parquet(path)[0] == RECORDS[:1]
