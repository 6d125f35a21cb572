"""The shadow router against a real SQLite log store, with challengers that answer, hang or fail.

The challenger here is a scripted backend (a sleep, a hang or an exception), because what is
under test is the router: sampling, the bounded queue, timeouts, the breaker, shutdown and the
counters; the real model backends are tested through the server."""

from __future__ import annotations

import asyncio

import pytest

from ctloop.config import ShadowConfig
from ctloop.errors import ModelError
from ctloop.logstore.shadow import ShadowStore
from ctloop.serving.backends import Generation, GenerationRequest
from ctloop.serving.router import CircuitBreaker, ShadowRouter, sampled

CHAMPION = Generation("champion answer", 3, 2, "stop", 5.0)
REQUEST = GenerationRequest(prompt="hello", max_tokens=8)


class ScriptedChallenger:
    def __init__(self, seconds: float = 0.0, fail: bool = False, hang: bool = False):
        self.seconds, self.fail, self.hang = seconds, fail, hang
        self.calls = 0

    async def generate(self, request, version, priority=0):
        self.calls += 1
        if self.hang:
            await asyncio.Event().wait()
        await asyncio.sleep(self.seconds)
        if self.fail:
            raise ModelError("challenger is broken")
        return Generation(f"challenger answer to {request.prompt}", 3, 4, "stop", self.seconds * 1000)


def _router(tmp_path, backend, **settings) -> ShadowRouter:
    store = ShadowStore(f"sqlite:///{tmp_path / 'shadow.db'}", flush_seconds=0.05)
    return ShadowRouter(backend, store, ShadowConfig(**settings), challenger=lambda: 2)


def _assert_counters_add_up(router: ShadowRouter) -> dict:
    c = router.counters.as_dict()
    assert c["offered"] == c["sampled_out"] + c["skipped"] + c["dropped"] + c["enqueued"]
    assert c["enqueued"] == c["completed"] + c["timed_out"] + c["errored"] + c["cancelled"]
    # Every enqueued request gets a row, and so does every one the breaker skipped or a full queue dropped.
    assert router.store.written == c["enqueued"] + c["skipped_breaker"] + c["dropped"] and router.store.dropped == 0
    statuses = [r["status"] for r in router.store.rows()]
    assert statuses.count("skipped_breaker") == c["skipped_breaker"] and statuses.count("dropped") == c["dropped"]
    return c


def test_sampling_is_deterministic_and_close_to_the_fraction():
    ids = [f"req-{i}" for i in range(20_000)]
    first = [sampled(i, 0.25) for i in ids]
    assert first == [sampled(i, 0.25) for i in ids]
    assert 0.23 < sum(first) / len(ids) < 0.27
    assert all(sampled(i, 1.0) for i in ids[:100]) and not any(sampled(i, 0.0) for i in ids[:100])


def test_every_shadowed_request_is_logged_with_both_answers(tmp_path):
    async def scenario():
        router = _router(tmp_path, ScriptedChallenger(0.001), workers=2)
        router.start()
        for i in range(50):
            router.submit(f"r{i}", GenerationRequest(prompt=f"p{i}", max_tokens=8), CHAMPION, 1)
        await router.shutdown(drain_seconds=5)
        return router

    router = asyncio.run(scenario())
    counters = _assert_counters_add_up(router)
    assert counters["completed"] == 50
    rows = router.store.rows()
    assert {r["request_id"] for r in rows} == {f"r{i}" for i in range(50)}
    row = next(r for r in rows if r["request_id"] == "r7")
    assert row["champion_output"] == "champion answer" and row["challenger_output"] == "challenger answer to p7"
    assert (row["champion_version"], row["challenger_version"], row["status"]) == ("1", "2", "completed")


def test_a_full_queue_drops_and_counts_instead_of_waiting(tmp_path):
    async def scenario():
        router = _router(tmp_path, ScriptedChallenger(0.05), workers=1, queue_size=3)
        router.start()
        outcomes = [router.submit(f"r{i}", REQUEST, CHAMPION, 1) for i in range(20)]
        await router.shutdown(drain_seconds=5)
        return router, outcomes

    router, outcomes = asyncio.run(scenario())
    counters = _assert_counters_add_up(router)
    assert outcomes.count("dropped") == counters["dropped"] >= 15
    assert counters["enqueued"] == outcomes.count("enqueued")


