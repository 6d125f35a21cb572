"""One decoding step of the continuous batcher: peft's own forward vs ctloop's, side by side in one run.

    OMP_NUM_THREADS=1 python benchmarks/decode_step.py [--rows 8] [--steps 40] [--rounds 7]

The tiny serving model (the one `serve_load.py` uses) with two random LoRA adapters, a running
batch of `--rows` sequences (real prompts of different lengths, so the cache is left-padded), and
one token decoded for every row per step, on one adapter and on both (mixed, rows alternating).

- peft: the model's forward with peft's LoRA layers; one adapter through `set_adapter`, mixed
  batches through peft's `adapter_names=` (what a batcher built on peft's API does);
- routed: ctloop's routed LoRA forward (`ctloop.kernels.lora`), through the model's forward;
- routed + lean: the routed forward and the lean Llama step (`ctloop.serving.decode`), what
  `ctloop serve` runs.

Each configuration decodes the same tokens (checked). Rounds alternate the configurations; the
figure per configuration is the median over rounds of each round's mean ms per step, and the
ratios are taken per round. Printed last.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

QUICKSTART = Path(__file__).resolve().parents[1] / "src" / "ctloop" / "quickstart"
CONFIGS = ("peft", "routed", "routed + lean")


def main() -> None:
    import torch

    from ctloop.config import ModelConfig
    from ctloop.model.batching import prompt_token_ids
    from ctloop.serving.backends import GenerationRequest, InProcessBackend
    from ctloop.serving.batching import BatchLimits, Sequence, _AdapterRouting, _Batch, _prefill
    from ctloop.training.tinymodel import TinyModelSpec, build_tiny_model, random_adapter

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--steps", type=int, default=40, help="decoding steps per round")
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = [json.loads(line) for line in (QUICKSTART / "pretrain.jsonl").read_text().splitlines()]
    prompts = [json.loads(line)["prompt"] for line in (QUICKSTART / "old_domain.jsonl").read_text().splitlines()]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        base = build_tiny_model(
            [r["prompt"] + r["completion"] for r in rows], root / "base", TinyModelSpec(pretrain_steps=30)
        )
        adapters = {v: random_adapter(base, root / f"v{v}", seed=v) for v in (1, 2)}
        backends = {}
        for name in ("peft", "routed"):  # two copies of the model: peft's layers stay peft's in the first
            backends[name] = InProcessBackend(ModelConfig(base=str(base)), BatchLimits(1, 8192))
            for version, folder in adapters.items():
                backends[name].load(version, folder)
        routing = _AdapterRouting()
        tokenizer = backends["peft"].tokenizer

        def fresh_batch(names: list[str]) -> _Batch:
            """The same prefilled batch for every configuration (the two model copies have the same weights)."""
            sequences = [
                Sequence(GenerationRequest(prompt=p, max_tokens=512), n, 0, i, prompt_token_ids(tokenizer, [p])[0])
                for i, (p, n) in enumerate(zip(prompts, names, strict=False))
            ]
            routing.use(backends["routed"].network, names)
            _prefill(backends["routed"].network, tokenizer.pad_token_id, sequences)
            batch = _Batch()
            batch.add(sequences)
            return batch

        def peft_step(batch: _Batch, network, names: list[str]) -> None:
            from transformers import DynamicCache

            rows_now = len(batch.sequences)
            device = batch.mask.device
            mask = torch.cat([batch.mask, torch.ones(rows_now, 1, dtype=batch.mask.dtype, device=device)], dim=1)
            cache = DynamicCache(ddp_cache_data=batch.layers)
            extra = {"adapter_names": names} if len(set(names)) > 1 else {}
            with torch.inference_mode():
                logits = network(
                    input_ids=torch.tensor([[s.generated[-1]] for s in batch.sequences]),
                    attention_mask=mask,
                    position_ids=torch.tensor([[s.cached_tokens] for s in batch.sequences]),
                    cache=cache,
                    use_cache=True,
                    **extra,
                ).logits[:, -1, :]
            batch.layers = [(layer.keys, layer.values) for layer in cache.layers]
            batch.mask = mask
            for sequence, token in zip(batch.sequences, logits.argmax(dim=-1).tolist(), strict=True):
                sequence.generated.append(token)

        def run(config: str, names: list[str]) -> tuple[float, list[list[int]]]:
            network = backends["peft" if config == "peft" else "routed"].network
            batch = fresh_batch(names)
            if config == "peft":
                network.set_adapter(names[0])
            started = time.perf_counter()
            for _ in range(args.steps):
                if config == "peft":
                    peft_step(batch, network, names)
                else:
                    routing.use(network, names)
                    batch.decode(network, routing.lean if config == "routed + lean" else None)
            return (time.perf_counter() - started) / args.steps * 1000, [s.generated for s in batch.sequences]

        results = {}
        for label, names in (
            ("one adapter", ["v1"] * args.rows),
            ("mixed", [("v1", "v2")[i % 2] for i in range(args.rows)]),
        ):
            for config in CONFIGS:
                run(config, names)  # warm-up
            times = {config: [] for config in CONFIGS}
            tokens = {}
            for _ in range(args.rounds):
                for config in CONFIGS:
                    ms, tokens[config] = run(config, names)
                    times[config].append(ms)
            agree = tokens["peft"] == tokens["routed"] == tokens["routed + lean"]
            results[label] = (times, agree)
        assert routing.lean is not None, "the lean step was refused on the tiny Llama"

    print(
        f"\n== one decoding step, tiny Llama (hidden 128, 4 layers), {args.rows} rows, {args.steps} steps per "
        f"round, {args.rounds} alternating rounds, 1 thread =="
    )
    print(f"{'batch':<13}{'configuration':<16}{'ms/step':>9}{'x peft':>8}{'per round':>14}  same tokens")
    for label, (times, agree) in results.items():
        for config in CONFIGS:
            ratios = [p / t for p, t in zip(times["peft"], times[config], strict=True)]
            print(
                f"{label:<13}{config:<16}{statistics.median(times[config]):9.2f}{statistics.median(ratios):8.2f}"
                f"{min(ratios):>8.2f}-{max(ratios):<5.2f}  {'yes' if agree else 'NO'}"
            )


if __name__ == "__main__":
    main()
