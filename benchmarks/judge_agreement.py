"""How far each judge of answer pairs agrees with (simulated) users, as `ctloop judge calibrate` measures it.

    OMP_NUM_THREADS=1 python benchmarks/judge_agreement.py [--seeds 3]

Setup (the users and production of benchmarks/preference.py): the quickstart's tiny base model;
a champion SFT adapter trained on 300 new-domain rows; it answers each of 300 other prompts twice,
sampled at temperature 0.8. Simulated users rate each answer by its token F1 against the reference
answer (up above the median, flipped with probability 0.1) and correct half the answers they rate
down with the reference. The labelled pairs are what ctloop reads from a harvest: every correction
against the answer it corrected, and each prompt's answer rated up against its answer rated down.

Judges, each calibrated on the same pairs (Cohen's kappa with its 95% bootstrap interval, accuracy,
position-swap consistency, and whether the calibration trusts it at the defaults):
- likelihood: ctloop's built-in judge, the base model's log-probability per character of each answer;
- likelihood (champion): the same score under the champion's adapter (not shipped; for comparison);
- position: always the first answer (the bias the consistency floor exists for);
- coin: a fair coin;
- oracle: token F1 against the reference, which is what the users rated by, before their label noise.
Pairs are pooled over seeds (one calibration per judge over every seed's pairs). Printed last.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from pathlib import Path

from _quickstart import records, tiny_base
from preference import feedback, sample_answers

from ctloop.config import JudgeConfig, LoraConfig, ModelConfig, TrainConfig
from ctloop.evaluation.judge import LikelihoodJudge, calibrate, labelled_pairs
from ctloop.evaluation.textmetrics import token_f1


def main() -> None:
    from peft import PeftModel

    from ctloop.model.loading import load_base_model, load_tokenizer
    from ctloop.training.trainer import train_adapter

    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--prompts", type=int, default=300)
    parser.add_argument("--work", default="/tmp/ctloop-judge-benchmark")
    args = parser.parse_args()
    work = Path(args.work)
    started = time.monotonic()
    model = ModelConfig(base=str(tiny_base(work)), max_seq_tokens=128)
    new = [r for r in records("new_domain.jsonl") if r.prompt.strip() and r.completion.strip()]
    settings = JudgeConfig()
    pairs, references = [], {}
    for seed in range(args.seeds):
        rng = random.Random(seed)
        shuffled = rng.sample(new, len(new))
        champion = work / f"champion-{seed}"
        if not (champion / "adapter_config.json").is_file():
            train_adapter(
                shuffled[:300],
                model=model,
                lora=LoraConfig(),
                out_dir=champion,
                train=TrainConfig(epochs=2.0, learning_rate=3e-3, batch_tokens=1024, seed=seed, checkpoint_every=0),
            )
        asked = shuffled[300 : 300 + args.prompts] * 2  # two answers per prompt
        answers = sample_answers(model, champion, [r.prompt for r in asked], seed, 48)
        threshold = statistics.median(token_f1(a, r.completion) for a, r in zip(answers, asked, strict=True))
        harvest = feedback(asked, answers, threshold, rng)
        references |= {r.prompt: r.completion for r in asked}
        found = labelled_pairs(harvest)
        print(f"seed {seed}: {len(found)} labelled pairs ({sum(p.source == 'correction' for p in found)} corrections)")
        pairs += found

    base_judge = LikelihoodJudge.from_config(model, settings)
    tokenizer = load_tokenizer(model)
    champion_network = PeftModel.from_pretrained(load_base_model(model), str(work / "champion-0")).eval()
    champion_judge = LikelihoodJudge(champion_network, tokenizer, settings.instruction, settings.margin)
    coin = random.Random(1)

    def oracle(prompt: str, a: str, b: str) -> str:
        fa, fb = token_f1(a, references[prompt]), token_f1(b, references[prompt])
        return "tie" if fa == fb else "a" if fa > fb else "b"

    judges = {
        "likelihood": base_judge,
        "likelihood (champion-0's adapter)": champion_judge,
        "position": lambda p, a, b: "a",
        "coin": lambda p, a, b: coin.choice("ab"),
        "oracle (token F1)": oracle,
    }
    print(
        f"\n{len(pairs)} labelled pairs over {args.seeds} seeds; defaults: judge.min_agreement "
        f"{settings.min_agreement}, judge.min_consistency {settings.min_consistency}"
    )
    print(f"{'judge':<36} {'kappa [95% CI]':<24} {'accuracy':>9} {'ties':>6} {'consistency':>12}  trusted")
    for name, judge in judges.items():
        result = calibrate(judge, name, pairs, settings)
        low, high = result.kappa_interval
        print(
            f"{name:<36} {result.kappa:+.3f} [{low:+.3f}, {high:+.3f}]   {result.accuracy:>8.1%} "
            f"{result.tie_share:>6.1%} {result.consistency:>11.1%}  {'yes' if result.calibrated else 'no'}"
        )
    print(f"\n{time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    main()
