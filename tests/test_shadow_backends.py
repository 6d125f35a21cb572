"""The in-process backend on the real tiny model with real LoRA adapters, in both modes (continuous
batching, and one request at a time): per-request adapters under concurrency, batched answers equal
to one-at-a-time ones, user requests ahead of shadow calls, timeouts that count only the model's own
time."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from ctloop.config import ModelConfig
from ctloop.errors import ModelError
from ctloop.serving.backends import SHADOW, USER, GenerationRequest, InProcessBackend, PriorityLock
from ctloop.serving.batching import BatchLimits
from ctloop.training.tinymodel import random_adapter

pytestmark = pytest.mark.slow

PROMPTS = [f"Package: lib{name}\nDescription:" for name in ("a", "foo-utils", "x11-common-data", "q", "zlib1g", "perl")]


@pytest.fixture(scope="module")
def adapters(tiny_base, tmp_path_factory):
    root = tmp_path_factory.mktemp("backend-adapters")
    return {version: random_adapter(tiny_base, root / f"v{version}", seed=version) for version in (1, 2)}


def _backend(tiny_base, adapters, max_sequences: int, max_tokens: int = 8192) -> InProcessBackend:
    backend = InProcessBackend(ModelConfig(base=str(tiny_base)), BatchLimits(max_sequences, max_tokens))
    for version, folder in adapters.items():
        backend.load(version, folder)
    return backend


@pytest.fixture(scope="module")
def serial(tiny_base, adapters):
    return _backend(tiny_base, adapters, 1)


@pytest.fixture(scope="module")
def batched(tiny_base, adapters):
    return _backend(tiny_base, adapters, 16)


@pytest.fixture(params=["serial", "batched"])
def backend(request):
    return request.getfixturevalue(request.param)


def _ask(prompt: str, tokens: int = 8, stop: tuple[str, ...] = ()) -> GenerationRequest:
    return GenerationRequest(prompt=prompt, max_tokens=tokens, stop=stop)


def _requests() -> list[tuple[GenerationRequest, int]]:
    """Prompts of different lengths, both adapters, different max_tokens, some with a stop string."""
    asks = []
    for i, prompt in enumerate(PROMPTS):
        for version in (1, 2):
            asks.append((_ask(prompt, tokens=4 + 5 * (i % 3), stop=("e",) if i % 2 else ()), version))
    return asks


def _summary(answer) -> tuple:
    return answer.text, answer.completion_tokens, answer.prompt_tokens, answer.finish_reason


def test_concurrent_requests_each_get_their_own_adapter(backend):
    async def sequential():
        return [(await backend.generate(_ask(p), v)).text for p in PROMPTS for v in (1, 2)]

    async def concurrent():
        answers = await asyncio.gather(*(backend.generate(_ask(p), v) for p in PROMPTS for v in (1, 2)))
        return [a.text for a in answers]

    expected = asyncio.run(sequential())
    assert expected[0] != expected[1]  # the two adapters really differ
    assert asyncio.run(concurrent()) == expected


def test_batched_greedy_answers_equal_one_at_a_time_generation(serial, batched):
    async def one_at_a_time():
        return [_summary(await serial.generate(request, version)) for request, version in _requests()]

    async def together():
        answers = await asyncio.gather(*(batched.generate(request, v) for request, v in _requests()))
        return [_summary(a) for a in answers]

    steps = batched.batcher.steps
    expected = asyncio.run(one_at_a_time())
    assert {finish for *_, finish in expected} == {"stop", "length"}  # both endings are exercised
    assert asyncio.run(together()) == expected
    assert batched.batcher.largest > 1 and batched.batcher.steps - steps < len(expected) * 4  # really batched


def test_answers_stay_the_same_after_a_long_run_on_one_adapter(serial, batched):
    """A long run on one adapter, then a mixed batch: its answers still equal one-at-a-time
    generation (peft's own forward), and every LoRA layer runs the routed forward, with no hooks."""
    from ctloop.serving.batching import _AdapterRouting

    async def on_champion_only():
        steps = batched.batcher.steps
        while batched.batcher.steps - steps <= _AdapterRouting.SINGLE_STEPS:
            await asyncio.gather(*(batched.generate(request, 1) for request, _ in _requests()))

    asyncio.run(on_champion_only())
    assert batched.batcher._routing._handles == []  # no hooks: every LoRA layer is on the routed forward
    expected = [_summary(asyncio.run(serial.generate(request, version))) for request, version in _requests()]

    async def mixed():
        return [_summary(a) for a in await asyncio.gather(*(batched.generate(r, v) for r, v in _requests()))]

    assert asyncio.run(mixed()) == expected
    from peft.tuners.lora import LoraLayer

    lora_layers = sum(isinstance(m, LoraLayer) for m in batched.network.modules())
    assert batched.batcher._routing._handles == [] and batched.batcher._routing.routed == lora_layers > 0


def test_adapters_loaded_and_unloaded_while_the_batcher_runs_are_used_at_once(tiny_base, adapters, serial, tmp_path):
    backend = _backend(tiny_base, adapters, 16)

    async def together(versions):
        asks = [(_ask(p, tokens=10), versions[i % len(versions)]) for i, p in enumerate(PROMPTS)]
        return [_summary(a) for a in await asyncio.gather(*(backend.generate(r, v) for r, v in asks))], asks

    asyncio.run(together((1, 2)))  # the layers are routed for v1 and v2
    serial.load(3, random_adapter(tiny_base, tmp_path / "v3", seed=3))
    backend.load(3, tmp_path / "v3")
    answers, asks = asyncio.run(together((1, 3)))
    assert answers == [_summary(asyncio.run(serial.generate(r, v))) for r, v in asks]
    backend.unload_except({1, 3})
    answers, asks = asyncio.run(together((3, 1)))
    assert answers == [_summary(asyncio.run(serial.generate(r, v))) for r, v in asks]
    assert backend.batcher._routing.lean is not None and set(backend.loaded) == {1, 3}
    asyncio.run(backend.aclose())


def test_non_linear_lora_layers_get_adapter_names_through_hooks_and_keep_the_model_forward(tiny_base, tmp_path):
    """Adapters on the embedding too: peft's LoRA embedding layer is not routed, so mixed batches
    pass it `adapter_names=` through hooks, and the lean step (which would skip them) is off."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    folders = {}
    for version in (1, 2):
        torch.manual_seed(version)
        model = AutoModelForCausalLM.from_pretrained(str(tiny_base))
        lora = LoraConfig(
            r=4, lora_alpha=32, target_modules=["q_proj", "v_proj", "embed_tokens"], init_lora_weights=False
        )
        folders[version] = tmp_path / f"v{version}"
        get_peft_model(model, lora).save_pretrained(str(folders[version]))
    one, batched = _backend(tiny_base, folders, 1), _backend(tiny_base, folders, 16)
    expected = [_summary(asyncio.run(one.generate(r, v))) for r, v in _requests()]

    async def together():
        return [_summary(a) for a in await asyncio.gather(*(batched.generate(r, v) for r, v in _requests()))]

    assert asyncio.run(together()) == expected
    routing = batched.batcher._routing
    assert routing.routed == 2 * 2 and len(routing._others) == 1 and routing.lean is None
    assert routing._handles  # the mixed batch attached them
    for backend in (one, batched):
        asyncio.run(backend.aclose())


def test_a_user_request_waits_at_most_one_step_behind_shadow_calls(tiny_base, adapters, serial):
    """The batch is full of long shadow calls; a user request still starts at the next step, and the
    shadow calls it paused resume and give the same answers as if they had never been paused."""
    backend = _backend(tiny_base, adapters, max_sequences=2)
    batcher = backend.batcher
    candidates = [_ask(prompt, tokens=14) for prompt in PROMPTS]
    answers = [asyncio.run(serial.generate(request, 2)) for request in candidates]
    long = [request for request, answer in zip(candidates, answers, strict=True) if answer.finish_reason == "length"]
    assert len(long) >= 2, [(a.completion_tokens, a.finish_reason) for a in answers]
    long = long[:2]
    expected = [_summary(asyncio.run(serial.generate(request, 2))) for request in long]
    question = _ask(PROMPTS[2], tokens=3)

    async def scenario():
        shadows = [asyncio.ensure_future(backend.generate(request, 2, SHADOW)) for request in long]
        deadline = time.monotonic() + 60
        while (batcher.running < 2 or batcher.steps < 3) and time.monotonic() < deadline:
            await asyncio.sleep(0.001)
        backend._lock.acquire(USER)  # no step starts until the user request is queued
        try:
            before = batcher.steps
            user = batcher.submit(question, backend.adapter_name(1), _prompt_ids(backend, question), USER, None)
        finally:
            backend._lock.release()
        await asyncio.wrap_future(user.result)
        shadows_finished = [s.done() for s in shadows]
        return before, user, shadows_finished, [await s for s in shadows]

    before, user, shadows_finished, shadow_answers = asyncio.run(scenario())
    assert user.first_step <= before + 2  # the step already planned, then the user's own
    assert batcher.paused >= 1 and shadows_finished == [False, False]
    assert backend._answer(question, len(user.prompt_ids), user.generated, 0).text == (
        asyncio.run(serial.generate(question, 1)).text
    )
    assert [_summary(a) for a in shadow_answers] == expected


def _prompt_ids(backend, request) -> list[int]:
    from ctloop.model.batching import prompt_token_ids

    return prompt_token_ids(backend.tokenizer, [request.prompt])[0]


def test_the_token_cap_limits_the_batch(tiny_base, adapters, serial):
    prompt_tokens = serial.count_tokens(PROMPTS[0])
    backend = _backend(tiny_base, adapters, max_sequences=16, max_tokens=2 * (prompt_tokens + 6) + 1)

    async def run():
        return await asyncio.gather(*(backend.generate(_ask(PROMPTS[0], tokens=6), 1 + i % 2) for i in range(6)))

    answers = asyncio.run(run())
    assert len(answers) == 6 and backend.batcher.largest == 2


def test_a_shadow_timeout_counts_the_generation_not_the_wait_behind_users(backend):
    async def scenario():
        backend._lock.acquire(USER)  # a long user generation holds the model
        threading.Timer(0.6, backend._lock.release).start()
        began = time.perf_counter()
        answer = await backend.generate(_ask("Package: x"), 2, SHADOW, timeout_s=0.5)
        return answer, time.perf_counter() - began

    answer, waited = asyncio.run(scenario())
    # The latency counts from when the call got the model, never the 0.6 s it waited (#22 item 7: no
    # fixed threshold that a loaded machine could cross).
    assert waited >= 0.6 and answer.completion_tokens >= 1 and answer.latency_ms <= (waited - 0.6) * 1000 + 1


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


@pytest.mark.parametrize("broken", ["lean_step", "routed_forward"])
def test_a_fast_path_that_breaks_falls_back_and_every_request_still_gets_its_answer(
    tiny_base, adapters, serial, monkeypatch, broken
):
    """#25 item 4: the routed LoRA forward and the lean step read private peft/transformers state; a
    release that changes it must not fail requests. Each is broken here as such a release would (an
    exception inside it): the pass is redone through peft's forward and the model's step, logged and
    counted once, and the answers equal one-at-a-time generation's."""
    from ctloop.kernels import lora
    from ctloop.serving.decode import LeanLlamaStep

    expected = [_summary(asyncio.run(serial.generate(r, v))) for r, v in _requests()]
    healthy = _backend(tiny_base, adapters, 16)

    async def together(backend):
        return [_summary(a) for a in await asyncio.gather(*(backend.generate(r, v) for r, v in _requests()))]

    assert asyncio.run(together(healthy)) == expected
    paths = {
        labels["path"]: value
        for name, _, value, labels in healthy.batcher.metrics()
        if name == "ctloop_decode_steps_total"
    }
    assert paths["lean"] > 0 and paths["peft"] == 0  # where it can, the fast path is what runs
    asyncio.run(healthy.aclose())

    def broke(*args, **kwargs):
        raise AttributeError("'LlamaAttention' object has no attribute 'num_key_value_groups'")

    if broken == "lean_step":
        monkeypatch.setattr(LeanLlamaStep, "step", broke)
    else:
        monkeypatch.setattr(lora, "_routable", broke)  # called inside every routed layer's forward
    fragile = _backend(tiny_base, adapters, 16)
    assert asyncio.run(together(fragile)) == expected
    metrics = {(name, tuple(labels.values())): value for name, _, value, labels in fragile.batcher.metrics()}
    assert metrics[("ctloop_fast_path_failures_total", ())] == 1
    assert (
        metrics[("ctloop_decode_steps_total", ("peft",))] > 0 and metrics[("ctloop_decode_steps_total", ("lean",))] == 0
    )
    asyncio.run(fragile.aclose())
