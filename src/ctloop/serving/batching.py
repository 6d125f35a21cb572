"""Continuous batching for the in-process backend.

Every request that waits joins the running batch at the next decoding step, whatever its adapter:
one forward pass decodes one token for every sequence, each row through its own LoRA adapter
(`_AdapterRouting`: ctloop's routed LoRA forward, or peft's `adapter_names=` for other LoRA
layers), so the champion's users and the challenger's shadow calls share a batch. On Llama models
the step itself is `ctloop.serving.decode`'s lean step where it reproduces the model's forward.

- Admission goes by (priority, arrival): user requests before shadow calls, first come first
  served within each. When a user request waits and the batch is full (`max_sequences`, or
  `max_tokens` counted as prompt + max_tokens of every sequence), shadow sequences are paused
  (their KV cache set aside) to make room, so a shadow call delays a user request by at most the
  decoding step that was running when it arrived. Paused sequences resume where they stopped.
- New sequences are prefilled together (left-padded, the padding masked out, each row's position
  ids counted from its own first real token) and join the running batch in the same step. (One
  forward pass for both would pad every running row to the prompts' width: on the tiny model that
  cost 14.5 ms against 4.7 + 3.9 ms for a separate prefill and decode.) Greedy outputs equal
  one-at-a-time generation (a test checks).
- Each sequence stops on its own: end of sequence, `max_tokens`, a stop string, its caller
  giving up (at the next step), or its time in the batch passing its `timeout_s` (time spent
  waiting or paused does not count: that is production load, not the sequence's fault).

One scheduler thread owns the model; `load`/`unload` of adapters take the same lock between steps
and then call `adapters_changed()`.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import random
import threading
import time
from collections import Counter
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from ctloop.errors import ModelError

log = logging.getLogger(__name__)
USER, SHADOW = 0, 1  # priorities: lower goes first


@dataclass(frozen=True)
class BatchLimits:
    max_sequences: int
    max_tokens: int  # prompt + max_tokens, summed over the sequences in the batch


@dataclass(eq=False)
class Sequence:
    """One request's generation state, owned by the scheduler thread once submitted."""

    request: Any  # GenerationRequest
    adapter: str
    priority: int
    ticket: int
    prompt_ids: list[int]
    result: Future = field(default_factory=Future)
    cancelled: threading.Event = field(default_factory=threading.Event)
    timeout_s: float | None = None
    generated: list[int] = field(default_factory=list)
    cache: list[tuple[Any, Any]] | None = None  # per layer (keys, values) [1, heads, tokens, dim] outside a batch
    busy_s: float = 0.0
    generator: Any = None  # torch.Generator when sampling
    finish: str | None = None
    first_step: int | None = None  # the scheduler step that admitted it
    on_token: Any = None  # called (on the scheduler thread) after each token it gets: streaming

    @property
    def budget(self) -> int:
        return len(self.prompt_ids) + self.request.max_tokens

    @property
    def cached_tokens(self) -> int:
        """Real tokens in this sequence's KV cache: the prompt and every generated token but the last."""
        return len(self.prompt_ids) + len(self.generated) - 1

    def order(self) -> tuple[int, int]:
        return (self.priority, self.ticket)

    def __lt__(self, other: Sequence) -> bool:
        return self.order() < other.order()


