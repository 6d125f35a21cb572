"""Forgetting across cycles whose topic shifts, for several replay ratios, side by side.

    OMP_NUM_THREADS=1 python benchmarks/forgetting.py [--ratios 0 0.05 0.1 0.25] [--epochs 2] [--seeds 3]

Eras (Debian package descriptions shipped with the quickstart): python -> perl -> games ->
sound + graphics. Each cycle continues the previous adapter (warm start, like `train.init:
champion`) on the new era's training rows plus a replay sample of earlier eras at the given token
ratio, with ctloop's replay buffer and trainer. After every cycle the adapter is scored (mean
completion-token loss) on every era's held-out rows.

- forgetting of era j after the last cycle = loss_last(j) - loss_j(j) (how much worse than right
  after learning it), averaged over the earlier eras;
- new-era gain of cycle k = loss_{k-1}(k) - loss_k(k), averaged over cycles 2..K.

Target (issue): the default replay ratio cuts average forgetting by at least half compared with
no replay while keeping at least 90% of the new-era gain. Figures printed last; an HTML report
with the table and a plot is written next to the results.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np

from ctloop.config import EvalConfig, LoraConfig, ModelConfig, ReplayConfig, TrainConfig
from ctloop.data.records import Record, record_from_fields
from ctloop.data.replay import ReplayBuffer, build_training_set
from ctloop.evaluation.evaluate import evaluate

QUICKSTART = Path(__file__).resolve().parents[1] / "src" / "ctloop" / "quickstart"
ERAS = {"python": {"python"}, "perl": {"perl"}, "games": {"games"}, "sound+graphics": {"sound", "graphics"}}


def load_eras(holdout: int) -> dict[str, tuple[list[Record], list[Record]]]:
    rows = []
    for name in ("old_domain.jsonl", "new_domain.jsonl"):
        for line in (QUICKSTART / name).read_bytes().splitlines():
            try:
                rows.append(record_from_fields(json.loads(line)))
            except Exception:  # the shipped files include deliberately broken rows
                continue
    eras = {}
    for era, sections in ERAS.items():
        picked = [r for r in rows if r.source in sections]
        eras[era] = (picked[holdout:], picked[:holdout])
    return eras


def base_model(work: Path) -> Path:
    from ctloop.training.tinymodel import TinyModelSpec, build_tiny_model

    texts = [
        json.loads(line)["prompt"] + json.loads(line)["completion"]
        for line in (QUICKSTART / "pretrain.jsonl").read_text().splitlines()
    ]
    return build_tiny_model(texts, work / "base", TinyModelSpec(pretrain_steps=300))


def run(ratio: float, eras, base: Path, work: Path, args, seed: int) -> list[dict[str, float]]:
    """Scores after each cycle: a list (one per cycle) of {era: loss}."""
    from ctloop.training.trainer import train_adapter

    model = ModelConfig(base=str(base), max_seq_tokens=128)
    folder = work / f"replay-{ratio}-{seed}"
    shutil.rmtree(folder, ignore_errors=True)  # a buffer left by an earlier run would replay in cycle 1
    buffer = ReplayBuffer(folder)
    replay = ReplayConfig(ratio=ratio, enabled=ratio > 0, holdout_rows=0)
    counts = _token_counter(base)
    scores: list[dict[str, float]] = []
    adapter = None
    for k, (era, (train, _)) in enumerate(eras.items()):
        tokens = {r.id: n for r, n in zip(train, counts(train), strict=True)}
        mix = build_training_set(train, tokens, buffer.rows(), replay, seed=100 * seed + k)
        out = work / f"adapter-{ratio}-{seed}-{k}"
        epochs = args.epochs
        if args.compute_matched:  # the same tokens, so the same optimizer steps, as training on the era alone
            mixed_tokens = sum(counts(mix.records))
            epochs = args.epochs * sum(tokens.values()) / mixed_tokens
        train_adapter(
            mix.records,
            model=model,
            lora=LoraConfig(),
            train=TrainConfig(
                epochs=epochs, learning_rate=3e-3, batch_tokens=1024, checkpoint_every=0, seed=100 * seed + k
            ),
            out_dir=out,
            warm_start_from=adapter,
        )
        adapter = out
        buffer.add_cycle(era, train, [], tokens)
        report = evaluate(
            {name: held for name, (_, held) in eras.items()}, {"adapter": adapter}, model=model, config=EvalConfig()
        )
        scores.append({name: report.mean(name, "adapter") for name in eras})
        print(
            f"seed {seed} ratio {ratio}: after {era}: " + ", ".join(f"{n} {v:.3f}" for n, v in scores[-1].items()),
            flush=True,
        )
    return scores


def _token_counter(base: Path):
    from ctloop.model.batching import token_counter
    from ctloop.model.loading import load_tokenizer

    count = token_counter(load_tokenizer(ModelConfig(base=str(base))))
    return lambda records: [
        p + c + 2
        for p, c in zip(count([r.prompt for r in records]), count([r.completion for r in records]), strict=True)
    ]


def summarise(scores: list[dict[str, float]], eras: list[str]) -> tuple[float, float]:
    last = scores[-1]
    forgetting = [last[era] - scores[j][era] for j, era in enumerate(eras[:-1])]
    gains = [scores[k - 1][eras[k]] - scores[k][eras[k]] for k in range(1, len(eras))]
    return sum(forgetting) / len(forgetting), sum(gains) / len(gains)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.0, 0.05, 0.1, 0.25])
    parser.add_argument("--default-ratio", type=float, default=0.25, help="ctloop's default replay.ratio")
    parser.add_argument("--epochs", type=float, default=2)
    parser.add_argument("--holdout", type=int, default=60)
    parser.add_argument("--seeds", type=int, default=5, help="runs per ratio (training and replay seeds)")
    parser.add_argument(
        "--compute-matched",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="train every ratio on as many tokens (optimizer steps) as no replay; --no-compute-matched: replay adds steps",
    )
    parser.add_argument("--work", default="/tmp/ctloop-forgetting")
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    eras = load_eras(args.holdout)
    base = base_model(work)
    started = time.perf_counter()
    names = list(eras)
    runs = {ratio: [run(ratio, eras, base, work, args, seed) for seed in range(args.seeds)] for ratio in args.ratios}
    # one run is noisy (a few hundred rows per era): scores are averaged over seeds
    results = {
        ratio: [
            {era: sum(scores[k][era] for scores in per_seed) / len(per_seed) for era in names}
            for k in range(len(names))
        ]
        for ratio, per_seed in runs.items()
    }
    summary = {ratio: summarise(scores, names) for ratio, scores in results.items()}
    per_seed = {ratio: [summarise(scores, names) for scores in seeds] for ratio, seeds in runs.items()}
    write_report(work / "forgetting.html", results, summary, names)

    matched = (
        "compute-matched (every ratio trains on the era's own token count)"
        if args.compute_matched
        else ("replay adds tokens and steps")
    )
    print(
        f"\neras: {' -> '.join(names)}; warm-started adapter, {args.epochs} epochs of the era's tokens per cycle, "
        f"{matched}; {args.seeds} seeds, mean and 95% t-interval over seeds; {time.perf_counter() - started:.0f} s"
    )
    print(f"{'replay ratio':>12s} {'avg forgetting':>28s} {'avg new-era gain':>28s}")
    for ratio, pairs in per_seed.items():
        forgetting, gain = mean_interval([f for f, _ in pairs]), mean_interval([g for _, g in pairs])
        print(f"{ratio:12.2f} {forgetting:>28s} {gain:>28s}")
    if 0.0 in per_seed and args.default_ratio in per_seed:
        none, default = np.array(per_seed[0.0]), np.array(per_seed[args.default_ratio])
        kept_forgetting = ratio_interval(default[:, 0], none[:, 0])
        kept_gain = ratio_interval(default[:, 1], none[:, 1])
        print(
            f"default ratio {args.default_ratio}: forgetting {kept_forgetting} of no-replay's (target <= 50%), "
            f"new-era gain {kept_gain} of no-replay's (target >= 90%); ratios of means, 95% bootstrap over seeds"
        )
    print(f"report: {work / 'forgetting.html'}")


def mean_interval(values: list[float]) -> str:
    from scipy import stats

    array = np.array(values)
    half = stats.t.ppf(0.975, len(array) - 1) * array.std(ddof=1) / np.sqrt(len(array)) if len(array) > 1 else np.nan
    return f"{array.mean():.4f} [{array.mean() - half:.4f}, {array.mean() + half:.4f}]"


def ratio_interval(numerator: np.ndarray, denominator: np.ndarray, resamples: int = 10_000) -> str:
    """mean(numerator) / mean(denominator), with a bootstrap interval that resamples seeds in pairs."""
    rng = np.random.default_rng(0)
    picks = rng.integers(0, len(numerator), size=(resamples, len(numerator)))
    ratios = numerator[picks].mean(axis=1) / denominator[picks].mean(axis=1)
    low, high = np.quantile(ratios, [0.025, 0.975])
    return f"{numerator.mean() / denominator.mean():.0%} [{low:.0%}, {high:.0%}]"


def write_report(path: Path, results, summary, names: list[str]) -> None:
    from ctloop.reports.charts import grouped_bars
    from ctloop.reports.page import Table, write_page

    sections = [
        (
            "Summary",
            [
                Table(
                    tuple(
                        (f"ratio {r}", f"avg forgetting {f:.4f}, avg new-era gain {g:.4f}")
                        for r, (f, g) in summary.items()
                    )
                )
            ],
        ),
        (
            "Forgetting by ratio",
            [
                grouped_bars(
                    "average forgetting (lower is better)",
                    {f"ratio {r}": {"forgetting": max(f, 0.0)} for r, (f, _) in summary.items()},
                    "loss increase",
                )
            ],
        ),
    ]
    for ratio, scores in results.items():
        sections.append(
            (
                f"ratio {ratio}: loss on each era after the last cycle",
                [
                    grouped_bars(
                        "mean completion loss",
                        {
                            era: {"after last cycle": scores[-1][era], "right after learning it": scores[j][era]}
                            for j, era in enumerate(names)
                        },
                        "loss",
                    )
                ],
            )
        )
    write_page(path, "ctloop forgetting benchmark", sections)


if __name__ == "__main__":
    main()
