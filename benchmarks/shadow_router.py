"""The shadow router's own cost and behaviour: ctloop's router vs the seed's thread-per-request router.

    OMP_NUM_THREADS=1 python benchmarks/shadow_router.py [--seconds 10] [--repeats 3]

Models are simulated so the routers' cost is what is measured: the champion answers in 20 ms
(`asyncio.sleep`), the challenger in 50 ms with 4 calls at a time (80/s), or never (hung). Requests arrive open-loop at a fixed
rate; a request's latency runs from its scheduled arrival to its answer, so event-loop stalls count.
ctloop: 4 shadow workers, queue 256, timeout 0.5 s, breaker 20 calls / 50%, the real SQLite log store.
Seed: `threading.Thread(target=shadow).start()` per request, the shadow answer printed (to /dev/null);
it has no sampling, so for the overload run it is given ctloop's hash sampling.

Scenarios, all in one run, figures printed last:
1. added production latency, shadowing on vs off, at 100 and 400 requests/s, healthy and hung challenger;
2. overload: 400 requests/s against a challenger that can do 80/s (2.5x over at fraction 0.5):
   the counters must account for every request, memory must stay bounded;
3. 10,000 requests then a clean shutdown: rows in the database must equal enqueued shadow requests.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

from ctloop.config import ShadowConfig
from ctloop.logstore.shadow import ShadowStore, read_rows
from ctloop.serving.backends import Generation, GenerationRequest
from ctloop.serving.router import ShadowRouter, sampled

CHAMPION_SECONDS = 0.020
CHALLENGER_SECONDS = 0.050
HANG_SECONDS = 3600.0
CAPACITY = 4  # the challenger serves 4 calls at a time: 80 requests/s at 50 ms


def rss_mb() -> float:
    with open("/proc/self/status", encoding="ascii") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


class SleepingChallenger:
    """ctloop's view of the simulated challenger: an async backend that sleeps, CAPACITY calls at a time."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.slots = asyncio.Semaphore(CAPACITY)

    async def generate(self, request, version, priority=0):
        async with self.slots:
            await asyncio.sleep(self.seconds)
        return Generation("shadow answer", 4, 8, "stop", self.seconds * 1000)


class SeedRouter:
    """The seed's router, as written: one new thread per request, the answer printed, nothing logged."""

    def __init__(self, shadow_seconds: float, sink):
        self.shadow_seconds = shadow_seconds
        self.slots = threading.Semaphore(CAPACITY)  # the same simulated challenger: CAPACITY calls at a time
        self.sink = sink
        self.completed = 0
        self.started = 0

    def handle_request(self, text: str) -> None:
        thread = threading.Thread(target=self._log_shadow_prediction, args=(text,), daemon=True)
        thread.start()
        self.started += 1

    def _log_shadow_prediction(self, text: str) -> None:
        with self.slots:
            time.sleep(self.shadow_seconds)
        print(f"Shadow Prediction: {text}", file=self.sink)
        self.completed += 1