class ContinuousBatcher:
    """The scheduler: a waiting heap, the running batch, and the thread that decodes it.

    `network()` returns the PeftModel to run (it changes when the first adapter loads); `model_lock`
    is held for each step, so a caller holding it knows no step is running."""

    def __init__(self, network, tokenizer, model_lock, limits: BatchLimits):
        self._network = network
        self._tokenizer = tokenizer
        self._model_lock = model_lock
        self.limits = limits
        self._condition = threading.Condition()
        self._waiting: list[Sequence] = []
        self._active: list[Sequence] = []
        self._batch = _Batch()
        self._tickets = itertools.count()
        self._closed = False
        self._routing = _AdapterRouting()
        self.paths: Counter[str] = Counter()  # decoding steps by path: lean, routed (LoRA layers only), peft
        self.steps = 0  # decoding steps run (each may start with a prefill)
        self.decoded = 0  # tokens decoded, summed over the steps' sequences
        self.paused = 0  # shadow sequences set aside for a waiting user request
        self.largest = 0  # the most sequences decoded in one step
        self._thread = threading.Thread(target=self._run, name="ctloop-batcher", daemon=True)
        self._thread.start()

    def submit(
        self,
        request: Any,
        adapter: str,
        prompt_ids: list[int],
        priority: int,
        timeout_s: float | None,
        on_token: Any = None,
    ) -> Sequence:
        sequence = Sequence(
            request, adapter, priority, next(self._tickets), prompt_ids, timeout_s=timeout_s, on_token=on_token
        )
        if request.temperature > 0:
            import torch

            seed = request.seed if request.seed is not None else random.getrandbits(63)
            sequence.generator = torch.Generator().manual_seed(seed)
        with self._condition:
            if self._closed:
                raise ModelError("the backend is shutting down; retry on another replica")
            heapq.heappush(self._waiting, sequence)
            self._condition.notify()
        return sequence

    def adapters_changed(self) -> None:
        """An adapter was loaded or deleted (call with the model lock held)."""
        self._routing.stale = True

    @property
    def running(self) -> int:
        """Sequences in the batch now."""
        return len(self._active)

    def metrics(self) -> list[tuple[str, str, float, dict[str, str]]]:
        """Rows for /metrics: mean batch size is decoded / steps."""
        with self._condition:
            waiting = len(self._waiting)
        return [
            ("ctloop_batch_steps_total", "counter", self.steps, {}),
            ("ctloop_batch_decoded_tokens_total", "counter", self.decoded, {}),
            ("ctloop_batch_paused_total", "counter", self.paused, {}),
            ("ctloop_batch_running", "gauge", len(self._active), {}),
            ("ctloop_batch_largest", "gauge", self.largest, {}),
            ("ctloop_batch_waiting", "gauge", waiting, {}),
            *(("ctloop_decode_steps_total", "counter", self.paths[p], {"path": p}) for p in ("lean", "routed", "peft")),
            ("ctloop_fast_path_failures_total", "counter", self._routing.failures, {}),
        ]

    def close(self) -> None:
        with self._condition:
            self._closed = True
            self._condition.notify()
        self._thread.join(30)

    # -- the scheduler thread ------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._condition:
                while not self._closed and not self._waiting and not self._active:
                    self._condition.wait()
                if self._closed:
                    for sequence in self._waiting + self._active:
                        _resolve(sequence, error=ModelError("the backend shut down before this answer finished"))
                    return
                self._admit()
            try:
                self._model_lock.acquire(USER)
                began = time.perf_counter()  # after the lock: an adapter load is not the sequences' time
                try:
                    self._step()
                finally:
                    self._model_lock.release()
            except Exception as exc:  # noqa: BLE001 - a failed step fails its sequences, not the server
                for sequence in self._active:
                    _resolve(sequence, error=ModelError(f"generation failed ({exc.__class__.__name__}: {exc})"))
                self._active, self._batch = [], _Batch()
                continue
            spent = time.perf_counter() - began
            for sequence in self._active:
                sequence.busy_s += spent
            self._retire()

    def _admit(self) -> None:
        """Move waiting sequences into the batch, pausing shadow ones for waiting users."""
        for sequence in [s for s in self._waiting if s.cancelled.is_set()]:
            self._waiting.remove(sequence)
            _resolve(sequence, error=ModelError("cancelled before it started"))
        heapq.heapify(self._waiting)
        while self._waiting:
            head = self._waiting[0]
            if self._fits(head):
                self._active.append(heapq.heappop(self._waiting))
                if head.first_step is None:
                    head.first_step = self.steps + 1
                continue
            paused = [s for s in self._active if s.priority > head.priority]
            if not paused:
                break
            newest = max(paused, key=Sequence.order)
            if newest in self._batch.sequences:
                newest.cache = self._batch.take_out(newest)
            self._active.remove(newest)
            heapq.heappush(self._waiting, newest)
            self.paused += 1

    def _fits(self, sequence: Sequence) -> bool:
        if not self._active:
            return True  # a request larger than the token cap still runs, alone
        if len(self._active) >= self.limits.max_sequences:
            return False
        return sum(s.budget for s in self._active) + sequence.budget <= self.limits.max_tokens

    def _step(self) -> None:
        """Prefill the new sequences, then one token for every running one (the new ones included)."""
        self.steps += 1
        network = self._network()
        new = [s for s in self._active if not s.generated]
        if new:
            self._guarded(
                network, [s.adapter for s in new], lambda: _prefill(network, self._tokenizer.pad_token_id, new)
            )
            for sequence in new:
                self._check_finished(sequence)
        inside = set(self._batch.sequences)
        joining = [s for s in self._active if s not in inside and s.finish is None]  # new, or resuming
        if joining:
            self._batch.add(joining)
        if not self._batch.sequences:
            return
        names = [s.adapter for s in self._batch.sequences]
        self._guarded(network, names, lambda: self._batch.decode(network, self._routing.lean))
        self.paths["lean" if self._routing.lean is not None else "routed" if self._routing.routed else "peft"] += 1
        self.decoded += len(self._batch.sequences)
        self.largest = max(self.largest, len(self._batch.sequences))
        for sequence in self._batch.sequences:
            self._check_finished(sequence)

    def _guarded(self, network, names: list[str], forward) -> None:
        """Run a forward pass with the fast paths (the routed LoRA forward, the lean step), which read
        private state of peft and transformers; if they raise, they are switched off for good (logged
        once, counted) and the pass runs again through the model's own forward, so the request still
        gets its answer. (Both fail before they change any sequence or cache: the pass is redone whole.)"""
        self._routing.use(network, names)
        try:
            forward()
        except Exception as exc:  # noqa: BLE001 - a fast path that breaks falls back; the model's own error propagates
            if not self._routing.fast:
                raise
            self._routing.give_up(exc)
            self._routing.use(network, names)
            forward()

    def _check_finished(self, sequence: Sequence) -> None:
        if sequence.on_token is not None:
            sequence.on_token()
        request = sequence.request
        if sequence.generated[-1] == self._tokenizer.eos_token_id:
            sequence.finish = "stop"
        elif request.stop:
            text = self._tokenizer.decode(sequence.generated, skip_special_tokens=True)
            if any(s and s in text for s in request.stop):
                sequence.finish = "stop"
        if sequence.finish is None and len(sequence.generated) >= request.max_tokens:
            sequence.finish = "length"

    def _retire(self) -> None:
        """Answer the finished sequences; drop the cancelled and the overtime ones."""
        keep = []
        for sequence in self._active:
            if sequence.cancelled.is_set():
                _resolve(sequence, error=ModelError("cancelled by its caller"))
            elif sequence.timeout_s is not None and sequence.busy_s > sequence.timeout_s and sequence.finish is None:
                _resolve(sequence, error=TimeoutError(f"the generation took longer than {sequence.timeout_s} s"))
            elif sequence.finish is not None:
                _resolve(sequence)
            else:
                keep.append(sequence)
        if len(keep) != len(self._active):
            self._batch.keep(keep)
            self._active = keep


