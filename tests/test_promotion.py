"""Promotion policy (`registry.promotion`) against a real MLflow with a SQLite backend."""

from __future__ import annotations

import threading

import pytest

from ctloop.errors import RegistryError
from ctloop.registry.client import CHALLENGER, CHAMPION, Registry
from ctloop.registry.promotion import (
    APPROVAL_TAG,
    approve,
    champion_history,
    offer_as_challenger,
    promote,
    rollback,
)
from test_registry import run_with_adapter


@pytest.fixture()
def registry(tmp_path) -> Registry:
    registry = Registry(f"sqlite:///{tmp_path / 'mlflow.db'}", "adapter", "exp", tmp_path / "artifacts")
    for name in ("a", "b", "c"):
        registry.register(run_with_adapter(registry, tmp_path, name), f"key-{name}", {"ctloop.gate": "PASS"}, name)
    return registry


def test_promote_and_rollback_move_champion_and_keep_history(registry):
    registry.set_alias(CHALLENGER, 3)
    assert promote(registry, 1, by="t", note="first").summary() == "champion: v- -> v1"
    assert promote(registry, by="t", note="the challenger").after == 3
    again = promote(registry, 3, by="t", note="again")
    assert not again.changed and "already the champion" in again.summary()
    assert champion_history(registry) == [1, 3]
    assert registry.alias(CHALLENGER) is None  # the promoted challenger is no longer pending
    change = rollback(registry, by="t")
    assert (change.before, change.after) == (3, 1) and registry.alias(CHAMPION) == 1
    assert champion_history(registry) == [1]
    assert "rolled_back" in " ".join(registry.version(3).tags)
    with pytest.raises(RegistryError, match="no previous champion"):
        rollback(registry, by="t")


def test_promoting_a_missing_version_or_no_challenger_fails_clearly(registry):
    with pytest.raises(RegistryError, match="has no version 7"):
        promote(registry, 7, by="t", note="typo")
    with pytest.raises(RegistryError, match="no challenger to promote"):
        promote(registry, by="t", note="nothing pending")
    assert registry.alias(CHAMPION) is None


def test_require_shadow_refuses_unless_the_shadow_check_says_promote(registry):
    promote(registry, 1, by="t", note="first")
    asked = []

    def hold(champion: int, challenger: int) -> tuple[str, str]:
        asked.append((champion, challenger))
        return "HOLD", "3 pairs, below shadow.min_pairs=50"

    with pytest.raises(RegistryError, match="HOLD, not PROMOTE .*min_pairs=50"):
        promote(registry, 2, by="t", note="x", shadow_check=hold)
    assert asked == [(1, 2)] and registry.alias(CHAMPION) == 1
    promote(registry, 2, by="t", note="x", shadow_check=lambda champion, challenger: ("PROMOTE", ""))
    assert registry.alias(CHAMPION) == 2


def test_approval_gates_the_challenger_role(registry):
    registry.set_version_tags(2, {APPROVAL_TAG: "pending"})
    with pytest.raises(RegistryError, match="awaits approval"):
        promote(registry, 2, by="t", note="too early")
    approve(registry, 2, by="alice", note="read the report", promote_first=False)
    assert registry.alias(CHALLENGER) == 2 and registry.alias(CHAMPION) is None
    registry.set_version_tags(3, {"ctloop.gate": "FAIL"})
    with pytest.raises(RegistryError, match="did not pass the gate"):
        approve(registry, 3, by="alice", note="no", promote_first=False)


def test_the_first_passing_version_becomes_champion_with_promote_first(registry):
    offer_as_challenger(registry, 1, promote_first=True)
    assert registry.alias(CHAMPION) == 1 and registry.alias(CHALLENGER) is None
    offer_as_challenger(registry, 2, promote_first=True)  # a champion exists: 2 waits as challenger
    assert registry.alias(CHAMPION) == 1 and registry.alias(CHALLENGER) == 2


