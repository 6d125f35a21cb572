"""What the request log adds to production latency: request log on vs off, side by side in one run.

    OMP_NUM_THREADS=1 python benchmarks/request_log.py [--seconds 10] [--repeats 3] [--store-url URL]

The harness of `shadow_router.py`: the champion is simulated (answers in 20 ms, `asyncio.sleep`),
requests arrive open-loop at 100 and 400 requests/s, and a request's latency runs from its
scheduled arrival to its answer, so event-loop stalls count. With the log on, every answer goes
through `ProductionLog.record` (sampling, then the bounded queue of the batched background writer)
into a real log store: SQLite in a temp folder by default, or `--store-url` (PostgreSQL). After each
run the writer is closed and the rows in the database are counted: they must equal the requests.
Each configuration runs in its own process; repeats are interleaved; medians are printed last.
Target: at most +1 ms p50 and +3 ms p99.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import statistics
import sys
import tempfile
import time
from pathlib import Path

from ctloop.config import CtloopConfig
from ctloop.logstore.requests import LogReader, RequestRecord
from ctloop.serving.production_log import ProductionLog

CHAMPION_SECONDS = 0.020


async def drive(rate: float, seconds: float, logged: bool, store_url: str) -> dict:
    total = int(rate * seconds)
    latencies: list[float] = []
    path_costs: list[float] = []
    production = ProductionLog(CtloopConfig(model={"base": "unused"}), store_url) if logged else None
    before = _rows(store_url) if logged else 0  # a shared store (PostgreSQL) holds earlier runs' rows

    async def handle(index: int, arrival: float) -> None:
        await asyncio.sleep(CHAMPION_SECONDS)
        if production is not None:
            began = time.perf_counter()
            production.record(
                RequestRecord(
                    request_id=f"req-{index}",
                    model_version="1",
                    endpoint="completions",
                    prompt=f"request {index} " * 20,
                    answer="production answer " * 8,
                    prompt_tokens=60,
                    completion_tokens=16,
                    latency_ms=20.0,
                    user="bench",
                    request_metadata={"team": "bench"},
                )
            )
            path_costs.append(time.perf_counter() - began)
        latencies.append(time.perf_counter() - arrival)

    tasks = []
    start = time.perf_counter()
    for index in range(total):
        arrival = start + index / rate
        delay = arrival - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(handle(index, arrival)))
    await asyncio.gather(*tasks)
    result = {
        "logged": logged,
        "rate": rate,
        "requests": total,
        "p50_ms": 1000 * statistics.median(latencies),
        "p99_ms": 1000 * statistics.quantiles(latencies, n=100)[98],
        "call_us_p50": 1e6 * statistics.median(path_costs) if path_costs else float("nan"),
        "call_us_p99": 1e6 * statistics.quantiles(path_costs, n=100)[98] if len(path_costs) > 1 else float("nan"),
    }
    if production is not None:
        production.close()  # drains the queue: every row written
        result["rows"] = _rows(store_url) - before
        result["dropped"] = production.writer.dropped
    return result


def _rows(store_url: str) -> int:
    reader = LogReader(store_url)
    try:
        return reader.counts()["request_log"]
    finally:
        reader.close()


def run_one(job: tuple) -> dict:
    rate, seconds, logged, store_url = job
    return asyncio.run(drive(rate, seconds, logged, store_url))


def main() -> None:
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--store-url", default=None, help="default: SQLite in a temp folder, one per run")
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        jobs = []
        for repeat, rate, logged in itertools.product(range(args.repeats), (100, 400), (False, True)):
            url = args.store_url or f"sqlite:///{Path(tmp) / f'log-{repeat}-{rate}-{logged}.db'}"
            jobs.append((rate, args.seconds, logged, url))
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"), max_tasks_per_child=1) as pool:
            for result in pool.map(run_one, jobs):
                print(
                    f"{result['rate']}/s log {'on ' if result['logged'] else 'off'} p50 {result['p50_ms']:.2f} ms "
                    f"p99 {result['p99_ms']:.2f} ms rows {result.get('rows', '-')}",
                    file=sys.stderr,
                )
                results.append(result)
    store = "PostgreSQL" if args.store_url else "SQLite (WAL)"
    print(
        f"\nrequest log on vs off, {args.repeats} interleaved repeats of {args.seconds:g} s each, store {store}, "
        f"champion simulated at {CHAMPION_SECONDS * 1000:.0f} ms; medians over the repeats"
    )
    print(
        f"{'rate/s':>7}{'off p50':>9}{'on p50':>9}{'+p50':>8}{'off p99':>9}{'on p99':>9}{'+p99':>8}"
        f"{'call p50 us':>13}{'call p99 us':>13}{'rows = requests':>17}"
    )
    for rate in (100, 400):
        off = [r for r in results if r["rate"] == rate and not r["logged"]]
        on = [r for r in results if r["rate"] == rate and r["logged"]]

        def med(runs: list[dict], key: str) -> float:
            return statistics.median(r[key] for r in runs)

        complete = all(r["rows"] == r["requests"] and r["dropped"] == 0 for r in on)
        print(
            f"{rate:>7}{med(off, 'p50_ms'):>9.2f}{med(on, 'p50_ms'):>9.2f}{med(on, 'p50_ms') - med(off, 'p50_ms'):>+8.2f}"
            f"{med(off, 'p99_ms'):>9.2f}{med(on, 'p99_ms'):>9.2f}{med(on, 'p99_ms') - med(off, 'p99_ms'):>+8.2f}"
            f"{med(on, 'call_us_p50'):>13.1f}{med(on, 'call_us_p99'):>13.1f}{str(complete):>17}"
        )
    print("target: at most +1 ms p50 and +3 ms p99; every request logged")


if __name__ == "__main__":
    main()