class _AdapterRouting:
    """Which adapter each row of the next forward pass uses.

    peft's plain LoRA linear layers are switched to `ctloop.kernels.lora`'s routed forward: peft's
    arithmetic without its per-call work, each row on its own adapter (mixed batches) or all on the
    active one. Rows are grouped by adapter once per step, not once per layer. Any other LoRA layer
    gets peft's `adapter_names=` through a forward pre-hook while batches mix (peft's own
    `adapter_names=` argument registers and removes such hooks on every call, which cost more than
    the step itself on a small model); those hooks go after SINGLE_STEPS steps on one adapter, since
    a module with a hook takes torch's slower call path."""

    SINGLE_STEPS = 64

    def __init__(self) -> None:
        from ctloop.kernels.lora import RowAdapters

        self.rows = RowAdapters()
        self.names: list[str] | None = None
        self.stale = True  # the loaded adapters changed: layers must be switched afresh
        self.routed = 0  # LoRA layers on the routed forward
        self.lean: Any = None  # a ctloop.serving.decode.LeanLlamaStep where it reproduces the model's step
        self.fast = True  # off for good once a fast path raised: peft's forward and the model's step
        self.failures = 0
        self._others: list[Any] = []  # LoRA layers that need adapter_names= from a hook
        self._handles: list[Any] = []
        self._single_steps = 0

    def use(self, network, names: list[str]) -> None:
        if self.stale:
            self._switch(network)
        if len(set(names)) > 1:
            self.rows.set(names, network.device)
            if self._others and not self._handles:
                self._handles = [
                    module.register_forward_pre_hook(self._pass_names, with_kwargs=True) for module in self._others
                ]
            self.names = names
            self._single_steps = 0
            return
        self.rows.set(names)
        self.names = None
        self._single_steps += 1
        if self._single_steps >= self.SINGLE_STEPS:
            self._detach()
        if network.active_adapter != names[0]:
            network.set_adapter(names[0])

    def _switch(self, network) -> None:
        from ctloop.kernels.lora import route_lora_layers, unroute_lora_layers
        from ctloop.serving.decode import lean_step

        self._detach()
        if self.fast:
            try:
                self.routed, self._others = route_lora_layers(network, self.rows)
                # the lean step calls layers' forwards directly, past the hooks the other LoRA layers would need
                self.lean = None if self._others else lean_step(network)
            except Exception as exc:  # noqa: BLE001 - a peft or transformers internals change: the slow path
                self._note_failure(exc)
        if not self.fast:
            self.routed, self._others, self.lean = 0, unroute_lora_layers(network), None
        self.stale = False

    def give_up(self, exc: BaseException) -> None:
        """A fast path raised: switch both off (the layers get peft's forward back at the next use)."""
        self._note_failure(exc)
        self.stale = True

    def _note_failure(self, exc: BaseException) -> None:
        self.failures += 1
        if self.fast:
            log.warning(
                "a decoding fast path failed (%s: %s); decoding goes on through peft's forward and the model's "
                "own step (ctloop_fast_path_failures_total counts it); likely a peft or transformers release "
                "ctloop was not tested on",
                exc.__class__.__name__,
                exc,
            )
        self.fast, self.lean = False, None

    def _detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _pass_names(self, module, args, kwargs):
        if self.names is not None:
            kwargs["adapter_names"] = self.names
        return args, kwargs


