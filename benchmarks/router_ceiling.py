"""What `ctloop serve` costs per request in front of an engine: requests per CPU-second of the ctloop
process (openai backend, request log on, SQLite), shadowing off and on, against a trivial upstream
that answers at once, next to the same upstream called directly, in one run.

    OMP_NUM_THREADS=1 python benchmarks/router_ceiling.py [--seconds 10] [--clients 16]

The upstream and ctloop run in their own processes; the load generator (keep-alive HTTP on raw
asyncio streams, as in serve_load.py) in this one. CPU time is read from /proc/<pid>/stat (user +
system) before and after each run, so the figure is ctloop's own work per request, whatever the
client and the upstream cost. The target: at most 1 ms of CPU per request without
shadowing (1,000 requests per CPU-second) and 2 ms with it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_load import Connection  # noqa: E402  # the keep-alive load generator
from stream_latency import free_port, register, serve_config, wait_up  # noqa: E402

TICKS = os.sysconf("SC_CLK_TCK")


def upstream_app():
    from fastapi import FastAPI
    from fastapi.responses import Response

    app = FastAPI()
    answer = json.dumps(
        {
            "id": "up",
            "object": "text_completion",
            "choices": [{"index": 0, "text": " ok", "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6},
        }
    ).encode()

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": f"bench-v{v}", "object": "model"} for v in (1, 2)]}

    @app.post("/v1/completions")
    async def complete():
        return Response(answer, media_type="application/json")

    return app


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


async def load(url: str, model: str, seconds: float, clients: int) -> int:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    body = json.dumps({"model": model, "prompt": "Package: libsdl2-mixer\nDescription:", "max_tokens": 4}).encode()
    done = 0
    deadline = time.perf_counter() + seconds

    async def client() -> None:
        nonlocal done
        connection = Connection(host, int(port))
        try:
            while time.perf_counter() < deadline:
                status, _ = await connection.post("/v1/completions", body)
                done += status == 200
        finally:
            await connection.close()

    await asyncio.gather(*(client() for _ in range(clients)))
    return done


def measure(url: str, model: str, pid: int, seconds: float, clients: int) -> tuple[float, float]:
    """(requests/s, requests per CPU-second of `pid`)."""
    asyncio.run(load(url, model, 1.0, clients))  # warm-up
    cpu, wall = cpu_seconds(pid), time.perf_counter()
    done = asyncio.run(load(url, model, seconds, clients))
    cpu, wall = cpu_seconds(pid) - cpu, time.perf_counter() - wall
    return done / wall, done / max(cpu, 1e-9)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--serve-upstream", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_upstream is not None:
        import uvicorn

        uvicorn.run(upstream_app(), port=args.serve_upstream, log_level="warning", http="httptools")
        return
    env = os.environ | {"OMP_NUM_THREADS": "1", "MLFLOW_DISABLE_TELEMETRY": "true"}
    with tempfile.TemporaryDirectory(prefix="ctloop-router-") as tmp:
        root = Path(tmp)
        up_port = free_port()
        upstream = subprocess.Popen(
            [sys.executable, __file__, "--serve-upstream", str(up_port)], stderr=subprocess.DEVNULL, env=env
        )
        servers = []
        try:
            up = f"http://127.0.0.1:{up_port}"
            wait_up(f"{up}/v1/models", upstream)
            rows = [("upstream directly", up, "bench-v1", upstream.pid)]
            for shadow in (False, True):
                port = free_port()
                store = f"sqlite:///{root / f'log-{shadow}.db'}"
                config = serve_config(
                    root / f"serve-{shadow}.yaml", root / "ws", port, up, {"enabled": shadow, "store_url": store}
                )
                if not shadow:
                    register(config, root)
                    _challenger(config)
                log = (root / f"serve-{shadow}.log").open("w")
                server = subprocess.Popen(
                    [sys.executable, "-m", "ctloop", "serve", "--config", str(config)], stdout=log, stderr=log, env=env
                )
                servers.append(server)
                wait_up(f"http://127.0.0.1:{port}/healthz", server)
                label = f"ctloop, shadowing {'on' if shadow else 'off'}"
                rows.append((label, f"http://127.0.0.1:{port}", "bench", server.pid))
            print(
                f"{args.clients} keep-alive clients, {args.seconds:g} s per run; cpu: {os.cpu_count()} cores shared by all"
            )
            print(f"{'':<26}{'requests/s':>11}{'per CPU-second':>16}{'CPU ms/request':>16}")
            for label, url, model, pid in rows:
                rate, per_cpu = measure(url, model, pid, args.seconds, args.clients)
                print(f"{label:<26}{rate:>11.0f}{per_cpu:>16.0f}{1000 / per_cpu:>16.2f}")
        finally:
            for process in (*servers, upstream):
                process.terminate()
                process.wait(timeout=60)


def _challenger(config: Path) -> None:
    """v2 as challenger, so shadowing has someone to mirror to (the same upstream serves it)."""
    from ctloop.config import load_config
    from ctloop.registry.client import CHALLENGER, open_registry
    from ctloop.workspace import Workspace

    cfg = load_config(config)
    registry = open_registry(cfg.registry, Workspace(cfg.workspace))
    adapter = Path(str(cfg.workspace)).parent / "adapter2"
    adapter.mkdir(exist_ok=True)
    (adapter / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 4}')
    registry.register_adapter_dir(adapter, "bench-2", {"ctloop.gate": "PASS"}, "benchmark challenger")
    registry.set_alias(CHALLENGER, 2)


if __name__ == "__main__":
    main()
