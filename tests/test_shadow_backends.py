"""The in-process backend on the real tiny model with real LoRA adapters: per-request adapters under
concurrency, user requests ahead of shadow calls, timeouts that count only the model's own time."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from ctloop.config import ModelConfig
from ctloop.errors import ModelError
from ctloop.serving.backends import SHADOW, USER, GenerationRequest, InProcessBackend, PriorityLock
from ctloop.training.tinymodel import random_adapter

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def backend(tiny_base, tmp_path_factory):
    root = tmp_path_factory.mktemp("backend-adapters")
    loaded = InProcessBackend(ModelConfig(base=str(tiny_base)))
    for version in (1, 2):
        loaded.load(version, random_adapter(tiny_base, root / f"v{version}", seed=version))
    return loaded


def _ask(prompt: str, tokens: int = 8) -> GenerationRequest:
    return GenerationRequest(prompt=prompt, max_tokens=tokens)


def test_concurrent_requests_each_get_their_own_adapter(backend):
    prompts = [f"Package: lib{i}\nDescription:" for i in range(6)]

    async def sequential():
        return [(await backend.generate(_ask(p), v)).text for p in prompts for v in (1, 2)]

    async def concurrent():
        answers = await asyncio.gather(*(backend.generate(_ask(p), v) for p in prompts for v in (1, 2)))
        return [a.text for a in answers]

    expected = asyncio.run(sequential())
    assert expected[0] != expected[1]  # the two adapters really differ
    assert asyncio.run(concurrent()) == expected


def test_a_shadow_timeout_counts_the_generation_not_the_wait_behind_users(backend):
    async def scenario():
        backend._lock.acquire(USER)  # a long user generation holds the model
        threading.Timer(0.6, backend._lock.release).start()
        began = time.perf_counter()
        answer = await backend.generate(_ask("Package: x"), 2, SHADOW, timeout_s=0.5)
        return answer, time.perf_counter() - began

    answer, waited = asyncio.run(scenario())
    assert waited >= 0.6 and answer.completion_tokens >= 1 and answer.latency_ms < 500


def test_a_generation_over_its_time_raises_timeout(backend):
    with pytest.raises(TimeoutError, match="longer than"):
        asyncio.run(backend.generate(_ask("Package: y", tokens=64), 1, SHADOW, timeout_s=1e-6))


def test_an_unloaded_version_is_a_clear_error(backend):
    with pytest.raises(ModelError, match="version 7 is not loaded"):
        asyncio.run(backend.generate(_ask("x"), 7))


def test_the_lock_serves_users_first_then_in_arrival_order():
    lock = PriorityLock()
    order: list[str] = []
    lock.acquire(USER)

    def waiter(name: str, priority: int) -> None:
        lock.acquire(priority)
        order.append(name)
        lock.release()

    threads = []
    for arrived, (name, priority) in enumerate(
        (("shadow-1", SHADOW), ("user-1", USER), ("shadow-2", SHADOW), ("user-2", USER)), start=1
    ):
        threads.append(threading.Thread(target=waiter, args=(name, priority)))
        threads[-1].start()
        deadline = time.monotonic() + 10
        while lock.waiting < arrived and time.monotonic() < deadline:  # the next arrives after this one waits
            time.sleep(0.001)
    lock.release()
    for thread in threads:
        thread.join(5)
    assert order == ["user-1", "user-2", "shadow-1", "shadow-2"]
