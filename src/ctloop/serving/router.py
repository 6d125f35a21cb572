"""The shadow router: the user gets the champion's answer; the challenger gets the same request
afterwards, off the user's critical path, and the pair is logged.

`submit()` runs on the request path after the champion has answered and never waits: a hash
decides whether the request is sampled, the circuit breaker whether the challenger is healthy,
and the request goes into a bounded queue (full: dropped and counted). A fixed pool of workers
calls the challenger with a per-call timeout and writes one row per enqueued request to the log
store; a request the open circuit breaker skips, or a full queue drops, gets a row too (status
`skipped_breaker` / `dropped`), so the shadow report counts what the challenger never answered. `shutdown()` stops intake, lets queued calls finish for `drain_seconds`, cancels the
rest (counted and logged as `cancelled`) and closes the store, so no enqueued request goes
unlogged.

Counters add up exactly, at any moment once `shutdown()` has returned:
    offered  = sampled_out + skipped + dropped + enqueued
    enqueued = completed + timed_out + errored + cancelled   (+ in_flight + queued while running)
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, fields

from ctloop.config import ShadowConfig
from ctloop.logstore.shadow import ShadowRecord, ShadowStore
from ctloop.serving.backends import SHADOW, Backend, Generation, GenerationRequest


def sampled(request_id: str, fraction: float) -> bool:
    """Deterministic sampling: the same request id is always in or out, whatever the process."""
    if fraction >= 1:
        return True
    digest = hashlib.blake2b(request_id.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 < fraction


class CircuitBreaker:
    """Opens when `failure_ratio` of the last `window` calls failed; after `cooldown_s` lets one probe
    through (half-open): its success closes the breaker, its failure opens it again."""

    def __init__(
        self, window: int, failure_ratio: float, cooldown_s: float, clock: Callable[[], float] = time.monotonic
    ):
        self.window = window
        self.max_failures = max(1, round(failure_ratio * window))
        self.cooldown_s = cooldown_s
        self.clock = clock
        self.outcomes: deque[bool] = deque(maxlen=window)
        self.state = "closed"
        self.opened_at = 0.0
        self.times_opened = 0

    def allow(self) -> bool:
        if self.state == "closed":
            return True
        if self.state == "open" and self.clock() - self.opened_at >= self.cooldown_s:
            self.state = "half_open"  # this one call is the probe
            return True
        return False

    def record(self, ok: bool) -> None:
        if self.state == "half_open":
            if ok:
                self.state = "closed"
                self.outcomes.clear()
            else:
                self._open()
            return
        self.outcomes.append(ok)
        if self.state == "closed" and self.outcomes.count(False) >= self.max_failures:
            self._open()

    def _open(self) -> None:
        self.state = "open"
        self.opened_at = self.clock()
        self.times_opened += 1
        self.outcomes.clear()


@dataclass
class ShadowCounters:
    offered: int = 0
    sampled_out: int = 0
    skipped_breaker: int = 0
    skipped_no_challenger: int = 0
    skipped_draining: int = 0
    dropped: int = 0
    enqueued: int = 0
    completed: int = 0
    timed_out: int = 0
    errored: int = 0
    cancelled: int = 0

    @property
    def skipped(self) -> int:
        return self.skipped_breaker + self.skipped_no_challenger + self.skipped_draining

    @property
    def finished(self) -> int:
        return self.completed + self.timed_out + self.errored + self.cancelled

    def as_dict(self) -> dict[str, int]:
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return {**values, "skipped": self.skipped, "finished": self.finished}


@dataclass(frozen=True)
class ShadowJob:
    request_id: str
    request: GenerationRequest
    champion: Generation
    champion_version: int
    challenger_version: int
    enqueued_at: float = field(default_factory=time.perf_counter)


class ShadowRouter:
    """Mirrors champion-answered requests to the challenger; one instance per event loop."""

    def __init__(
        self, backend: Backend, store: ShadowStore, settings: ShadowConfig, challenger: Callable[[], int | None]
    ):
        self.backend = backend
        self.store = store
        self.settings = settings
        self.challenger = challenger
        self.counters = ShadowCounters()
        self.breaker = CircuitBreaker(
            settings.breaker_window, settings.breaker_failure_ratio, settings.breaker_cooldown_s
        )
        self.queue: asyncio.Queue[ShadowJob] = asyncio.Queue(maxsize=settings.queue_size)
        self.in_flight = 0
        self.draining = False
        self._workers: list[asyncio.Task] = []

    def start(self) -> None:
        """Start the worker pool (call from inside the running event loop)."""
        self._workers = [
            asyncio.create_task(self._work(), name=f"ctloop-shadow-{i}") for i in range(self.settings.workers)
        ]

    def submit(
        self,
        request_id: str,
        request: GenerationRequest,
        champion: Generation,
        champion_version: int,
        sample_key: str | None = None,
    ) -> str:
        """Offer a champion-answered request for shadowing; never blocks. Returns what happened to it.
        `sample_key` (default: the request id) decides the sampling, so one user is always in or out."""
        counters = self.counters
        counters.offered += 1
        if not sampled(sample_key or request_id, self.settings.fraction):
            counters.sampled_out += 1
            return "sampled_out"
        challenger = self.challenger()
        if self.draining:
            counters.skipped_draining += 1
            return "skipped_draining"
        if challenger is None or challenger == champion_version:
            counters.skipped_no_challenger += 1
            return "skipped_no_challenger"
        job = ShadowJob(request_id, request, champion, champion_version, challenger)
        if not self.breaker.allow():
            counters.skipped_breaker += 1
            self._log(job, "skipped_breaker", None, "the circuit breaker was open")
            return "skipped_breaker"
        try:
            self.queue.put_nowait(job)
        except asyncio.QueueFull:
            counters.dropped += 1
            self._log(job, "dropped", None, f"the shadow queue was full (shadow.queue_size={self.settings.queue_size})")
            return "dropped"
        counters.enqueued += 1
        return "enqueued"

    async def _work(self) -> None:
        while True:
            job = await self.queue.get()
            self.in_flight += 1
            try:
                await self._shadow(job)
            finally:
                self.in_flight -= 1
                self.queue.task_done()

    async def _shadow(self, job: ShadowJob) -> None:
        if job.challenger_version != self.challenger():  # replaced while queued: not this challenger's fault
            self.counters.cancelled += 1
            self._log(job, "cancelled", None, f"the challenger changed from v{job.challenger_version} while queued")
            return
        timeout = self.settings.timeout_s
        try:
            if getattr(self.backend, "shares_compute", False):  # the backend times the generation itself
                answer = await self.backend.generate(job.request, job.challenger_version, SHADOW, timeout_s=timeout)
            else:
                answer = await asyncio.wait_for(
                    self.backend.generate(job.request, job.challenger_version, SHADOW), timeout
                )
        except TimeoutError:
            self.breaker.record(False)
            self.counters.timed_out += 1
            self._log(job, "timed_out", None, f"no answer within shadow.timeout_s={self.settings.timeout_s}")
        except asyncio.CancelledError:
            self.counters.cancelled += 1
            self._log(job, "cancelled", None, "cancelled at shutdown")
            raise
        except Exception as exc:  # noqa: BLE001 - any challenger failure is an outcome to count, not a crash
            self.breaker.record(False)
            self.counters.errored += 1
            self._log(job, "errored", None, f"{exc.__class__.__name__}: {exc}"[:2000])
        else:
            self.breaker.record(True)
            self.counters.completed += 1
            self._log(job, "completed", answer, "")

    def _log(self, job: ShadowJob, status: str, answer: Generation | None, error: str) -> None:
        self.store.put(
            ShadowRecord(
                request_id=job.request_id,
                prompt=job.request.prompt,
                champion_output=job.champion.text,
                challenger_output=answer.text if answer else "",
                status=status,
                error=error,
                champion_version=str(job.champion_version),
                challenger_version=str(job.challenger_version),
                champion_latency_ms=job.champion.latency_ms,
                challenger_latency_ms=answer.latency_ms if answer else 0.0,
                champion_tokens=job.champion.completion_tokens,
                challenger_tokens=answer.completion_tokens if answer else 0,
            )
        )

    async def shutdown(self, drain_seconds: float) -> None:
        """Stop intake, let queued calls finish for up to `drain_seconds`, cancel and log the rest,
        then write every logged row."""
        self.draining = True
        try:
            await asyncio.wait_for(self.queue.join(), drain_seconds)
        except TimeoutError:
            pass
        while not self.queue.empty():  # never started: cancelled, and logged as such
            job = self.queue.get_nowait()
            self.counters.cancelled += 1
            self._log(job, "cancelled", None, "still queued at shutdown")
            self.queue.task_done()
        for worker in self._workers:
            worker.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)
        await asyncio.to_thread(self.store.close)

    def metrics(self) -> list[tuple[str, str, float, dict[str, str]]]:
        """(name, type, value, labels) for the Prometheus exposition."""
        c = self.counters
        rows: list[tuple[str, str, float, dict[str, str]]] = [
            ("ctloop_shadow_offered_total", "counter", c.offered, {}),
            ("ctloop_shadow_sampled_out_total", "counter", c.sampled_out, {}),
            ("ctloop_shadow_dropped_total", "counter", c.dropped, {}),
            ("ctloop_shadow_enqueued_total", "counter", c.enqueued, {}),
        ]
        for reason in ("breaker", "no_challenger", "draining"):
            rows.append(("ctloop_shadow_skipped_total", "counter", getattr(c, f"skipped_{reason}"), {"reason": reason}))
        for outcome in ("completed", "timed_out", "errored", "cancelled"):
            rows.append(("ctloop_shadow_finished_total", "counter", getattr(c, outcome), {"outcome": outcome}))
        rows += [
            ("ctloop_shadow_queue_depth", "gauge", self.queue.qsize(), {}),
            ("ctloop_shadow_in_flight", "gauge", self.in_flight, {}),
            ("ctloop_shadow_breaker_open", "gauge", float(self.breaker.state != "closed"), {}),
            ("ctloop_shadow_breaker_opened_total", "counter", self.breaker.times_opened, {}),
            ("ctloop_shadow_log_rows_written_total", "counter", self.store.written, {}),
            ("ctloop_shadow_log_rows_dropped_total", "counter", self.store.dropped, {}),
            ("ctloop_shadow_log_write_errors_total", "counter", self.store.write_errors, {}),
        ]
        return rows
