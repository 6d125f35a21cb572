"""Model backends: where the champion's and the challenger's answers come from.

- `InProcessBackend`: one base model in this process with several LoRA adapters loaded once
  (champion, challenger, previous champion), each request generating with its own adapter.
  Requests waiting at the same moment are decoded together, one batch across adapters
  (`serving/batching.py`: continuous batching, user requests before shadow calls). With
  `serve.max_batch_size: 1` they are instead serialised by a priority lock and generated one at
  a time by transformers' `generate`. Either way a cancelled call stops at the next token.
- `OpenAIBackend`: any OpenAI-compatible server (vLLM, TGI) that serves each adapter under its
  own model name; ctloop's router then sits in front of real model servers.

Both take a `GenerationRequest` and a registry version and return a `Generation`.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import threading
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from ctloop.config import ModelConfig
from ctloop.errors import ModelError
from ctloop.serving.batching import SHADOW, USER, BatchLimits, ContinuousBatcher

log = logging.getLogger(__name__)

__all__ = [
    "CLIENT_GONE",
    "SHADOW",
    "USER",
    "Backend",
    "Generation",
    "GenerationRequest",
    "InProcessBackend",
    "OpenAIBackend",
]


@dataclass(frozen=True)
class GenerationRequest:
    """Everything the model sees, frozen, so the shadow answers exactly the user's question.

    `messages` (chat requests) and `passthrough` (fields ctloop does not implement, such as tools
    or response_format) are for the openai backend, which sends chat as chat to the upstream; the
    in-process backend answers `prompt` and is never given a passthrough field."""

    prompt: str
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    messages: tuple[dict[str, Any], ...] | None = None
    passthrough: tuple[tuple[str, Any], ...] = ()


CLIENT_GONE = "client_disconnected"  # the finish reason of a stream its client left before the end


@dataclass(frozen=True)
class Generation:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop", "length", an upstream's own, or CLIENT_GONE for a stream cut short
    latency_ms: float
    message: dict[str, Any] | None = None  # openai backend, chat: the upstream's message (tool calls included)


class Backend(Protocol):
    loaded: dict[int, Path | None]  # servable versions -> their adapter folder (None: the upstream has it)

    def load(self, version: int, adapter_dir: Path | None) -> None:
        """Make `version` servable (blocking; called off the event loop)."""

    def unload_except(self, keep: set[int]) -> None: ...

    def chat_prompt(self, messages: list[dict[str, Any]]) -> str:
        """A chat request's prompt text, rendered as the model reads it."""

    def count_tokens(self, prompt: str) -> int | None:
        """The prompt's tokens as the model sees them, or None when the upstream counts (openai)."""

    @property
    def context_tokens(self) -> int | None:
        """The model's context length (prompt + answer), or None when unknown here."""

    async def generate(
        self, request: GenerationRequest, version: int, priority: int = USER, timeout_s: float | None = None
    ) -> Generation:
        """Answer; raise TimeoutError when the model itself takes longer than `timeout_s`."""

    def stream(self, request: GenerationRequest, version: int) -> AsyncIterator[str | Generation]:
        """The answer as it is decoded: text deltas, then the complete Generation (the same text as
        `generate` would give). Closing the iterator early stops the generation."""

    async def aclose(self) -> None: ...


class PriorityLock:
    """A lock handed to waiters in (priority, arrival) order: user requests before shadow calls, and
    first come, first served within each, so no request starves behind later ones."""

    def __init__(self) -> None:
        self._condition = threading.Condition()
        self._held = False
        self._waiting: list[tuple[int, int]] = []
        self._tickets = itertools.count()

    def acquire(self, priority: int) -> None:
        with self._condition:
            me = (priority, next(self._tickets))
            heapq.heappush(self._waiting, me)
            while self._held or self._waiting[0] != me:
                self._condition.wait()
            heapq.heappop(self._waiting)
            self._held = True

    def release(self) -> None:
        with self._condition:
            self._held = False
            self._condition.notify_all()

    @property
    def waiting(self) -> int:
        """How many callers wait for the lock."""
        with self._condition:
            return len(self._waiting)