def test_a_hung_challenger_times_out_opens_the_breaker_and_never_blocks_submit(tmp_path):
    backend = ScriptedChallenger(hang=True)

    async def scenario():
        router = _router(
            tmp_path,
            backend,
            workers=4,
            timeout_s=0.05,
            breaker_window=4,
            breaker_failure_ratio=0.5,
            breaker_cooldown_s=60,
        )
        router.start()
        for i in range(40):
            router.submit(f"r{i}", REQUEST, CHAMPION, 1)
            await asyncio.sleep(0.01)
        await router.shutdown(drain_seconds=0.2)
        return router

    router = asyncio.run(scenario())
    counters = _assert_counters_add_up(router)
    assert router.breaker.state == "open" and counters["timed_out"] >= 2
    assert counters["skipped_breaker"] > 0
    assert backend.calls < 40  # the breaker stopped sending
    statuses = {r["status"] for r in router.store.rows()}
    assert "timed_out" in statuses


def test_errors_are_counted_and_logged_with_the_cause(tmp_path):
    async def scenario():
        router = _router(tmp_path, ScriptedChallenger(fail=True), breaker_window=100)
        router.start()
        for i in range(5):
            router.submit(f"r{i}", REQUEST, CHAMPION, 1)
        await router.shutdown(drain_seconds=5)
        return router

    router = asyncio.run(scenario())
    assert _assert_counters_add_up(router)["errored"] == 5
    assert all("challenger is broken" in r["error"] for r in router.store.rows())


def test_shutdown_cancels_what_cannot_finish_and_still_logs_every_enqueued_request(tmp_path):
    async def scenario():
        router = _router(tmp_path, ScriptedChallenger(10.0), workers=2, queue_size=100, timeout_s=60)
        router.start()
        for i in range(30):
            router.submit(f"r{i}", REQUEST, CHAMPION, 1)
        await asyncio.sleep(0.05)
        await router.shutdown(drain_seconds=0.1)
        after = router.submit("late", REQUEST, CHAMPION, 1)
        return router, after

    router, after = asyncio.run(scenario())
    counters = _assert_counters_add_up(router)
    assert counters["cancelled"] == 30 and after == "skipped_draining"
    assert len(router.store.rows()) == 30 + counters["dropped"] + counters["skipped_breaker"]


def test_no_challenger_means_nothing_is_mirrored(tmp_path):
    async def scenario():
        store = ShadowStore(f"sqlite:///{tmp_path / 'shadow.db'}")
        router = ShadowRouter(ScriptedChallenger(), store, ShadowConfig(), challenger=lambda: None)
        router.start()
        outcome = router.submit("r", REQUEST, CHAMPION, 1)
        await router.shutdown(0.1)
        return router, outcome

    router, outcome = asyncio.run(scenario())
    assert outcome == "skipped_no_challenger" and _assert_counters_add_up(router)["enqueued"] == 0


def test_the_breaker_half_opens_after_the_cooldown_and_closes_on_success():
    now = [0.0]
    breaker = CircuitBreaker(window=4, failure_ratio=0.5, cooldown_s=10, clock=lambda: now[0])
    breaker.record(False)
    assert breaker.state == "closed"
    breaker.record(False)
    assert breaker.state == "open" and not breaker.allow()
    now[0] = 11
    assert breaker.allow() and breaker.state == "half_open"
    assert not breaker.allow()  # one probe at a time
    breaker.record(False)
    assert breaker.state == "open" and breaker.times_opened == 2
    now[0] = 22
    assert breaker.allow()
    breaker.record(True)
    assert breaker.state == "closed" and breaker.allow()


@pytest.mark.parametrize("fraction", [0.0, 0.5])
def test_sampled_out_requests_are_counted_not_logged(tmp_path, fraction):
    async def scenario():
        router = _router(tmp_path, ScriptedChallenger(), fraction=fraction)
        router.start()
        for i in range(200):
            router.submit(f"r{i}", REQUEST, CHAMPION, 1)
        await router.shutdown(5)
        return router

    counters = _assert_counters_add_up(asyncio.run(scenario()))
    assert counters["sampled_out"] == sum(not sampled(f"r{i}", fraction) for i in range(200))


def test_jobs_queued_for_a_replaced_challenger_are_cancelled_not_blamed_on_it(tmp_path):
    current = {"challenger": 2}

    async def scenario():
        store = ShadowStore(f"sqlite:///{tmp_path / 'shadow.db'}", flush_seconds=0.05)
        router = ShadowRouter(
            ScriptedChallenger(0.02),
            store,
            ShadowConfig(workers=1, breaker_window=4),
            challenger=lambda: current["challenger"],
        )
        router.start()
        for i in range(10):
            router.submit(f"r{i}", REQUEST, CHAMPION, 1)
        await asyncio.sleep(0.005)
        current["challenger"] = 3  # promoted/replaced while nine jobs still wait
        await router.shutdown(drain_seconds=5)
        return router

    router = asyncio.run(scenario())
    counters = _assert_counters_add_up(router)
    assert counters["cancelled"] >= 8 and counters["errored"] == 0 and router.breaker.state == "closed"
    assert all("challenger changed" in r["error"] for r in router.store.rows() if r["status"] == "cancelled")