def test_concurrent_promoters_lose_no_history_entry(registry, monkeypatch):
    """The race is forced (#22 item 7): neither promoter writes its history event until both have
    read the history, so the test fails if promotions can overwrite each other."""
    promote(registry, 1, by="t", note="first")
    start = threading.Barrier(2)
    both_read = threading.Barrier(2, timeout=30)
    errors: list[BaseException] = []
    write_event = registry.add_model_event
    forced = []

    def add_event_after_both_read(prefix, event):
        if threading.current_thread() is not threading.main_thread() and not forced.count(threading.get_ident()):
            forced.append(threading.get_ident())
            both_read.wait()  # both promoters are past their reads: the writes now race
        return write_event(prefix, event)

    monkeypatch.setattr(registry, "add_model_event", add_event_after_both_read)

    def promoter(version: int) -> None:
        try:
            start.wait()
            promote(registry, version, by=f"promoter-{version}", note="at once")
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=promoter, args=(v,)) for v in (2, 3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    history = champion_history(registry)
    assert len(forced) == 2  # the two writes really were held until both had read
    assert history[0] == 1 and sorted(history[1:]) == [2, 3]  # both promotions are in the history
    assert registry.alias(CHAMPION) == history[-1]  # and the alias agrees with it
    # A promoter whose change was overtaken before it took effect is told so, never told it won.
    assert len(errors) <= 1 and all("overtaken by a concurrent change" in str(e) for e in errors)


def test_a_promoter_whose_clock_is_behind_still_lands_last(registry, monkeypatch):
    import time

    promote(registry, 1, by="t", note="first")
    promote(registry, 2, by="t", note="second")
    behind = time.time_ns() - 600 * 10**9
    monkeypatch.setattr(time, "time_ns", lambda: behind)  # this host's clock is 10 minutes slow
    assert promote(registry, 3, by="slow-host", note="third").after == 3
    assert champion_history(registry) == [1, 2, 3] and registry.alias(CHAMPION) == 3


def test_a_retried_register_or_a_late_approval_never_makes_the_champion_a_challenger(registry):
    offer_as_challenger(registry, 1, promote_first=True)
    offer_as_challenger(registry, 1, promote_first=True)  # the register stage, retried
    assert registry.alias(CHAMPION) == 1 and registry.alias(CHALLENGER) is None
    offer_as_challenger(registry, 2, promote_first=True)
    promote(registry, by="t", note="v2")
    approve(registry, 2, by="late", note="after the fact", promote_first=False)
    assert registry.alias(CHAMPION) == 2 and registry.alias(CHALLENGER) is None


def test_a_registry_written_by_ctloop_0_1_keeps_its_history(registry):
    registry.client.set_registered_model_tag("adapter", "ctloop.champion_history", "[1, 2]")
    registry.set_alias(CHAMPION, 2)
    assert champion_history(registry) == [1, 2]
    assert rollback(registry, by="t").after == 1
    promote(registry, 3, by="t", note="after the upgrade")
    assert champion_history(registry) == [1, 3]


def test_each_version_walks_the_lifecycle_and_every_move_is_an_allowed_one(registry):
    """#22 item 4: a version's state is one VersionState, read from the registry; the moves that
    register, approve, promote and roll back make are the ones ALLOWED lists."""
    from ctloop.registry.promotion import ALLOWED, VersionState, register_passed, version_state

    def states() -> dict[int, VersionState]:
        return {v: version_state(registry, v) for v in (1, 2, 3)}

    registry.set_version_tags(2, {APPROVAL_TAG: "pending"})  # registered with registration_tags(True)
    seen: list[dict[int, VersionState]] = [states()]
    assert seen[0] == {1: VersionState.REGISTERED, 2: VersionState.PENDING_APPROVAL, 3: VersionState.REGISTERED}
    assert register_passed(registry, 1, promote_first=True) == VersionState.CHAMPION
    seen.append(states())
    assert register_passed(registry, 2, promote_first=True) == VersionState.PENDING_APPROVAL
    seen.append(states())
    approve(registry, 2, by="alice", note="checked", promote_first=True)
    seen.append(states())
    assert seen[-1][2] == VersionState.CHALLENGER
    promote(registry, by="t", note="shadow said PROMOTE")
    seen.append(states())
    assert (seen[-1][1], seen[-1][2]) == (VersionState.RETIRED, VersionState.CHAMPION)
    rollback(registry, by="t")
    seen.append(states())
    assert (seen[-1][1], seen[-1][2]) == (VersionState.CHAMPION, VersionState.ROLLED_BACK)
    promote(registry, 2, by="t", note="fixed after all")
    seen.append(states())
    assert seen[-1][2] == VersionState.CHAMPION
    promote(registry, 3, by="t", note="the next one")  # 2, once rolled back, is now retired like any other
    seen.append(states())
    assert (seen[-1][2], seen[-1][3]) == (VersionState.RETIRED, VersionState.CHAMPION)
    for before, after in zip(seen, seen[1:], strict=False):
        for version in (1, 2, 3):
            if before[version] != after[version]:
                assert after[version] in ALLOWED[before[version]], (version, before[version], after[version])


@pytest.mark.parametrize(
    ("history", "champion", "previous"),
    [([1, 2, 3], 3, 2), ([1], 1, None), ([], None, None), ([1, 2], 5, 2), ([1, 2], None, 2)],
    ids=["history-ends-at-champion", "first-champion", "none", "alias-set-outside", "no-alias"],
)
def test_one_definition_of_the_previous_champion(history, champion, previous):
    """#22 item 4: the server kept "the previous champion" loaded by one rule and rollback returned
    to another; both now call previous_champion."""
    from ctloop.registry.promotion import previous_champion

    assert previous_champion(history, champion) == previous