def _truncate_at_stop(text: str, stop: tuple[str, ...]) -> tuple[str, bool]:
    cut = min((text.find(s) for s in stop if s and s in text), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


class InProcessBackend:
    """The base model and its adapters in this process, on `model.device` (the CPU or one GPU).

    It shares its compute between the champion and the challenger: a shadow call waits while user
    requests are waiting, and its timeout counts only its own generation, not that wait (which
    is production load, not the challenger's fault)."""

    shares_compute = True
    passes_fields_through = False  # fields it does not implement are refused

    def __init__(self, model: ModelConfig, batch: BatchLimits, user_threads: int = 8, max_lora_rank: int = 64):
        from ctloop.model.chat import chat_format
        from ctloop.model.loading import load_base_model, load_tokenizer
        from ctloop.serving.adapter_safety import BaseFingerprint

        self.model_config = model
        self.max_lora_rank = max_lora_rank
        self.tokenizer = load_tokenizer(model)
        self.chat = chat_format(self.tokenizer)  # the base model's chat template, as in training
        self.base = load_base_model(model).eval()
        self.fingerprint = BaseFingerprint.of(self.base)  # what every load and unload must leave as it was
        self.base_incidents = 0  # loads or unloads after which the base had changed (and was reloaded)
        self.base_problem = ""  # set while the base still differs from its fingerprint: unhealthy
        self.network: Any = None  # the PeftModel once an adapter is loaded
        self.loaded: dict[int, Path | None] = {}
        self._lock = PriorityLock()
        self._in_use: dict[int, int] = {}
        self._pools = {
            USER: ThreadPoolExecutor(user_threads, thread_name_prefix="ctloop-gen-user"),
            SHADOW: ThreadPoolExecutor(1, thread_name_prefix="ctloop-gen-shadow"),
        }
        self.batcher = (
            ContinuousBatcher(lambda: self.network, self.tokenizer, self._lock, batch)
            if batch.max_sequences > 1
            else None
        )

    def chat_prompt(self, messages: list[dict[str, Any]]) -> str:
        """The chat request rendered as the adapters were trained on it (the tokenizer's template)."""
        return self.chat.prompt(messages)

    def count_tokens(self, prompt: str) -> int | None:
        from ctloop.model.batching import prompt_token_ids

        return len(prompt_token_ids(self.tokenizer, [prompt])[0])

    @property
    def context_tokens(self) -> int | None:
        return getattr(self.base.config, "max_position_embeddings", None)

    @staticmethod
    def adapter_name(version: int) -> str:
        return f"v{version}"

    def load(self, version: int, adapter_dir: Path | None) -> None:
        """Load a version's adapter next to the others, with the checks of `adapter_safety`: a config
        that would modify the base is refused before anything is allocated, no initialisation runs,
        a failed load frees what it allocated, and a base changed anyway is reloaded (ModelError)."""
        from ctloop.serving.adapter_safety import checked_lora_config

        if version in self.loaded:
            return
        if adapter_dir is None or not (adapter_dir / "adapter_config.json").is_file():
            raise ModelError(
                f"version {version} has no adapter files at {adapter_dir}; re-register it or "
                f"check the registry's artifact store"
            )
        config = checked_lora_config(adapter_dir, self.max_lora_rank)
        self._lock.acquire(USER)
        try:
            self._attach(version, adapter_dir, config)
            self._verify_base(f"loading v{version}", refused=version)
        finally:
            self._lock.release()

    def _attach(self, version: int, adapter_dir: Path, config: Any) -> None:
        from ctloop.serving.adapter_safety import add_empty_adapter, fill_adapter

        name = self.adapter_name(version)
        try:
            self.network = add_empty_adapter(self.network, self.base, name, config)
            fill_adapter(self.network, adapter_dir, name)
        except BaseException:
            self._discard(name)  # a failed load keeps nothing it allocated
            raise
        self.loaded[version] = adapter_dir
        if self.batcher is not None:
            self.batcher.adapters_changed()

    def _discard(self, name: str) -> None:
        if self.network is not None and name in self.network.peft_config:
            if self.network.active_adapter == name and len(self.network.peft_config) > 1:
                self.network.set_adapter(next(n for n in self.network.peft_config if n != name))
            self.network.delete_adapter(name)

    def _verify_base(self, action: str, refused: int | None = None) -> None:
        """After a load or an unload (model lock held): the base must equal its start-up fingerprint.
        If it does not, fail closed: drop every adapter, reload the base from disk, load the other
        versions again, and raise; `/healthz` reports the incident, and stays unhealthy while the
        reloaded base still differs."""
        from ctloop.model.loading import load_base_model
        from ctloop.serving.adapter_safety import BaseFingerprint, checked_lora_config

        changed = self.fingerprint.differences(BaseFingerprint.of(self.base))
        if not changed:
            return
        self.base_incidents += 1
        log.error("%s changed %d base tensors (%s); reloading the base model", action, len(changed), changed[:3])
        others = {v: p for v, p in self.loaded.items() if v != refused and p is not None}
        # Unhealthy until the reload is done and checked: a reload that fails itself stays visible.
        self.base_problem = f"{action} changed the base model's weights; reloading it from {self.model_config.base}"
        self.network, self.loaded = None, {}
        self.base = load_base_model(self.model_config).eval()
        for version, path in others.items():
            self._attach(version, path, checked_lora_config(path, self.max_lora_rank))
        still = self.fingerprint.differences(BaseFingerprint.of(self.base))
        self.base_problem = (
            f"the base model differs from its start-up weights after a reload ({len(still)} tensors, first "
            f"{still[0]}); restart the server"
            if still
            else ""
        )
        if self.batcher is not None:
            self.batcher.adapters_changed()
        raise ModelError(
            f"{action} changed the shared base model's weights ({len(changed)} tensors, first {changed[0]}); "
            f"the base was reloaded from {self.model_config.base}"
            + (f" and v{refused} refused" if refused is not None else "")
            + "; check the adapter's files and adapter_config.json"
        )

    def unload_except(self, keep: set[int]) -> None:
        """Free adapters outside `keep` that no request is using (the rest go on a later call)."""
        self._lock.acquire(USER)
        try:
            doomed = [v for v in self.loaded if v not in keep and not self._in_use.get(v)]
            staying = [self.adapter_name(v) for v in self.loaded if v not in doomed]
            if staying and self.network.active_adapter not in staying:
                self.network.set_adapter(staying[0])  # peft would warn when the active adapter goes
            for version in doomed:
                self.network.delete_adapter(self.adapter_name(version))
                del self.loaded[version]
            if doomed:
                if self.batcher is not None:
                    self.batcher.adapters_changed()
                self._verify_base(f"unloading v{', v'.join(map(str, doomed))}")
        finally:
            self._lock.release()

    async def generate(
        self, request: GenerationRequest, version: int, priority: int = USER, timeout_s: float | None = None
    ) -> Generation:
        if version not in self.loaded:
            raise ModelError(f"version {version} is not loaded; loaded: {sorted(self.loaded)}")
        cancelled = threading.Event()
        self._in_use[version] = self._in_use.get(version, 0) + 1
        loop = asyncio.get_running_loop()
        try:
            if self.batcher is not None:
                return await self._generate_batched(request, version, priority, timeout_s)
            return await loop.run_in_executor(
                self._pools[priority], self._generate, request, version, priority, cancelled, timeout_s
            )
        finally:
            cancelled.set()  # a timed-out or cancelled call stops at its next token
            self._in_use[version] -= 1

    async def stream(
        self, request: GenerationRequest, version: int, priority: int = USER, timeout_s: float | None = None
    ) -> AsyncIterator[str | Generation]:
        """Text deltas as the batcher (or, serialised, `generate`) decodes them, then the Generation.
        Closing the iterator early cancels the sequence: the batcher drops it at its next step."""
        from ctloop.model.batching import prompt_token_ids
        from ctloop.serving.streaming import TextDeltas

        if version not in self.loaded:
            raise ModelError(f"version {version} is not loaded; loaded: {sorted(self.loaded)}")
        loop = asyncio.get_running_loop()
        ready = asyncio.Event()

        def wake(*_: Any) -> None:  # on the scheduler or generation thread
            try:
                loop.call_soon_threadsafe(ready.set)
            except RuntimeError:
                pass  # the event loop has closed: nobody is listening

        deltas = TextDeltas(self.tokenizer, request.stop)
        ids = prompt_token_ids(self.tokenizer, [request.prompt])[0]
        latest: list[int] = []
        cancelled = threading.Event()
        self._in_use[version] = self._in_use.get(version, 0) + 1
        try:
            if self.batcher is not None:
                sequence = self.batcher.submit(
                    request, self.adapter_name(version), ids, priority, timeout_s, on_token=wake
                )
                cancelled = sequence.cancelled
                future = asyncio.wrap_future(sequence.result)

                def current() -> list[int]:
                    return list(sequence.generated)
            else:

                def seen(tokens: list[int]) -> None:
                    latest[:] = tokens
                    wake()

                future = loop.run_in_executor(
                    self._pools[priority], self._generate, request, version, priority, cancelled, timeout_s, seen
                )

                def current() -> list[int]:
                    return list(latest)

            future.add_done_callback(lambda _: ready.set())
            while not future.done():
                await ready.wait()
                ready.clear()
                delta = deltas.update(current())
                if delta:
                    yield delta
            outcome = await future
            generation = (
                self._answer(request, len(ids), outcome.generated, outcome.busy_s)
                if self.batcher is not None
                else outcome
            )
            rest = deltas.finish(generation.text)
            if rest:
                yield rest
            yield generation
        finally:
            cancelled.set()  # a client that left frees its batch slot at the next step
            self._in_use[version] -= 1

    async def _generate_batched(
        self, request: GenerationRequest, version: int, priority: int, timeout_s: float | None
    ) -> Generation:
        from ctloop.model.batching import prompt_token_ids

        ids = prompt_token_ids(self.tokenizer, [request.prompt])[0]
        assert self.batcher is not None  # the caller checked
        sequence = self.batcher.submit(request, self.adapter_name(version), ids, priority, timeout_s)
        try:
            await asyncio.wrap_future(sequence.result)
        finally:
            sequence.cancelled.set()  # the scheduler drops it at the next step
        return self._answer(request, len(ids), sequence.generated, sequence.busy_s)

    def _answer(self, request: GenerationRequest, prompt_tokens: int, new: list[int], seconds: float) -> Generation:
        ended_by_eos = bool(new) and new[-1] == self.tokenizer.eos_token_id
        text, stopped = _truncate_at_stop(self.tokenizer.decode(new, skip_special_tokens=True), request.stop)
        finish = "stop" if ended_by_eos or stopped or len(new) < request.max_tokens else "length"
        return Generation(text, prompt_tokens, len(new), finish, seconds * 1000)

    def _generate(
        self,
        request: GenerationRequest,
        version: int,
        priority: int,
        cancelled: threading.Event,
        timeout_s: float | None,
        on_tokens: Any = None,
    ) -> Generation:
        """One request alone through transformers' `generate`; `on_tokens(ids)` (streaming) gets the
        answer's token ids after every step."""
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList

        from ctloop.model.batching import prompt_token_ids

        class Stop(StoppingCriteria):
            """Stops once a stop string appears, the caller gave up, or the call's own time ran out."""

            def __call__(self, input_ids, scores, **kwargs):
                if on_tokens is not None:
                    on_tokens(input_ids[0, len(ids) :].tolist())
                if timeout_s is not None and time.perf_counter() - started > timeout_s:
                    overtime.set()
                text = tokenizer.decode(input_ids[0, len(ids) :], skip_special_tokens=True) if request.stop else ""
                done = cancelled.is_set() or overtime.is_set() or any(s and s in text for s in request.stop)
                return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)

        tokenizer = self.tokenizer
        overtime = threading.Event()

        ids = prompt_token_ids(self.tokenizer, [request.prompt])[0]
        sampling: dict[str, Any] = {"do_sample": False}
        if request.temperature > 0:
            sampling = {"do_sample": True, "temperature": request.temperature, "top_p": request.top_p}
        self._lock.acquire(priority)
        started = time.perf_counter()
        try:
            if cancelled.is_set():
                raise RuntimeError("cancelled before it started")
            if version not in self.loaded:  # unloaded while this request waited
                raise ModelError(f"version {version} was unloaded; loaded: {sorted(self.loaded)}")
            if request.seed is not None:
                torch.manual_seed(request.seed)
            self.network.set_adapter(self.adapter_name(version))
            with torch.inference_mode():
                out = self.network.generate(
                    input_ids=torch.tensor([ids], device=self.base.device),
                    attention_mask=torch.ones(1, len(ids), dtype=torch.long, device=self.base.device),
                    max_new_tokens=request.max_tokens,
                    pad_token_id=self.tokenizer.pad_token_id,
                    eos_token_id=self.tokenizer.eos_token_id,
                    stopping_criteria=StoppingCriteriaList([Stop()]),
                    **sampling,
                )
        finally:
            self._lock.release()
        if overtime.is_set():
            raise TimeoutError(f"the generation took longer than {timeout_s} s")
        return self._answer(request, len(ids), out[0, len(ids) :].tolist(), time.perf_counter() - started)

    async def aclose(self) -> None:
        if self.batcher is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.batcher.close)
        for pool in self._pools.values():
            pool.shutdown(wait=False, cancel_futures=True)


