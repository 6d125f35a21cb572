"""Publishing to a real vLLM server, checked end to end on a GPU host.

    python benchmarks/vllm_publish.py [--port 8765] [--dtype float32] [--max-tokens 16]

Where a CUDA GPU and vLLM are present, it builds the tiny model and two LoRA adapters, registers
them as versions 1 and 2 in a local MLflow registry, starts vLLM's OpenAI server on BASE with `--enable-lora` with
runtime LoRA updating on, and publishes both versions through ctloop's publish targets (a `directory`
copy, then the `vllm` runtime LoRA API with a `lora_path` template into that directory). It then
asks vLLM for `<name>-v1` and `<name>-v2` and compares each greedy answer with ctloop's own
in-process backend (CPU, fp32, the same adapter files). It prints the publish outcome per replica,
the publish time per version, and the answers that match; exit code 1 when a publish failed or an
answer differs. vLLM decodes on the GPU and ctloop on the CPU: in float32 the greedy tokens should
agree; a difference names the prompt and the first token where they part.

Without a CUDA GPU it says so and exits 0 (vLLM's LoRA serving needs one); with a GPU but no vLLM it
says how to install it and exits 1.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

QUICKSTART = Path(__file__).resolve().parents[1] / "src" / "ctloop" / "quickstart"
MODEL_NAME = "bench"


def gpu_and_vllm() -> tuple[bool, str]:
    import importlib.util

    import torch

    if not torch.cuda.is_available():
        return False, "no CUDA GPU on this machine: the vLLM publish check needs one; skipped"
    if importlib.util.find_spec("vllm") is None:
        return True, "a GPU is here but vLLM is not installed: pip install vllm, then run this again"
    return True, ""


def start_vllm(base: Path, port: int, dtype: str, log: Path) -> subprocess.Popen:
    env = dict(os.environ, VLLM_ALLOW_RUNTIME_LORA_UPDATING="True")
    command = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(base),
        "--port",
        str(port),
        "--enable-lora",
        "--max-lora-rank",
        "8",
        "--max-loras",
        "4",
        "--dtype",
        dtype,
        "--max-model-len",
        "256",
        "--gpu-memory-utilization",
        "0.3",
        "--enforce-eager",
    ]
    return subprocess.Popen(command, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)


def wait_until_up(url: str, server: subprocess.Popen, log: Path, seconds: float = 900) -> None:
    import httpx

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"vLLM exited with code {server.returncode}; its log:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{url}/v1/models", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise SystemExit(f"vLLM did not come up within {seconds:.0f} s; its log:\n{log.read_text()[-3000:]}")


def vllm_answer(url: str, model: str, prompt: str, max_tokens: int) -> str:
    import httpx

    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
    response = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
    response.raise_for_status()
    return response.json()["choices"][0]["text"]


def first_difference(a: str, b: str) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--dtype", default="float32", help="vLLM's --dtype (ctloop's reference runs in float32)")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--prompts", type=int, default=20)
    args = parser.parse_args()

    has_gpu, problem = gpu_and_vllm()
    if problem:
        print(problem)
        return 0 if not has_gpu else 1

    import yaml

    from ctloop.config import load_config
    from ctloop.registry.client import open_registry
    from ctloop.registry.publishing import make_publisher
    from ctloop.serving.backends import GenerationRequest, InProcessBackend
    from ctloop.serving.batching import BatchLimits
    from ctloop.training.tinymodel import TinyModelSpec, build_tiny_model, random_adapter
    from ctloop.workspace import Workspace

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        texts = [json.loads(line) for line in (QUICKSTART / "pretrain.jsonl").read_text().splitlines()]
        base = build_tiny_model([r["prompt"] + r["completion"] for r in texts], root / "base", TinyModelSpec())
        prompts = [
            json.loads(line)["prompt"]
            for line in (QUICKSTART / "old_domain.jsonl").read_text().splitlines()[: args.prompts]
        ]
        url = f"http://127.0.0.1:{args.port}"
        shared = root / "adapters"  # the volume vLLM reads adapters from
        shared.mkdir()
        config_path = root / "ctloop.yaml"
        config_path.write_text(
            yaml.safe_dump(
                {
                    "workspace": str(root / "ws"),
                    "model": {"base": str(base)},
                    "registry": {"model_name": MODEL_NAME, "experiment": MODEL_NAME},
                    "publish": {
                        "targets": [
                            {"kind": "directory", "path": str(shared)},
                            {"kind": "vllm", "urls": [url], "path": str(shared / "{name}-v{version}")},
                        ]
                    },
                }
            )
        )
        config = load_config(config_path)
        workspace = Workspace(config.workspace).create()
        registry = open_registry(config.registry, workspace)
        adapters = {}
        for version in (1, 2):
            adapters[version] = random_adapter(base, root / f"adapter{version}", seed=version)
            registry.register_adapter_dir(adapters[version], f"bench-{version}", {}, f"vllm_publish adapter {version}")

        log = root / "vllm.log"
        server = start_vllm(base, args.port, args.dtype, log)
        try:
            started = time.perf_counter()
            wait_until_up(url, server, log)
            print(f"vLLM up in {time.perf_counter() - started:.0f} s ({args.dtype}, --enable-lora)")
            publisher = make_publisher(config.publish, registry, workspace)
            ok = True
            for version in (1, 2):
                began = time.perf_counter()
                result = publisher.publish(version)
                print(f"publish v{version} in {time.perf_counter() - began:.2f} s: {result.summary()}")
                for outcome in result.outcomes:
                    print(f"  {outcome.target}: {'ok' if outcome.ok else 'FAILED'} ({outcome.detail})")
                ok &= result.enough("all")
            if not ok:
                return 1
            answers = {
                version: [vllm_answer(url, f"{MODEL_NAME}-v{version}", p, args.max_tokens) for p in prompts]
                for version in (1, 2)
            }
        finally:
            server.send_signal(signal.SIGINT)
            try:
                server.wait(60)
            except subprocess.TimeoutExpired:
                server.kill()

        reference = InProcessBackend(config.model, BatchLimits(16, 8192))
        for version, folder in adapters.items():
            reference.load(version, folder)

        async def ctloop_answers(version: int) -> list[str]:
            requests = [GenerationRequest(prompt=p, max_tokens=args.max_tokens) for p in prompts]
            return [g.text for g in await asyncio.gather(*(reference.generate(r, version) for r in requests))]

        failures = 0
        for version in (1, 2):
            ours = asyncio.run(ctloop_answers(version))
            same = sum(a == b for a, b in zip(ours, answers[version], strict=True))
            print(f"v{version}: {same} of {len(prompts)} greedy answers equal ctloop's own")
            for prompt, a, b in zip(prompts, ours, answers[version], strict=True):
                if a != b:
                    failures += 1
                    at = first_difference(a, b)
                    print(f"  differs at character {at} for {prompt[:40]!r}: ctloop {a!r} vs vLLM {b!r}")
        if answers[1] == answers[2]:
            print("the two versions gave the same answers: vLLM did not apply the adapters")
            return 1
        return 0 if failures == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