async def drive(
    rate: float,
    seconds: float,
    mode: str,
    challenger_seconds: float,
    store_dir: Path,
    fraction: float = 1.0,
    requests: int | None = None,
) -> dict:
    """Send requests open-loop; return production latency percentiles and the shadow outcome."""
    total = requests if requests is not None else int(rate * seconds)
    latencies: list[float] = []
    path_costs: list[float] = []  # seconds spent in the router's own call on the request path
    threads_before = threading.active_count()  # a hung seed run leaves its sleeping threads behind
    peak = {"threads": threads_before, "rss": rss_mb()}
    rss_before = rss_mb()
    router = seed = None
    if mode == "ctloop":
        settings = ShadowConfig(
            fraction=fraction,
            workers=4,
            queue_size=256,
            timeout_s=0.5,
            breaker_window=20,
            breaker_failure_ratio=0.5,
            breaker_cooldown_s=5,
        )
        store = ShadowStore(f"sqlite:///{store_dir / f'shadow-{mode}-{rate}-{time.time_ns()}.db'}")
        router = ShadowRouter(SleepingChallenger(challenger_seconds), store, settings, challenger=lambda: 2)
        router.start()
    elif mode == "seed":
        seed = SeedRouter(challenger_seconds, open(os.devnull, "w"))  # noqa: SIM115 - closed below

    async def handle(index: int, arrival: float) -> None:
        request = GenerationRequest(prompt=f"request {index}", max_tokens=16)
        if seed is not None and sampled(f"req-{index}", fraction):  # the seed has no sampling; given ctloop's
            began = time.perf_counter()
            seed.handle_request(request.prompt)
            path_costs.append(time.perf_counter() - began)  # the seed starts the shadow first, on the request path
        await asyncio.sleep(CHAMPION_SECONDS)
        answer = Generation("production answer", 4, 8, "stop", CHAMPION_SECONDS * 1000)
        if router is not None:
            began = time.perf_counter()
            router.submit(f"req-{index}", request, answer, 1)
            path_costs.append(time.perf_counter() - began)
        latencies.append(time.perf_counter() - arrival)

    async def sample_resources() -> None:
        while True:
            peak["threads"] = max(peak["threads"], threading.active_count())
            peak["rss"] = max(peak["rss"], rss_mb())
            await asyncio.sleep(0.1)

    sampler = asyncio.create_task(sample_resources())
    tasks = []
    start = time.perf_counter()
    for index in range(total):
        arrival = start + index / rate
        delay = arrival - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(handle(index, arrival)))
    await asyncio.gather(*tasks)
    sampler.cancel()
    result = {
        "mode": mode,
        "rate": rate,
        "requests": total,
        "p50_ms": 1000 * statistics.median(latencies),
        "p99_ms": 1000 * statistics.quantiles(latencies, n=100)[98],
        "peak_threads": peak["threads"] - threads_before,
        "rss_growth_mb": peak["rss"] - rss_before,
        "path_us": _us(path_costs),
    }
    if router is not None:
        await router.shutdown(drain_seconds=2.0)
        counters = router.counters.as_dict()
        result.update(
            counters=counters,
            rows=len(read_rows(router.store.url)),
            log_dropped=router.store.dropped,
            accounted=counters["offered"]
            == counters["sampled_out"] + counters["skipped"] + counters["dropped"] + counters["enqueued"]
            and counters["enqueued"] == counters["finished"],
        )
    if seed is not None:
        result.update(
            shadow_started=seed.started,
            shadow_completed=seed.completed,
            shadow_lost_at_exit=seed.started - seed.completed,
            rows=0,
        )
    return result


def _us(values: list[float]) -> dict[str, float]:
    if len(values) < 2:
        return {"p50": float("nan"), "p99": float("nan")}
    return {"p50": 1e6 * statistics.median(values), "p99": 1e6 * statistics.quantiles(values, n=100)[98]}


def run_one(job: tuple) -> dict:
    """One configuration in its own process, so a seed run's leftover threads cannot touch the next run."""
    scenario, rate, seconds, mode, challenger_seconds, fraction, requests, store_dir = job
    result = asyncio.run(drive(rate, seconds, mode, challenger_seconds, Path(store_dir), fraction, requests))
    result["scenario"] = scenario
    return result


def run(seconds: float, repeats: int) -> list[dict]:
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    jobs = []
    with tempfile.TemporaryDirectory() as tmp:
        challengers = (("healthy", CHALLENGER_SECONDS), ("hung", HANG_SECONDS))
        for _, (challenger, challenger_seconds), rate, mode in itertools.product(  # repeats interleaved
            range(repeats), challengers, (100, 400), ("off", "ctloop", "seed")
        ):
            if not (mode == "off" and challenger == "hung"):
                jobs.append((f"latency/{challenger}", rate, seconds, mode, challenger_seconds, 1.0, None, tmp))
        for mode in ("ctloop", "seed"):
            jobs.append(("overload 2.5x", 400, seconds * 2, mode, CHALLENGER_SECONDS, 0.5, None, tmp))
        for mode in ("ctloop", "seed"):
            jobs.append(("10k then shutdown", 1000, 0, mode, 0.001, 1.0, 10_000, tmp))
        results = []
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"), max_tasks_per_child=1) as pool:
            for result in pool.map(run_one, jobs):
                print(_line(result), file=sys.stderr)
                results.append(result)
    return results