def _resolve(sequence: Sequence, error: BaseException | None = None) -> None:
    sequence.cache = None
    if sequence.result.done():
        return
    if error is not None:
        sequence.result.set_exception(error)
    else:
        sequence.result.set_result(sequence)


def _next_tokens(logits, sequences: list[Sequence]) -> list[int]:
    """Greedy argmax, or a draw with the request's temperature and top_p from its own generator."""
    import torch

    chosen = logits.argmax(dim=-1).tolist()
    for row, sequence in enumerate(sequences):
        request = sequence.request
        if request.temperature <= 0:
            continue
        probs = torch.softmax(logits[row].float() / request.temperature, dim=-1).cpu()
        if request.top_p < 1:
            ordered, index = probs.sort(descending=True)
            outside = ordered.cumsum(0) - ordered >= request.top_p  # keep the smallest set reaching top_p
            ordered[outside] = 0
            probs = torch.zeros_like(probs).scatter(0, index, ordered)
        chosen[row] = int(torch.multinomial(probs, 1, generator=sequence.generator))
    return chosen


def _prefill(network, pad_id: int, sequences: list[Sequence]) -> None:
    """Run the new prompts together (left-padded); each sequence gets its own KV cache and first token."""
    import torch
    from transformers import DynamicCache

    device = network.device
    width = max(len(s.prompt_ids) for s in sequences)
    ids = torch.tensor([[pad_id] * (width - len(s.prompt_ids)) + s.prompt_ids for s in sequences], device=device)
    mask = torch.tensor([[0] * (width - len(s.prompt_ids)) + [1] * len(s.prompt_ids) for s in sequences], device=device)
    cache = DynamicCache()
    with torch.inference_mode():
        out = network(
            input_ids=ids,
            attention_mask=mask,
            position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
            cache=cache,
            use_cache=True,
            logits_to_keep=1,
        )
    for row, (sequence, token) in enumerate(zip(sequences, _next_tokens(out.logits[:, -1, :], sequences), strict=True)):
        start = width - len(sequence.prompt_ids)
        sequence.cache = [
            (layer.keys[row : row + 1, :, start:], layer.values[row : row + 1, :, start:]) for layer in cache.layers
        ]
        sequence.generated.append(token)


