"""The gate on A/A and A/B experiments: false promotions and power, ctloop's paired-bootstrap gate
vs a point-estimate gate on the same runs.

    OMP_NUM_THREADS=1 python benchmarks/gate_false_promotions.py [--repetitions 100]

Tiny base model (the quickstart's), data from the quickstart's new domain (games, sound, graphics).
Each repetition draws its own holdout (200 rows) and training rows (600) from the new domain.
- A/A: champion and candidate are trained on the same data with different seeds; the candidate is
  not better, so every PASS is a false promotion.
- A/B near the margin (power): the champion is trained on a quarter of the candidate's rows
  (--near-rows), an improvement of a few percent, near the default 1% margin plus the gate's noise.
- A/B far (power): the champion is trained on the old domain (Python/Perl packages).
Both gates run with the defaults (new-data improvement >= 1%, `gate.seed_spread` 0.5%) and with
margin 0 ("any improvement"); the point-estimate gate compares two means, ctloop's gate the
one-sided 95% paired-bootstrap bound. All repetitions are pooled; rates come with Clopper-Pearson
95% intervals. Figures printed last.
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

from _intervals import interval
from _quickstart import records, tiny_base

from ctloop.config import EvalConfig, GateConfig, LoraConfig, ModelConfig, TrainConfig
from ctloop.evaluation.evaluate import evaluate
from ctloop.evaluation.gate import PASS, decide


def new_data_rule_passes(losses: dict, rules: GateConfig) -> bool:
    """The gate's new-data rule alone (this benchmark has no old data; the whole gate would call
    that INCONCLUSIVE, as it must with a champion)."""
    decision = decide(losses, rules, has_champion=True)
    return next(r for r in decision.rules if r.name == "new data").outcome == PASS


def main() -> None:
    from ctloop.training.trainer import train_adapter

    parser = argparse.ArgumentParser()
    parser.add_argument("--repetitions", type=int, default=100)
    parser.add_argument("--train-rows", type=int, default=600)
    parser.add_argument("--near-rows", type=int, default=150, help="A/B near the margin: the champion's rows")
    parser.add_argument("--work", default="/tmp/ctloop-gate-benchmark")
    args = parser.parse_args()
    work = Path(args.work)
    base = tiny_base(work)
    model = ModelConfig(base=str(base), max_seq_tokens=128)
    new, old = records("new_domain.jsonl"), records("old_domain.jsonl")
    old_train = old[: args.train_rows]
    rules = GateConfig()  # the defaults: min_new_improvement 0.01, seed_spread 0.005, 95% one-sided bound

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

    def gates(champion: Path, candidate: Path, holdout: list) -> tuple[bool, bool, float, bool, bool]:
        report = evaluate(
            {"new_holdout": holdout}, {"candidate": candidate, "champion": champion}, model=model, config=EvalConfig()
        )
        ref, cand = report.mean("new_holdout", "champion"), report.mean("new_holdout", "candidate")
        change = (ref - cand) / ref
        # Margin 1% (the default) and margin 0 ("any improvement", what a plain A/B comparison does).
        ctloop = new_data_rule_passes(report.losses, rules)
        ctloop_zero = new_data_rule_passes(report.losses, GateConfig(min_new_improvement=0.0))
        return ctloop, change >= rules.min_new_improvement, change, ctloop_zero, change > 0.0

    runs: dict[str, list] = {"A/A": [], "A/B near": [], "A/B far": []}
    for rep in range(args.repetitions):
        shuffled = random.Random(rep).sample(new, len(new))  # this repetition's holdout and training rows
        holdout, new_train = shuffled[:200], shuffled[200 : 200 + args.train_rows]
        candidate = adapter(new_train, seed=2 * rep, tag=f"new-r{rep}")
        runs["A/A"].append(gates(adapter(new_train, seed=2 * rep + 1, tag=f"new-r{rep}"), candidate, holdout))
        near = adapter(new_train[: args.near_rows], seed=2 * rep + 1, tag=f"near-r{rep}")
        runs["A/B near"].append(gates(near, candidate, holdout))
        runs["A/B far"].append(gates(adapter(old_train, seed=2 * rep, tag="old"), candidate, holdout))
        print(
            f"rep {rep}: "
            + "; ".join(f"{name} {r[-1][2]:+.2%} (ctloop {r[-1][0]}, point {r[-1][1]})" for name, r in runs.items()),
            flush=True,
        )

    n = args.repetitions
    print(
        f"\n{n} repetitions, each with its own 200 holdout rows; tiny model; rule: new-data improvement >= "
        f"{rules.min_new_improvement:.0%}, seed spread {rules.seed_spread:.1%}"
    )
    for name, rows in runs.items():
        changes = sorted(r[2] for r in rows)
        print(
            f"{name}: measured improvement median {changes[len(changes) // 2]:+.2%} "
            f"(5-95%: {changes[int(0.05 * n)]:+.2%} to {changes[int(0.95 * n) - 1]:+.2%})"
        )
    for label, k in (
        ("ctloop, margin 1% (95% paired bootstrap + seed spread)", 0),
        ("point estimate, margin 1%", 1),
        ("ctloop, margin 0 (95% paired bootstrap + seed spread)", 3),
        ("point estimate, margin 0", 4),
    ):
        print(f"\n{label}:")
        print(f"  A/A false promotions: {interval(sum(r[k] for r in runs['A/A']), n)}")
        print(f"  A/B near power:       {interval(sum(r[k] for r in runs['A/B near']), n)}")
        print(f"  A/B far power:        {interval(sum(r[k] for r in runs['A/B far']), n)}")
    print("\ntargets: false promotions <= 5%, power >= 80%")


if __name__ == "__main__":
    main()