def _line(r: dict) -> str:
    return f"{r.get('scenario', '')} {r['mode']} {r['rate']}/s p50 {r['p50_ms']:.2f} ms p99 {r['p99_ms']:.2f} ms"


def _medians(results: list[dict]) -> dict[tuple, dict]:
    """Per (scenario, rate, mode): the median of each figure over the repeats."""
    grouped: dict[tuple, list[dict]] = {}
    for r in results:
        grouped.setdefault((r["scenario"], r["rate"], r["mode"]), []).append(r)
    out = {}
    for key, runs in grouped.items():
        out[key] = {
            "p50_ms": statistics.median(r["p50_ms"] for r in runs),
            "p99_ms": statistics.median(r["p99_ms"] for r in runs),
            "path_p50": statistics.median(r["path_us"]["p50"] for r in runs),
            "path_p99": statistics.median(r["path_us"]["p99"] for r in runs),
            "peak_threads": statistics.median(r["peak_threads"] for r in runs),
            "rows": statistics.median(r.get("rows", 0) for r in runs),
        }
    return out


def report(results: list[dict]) -> str:
    lines = ["", "== added production latency (ms) vs shadowing off, same run =="]
    lines.append(
        f"{'challenger':<10}{'rate/s':>8}{'router':>9}{'p50':>9}{'p99':>9}{'+p50':>8}{'+p99':>8}"
        f"{'call p50':>10}{'call p99':>10}{'threads':>9}{'logged':>13}"
    )
    lines.append(
        "(p50/p99: production latency, ms, median of the repeats; call: the router's own call on the "
        "request path, us; threads: added at peak)"
    )
    latency = _medians([r for r in results if r["scenario"].startswith("latency")])
    off = {rate: r for (scenario, rate, mode), r in latency.items() if mode == "off"}
    for (scenario, rate, mode), r in latency.items():
        if mode == "off":
            continue
        base = off[rate]
        logged = r["rows"] if mode == "ctloop" else "0 (printed)"
        lines.append(
            f"{scenario.split('/')[1]:<10}{rate:>8}{mode:>9}{r['p50_ms']:>9.2f}"
            f"{r['p99_ms']:>9.2f}{r['p50_ms'] - base['p50_ms']:>+8.2f}{r['p99_ms'] - base['p99_ms']:>+8.2f}"
            f"{r['path_p50']:>10.1f}{r['path_p99']:>10.1f}{r['peak_threads']:>9.0f}{logged!s:>13}"
        )
    lines.append(
        f"(shadowing off: p50/p99 {off[100]['p50_ms']:.2f}/{off[100]['p99_ms']:.2f} ms at 100/s, "
        f"{off[400]['p50_ms']:.2f}/{off[400]['p99_ms']:.2f} ms at 400/s; targets: +1 ms p50, +3 ms p99)"
    )
    for scenario in ("overload 2.5x", "10k then shutdown"):
        lines.append(f"\n== {scenario} ==")
        for r in results:
            if r["scenario"] != scenario:
                continue
            if r["mode"] == "ctloop":
                c = r["counters"]
                lines.append(
                    f"ctloop: offered {c['offered']} = sampled_out {c['sampled_out']} + skipped {c['skipped']} "
                    f"+ dropped {c['dropped']} + enqueued {c['enqueued']}; enqueued = completed "
                    f"{c['completed']} + timed_out {c['timed_out']} + errored {c['errored']} + cancelled "
                    f"{c['cancelled']}; accounted: {r['accounted']}; rows in DB {r['rows']} "
                    f"(enqueued {c['enqueued']}, log dropped {r['log_dropped']}); added threads "
                    f"{r['peak_threads']}; RSS growth {r['rss_growth_mb']:.1f} MB"
                )
            else:
                lines.append(
                    f"seed:   {r['shadow_started']} shadow threads started, {r['shadow_completed']} completed, "
                    f"{r['shadow_lost_at_exit']} still running when the run ended (lost); rows in DB 0; "
                    f"added threads {r['peak_threads']}; RSS growth {r['rss_growth_mb']:.1f} MB"
                )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each latency run")
    parser.add_argument("--repeats", type=int, default=3, help="latency runs per configuration (median reported)")
    args = parser.parse_args()
    print(report(run(args.seconds, args.repeats)))


if __name__ == "__main__":
    main()
