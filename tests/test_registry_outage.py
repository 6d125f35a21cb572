"""#22 item 1: a registry that does not answer is never read as an empty one.

Each read of `Registry` meets an injected transport or server failure in the MLflow call it makes,
against a real MLflow on SQLite that holds a champion: every one must raise RegistryUnavailable
(after its retries), where the old code answered None, [] or {}. "Does not exist" alone still
means absence. A real unreachable tracking server gives the same error, with its password hidden.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow.exceptions import MlflowException

from conftest import free_port
from ctloop.errors import RegistryError, RegistryUnavailable
from ctloop.registry.client import CHAMPION, Registry, shown_uri


def _outage(*args, **kwargs):
    raise MlflowException("API request to http://mlflow:5000 failed: connection refused", error_code="INTERNAL_ERROR")


@pytest.fixture()
def registry(tmp_path) -> Registry:
    """A real SQLite registry with v1 registered (with a run holding a report) and set as champion."""
    registry = Registry(f"sqlite:///{tmp_path / 'mlflow.db'}", "adapter", "exp", tmp_path / "artifacts", (0.0, 0.0))
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"r": 4}))
    info = registry.register_adapter_dir(adapter, "key-1", {}, "v1")
    report = tmp_path / "replay_manifest.json"
    report.write_text("{}")
    registry.log_artifact(info.run_id, report, "reports")
    registry.set_alias(CHAMPION, 1)
    registry.add_model_event("ctloop.history", {"action": "promote", "to": 1})
    return registry


READS = {
    "alias": ("get_registered_model", lambda r, tmp: r.alias(CHAMPION)),
    "versions": ("search_model_versions", lambda r, tmp: r.versions()),
    "find_by_cycle_key": ("get_registered_model", lambda r, tmp: r.find_by_cycle_key("key-1")),
    "version": ("get_model_version", lambda r, tmp: r.version(1)),
    "model_tag": ("get_registered_model", lambda r, tmp: r.model_tag("ctloop.history")),
    "model_events": ("get_registered_model", lambda r, tmp: r.model_events("ctloop.history")),
    "delete_alias": ("delete_registered_model_alias", lambda r, tmp: r.delete_alias("challenger")),
    "download_run_file": (
        "list_artifacts",
        lambda r, tmp: r.download_run_file(r.version(1).run_id, "reports/replay_manifest.json", tmp / "cache"),
    ),
    "download_adapter": ("get_model_version", lambda r, tmp: r.download_adapter(1, tmp / "cache")),
}


@pytest.mark.parametrize("read", sorted(READS))
def test_every_read_raises_when_the_registry_does_not_answer(registry, tmp_path, monkeypatch, read):
    method, call = READS[read]
    calls = []

    def failing(*args, **kwargs):
        calls.append(args)
        _outage()

    monkeypatch.setattr(registry.client, method, failing)
    with pytest.raises(RegistryUnavailable, match=r"did not answer .*3 attempts.*run the command again") as raised:
        call(registry, tmp_path)
    assert str(tmp_path / "mlflow.db") in str(raised.value)
    assert len(calls) == 3  # the first try and the two configured retries: every read is idempotent


@pytest.mark.parametrize("read", sorted(READS))
def test_a_passing_hiccup_is_retried_and_answers_as_if_none_happened(registry, tmp_path, monkeypatch, read):
    method, call = READS[read]
    expected = call(registry, tmp_path / "first")
    real = getattr(registry.client, method)
    failures = iter([True])

    def flaky(*args, **kwargs):
        if next(failures, False):
            _outage()
        return real(*args, **kwargs)

    monkeypatch.setattr(registry.client, method, flaky)
    again = call(registry, tmp_path / "second")
    if isinstance(expected, Path):
        assert again.name == expected.name and again.exists()
    else:
        assert again == expected


def test_absence_still_reads_as_absence(tmp_path):
    empty = Registry(f"sqlite:///{tmp_path / 'mlflow.db'}", "adapter", "exp", tmp_path / "artifacts", (0.0,))
    assert empty.alias(CHAMPION) is None and empty.versions() == [] and empty.model_tag("x") is None
    assert empty.find_by_cycle_key("k") is None and empty.model_events("ctloop.history") == []
    empty.delete_alias(CHAMPION)  # nothing to delete: not an error
    with pytest.raises(RegistryError, match="has no version 3"):
        empty.version(3)


def test_a_missing_file_of_an_existing_run_is_absent_not_an_outage(registry, tmp_path):
    run_id = registry.version(1).run_id
    assert registry.download_run_file(run_id, "data/train.parquet", tmp_path / "cache") is None
    assert registry.download_run_file("0" * 32, "data/train.parquet", tmp_path / "cache") is None


def test_writes_that_are_not_idempotent_are_tried_once(registry, monkeypatch):
    calls = []

    def failing(*args, **kwargs):
        calls.append(args)
        _outage()

    monkeypatch.setattr(registry.client, "create_run", failing)
    with pytest.raises(RegistryUnavailable, match="not retried: it is not idempotent"):
        registry.start_run("cycle-x", {})
    assert len(calls) == 1  # a retry after a lost answer would open a second run


def test_an_unreachable_tracking_server_is_an_outage_with_its_password_hidden(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    uri = f"http://ops:s3cret@127.0.0.1:{free_port()}"
    down = Registry(uri, "adapter", "exp", None, (0.0,))
    with pytest.raises(RegistryUnavailable) as raised:
        down.alias(CHAMPION)  # the old code answered None: "no champion", and a cycle gated against the base
    message = str(raised.value)
    assert "s3cret" not in message and "http://ops:***@127.0.0.1" in message
    assert shown_uri("postgresql://u:p@db/x") == "postgresql://u:***@db/x"
    assert shown_uri("sqlite:///tmp/mlflow.db") == "sqlite:///tmp/mlflow.db"
