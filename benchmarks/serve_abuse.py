"""Abuse next to normal traffic: what oversized, over-long and slow requests cost everyone else.

    OMP_NUM_THREADS=1 python benchmarks/serve_abuse.py [--seconds 20] [--concurrency 4]

`ctloop serve` (the tiny model, in-process backend) runs as its own process on loopback. Normal
traffic: `--concurrency` clients in a closed loop sending short completions (max_tokens 8). It runs
twice in one invocation: alone, then next to three abusers that run the whole time:
- oversized: bodies declaring 150 MB (refused by Content-Length before they are read);
- over-long: 60 KB prompts of CJK text under the body cap, about 20,000 tokens (refused before
  any generation: prompt + max_tokens over the model's context);
- slow: a client that sends its headers, then one byte of body every second;
- huge heads: a 200 KB X-Request-Id, and 200,000 header lines (431 before the parser keeps them).
Then publishing against two misbehaving replicas: one that drips its answer a byte a second, one
that answers with a 50 MB error page (`timeout_s` 2, 2 attempts): the time each publish took and
this process's memory growth, against the bound of attempts x timeout + backoff.
Printed last: normal requests' p50/p99 alone vs with the abuse, the abusers' status codes, and the
server's peak resident memory (sampled from /proc every 50 ms), against a stated bound.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import yaml

from ctloop.config import load_config
from ctloop.registry.client import open_registry
from ctloop.registry.promotion import promote
from ctloop.training.tinymodel import TinyModelSpec, build_tiny_model, random_adapter
from ctloop.workspace import Workspace

QUICKSTART = Path(__file__).resolve().parents[1] / "src" / "ctloop" / "quickstart"
MEMORY_BOUND_MB = 1500.0  # the tiny model's server idles near 750 MB; abuse must not grow it without bound


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status", encoding="ascii") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


async def normal_traffic(url: str, prompts: list[str], seconds: float, concurrency: int) -> dict:
    latencies: list[float] = []
    statuses: Counter[int] = Counter()
    stop = time.monotonic() + seconds
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:

        async def worker(offset: int) -> None:
            index = offset
            while time.monotonic() < stop:
                began = time.perf_counter()
                response = await client.post(
                    "/v1/completions", json={"model": "bench", "prompt": prompts[index % len(prompts)], "max_tokens": 8}
                )
                latencies.append(time.perf_counter() - began)
                statuses[response.status_code] += 1
                index += concurrency

        await asyncio.gather(*(worker(i) for i in range(concurrency)))
    return {
        "requests": len(latencies),
        "p50_ms": 1000 * statistics.median(latencies),
        "p99_ms": 1000 * statistics.quantiles(latencies, n=100)[98],
        "statuses": dict(statuses),
    }


def abuse(url: str, stop: threading.Event, outcomes: Counter) -> list[threading.Thread]:
    host, port = url.removeprefix("http://").split(":")

    def oversized() -> None:
        while not stop.is_set():
            try:
                with socket.create_connection((host, int(port)), timeout=10) as sock:
                    sock.sendall(
                        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                        b"Content-Length: 150000000\r\n\r\n{"
                    )
                    outcomes["oversized " + sock.recv(64).decode(errors="replace").split(" ")[1]] += 1
            except OSError as exc:
                outcomes[f"oversized {exc.__class__.__name__}"] += 1

    def over_long() -> None:
        prompt = "数据漂移检测" * 3300  # ~60 KB of UTF-8, under serve.max_body_bytes
        with httpx.Client(timeout=60) as client:
            while not stop.is_set():
                response = client.post(f"{url}/v1/completions", json={"model": "bench", "prompt": prompt})
                outcomes[f"over-long {response.status_code}"] += 1

    def slow() -> None:
        while not stop.is_set():
            try:
                with socket.create_connection((host, int(port)), timeout=30) as sock:
                    sock.sendall(
                        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                        b"Content-Length: 60\r\n\r\n"
                    )
                    for _ in range(5):
                        if stop.is_set():
                            break
                        sock.sendall(b" ")
                        time.sleep(1)
                    outcomes["slow client held 5 s"] += 1
            except OSError as exc:
                outcomes[f"slow {exc.__class__.__name__}"] += 1

    def huge_heads() -> None:
        heads = [b"X-Request-Id: " + b"x" * 200_000 + b"\r\n", b"X-H: v\r\n" * 200_000]
        while not stop.is_set():
            for kind, head in zip(("huge header", "many headers"), heads, strict=True):
                try:
                    with socket.create_connection((host, int(port)), timeout=30) as sock:
                        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
                        try:
                            sock.sendall(head + b"\r\n")
                        except OSError:
                            pass  # the server answered and closed before reading it all
                        outcomes[f"{kind} " + sock.recv(64).decode(errors="replace").split(" ")[1]] += 1
                except (OSError, IndexError) as exc:
                    outcomes[f"{kind} {exc.__class__.__name__}"] += 1

    threads = [threading.Thread(target=f, daemon=True) for f in (oversized, over_long, slow, huge_heads)]
    for thread in threads:
        thread.start()
    return threads


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--concurrency", type=int, default=4)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="ctloop-serve-abuse-"))
    rows = [json.loads(line) for line in (QUICKSTART / "pretrain.jsonl").read_text().splitlines()]
    base = build_tiny_model(
        [r["prompt"] + r["completion"] for r in rows], root / "base", TinyModelSpec(pretrain_steps=30)
    )
    prompts = [json.loads(line)["prompt"] for line in (QUICKSTART / "old_domain.jsonl").read_text().splitlines()[:200]]
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    config_path = root / "serve.yaml"
    config_path.write_text(
        yaml.safe_dump(
            {
                "workspace": str(root / "ws"),
                "model": {"base": str(base)},
                "registry": {"model_name": "bench", "experiment": "bench"},
                "serve": {"port": port, "max_tokens": 64},
                "shadow": {"enabled": False},
            }
        )
    )
    config = load_config(config_path)
    registry = open_registry(config.registry, Workspace(root / "ws").create())
    registry.register_adapter_dir(random_adapter(base, root / "adapter", 1), "bench-1", {}, "bench")
    promote(registry, 1, by="benchmark", note="serve_abuse")
    server = subprocess.Popen(
        [sys.executable, "-m", "ctloop", "serve", "--config", str(config_path)],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    peak = {"rss": 0.0}
    sampling = threading.Event()

    def sample() -> None:
        while not sampling.is_set():
            peak["rss"] = max(peak["rss"], rss_mb(server.pid))
            time.sleep(0.05)

    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the server did not come up")
            time.sleep(0.2)
        asyncio.run(normal_traffic(url, prompts, 2, args.concurrency))  # warm-up
        threading.Thread(target=sample, daemon=True).start()
        alone = asyncio.run(normal_traffic(url, prompts, args.seconds, args.concurrency))
        idle_peak = peak["rss"]
        stop, outcomes = threading.Event(), Counter()
        abusers = abuse(url, stop, outcomes)
        attacked = asyncio.run(normal_traffic(url, prompts, args.seconds, args.concurrency))
        stop.set()
        for thread in abusers:
            thread.join(10)
    finally:
        sampling.set()
        server.send_signal(signal.SIGTERM)
        server.wait(60)
    print(
        f"\nnormal traffic: {args.concurrency} closed-loop clients, max_tokens 8, {args.seconds:g} s each, tiny model, "
        f"one CPU thread"
    )
    print(f"{'':<22}{'requests':>9}{'p50 ms':>9}{'p99 ms':>9}  statuses")
    for label, r in (("alone", alone), ("next to the abuse", attacked)):
        print(f"{label:<22}{r['requests']:>9}{r['p50_ms']:>9.1f}{r['p99_ms']:>9.1f}  {r['statuses']}")
    print(f"abusers: {dict(sorted(outcomes.items()))}")
    print(
        f"p99 with abuse / alone: {attacked['p99_ms'] / alone['p99_ms']:.2f}x; p50: {attacked['p50_ms'] / alone['p50_ms']:.2f}x"
    )
    print(
        f"server peak RSS: {idle_peak:.0f} MB alone, {peak['rss']:.0f} MB with the abuse "
        f"(bound {MEMORY_BOUND_MB:.0f} MB: {'held' if peak['rss'] <= MEMORY_BOUND_MB else 'EXCEEDED'})"
    )
    publish_bounds(config_path)


def misbehaving_replica(mode: str) -> tuple[str, threading.Event]:
    """A replica on loopback that drips its answer a byte a second, or answers with 50 MB."""
    server = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def answer(connection: socket.socket) -> None:
        with connection:
            connection.recv(65536)
            try:
                if mode == "drip":
                    connection.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\n")
                    while not stop.is_set():
                        connection.sendall(b"x")
                        time.sleep(1)
                else:
                    connection.sendall(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 50000000\r\n\r\n")
                    for _ in range(50_000_000 // 65536):
                        connection.sendall(b"e" * 65536)
            except OSError:
                pass

    def accept() -> None:
        while not stop.is_set():
            try:
                connection, _ = server.accept()
            except OSError:
                return
            threading.Thread(target=answer, args=(connection,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    return f"http://127.0.0.1:{server.getsockname()[1]}", stop


def publish_bounds(config_path: Path) -> None:
    from ctloop.config import PublishConfig, PublishTarget
    from ctloop.registry.publishing import make_publisher

    config = load_config(config_path)
    workspace = Workspace(config.workspace)
    registry = open_registry(config.registry, workspace)
    timeout_s, attempts = 2.0, 2
    bound = attempts * timeout_s + 0.5 * (2 ** (attempts - 1) - 1) + 1.0  # + backoff + a second of slack
    print(f"\npublishing to a misbehaving replica (timeout_s {timeout_s:g}, {attempts} attempts; bound {bound:.1f} s):")
    for mode in ("drip", "50 MB error page"):
        url, stop = misbehaving_replica("drip" if mode == "drip" else "huge")
        target = PublishTarget(kind="ctloop", urls=[url], timeout_s=timeout_s)
        publisher = make_publisher(PublishConfig(targets=[target], attempts=attempts), registry, workspace)
        before = rss_mb(os.getpid())
        started = time.monotonic()
        result = publisher.publish(1)
        took = time.monotonic() - started
        grew = rss_mb(os.getpid()) - before
        stop.set()
        print(
            f"  {mode:<17} {took:5.1f} s ({'held' if took <= bound else 'EXCEEDED'}), memory +{grew:.0f} MB, "
            f"outcome: {result.outcomes[0].detail[:90]}"
        )


if __name__ == "__main__":
    main()
