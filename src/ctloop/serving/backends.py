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
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from ctloop.config import ModelConfig
from ctloop.errors import ModelError
from ctloop.serving.batching import SHADOW, USER, BatchLimits, ContinuousBatcher

__all__ = ["SHADOW", "USER", "Backend", "Generation", "GenerationRequest", "InProcessBackend", "OpenAIBackend"]


@dataclass(frozen=True)
class GenerationRequest:
    """Everything the model sees, frozen, so the shadow answers exactly the user's question."""

    prompt: str
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None


@dataclass(frozen=True)
class Generation:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" or "length"
    latency_ms: float


class Backend(Protocol):
    loaded: dict[int, Path | None]  # servable versions -> their adapter folder (None: the upstream has it)

    def load(self, version: int, adapter_dir: Path | None) -> None:
        """Make `version` servable (blocking; called off the event loop)."""

    def unload_except(self, keep: set[int]) -> None: ...

    def count_tokens(self, prompt: str) -> int | None:
        """The prompt's tokens as the model sees them, or None when the upstream counts (openai)."""

    @property
    def context_tokens(self) -> int | None:
        """The model's context length (prompt + answer), or None when unknown here."""

    async def generate(
        self, request: GenerationRequest, version: int, priority: int = USER, timeout_s: float | None = None
    ) -> Generation:
        """Answer; raise TimeoutError when the model itself takes longer than `timeout_s`."""

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

    def __init__(self, model: ModelConfig, batch: BatchLimits, user_threads: int = 8):
        from ctloop.model.loading import load_base_model, load_tokenizer

        self.model_config = model
        self.tokenizer = load_tokenizer(model)
        self.base = load_base_model(model).eval()
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
        from peft import PeftModel

        if version in self.loaded:
            return
        if adapter_dir is None or not (adapter_dir / "adapter_config.json").is_file():
            raise ModelError(
                f"version {version} has no adapter files at {adapter_dir}; re-register it or "
                f"check the registry's artifact store"
            )
        self._lock.acquire(USER)
        try:
            if self.network is None:
                self.network = PeftModel.from_pretrained(
                    self.base, str(adapter_dir), adapter_name=self.adapter_name(version)
                ).eval()
            else:
                self.network.load_adapter(str(adapter_dir), adapter_name=self.adapter_name(version))
            self.loaded[version] = adapter_dir
            if self.batcher is not None:
                self.batcher.adapters_changed()
        finally:
            self._lock.release()

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
            if doomed and self.batcher is not None:
                self.batcher.adapters_changed()
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

    async def _generate_batched(
        self, request: GenerationRequest, version: int, priority: int, timeout_s: float | None
    ) -> Generation:
        from ctloop.model.batching import prompt_token_ids

        ids = prompt_token_ids(self.tokenizer, [request.prompt])[0]
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
    ) -> Generation:
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList

        from ctloop.model.batching import prompt_token_ids

        class Stop(StoppingCriteria):
            """Stops once a stop string appears, the caller gave up, or the call's own time ran out."""

            def __call__(self, input_ids, scores, **kwargs):
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

    def __init__(self, base_url: str, model_name: str, model_template: str, api_key: str | None, timeout_s: float):
        import httpx

        self.base_url = base_url.rstrip("/")
        self.model_name = model_name
        self.model_template = model_template
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._headers = headers
        self._timeout = timeout_s
        self.client = httpx.AsyncClient(base_url=self.base_url, headers=headers, timeout=timeout_s)
        self.loaded: dict[int, Path | None] = {}

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

    async def generate(
        self, request: GenerationRequest, version: int, priority: int = USER, timeout_s: float | None = None
    ) -> Generation:
        body: dict[str, Any] = {
            "model": self.upstream_model(version),
            "prompt": request.prompt,
            "max_tokens": request.max_tokens,
            "temperature": request.temperature,
            "top_p": request.top_p,
        }
        if request.stop:
            body["stop"] = list(request.stop)
        if request.seed is not None:
            body["seed"] = request.seed
        import httpx

        started = time.perf_counter()
        try:
            response = await self.client.post("/completions", json=body)
        except httpx.TimeoutException as exc:
            raise TimeoutError(f"upstream {self.base_url} did not answer in time ({exc.__class__.__name__})") from exc
        except httpx.HTTPError as exc:
            raise ModelError(f"upstream {self.base_url} unreachable ({exc.__class__.__name__}: {exc})") from exc
        if response.status_code >= 400:
            raise ModelError(f"upstream {response.status_code} for {body['model']}: {response.text[:300]}")
        try:
            data = response.json()
            choice = data["choices"][0]
            usage = data.get("usage") or {}
            return Generation(
                choice.get("text", ""),
                int(usage.get("prompt_tokens", 0)),
                int(usage.get("completion_tokens", 0)),
                choice.get("finish_reason") or "stop",
                (time.perf_counter() - started) * 1000,
            )
        except (ValueError, KeyError, IndexError, TypeError, AttributeError) as exc:
            raise ModelError(
                f"upstream {self.base_url} sent an answer that is not an OpenAI completion "
                f"({exc.__class__.__name__}: {exc}): {response.text[:200]}"
            ) from exc

    async def aclose(self) -> None:
        await self.client.aclose()
