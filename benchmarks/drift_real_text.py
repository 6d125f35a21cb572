"""Drift on real text: Debian package summaries embedded with all-MiniLM-L6-v2, ctloop's default
detectors (mmd + mean, Holm, alpha 0.05) side by side with the seed's trigger (mean-embedding
distance > 0.1) on the same samples.

    OMP_NUM_THREADS=1 python benchmarks/drift_real_text.py [--trials 200] [--n 1000]

Per trial, from libs + libdevel (12,260 rows): a reference of --n rows and a disjoint current
sample of --n rows (null: must not be flagged); a current sample of games rows (a new domain,
drawn from the 1,108 games rows, so shifted trials share rows); and a current sample with
--mix-share of its rows from games (a shift near what --n rows can detect). Every trial is
pooled; rates come with Clopper-Pearson 95% intervals, effect sizes as MMD^2 and mean distance.
Reads the JSONL named by CTLOOP_BENCH_DATA (package, section, description) and stops, saying so,
when it is unset. Figures printed last.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
from _debian_text import sections
from _intervals import interval

from ctloop.config import DriftConfig
from ctloop.drift.detectors import detect_drift


def seed_check(reference: np.ndarray, current: np.ndarray, threshold: float = 0.1) -> tuple[bool, float]:
    """The seed's trigger: distance between mean embeddings above a fixed threshold."""
    distance = float(np.linalg.norm(reference.mean(axis=0) - current.mean(axis=0)))
    return distance > threshold, distance


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=1000, help="rows per side")
    parser.add_argument("--trials", type=int, default=200)
    parser.add_argument("--mix-share", type=float, default=0.05, help="games share of the mixed current sample")
    parser.add_argument("--permutations", type=int, default=500)
    args = parser.parse_args()
    real = sections({"libs": ("libs", "libdevel"), "games": ("games",)})
    if real is None:
        sys.exit(
            "set CTLOOP_BENCH_DATA to a JSONL list of Debian package descriptions (package, section, "
            "description); this benchmark needs thousands of real rows per section"
        )
    libs, games = real["libs"], real["games"]
    config = DriftConfig(detectors=["mmd", "mean"], permutations=args.permutations)
    cases = ("null (libs vs libs)", f"mix ({args.mix_share:.0%} games)", "new domain (games)")
    ours = {case: 0 for case in cases}
    seed = {case: 0 for case in cases}
    distances: dict[str, list[float]] = {case: [] for case in cases}
    mmd: dict[str, list[float]] = {case: [] for case in cases}
    mixed_games = int(round(args.mix_share * args.n))
    started = time.perf_counter()
    for trial in range(args.trials):
        rng = np.random.default_rng(trial)
        order = rng.permutation(len(libs))
        reference = libs[order[: args.n]]
        null = libs[order[args.n : 2 * args.n]]
        mix = np.concatenate(
            [libs[order[2 * args.n : 3 * args.n - mixed_games]], games[rng.choice(len(games), mixed_games, False)]]
        )
        new = games[rng.choice(len(games), min(args.n, len(games)), replace=False)]
        for case, current in zip(cases, (null, mix, new), strict=True):
            report = detect_drift(reference, current, config.model_copy(update={"seed": trial}))
            flagged, distance = seed_check(reference, current)
            ours[case] += report.drift
            seed[case] += flagged
            distances[case].append(distance)
            mmd[case].append(next(d.statistic for d in report.detectors if d.name == "mmd"))
        if trial % 20 == 19:
            print(f"{trial + 1} trials, {time.perf_counter() - started:.0f} s; flagged so far: {ours}", flush=True)
    print(
        f"\nall-MiniLM-L6-v2 embeddings (unit norm, 384 dims) of Debian package summaries; {args.n} rows per side; "
        f"{args.trials} trials per case, all pooled; ctloop: mmd + mean (Holm), alpha 0.05, B = {args.permutations}; "
        "seed: mean-embedding distance > 0.1"
    )
    for case in cases:
        d, m = np.array(distances[case]), np.array(mmd[case])
        print(f"\n{case}:")
        print(f"  ctloop flagged: {interval(ours[case], args.trials)}")
        print(f"  seed flagged:   {interval(seed[case], args.trials)}")
        print(
            f"  effect: mean distance median {np.median(d):.4f} (5-95%: {np.quantile(d, 0.05):.4f}-"
            f"{np.quantile(d, 0.95):.4f}); MMD^2 median {np.median(m):.2e} (5-95%: {np.quantile(m, 0.05):.2e}-"
            f"{np.quantile(m, 0.95):.2e})"
        )


if __name__ == "__main__":
    main()
