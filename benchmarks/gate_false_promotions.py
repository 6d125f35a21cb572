"""The gate on A/A and A/B experiments: false promotions and power, ctloop's paired-bootstrap gate
vs a point-estimate gate on the same runs.

    OMP_NUM_THREADS=1 python benchmarks/gate_false_promotions.py [--repetitions 20]

Tiny base model (the quickstart's), data from the quickstart's new domain (games, sound, graphics).
- A/A: champion and candidate are trained on the same data with different seeds; the candidate is
  not better, so every PASS is a false promotion.
- A/B (power): the champion is trained on the old domain (Python/Perl packages), the candidate on
  the new domain; on new-domain holdout rows the candidate is truly better.
Both gates run with the default margin (new-data improvement >= 1%) and with margin 0 ("any
improvement"); the point-estimate gate compares two means, ctloop's gate the one-sided 95%
paired-bootstrap bound. Figures printed last.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ctloop.config import EvalConfig, GateConfig, LoraConfig, ModelConfig, TrainConfig
from ctloop.data.records import record_from_fields
from ctloop.evaluation.evaluate import evaluate
from ctloop.evaluation.gate import decide

QUICKSTART = Path(__file__).resolve().parents[1] / "src" / "ctloop" / "quickstart"


def records(name: str) -> list:
    out = []
    for line in (QUICKSTART / name).read_bytes().splitlines():
        try:
            out.append(record_from_fields(json.loads(line)))
        except Exception:  # the shipped new-domain file holds a few deliberately broken rows
            continue
    return out


def main() -> None:
    from ctloop.training.tinymodel import TinyModelSpec, build_tiny_model
    from ctloop.training.trainer import train_adapter

    parser = argparse.ArgumentParser()
    parser.add_argument("--repetitions", type=int, default=20)
    parser.add_argument("--train-rows", type=int, default=600)
    parser.add_argument("--work", default="/tmp/ctloop-gate-benchmark")
    args = parser.parse_args()
    work = Path(args.work)
    texts = [
        json.loads(line)["prompt"] + json.loads(line)["completion"]
        for line in (QUICKSTART / "pretrain.jsonl").read_text().splitlines()
    ]
    base = build_tiny_model(texts, work / "base", TinyModelSpec(pretrain_steps=300))
    model = ModelConfig(base=str(base), max_seq_tokens=128)
    new, old = records("new_domain.jsonl"), records("old_domain.jsonl")
    holdout, new_train = new[:200], new[200 : 200 + args.train_rows]
    old_train = old[: args.train_rows]
    rules = GateConfig()  # the defaults: min_new_improvement 0.01, 95% one-sided bound

    def adapter(rows, seed: int, tag: str) -> Path:
        out = work / f"{tag}-{seed}"
        if not (out / "adapter_config.json").is_file():
            train_adapter(
                rows,
                model=model,
                lora=LoraConfig(),
                out_dir=out,
                train=TrainConfig(epochs=1, learning_rate=3e-3, batch_tokens=1024, seed=seed, checkpoint_every=0),
            )
        return out

    def gates(champion: Path, candidate: Path) -> tuple[bool, bool, float, bool, bool]:
        report = evaluate(
            {"new_holdout": holdout}, {"candidate": candidate, "champion": champion}, model=model, config=EvalConfig()
        )
        ref, cand = report.mean("new_holdout", "champion"), report.mean("new_holdout", "candidate")
        change = (ref - cand) / ref
        # Margin 1% (the default) and margin 0 ("any improvement", what a plain A/B comparison does).
        ctloop = decide(report.losses, rules, has_champion=True).passed
        ctloop_zero = decide(report.losses, GateConfig(min_new_improvement=0.0), has_champion=True).passed
        return ctloop, change >= rules.min_new_improvement, change, ctloop_zero, change > 0.0

    aa, ab = [], []
    for rep in range(args.repetitions):
        champion = adapter(new_train, seed=2 * rep, tag="new")
        aa.append(gates(champion, adapter(new_train, seed=2 * rep + 1, tag="new")))
        ab.append(gates(adapter(old_train, seed=2 * rep, tag="old"), champion))
        print(
            f"rep {rep}: A/A improvement {aa[-1][2]:+.2%} (ctloop {aa[-1][0]}, point {aa[-1][1]}); "
            f"A/B improvement {ab[-1][2]:+.2%} (ctloop {ab[-1][0]}, point {ab[-1][1]})",
            flush=True,
        )

    n = args.repetitions
    print(
        f"\n{n} repetitions; tiny model; {len(holdout)} holdout rows; rule: new-data improvement >= "
        f"{rules.min_new_improvement:.0%}"
    )
    print(f"{'gate':44s} {'A/A false promotions':>21s} {'A/B power':>10s}")
    for label, k in (
        ("ctloop, margin 1% (95% paired bootstrap)", 0),
        ("point estimate, margin 1%", 1),
        ("ctloop, margin 0 (95% paired bootstrap)", 3),
        ("point estimate, margin 0", 4),
    ):
        print(f"{label:44s} {sum(r[k] for r in aa) / n:21.0%} {sum(r[k] for r in ab) / n:10.0%}")
    print("targets: false promotions <= 5%, power >= 80%")


if __name__ == "__main__":
    main()
