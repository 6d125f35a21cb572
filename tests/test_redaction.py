"""Redaction before storage, on a corpus of real-shaped (fake) secrets: none may survive, and the
text around them must (#17 item 6)."""

from __future__ import annotations

import pytest

from ctloop.logstore.requests import LogReader, RequestLog, RequestRecord
from ctloop.logstore.writer import redact

SECRETS = {
    "aws access key": "AKIAIOSFODNN7EXAMPLE",
    "aws temporary key": "ASIAY34FZKBOKMUTVV7A",
    "github classic token": "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",
    "github fine-grained token": "github_pat_11ABCDEFG0123456789_abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTU",
    "gitlab token": "glpat-xxxxxxxxxxxxxxxxxxxx1234",
    "slack bot token": "xoxb-123456789012-1234567890123-AbCdEfGhIjKlMnOpQrStUvWx",
    "stripe live key": "sk_live_4eC39HqLyjWDarjtT1zdp7dc",
    "google api key": "AIzaSyDdI0hCZtE6vySjMm-WEfRq3CPzqKqqsHI",
    "sendgrid key": "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",
    "npm token": "npm_abcdefghijklmnopqrstuvwxyz0123456789",
    "jwt": "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U",
    "openai-style key": "sk-proj-abcdefghijklmnop1234567890",
    "email": "jane.doe@example.com",
    "phone": "+1 (555) 123-4567",
}
CONTEXTS = {
    "bearer header": "Authorization: Bearer {secret}",
    "assignment": "api_key={secret}",
    "prose": "my key is {secret} please keep it",
    "json": '{{"password": "{secret}"}}',
}


@pytest.mark.parametrize("kind", sorted(SECRETS))
@pytest.mark.parametrize("context", sorted(CONTEXTS))
def test_no_real_shaped_secret_survives(kind, context):
    text = CONTEXTS[context].format(secret=SECRETS[kind])
    cleaned = redact(text)
    assert SECRETS[kind] not in cleaned
    core = SECRETS[kind].split("_")[-1][-12:]  # no tail of it either (not "xoxb-[phone]-..." leftovers)
    assert core not in cleaned, cleaned
    words = [w for w in CONTEXTS[context].replace("{secret}", "").split() if w.isalpha() and len(w) > 2]
    assert all(w in cleaned for w in words), cleaned


@pytest.mark.parametrize(
    "text",
    ["Describe the Debian package python3-requests:", "version 2.31.0 released 2023-05-22", "see RFC 7231 section 6"],
)
def test_ordinary_text_is_left_alone(text):
    assert redact(text) == text


def test_every_stored_field_is_redacted_ids_and_metadata_included(tmp_path):
    url = f"sqlite:///{tmp_path / 'logs.db'}"
    writer = RequestLog(url, redact_pii=True)
    writer.put(
        RequestRecord(
            request_id="req-for-jane.doe@example.com",
            model_version="1",
            endpoint="completions",
            prompt=f"my token is {SECRETS['github classic token']}",
            answer=SECRETS["jwt"],
            user="jane.doe@example.com",
            request_metadata={"key": SECRETS["aws access key"]},
        )
    )
    writer.close()
    reader = LogReader(url, redact_pii=True)
    row = reader.requests()[0]
    reader.close()
    stored = repr(row)
    assert not any(secret in stored for secret in SECRETS.values()), stored


def test_redacted_request_ids_stay_distinct_short_and_joinable(tmp_path):
    """Ids that redaction would change (numbers that look like phones, e-mail addresses) are stored
    as a hash of themselves: two requests never share an id, and feedback still finds its request."""
    from ctloop.logstore.requests import FeedbackRecord
    from ctloop.logstore.writer import stored_id

    ids = ["1716400000000", "1716400000001", "user-a@x.com", "user-b@y.com", "x" * 300, "plain-id-7"]
    stored = [stored_id(i, redact_pii=True) for i in ids]
    assert len(set(stored)) == len(ids) and all(len(s) <= 128 for s in stored)
    assert stored[-1] == "plain-id-7" and not any("@" in s for s in stored)
    url = f"sqlite:///{tmp_path / 'logs.db'}"
    writer = RequestLog(url, redact_pii=True)
    for rid in ids:
        writer.put(RequestRecord(request_id=rid, model_version="1", endpoint="completions", prompt="p", answer="a"))
    writer.close()
    reader = LogReader(url, redact_pii=True)
    assert all(reader.has_request(rid) for rid in ids)
    reader.add_feedback([FeedbackRecord("1716400000001", rating=-1)])
    rated = [row for row in reader.requests() if row["feedback"] is not None]
    reader.close()
    assert len(rated) == 1  # the feedback joined exactly one request


def test_an_address_after_a_long_run_of_word_characters_is_still_found():
    # The pattern is bounded ({1,64} before the @): an unbounded one took ~11 s on a 64 kB field.
    text = "a" * 64_000 + " mail bob.smith+x@example.co.uk " + "b." * 20_000
    cleaned = redact(text)
    assert "[email]" in cleaned and "example.co.uk" not in cleaned and cleaned.startswith("a" * 64_000)


def test_the_keyword_detector_is_skipped_only_where_it_could_not_fire():
    """scrub runs detect-secrets' keyword detector only on lines holding one of its keywords' stems,
    compared as its case-insensitive regexes compare them: "ſ" is an "s" there."""
    from ctloop.logstore.writer import scrub

    for line in ('contraſeña: "abcdefgh12"', 'db_paſſ: "abcdefgh12"', 'PASSWORD = "abcdefgh12"'):
        assert "abcdefgh12" not in scrub(line), line
    assert scrub("a keyboard of 88 keys") == "a keyboard of 88 keys"