def _left_pad(tensor, width: int, dim: int):
    import torch

    short = width - tensor.shape[dim]
    if not short:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = short
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)


@dataclass
class _Batch:
    """The running sequences' KV caches in one tensor per layer, each row's real tokens right-aligned
    (left padding, masked out), and the attention mask over them."""

    sequences: list[Sequence] = field(default_factory=list)
    layers: list[tuple[Any, Any]] = field(default_factory=list)  # per layer (keys, values) [rows, heads, width, dim]
    mask: Any = None  # [rows, width], 0 on padding

    @property
    def width(self) -> int:
        return 0 if self.mask is None else self.mask.shape[1]

    def decode(self, network, lean: Any = None) -> None:
        """One token for every row: through `lean` (a `ctloop.serving.decode.LeanLlamaStep`) when
        given, else through the model's forward."""
        import torch
        from transformers import DynamicCache

        device = self.mask.device
        rows = len(self.sequences)
        mask = torch.cat([self.mask, torch.ones(rows, 1, dtype=self.mask.dtype, device=device)], dim=1)
        input_ids = torch.tensor([[s.generated[-1]] for s in self.sequences], device=device)
        position_ids = torch.tensor([[s.cached_tokens] for s in self.sequences], device=device)
        with torch.inference_mode():
            if lean is not None:
                logits, self.layers = lean.step(input_ids, position_ids, mask, self.layers)
            else:
                cache = DynamicCache(ddp_cache_data=self.layers)
                out = network(
                    input_ids=input_ids, attention_mask=mask, position_ids=position_ids, cache=cache, use_cache=True
                )
                logits = out.logits[:, -1, :]
                self.layers = [(layer.keys, layer.values) for layer in cache.layers]
        self.mask = mask
        for sequence, token in zip(self.sequences, _next_tokens(logits, self.sequences), strict=True):
            sequence.generated.append(token)

    def keep(self, sequences: list[Sequence]) -> None:
        """Only these rows stay."""
        import torch

        if not sequences:
            self.sequences, self.layers, self.mask = [], [], None
            return
        rows = torch.tensor([self.sequences.index(s) for s in sequences], device=self.mask.device)
        mask = self.mask.index_select(0, rows)
        start = self.width - int(mask.sum(dim=1).max())  # rows are right-aligned: leading all-pad columns go
        self.mask = mask[:, start:]
        self.layers = [
            (k.index_select(0, rows)[:, :, start:], v.index_select(0, rows)[:, :, start:]) for k, v in self.layers
        ]
        self.sequences = list(sequences)

    def take_out(self, sequence: Sequence) -> list[tuple[Any, Any]]:
        """Remove a row; return its own cache (real tokens only)."""
        row = self.sequences.index(sequence)
        start = self.width - sequence.cached_tokens
        cache = [(k[row : row + 1, :, start:], v[row : row + 1, :, start:]) for k, v in self.layers]
        self.keep([s for s in self.sequences if s is not sequence])
        return cache

    def add(self, sequences: list[Sequence]) -> None:
        """Rows for sequences with their own caches: just prefilled, or resuming after a pause."""
        import torch

        width = max([self.width] + [s.cached_tokens for s in sequences])
        layers = []
        for index in range(len(sequences[0].cache)):
            keys = [_left_pad(k, width, 2) for k, _ in self.layers[index : index + 1]]
            values = [_left_pad(v, width, 2) for _, v in self.layers[index : index + 1]]
            keys += [_left_pad(s.cache[index][0], width, 2) for s in sequences]
            values += [_left_pad(s.cache[index][1], width, 2) for s in sequences]
            layers.append((torch.cat(keys), torch.cat(values)))
        device = layers[0][0].device
        masks = [] if self.mask is None else [_left_pad(self.mask, width, 1)]
        masks += [
            _left_pad(torch.ones(1, s.cached_tokens, dtype=torch.long, device=device), width, 1) for s in sequences
        ]
        for sequence in sequences:
            sequence.cache = None  # the batch holds it now
        self.sequences = self.sequences + list(sequences)
        self.layers = layers
        self.mask = torch.cat(masks)
