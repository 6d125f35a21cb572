"""Load test of the real server, serialised generation vs continuous batching, side by side in one run.

`ctloop serve` in its own process over loopback, the real tiny model with two LoRA adapters
(champion v1, challenger v2) from a real MLflow registry:

    OMP_NUM_THREADS=1 python benchmarks/serve_load.py [--seconds 20] [--clients 8 32] [--max-tokens 16]

Each backend runs with `serve.max_batch_size: 1` (the baseline: one request at a time through
transformers' `generate`, user requests first) and with the default continuous batching, shadowing off
and on. For each: a closed loop at every `--clients` count (each client sends its next request when the
last one is answered: throughput at saturation), then an open loop at `--rate` requests/s under
capacity (latency, shadow calls completing live). After a SIGTERM, the rows in the shadow log database
must equal the shadow requests enqueued. It prints the batched / serialised ratios of requests/s and
p99 at each client count; the target at 8 clients is at least 4x the requests/s with p99 no worse.
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


def write_config(root: Path, base: Path, port: int, batch: int, shadow: bool) -> Path:
    path = root / f"serve-{batch}-{'on' if shadow else 'off'}.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "workspace": str(root / "ws"),
                "model": {"base": str(base)},
                "registry": {"model_name": "bench", "experiment": "bench"},
                "serve": {"port": port, "max_tokens": 64, "drain_seconds": 30, "max_batch_size": batch},
                "shadow": {"enabled": shadow, "store_url": f"sqlite:///{root / f'shadow-{batch}-{shadow}.db'}"},
            }
        )
    )
    return path


class Connection:
    """One keep-alive HTTP/1.1 connection speaking just enough of the protocol for this load:
    pre-encoded POSTs and Content-Length answers. The load generator shares the server's two
    cores here, and httpx's per-request Python work would be charged to whichever server mode
    answers more requests; raw asyncio streams keep the client's share small for both."""

    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        )
        self.writer.write(head.encode() + body)
        status_line, *headers = (await self.reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        length = next(int(h.split(":", 1)[1]) for h in headers if h.lower().startswith("content-length:"))
        return int(status_line.split(" ", 2)[1]), await self.reader.readexactly(length)

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


async def load(
    url: str, prompts: list[str], seconds: float, concurrency: int, max_tokens: int, rate: float | None = None
) -> dict:
    """Closed loop (`concurrency` clients back to back, one connection each), or open loop at `rate`
    requests/s (a connection per request)."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    bodies = [json.dumps({"model": "bench", "prompt": prompt, "max_tokens": max_tokens}).encode() for prompt in prompts]
    latencies: list[float] = []
    tokens = errors = 0
    deadline = time.perf_counter() + seconds

    async def one(connection: Connection, i: int) -> None:
        nonlocal tokens, errors
        began = time.perf_counter()
        status, answer = await connection.post("/v1/completions", bodies[i % len(bodies)])
        if status == 200:
            latencies.append(time.perf_counter() - began)
            tokens += json.loads(answer)["usage"]["completion_tokens"]
        else:
            errors += 1

    async def single(i: int) -> None:
        connection = Connection(host, int(port))
        try:
            await one(connection, i)
        finally:
            await connection.close()

    if rate is not None:
        started = time.perf_counter()
        pending = []
        for i in range(int(seconds * rate)):
            await asyncio.sleep(max(0.0, started + i / rate - time.perf_counter()))
            pending.append(asyncio.create_task(single(i)))
        await asyncio.gather(*pending)
        return summary(latencies, errors, tokens, time.perf_counter() - started)

    async def client(offset: int) -> None:
        connection = Connection(host, int(port))
        i = offset
        try:
            while time.perf_counter() < deadline:
                await one(connection, i)
                i += concurrency
        finally:
            await connection.close()

    started = time.perf_counter()
    await asyncio.gather(*(client(k) for k in range(concurrency)))
    return summary(latencies, errors, tokens, time.perf_counter() - started)


def summary(latencies: list[float], errors: int, tokens: int, elapsed: float) -> dict:
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


def start_server(config: Path, port: int) -> tuple[subprocess.Popen, str]:
    """`ctloop serve` in its own process, once /healthz answers."""
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [sys.executable, "-m", "ctloop", "serve", "--config", str(config), "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 180
    while True:
        try:
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                return server, url
        except httpx.HTTPError:
            pass
        if server.poll() is not None or time.monotonic() > deadline:
            server.kill()
            raise RuntimeError(f"the server did not come up: {server.stderr.read()[-2000:]}")
        time.sleep(0.2)


def alternating(configs: dict, port: int, prompts: list[str], args) -> dict[int, list[float]]:
    """Both modes up at once (shadowing off), measured in turns at the first client count: a slow
    minute on a shared machine then hits both, and the per-round ratios show the spread."""
    servers = {batch: start_server(configs[(batch, False)], port + 1 + k) for k, batch in enumerate(MODES)}
    rates: dict[int, list[float]] = {batch: [] for batch in MODES}
    try:
        for _, url in servers.values():
            asyncio.run(load(url, prompts, 2, args.clients[0], args.max_tokens))  # warm-up
        for _ in range(args.rounds):
            for batch, (_, url) in servers.items():
                measured = asyncio.run(load(url, prompts, args.round_seconds, args.clients[0], args.max_tokens))
                rates[batch].append(measured["rps"])
    finally:
        for server, _ in servers.values():
            server.send_signal(signal.SIGTERM)
            server.wait(120)
    return rates


def run_server(config: Path, port: int, prompts: list[str], args) -> dict:
    server, url = start_server(config, port)
    result: dict = {"closed": {}}
    try:
        asyncio.run(load(url, prompts, 2, max(args.clients), args.max_tokens))  # warm-up
        completed = 'ctloop_shadow_finished_total{outcome="completed"}'
        for clients in args.clients:
            before = metrics(url)
            result["closed"][clients] = asyncio.run(load(url, prompts, args.seconds, clients, args.max_tokens))
            result["closed"][clients]["shadow_completed"] = metrics(url).get(completed, 0) - before.get(completed, 0)
        before = metrics(url)
        result["open_loop"] = asyncio.run(load(url, prompts, args.seconds, 0, args.max_tokens, rate=args.rate))
        after = metrics(url)
        result["open_loop"]["shadow_completed"] = after.get(completed, 0) - before.get(completed, 0)
        steps = after.get("ctloop_batch_steps_total", 0)
        result["mean_batch"] = after.get("ctloop_batch_decoded_tokens_total", 0) / steps if steps else 1.0
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(120)
    result["logged_total"] = (  # a row per enqueued request, and per one the breaker skipped or a full queue dropped
        after.get("ctloop_shadow_enqueued_total", 0)
        + after.get('ctloop_shadow_skipped_total{reason="breaker"}', 0)
        + after.get("ctloop_shadow_dropped_total", 0)
    )
    result["exit_code"] = server.returncode
    return result


MODES = {1: "serialised", 16: "batched"}


def engine_alone(base: Path, adapter: Path, prompts: list[str], args) -> dict[int, float]:
    """The in-process backend without HTTP: closed-loop requests/s at the first client count."""
    from ctloop.config import ModelConfig
    from ctloop.serving.backends import GenerationRequest, InProcessBackend
    from ctloop.serving.batching import BatchLimits

    clients = args.clients[0]
    out = {}
    for batch in MODES:
        backend = InProcessBackend(ModelConfig(base=str(base)), BatchLimits(batch, 8192))
        backend.load(1, adapter)

        async def run(backend=backend) -> float:
            done = 0
            deadline = time.perf_counter() + args.seconds

            async def client(offset: int) -> None:
                nonlocal done
                i = offset
                while time.perf_counter() < deadline:
                    await backend.generate(GenerationRequest(prompts[i % len(prompts)], args.max_tokens), 1)
                    done += 1
                    i += clients

            started = time.perf_counter()
            await asyncio.gather(*(client(k) for k in range(clients)))
            await backend.aclose()
            return done / (time.perf_counter() - started)

        out[batch] = asyncio.run(run())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--clients", type=int, nargs="+", default=[8, 32], help="closed-loop client counts")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--rate", type=float, default=3.0, help="open-loop requests/s (well under capacity)")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds, both modes up at once")
    parser.add_argument("--round-seconds", type=float, default=10)
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        base, prompts = prepare(root)
        port = 18000 + os.getpid() % 1000
        runs = [(batch, shadow) for shadow in (False, True) for batch in MODES]
        configs = {run: write_config(root, base, port, *run) for run in runs}
        registry = open_registry(load_config(configs[runs[0]]).registry, Workspace(root / "ws").create())
        for version in (1, 2):
            adapter = random_adapter(base, root / f"adapter{version}", seed=version)
            registry.register_adapter_dir(adapter, f"bench-{version}", {}, f"benchmark adapter {version}")
        promote(registry, 1, by="benchmark", note="serve_load")
        registry.set_alias(CHALLENGER, 2)
        results = {run: run_server(configs[run], port, prompts, args) for run in runs}
        turns = alternating(configs, port, prompts, args)
        alone = engine_alone(base, root / "adapter1", prompts, args)
        rows = {batch: len(read_rows(f"sqlite:///{root / f'shadow-{batch}-True.db'}")) for batch in MODES}
    print(
        f"\n== ctloop serve over loopback: tiny model, closed loop {args.seconds:.0f} s per client count, "
        f"max_tokens {args.max_tokens}, OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}, {os.cpu_count()} CPUs =="
    )
    header = f"{'backend':<12}{'shadowing':<10}{'clients':>8}{'requests':>9}{'errors':>7}{'req/s':>8}"
    print(header + f"{'tokens/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'shadow done':>12}{'mean batch':>11}")
    for (batch, shadow), r in results.items():
        for clients, c in r["closed"].items():
            print(
                f"{MODES[batch]:<12}{'on' if shadow else 'off':<10}{clients:>8}{c['requests']:>9}{c['errors']:>7}"
                f"{c['rps']:>8.1f}{c['tokens_per_s']:>10.1f}{c['p50_ms']:>9.1f}{c['p99_ms']:>9.1f}"
                f"{c['shadow_completed']:>12.0f}{r['mean_batch']:>11.1f}"
            )
    print("(shadow done: shadow calls completed during that closed loop; serialised, they yield to waiting users)")
    print("(mean batch: sequences per decoding step over the server's life, warm-up and open loop included)")
    print(f"\n== batched / serialised, closed loop ==\n{'shadowing':<10}{'clients':>8}{'req/s':>8}{'p99':>8}  target")
    for shadow in (False, True):
        for clients in args.clients:
            fast, slow = results[(16, shadow)]["closed"][clients], results[(1, shadow)]["closed"][clients]
            target = "(>= 4x req/s, p99 <= 1x)" if clients == 8 else ""
            print(
                f"{'on' if shadow else 'off':<10}{clients:>8}{fast['rps'] / slow['rps']:>7.2f}x"
                f"{fast['p99_ms'] / slow['p99_ms']:>7.2f}x  {target}"
            )
    ratios = [fast / slow for fast, slow in zip(turns[16], turns[1], strict=True)]
    print(
        f"\n== alternating rounds, both servers up, {args.clients[0]} clients, shadowing off, "
        f"{args.round_seconds:.0f} s per turn ==\n"
        + "\n".join(
            f"round {k + 1}: serialised {slow:.1f} req/s, batched {fast:.1f} req/s: {fast / slow:.2f}x"
            for k, (fast, slow) in enumerate(zip(turns[16], turns[1], strict=True))
        )
        + f"\nmedian {statistics.median(ratios):.2f}x (rounds {min(ratios):.2f}-{max(ratios):.2f}x; target >= 4x)"
    )
    print(
        f"\n== the in-process backend alone (no HTTP, no logs), {args.clients[0]} clients, shadowing off ==\n"
        f"serialised {alone[1]:.1f} req/s, batched {alone[16]:.1f} req/s: {alone[16] / alone[1]:.2f}x"
    )
    print(f"\n== open loop at {args.rate:g} requests/s (under capacity): shadow calls complete live ==")
    print(
        f"{'backend':<12}{'shadowing':<10}{'requests':>9}{'errors':>7}{'p50 ms':>9}{'p99 ms':>9}{'shadow completed':>18}"
    )
    for (batch, shadow), r in results.items():
        o = r["open_loop"]
        print(
            f"{MODES[batch]:<12}{'on' if shadow else 'off':<10}{o['requests']:>9}{o['errors']:>7}{o['p50_ms']:>9.1f}"
            f"{o['p99_ms']:>9.1f}{o['shadow_completed']:>18.0f}"
        )
    for batch in MODES:
        on = results[(batch, True)]
        verdict = "equal" if rows[batch] == on["logged_total"] else "MISMATCH"
        print(
            f"{MODES[batch]}, shadowing on, after SIGTERM: exit code {on['exit_code']}, rows in the shadow log "
            f"{rows[batch]}, enqueued + breaker-skipped + dropped over the whole run {on['logged_total']:.0f} "
            f"-> {verdict}"
        )


if __name__ == "__main__":
    main()
