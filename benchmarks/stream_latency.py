"""Streaming through `ctloop serve` (openai backend) against the same streaming upstream called
directly, side by side in one run: time to first token and inter-token latency at 1, 8 and 32
concurrent streams.

    OMP_NUM_THREADS=1 python benchmarks/stream_latency.py [--streams 48] [--tokens 32] [--token-ms 10]
    OMP_NUM_THREADS=1 python benchmarks/stream_latency.py --in-process [--concurrency 8]

With `--in-process`: `ctloop serve` runs the quickstart's tiny model itself (in_process backend,
continuous batching), and the figures are time to first token of streamed answers against the
latency of the same answers not streamed, at `--concurrency` concurrent requests (default 8):
streaming's point is that the first token arrives long before the whole answer.

The upstream is a minimal OpenAI-compatible server in its own process that streams `--tokens`
completion chunks `--token-ms` apart (an engine's decode rate); `ctloop serve` runs in its own
process in front of it, with the request log on (SQLite) and shadowing off. The client (httpx,
one process) reads the server-sent events and times each chunk. Both sides share this machine's
two cores with the client, so the added figures are an upper bound of what ctloop adds. The target
(to aim for): at most 2 ms added to the p50 time to first token and 5 ms to its p99.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import yaml


def upstream_app(tokens: int, token_ms: float):
    from fastapi import FastAPI
    from fastapi.responses import StreamingResponse

    app = FastAPI()

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": "bench-v1", "object": "model"}]}

    @app.post("/v1/completions")
    async def complete(body: dict):
        async def events():
            for i in range(tokens):
                await asyncio.sleep(token_ms / 1000)
                choice = {"index": 0, "text": f" t{i}", "finish_reason": "length" if i == tokens - 1 else None}
                yield f"data: {json.dumps({'id': 'up', 'object': 'text_completion', 'choices': [choice]})}\n\n"
            usage = {"prompt_tokens": 5, "completion_tokens": tokens, "total_tokens": tokens + 5}
            yield f"data: {json.dumps({'id': 'up', 'object': 'text_completion', 'choices': [], 'usage': usage})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_up(url: str, process: subprocess.Popen, seconds: float = 180) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{url}: the process exited ({process.returncode})")
        try:
            if httpx.get(url, timeout=2).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} did not come up")


async def streams(url: str, model: str, count: int, concurrency: int) -> dict[str, list[float]]:
    """Time to first token and the gaps between tokens, in ms, over `count` streams."""
    first: list[float] = []
    gaps: list[float] = []
    semaphore = asyncio.Semaphore(concurrency)
    body = {"model": model, "prompt": "Package: libsdl2-mixer\nDescription:", "max_tokens": 64, "stream": True}
    async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=concurrency)) as client:

        async def one() -> None:
            async with semaphore:
                began = time.perf_counter()
                times = []
                async with client.stream("POST", f"{url}/v1/completions", json=body) as response:
                    async for line in response.aiter_lines():
                        if line.startswith("data: {") and '"text": " t' in line.replace('"text":" t', '"text": " t'):
                            times.append(time.perf_counter())
                if times:
                    first.append((times[0] - began) * 1000)
                    gaps.extend((b - a) * 1000 for a, b in zip(times, times[1:], strict=False))

        await asyncio.gather(*(one() for _ in range(count)))
    return {"ttft": first, "itl": gaps}


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=48)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--token-ms", type=float, default=10.0)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--serve-upstream", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--in-process", action="store_true", help="the in-process backend on the tiny model")
    parser.add_argument("--work", default="/tmp/ctloop-stream-benchmark", help="--in-process: the tiny model's cache")
    args = parser.parse_args()
    if args.in_process:
        in_process(args)
        return
    if args.serve_upstream is not None:  # the upstream's own process
        import uvicorn

        uvicorn.run(upstream_app(args.tokens, args.token_ms), port=args.serve_upstream, log_level="warning")
        return

    env = os.environ | {"OMP_NUM_THREADS": "1", "MLFLOW_DISABLE_TELEMETRY": "true"}
    with tempfile.TemporaryDirectory(prefix="ctloop-stream-") as tmp:
        root = Path(tmp)
        up_port, ctloop_port = free_port(), free_port()
        upstream = subprocess.Popen(
            [sys.executable, __file__, "--serve-upstream", str(up_port), "--tokens", str(args.tokens),
             "--token-ms", str(args.token_ms)],
            stderr=subprocess.DEVNULL, text=True, env=env,
        )  # fmt: skip
        server = None
        try:
            up = f"http://127.0.0.1:{up_port}"
            wait_up(f"{up}/v1/models", upstream)
            config = serve_config(root / "serve.yaml", root / "ws", ctloop_port, up, {"enabled": False})
            register(config, root)
            server_log = (root / "serve.log").open("w")  # a pipe nobody reads would block the server
            server = subprocess.Popen(
                [sys.executable, "-m", "ctloop", "serve", "--config", str(config)],
                stderr=server_log, stdout=server_log, text=True, env=env,
            )  # fmt: skip
            url = f"http://127.0.0.1:{ctloop_port}"
            wait_up(f"{url}/healthz", server)
            print(
                f"{args.streams} streams of {args.tokens} tokens, {args.token_ms:g} ms apart; "
                f"cpu: {os.cpu_count()} cores; client, upstream and ctloop on this machine"
            )
            print(f"{'streams':>7}  {'TTFT p50 direct':>15} {'via ctloop':>10} {'added':>7}   "
                  f"{'TTFT p99 direct':>15} {'via ctloop':>10} {'added':>7}   {'ITL p50 direct / ctloop':>24}")  # fmt: skip
            for concurrency in args.concurrency:
                asyncio.run(streams(up, "bench-v1", concurrency, concurrency))  # warm both paths
                asyncio.run(streams(url, "bench", concurrency, concurrency))
                direct = asyncio.run(streams(up, "bench-v1", args.streams, concurrency))
                through = asyncio.run(streams(url, "bench", args.streams, concurrency))
                p50d, p50c = quantile(direct["ttft"], 0.5), quantile(through["ttft"], 0.5)
                p99d, p99c = quantile(direct["ttft"], 0.99), quantile(through["ttft"], 0.99)
                itl = f"{statistics.median(direct['itl']):.1f} / {statistics.median(through['itl']):.1f} ms"
                print(
                    f"{concurrency:>7}  {p50d:>12.1f} ms {p50c:>7.1f} ms {p50c - p50d:>+5.1f} ms   "
                    f"{p99d:>12.1f} ms {p99c:>7.1f} ms {p99c - p99d:>+5.1f} ms   {itl:>24}"
                )
        finally:
            for process in (server, upstream):
                if process is not None:
                    process.terminate()
                    process.wait(timeout=60)


async def answers(url: str, count: int, concurrency: int, stream: bool, tokens: int) -> list[float]:
    """ms to the first token of each answer (streamed), or to the whole answer (not streamed)."""
    semaphore = asyncio.Semaphore(concurrency)
    body = {"model": "bench", "prompt": "Package: libsdl2-mixer\nDescription:", "max_tokens": tokens}
    body |= {"temperature": 0, "stream": stream}
    times: list[float] = []
    async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=concurrency)) as client:

        async def one() -> None:
            async with semaphore:
                began = time.perf_counter()
                if not stream:
                    (await client.post(f"{url}/v1/completions", json=body)).raise_for_status()
                    times.append((time.perf_counter() - began) * 1000)
                    return
                first = None
                async with client.stream("POST", f"{url}/v1/completions", json=body) as response:
                    async for line in response.aiter_lines():  # to the end: the slot is freed as it ends
                        if first is None and line.startswith("data: {"):
                            if any(c.get("text") for c in json.loads(line[6:])["choices"]):
                                first = (time.perf_counter() - began) * 1000
                if first is not None:
                    times.append(first)

        await asyncio.gather(*(one() for _ in range(count)))
    return times


def in_process(args: argparse.Namespace) -> None:
    """Time to first token of streamed answers vs the latency of whole answers, in-process backend."""
    sys.path.insert(0, str(Path(__file__).parent))
    from _quickstart import tiny_base

    from ctloop.training.tinymodel import random_adapter

    concurrency = args.concurrency[0] if args.concurrency != [1, 8, 32] else 8
    env = os.environ | {"OMP_NUM_THREADS": "1", "MLFLOW_DISABLE_TELEMETRY": "true"}
    base = tiny_base(Path(args.work))
    with tempfile.TemporaryDirectory(prefix="ctloop-stream-") as tmp:
        root = Path(tmp)
        port = free_port()
        config = root / "serve.yaml"
        config.write_text(
            yaml.safe_dump(
                {
                    "workspace": str(root / "ws"),
                    "model": {"base": str(base), "device": "cpu"},
                    "registry": {"model_name": "bench", "experiment": "bench"},
                    "serve": {"port": port, "max_tokens": 256},
                    "shadow": {"enabled": False},
                }
            )
        )
        register(config, root, adapter=random_adapter(base, root / "adapter", seed=1))
        server_log = (root / "serve.log").open("w")
        server = subprocess.Popen(
            [sys.executable, "-m", "ctloop", "serve", "--config", str(config)],
            stderr=server_log, stdout=server_log, text=True, env=env,
        )  # fmt: skip
        url = f"http://127.0.0.1:{port}"
        try:
            wait_up(f"{url}/healthz", server)
            asyncio.run(answers(url, concurrency, concurrency, True, args.tokens))  # warm up
            whole = asyncio.run(answers(url, args.streams, concurrency, False, args.tokens))
            first = asyncio.run(answers(url, args.streams, concurrency, True, args.tokens))
        finally:
            server.terminate()
            server.wait(timeout=60)
    print(
        f"in-process backend, the quickstart's tiny model; {args.streams} answers of up to {args.tokens} tokens, "
        f"{concurrency} at a time; cpu: {os.cpu_count()} cores shared with the client"
    )
    print(f"{'':<34} {'p50':>9} {'p99':>9}")
    print(f"{'whole answer, not streamed':<34} {quantile(whole, 0.5):>6.1f} ms {quantile(whole, 0.99):>6.1f} ms")
    print(f"{'first token, streamed':<34} {quantile(first, 0.5):>6.1f} ms {quantile(first, 0.99):>6.1f} ms")
    print(f"first token / whole answer at p50: {quantile(first, 0.5) / quantile(whole, 0.5):.2f}")


def serve_config(path: Path, workspace: Path, port: int, upstream: str, shadow: dict) -> Path:
    """A `ctloop serve` config in front of `upstream` (openai backend; the base model is never loaded)."""
    path.write_text(
        yaml.safe_dump(
            {
                "workspace": str(workspace),
                "model": {"base": "unused-with-the-openai-backend"},
                "registry": {"model_name": "bench", "experiment": "bench"},
                "serve": {"port": port, "backend": "openai", "upstream_url": f"{upstream}/v1"},
                "shadow": shadow,
            }
        )
    )
    return path


def register(config: Path, root: Path, adapter: Path | None = None) -> None:
    """Version 1 of `bench` as champion: `adapter`, or a stub the openai backend never reads."""
    from ctloop.config import load_config
    from ctloop.registry.client import open_registry
    from ctloop.registry.promotion import promote
    from ctloop.workspace import Workspace

    cfg = load_config(config)
    if adapter is None:
        adapter = root / "adapter"
        adapter.mkdir()
        (adapter / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 4}')
    workspace = Workspace(cfg.workspace).create()
    registry = open_registry(cfg.registry, workspace)
    registry.register_adapter_dir(adapter, "bench-1", {"ctloop.gate": "PASS"}, "benchmark version")
    promote(registry, 1, by="benchmark", note="champion")


if __name__ == "__main__":
    main()
