"""Load test of the real server: `ctloop serve` in its own process over loopback, the real tiny model
with two LoRA adapters (champion v1, challenger v2) from a real MLflow registry.

    OMP_NUM_THREADS=1 python benchmarks/serve_load.py [--seconds 20] [--concurrency 8] [--max-tokens 16]

Runs the same loads twice, shadowing off and on: closed loop (N clients, each sending its next
request when the last one is answered: throughput at saturation), then open loop at a rate
under capacity (latency, shadow calls completing live). Prints throughput, p50/p99 latency and
the shadow counters; after a SIGTERM, the rows in the log database must equal the enqueued shadow
requests.
On a CPU the in-process backend serialises generations (user requests first), so with shadowing
on, the challenger's generations share the CPU with the champion's: the figure shows that cost.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import yaml

from ctloop.config import load_config
from ctloop.logstore.shadow import read_rows
from ctloop.registry.client import CHALLENGER, open_registry
from ctloop.registry.promotion import promote
from ctloop.training.tinymodel import TinyModelSpec, build_tiny_model, random_adapter
from ctloop.workspace import Workspace

QUICKSTART = Path(__file__).resolve().parents[1] / "src" / "ctloop" / "quickstart"


def prepare(root: Path) -> tuple[Path, list[str]]:
    rows = [json.loads(line) for line in (QUICKSTART / "pretrain.jsonl").read_text().splitlines()]
    base = build_tiny_model(
        [r["prompt"] + r["completion"] for r in rows], root / "base", TinyModelSpec(pretrain_steps=30)
    )
    prompts = [json.loads(line)["prompt"] for line in (QUICKSTART / "old_domain.jsonl").read_text().splitlines()[:200]]
    return base, prompts


def write_config(root: Path, base: Path, port: int, shadow: bool) -> Path:
    path = root / f"serve-{'on' if shadow else 'off'}.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "workspace": str(root / "ws"),
                "model": {"base": str(base)},
                "registry": {"model_name": "bench", "experiment": "bench"},
                "serve": {"port": port, "max_tokens": 64, "drain_seconds": 30},
                "shadow": {"enabled": shadow, "store_url": f"sqlite:///{root / f'shadow-{shadow}.db'}"},
            }
        )
    )
    return path


async def load(
    url: str, prompts: list[str], seconds: float, concurrency: int, max_tokens: int, rate: float | None = None
) -> dict:
    """Closed loop (`concurrency` clients back to back), or open loop at `rate` requests/s."""
    latencies: list[float] = []
    tokens = errors = 0
    deadline = time.perf_counter() + seconds

    async def one(http: httpx.AsyncClient, i: int) -> None:
        nonlocal tokens, errors
        began = time.perf_counter()
        response = await http.post(
            f"{url}/v1/completions",
            json={"model": "bench", "prompt": prompts[i % len(prompts)], "max_tokens": max_tokens},
        )
        if response.status_code == 200:
            latencies.append(time.perf_counter() - began)
            tokens += response.json()["usage"]["completion_tokens"]
        else:
            errors += 1

    if rate is not None:
        started = time.perf_counter()
        async with httpx.AsyncClient(timeout=120) as http:
            pending = []
            for i in range(int(seconds * rate)):
                await asyncio.sleep(max(0.0, started + i / rate - time.perf_counter()))
                pending.append(asyncio.create_task(one(http, i)))
            await asyncio.gather(*pending)
        elapsed = time.perf_counter() - started
        return {
            "requests": len(latencies),
            "errors": errors,
            "rps": len(latencies) / elapsed,
            "tokens_per_s": tokens / elapsed,
            "p50_ms": 1000 * statistics.median(latencies),
            "p99_ms": 1000 * statistics.quantiles(latencies, n=100)[98],
        }

    async def client(offset: int) -> None:
        async with httpx.AsyncClient(timeout=120) as http:
            i = offset
            while time.perf_counter() < deadline:
                await one(http, i)
                i += concurrency

    started = time.perf_counter()
    await asyncio.gather(*(client(k) for k in range(concurrency)))
    elapsed = time.perf_counter() - started
    return {
        "requests": len(latencies),
        "errors": errors,
        "rps": len(latencies) / elapsed,
        "tokens_per_s": tokens / elapsed,
        "p50_ms": 1000 * statistics.median(latencies),
        "p99_ms": 1000 * statistics.quantiles(latencies, n=100)[98],
    }


def metrics(url: str) -> dict[str, float]:
    out = {}
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def run_server(config: Path, port: int, prompts: list[str], args) -> dict:
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [sys.executable, "-m", "ctloop", "serve", "--config", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not come up: {server.stderr.read()[-2000:]}")
            time.sleep(0.2)
        asyncio.run(load(url, prompts, 2, args.concurrency, args.max_tokens))  # warm-up
        before = metrics(url)
        result = asyncio.run(load(url, prompts, args.seconds, args.concurrency, args.max_tokens))
        after = metrics(url)
        result["open_loop"] = asyncio.run(load(url, prompts, args.seconds, 0, args.max_tokens, rate=args.rate))
        later = metrics(url)
        result["open_loop"]["shadow_completed"] = later.get(
            'ctloop_shadow_finished_total{outcome="completed"}', 0
        ) - after.get('ctloop_shadow_finished_total{outcome="completed"}', 0)
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(120)
    result["shadow"] = {
        k.removeprefix("ctloop_shadow_"): after[k] - before.get(k, 0)
        for k in after
        if k.startswith("ctloop_shadow_") and k.endswith("_total")
    }
    result["enqueued_total"] = later.get("ctloop_shadow_enqueued_total", 0)
    result["exit_code"] = server.returncode
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--rate", type=float, default=3.0, help="open-loop requests/s (well under capacity)")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        base, prompts = prepare(root)
        port = 18000 + os.getpid() % 1000
        configs = {shadow: write_config(root, base, port, shadow) for shadow in (False, True)}
        registry = open_registry(load_config(configs[False]).registry, Workspace(root / "ws").create())
        for version in (1, 2):
            adapter = random_adapter(base, root / f"adapter{version}", seed=version)
            registry.register_adapter_dir(adapter, f"bench-{version}", {}, f"benchmark adapter {version}")
        promote(registry, 1, by="benchmark", note="serve_load")
        registry.set_alias(CHALLENGER, 2)
        results = {shadow: run_server(configs[shadow], port, prompts, args) for shadow in (False, True)}
        rows = len(read_rows(f"sqlite:///{root / 'shadow-True.db'}"))
    print(
        f"\n== ctloop serve over loopback: tiny model, {args.concurrency} clients, {args.seconds:.0f} s, "
        f"max_tokens {args.max_tokens} =="
    )
    print(f"{'shadowing':<10}{'requests':>9}{'errors':>7}{'req/s':>8}{'tokens/s':>10}{'p50 ms':>9}{'p99 ms':>9}")
    for shadow, r in results.items():
        print(
            f"{'on' if shadow else 'off':<10}{r['requests']:>9}{r['errors']:>7}{r['rps']:>8.1f}"
            f"{r['tokens_per_s']:>10.1f}{r['p50_ms']:>9.1f}{r['p99_ms']:>9.1f}"
        )
    on = results[True]
    print(f"shadow counters during the closed-loop window: {json.dumps(on['shadow'])}")
    print("(the closed loop keeps user requests waiting, and shadow calls yield to them: most finish later)")
    print(
        f"\n== open loop at {args.rate:g} requests/s (under capacity): shadow calls complete live; in-process, "
        f"they share the CPU with the champion, so a user request that arrives during one waits for it =="
    )
    print(f"{'shadowing':<10}{'requests':>9}{'errors':>7}{'p50 ms':>9}{'p99 ms':>9}{'shadow completed':>18}")
    for shadow, r in results.items():
        o = r["open_loop"]
        print(
            f"{'on' if shadow else 'off':<10}{o['requests']:>9}{o['errors']:>7}{o['p50_ms']:>9.1f}{o['p99_ms']:>9.1f}"
            f"{o['shadow_completed']:>18.0f}"
        )
    print(
        f"after SIGTERM (uvicorn re-raises it after its graceful shutdown): exit code {on['exit_code']}, rows in the log database {rows}, "
        f"enqueued over the whole run {on['enqueued_total']:.0f} -> {'equal' if rows == on['enqueued_total'] else 'MISMATCH'}"
    )
    print(f"throughput with shadowing on / off: {on['rps'] / results[False]['rps']:.2f}x")


if __name__ == "__main__":
    main()