class OpenAIBackend:
    """An OpenAI-compatible server that serves version N as model `upstream_model.format(name, version)`."""

    shares_compute = False  # the upstream's queueing is the challenger's own latency
    passes_fields_through = True  # tools, response_format, logprobs, ... go to the upstream unchanged

    def __init__(self, base_url: str, model_name: str, model_template: str, api_key: str | None, timeout_s: float):
        self.base_url = base_url.rstrip("/")
        self.model_name = model_name
        self.model_template = model_template
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._headers = headers
        self._timeout = timeout_s
        self._session: Any = None  # aiohttp's, opened on first use, inside the server's event loop
        self._proxy: str | None = None
        self.loaded: dict[int, Path | None] = {}

    def session(self) -> Any:
        """The keep-alive session to the upstream. aiohttp, not httpx: in front of a fast engine httpx's
        pool and stream machinery was the largest CPU cost of a request (measured with py-spy on
        benchmarks/router_ceiling.py). `timeout_s` bounds the connection and every read, not the whole
        answer (a long stream may run longer). A proxy comes from the environment (HTTP(S)_PROXY,
        NO_PROXY), as with httpx, looked up once: aiohttp's own trust_env reads ~/.netrc on every call."""
        import aiohttp

        if self._session is None or self._session.closed:
            timeout = aiohttp.ClientTimeout(total=None, connect=self._timeout, sock_read=self._timeout)
            self._proxy = _environment_proxy(self.base_url)
            self._session = aiohttp.ClientSession(
                headers=self._headers,
                timeout=timeout,
                read_bufsize=1 << 20,  # one server-sent event may be long (a big chunk of text)
                connector=aiohttp.TCPConnector(limit=0),  # the engine queues; ctloop does not cap its calls
            )
        return self._session

    def chat_prompt(self, messages: list[dict[str, Any]]) -> str:
        """For the request log and drift only: chat goes to the upstream as chat, templated there."""
        from ctloop.data.records import chat_prompt

        return chat_prompt(messages)

    def count_tokens(self, prompt: str) -> int | None:
        return None  # the upstream knows its tokenizer and context, and refuses what does not fit

    @property
    def context_tokens(self) -> int | None:
        return None

    def upstream_model(self, version: int) -> str:
        return self.model_template.format(name=self.model_name, version=version)

    def load(self, version: int, adapter_dir: Path | None) -> None:
        """Check that the upstream serves the version's model name (a load that did not load fails here)."""
        import httpx

        try:
            response = httpx.get(f"{self.base_url}/models", headers=self._headers, timeout=self._timeout)
            response.raise_for_status()
            served = {m.get("id") for m in response.json().get("data", [])}
        except (httpx.HTTPError, ValueError) as exc:
            raise ModelError(
                f"serve.upstream_url={self.base_url!r}: GET /models failed ({exc}); check the URL "
                f"(it should end in /v1) and that the server is up"
            ) from exc
        name = self.upstream_model(version)
        if name not in served:
            raise ModelError(
                f"the upstream server does not serve {name!r} (it serves {sorted(served)}); load the "
                f"adapter there (vLLM: --lora-modules {name}=PATH) or set serve.upstream_model"
            )
        self.loaded[version] = adapter_dir

    def unload_except(self, keep: set[int]) -> None:
        for version in [v for v in self.loaded if v not in keep]:
            del self.loaded[version]

    def _body(self, request: GenerationRequest, version: int) -> tuple[str, dict[str, Any]]:
        """(path, body): chat goes to the upstream as chat, so the engine applies its own chat template."""
        body: dict[str, Any] = {
            **dict(request.passthrough),
            "model": self.upstream_model(version),
            "max_tokens": request.max_tokens,
            "temperature": request.temperature,
            "top_p": request.top_p,
        }
        if request.stop:
            body["stop"] = list(request.stop)
        if request.seed is not None:
            body["seed"] = request.seed
        if request.messages is not None:
            return "/chat/completions", body | {"messages": list(request.messages)}
        return "/completions", body | {"prompt": request.prompt}

    async def stream(
        self, request: GenerationRequest, version: int, priority: int = USER, timeout_s: float | None = None
    ) -> AsyncIterator[str | Generation]:
        """The upstream's own stream, relayed chunk by chunk (nothing buffered), then the Generation.
        Closing the iterator early closes the upstream request, which frees its engine slot."""
        import json

        import aiohttp

        path, body = self._body(request, version)
        body |= {"stream": True, "stream_options": {"include_usage": True}}
        started = time.perf_counter()
        parts: list[str] = []
        finish = "stop"
        usage: dict[str, Any] = {}
        try:
            async with self.session().post(self.base_url + path, json=body, proxy=self._proxy) as response:
                if response.status >= 400:
                    raise ModelError(f"upstream {response.status} for {body['model']}: {await _capped_text(response)}")
                async for raw in response.content:
                    line = raw.decode("utf-8", "replace")
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        break
                    try:
                        event = json.loads(data)
                        if event.get("error"):
                            raise ModelError(f"upstream error mid-stream: {str(event['error'])[:300]}")
                        usage = event.get("usage") or usage
                        for choice in event.get("choices") or []:
                            delta = choice.get("delta")
                            piece = (delta.get("content") or "") if delta is not None else (choice.get("text") or "")
                            finish = choice.get("finish_reason") or finish
                            if piece:
                                parts.append(piece)
                                yield piece
                    except (ValueError, AttributeError, TypeError) as exc:
                        raise ModelError(
                            f"upstream {self.base_url} sent a malformed stream event: {data[:200]}"
                        ) from exc
        except TimeoutError as exc:  # aiohttp's read and connect timeouts are TimeoutErrors
            raise TimeoutError(f"upstream {self.base_url} did not answer in time ({exc.__class__.__name__})") from exc
        except aiohttp.ClientError as exc:
            raise ModelError(f"upstream {self.base_url} failed mid-stream ({exc.__class__.__name__}: {exc})") from exc
        yield Generation(
            "".join(parts),
            int(usage.get("prompt_tokens", 0)),
            int(usage.get("completion_tokens", 0)),
            finish,
            (time.perf_counter() - started) * 1000,
        )

    async def generate(
        self, request: GenerationRequest, version: int, priority: int = USER, timeout_s: float | None = None
    ) -> Generation:
        import json

        import aiohttp

        path, body = self._body(request, version)
        started = time.perf_counter()
        try:
            async with self.session().post(self.base_url + path, json=body, proxy=self._proxy) as response:
                if response.status >= 400:
                    raise ModelError(f"upstream {response.status} for {body['model']}: {await _capped_text(response)}")
                text = (await response.read()).decode("utf-8", "replace")
        except TimeoutError as exc:
            raise TimeoutError(f"upstream {self.base_url} did not answer in time ({exc.__class__.__name__})") from exc
        except aiohttp.ClientError as exc:
            raise ModelError(f"upstream {self.base_url} unreachable ({exc.__class__.__name__}: {exc})") from exc
        try:
            data = json.loads(text)
            choice = data["choices"][0]
            usage = data.get("usage") or {}
            message = choice.get("message") if request.messages is not None else None
            return Generation(
                (message.get("content") or "") if message is not None else choice.get("text", ""),
                int(usage.get("prompt_tokens", 0)),
                int(usage.get("completion_tokens", 0)),
                choice.get("finish_reason") or "stop",
                (time.perf_counter() - started) * 1000,
                message=message,
            )
        except (ValueError, KeyError, IndexError, TypeError, AttributeError) as exc:
            raise ModelError(
                f"upstream {self.base_url} sent an answer that is not an OpenAI completion "
                f"({exc.__class__.__name__}: {exc}): {text[:200]}"
            ) from exc

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()


def _environment_proxy(url: str) -> str | None:
    """The proxy the environment sets for `url` (HTTP_PROXY / HTTPS_PROXY, unless NO_PROXY covers it)."""
    import urllib.parse
    import urllib.request

    parsed = urllib.parse.urlsplit(url)
    if parsed.hostname is None or urllib.request.proxy_bypass(parsed.hostname):
        return None
    return urllib.request.getproxies().get(parsed.scheme)


async def _capped_text(response: Any, limit: int = 4096) -> str:
    """At most `limit` bytes of an error body, as text: an upstream's huge error page costs nothing."""
    data = await response.content.read(limit)
    return data.decode("utf-8", "replace")[:300]
