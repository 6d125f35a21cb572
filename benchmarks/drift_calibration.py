"""Drift detectors: false-alarm rate over null trials and power at a small shift, side by side
with the seed's fixed-threshold check (mean-embedding distance > 0.1).

    OMP_NUM_THREADS=1 python benchmarks/drift_calibration.py [--trials 500] [--n 500] [--dim 384]

Null: both samples N(0, I_d). Shift: +delta on the first 5 coordinates of the current sample;
the default delta (0.32 at n=500) has the difficulty of delta=0.1 at n=5,000 (n * delta^2 equal).
A calibrated test at alpha 0.05 falls in [0.03, 0.07] with probability 0.97 over 500 trials.
Figures are printed last.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from ctloop.config import DriftConfig
from ctloop.drift.detectors import DETECTORS, detect_drift


def seed_check(reference: np.ndarray, current: np.ndarray, threshold: float = 0.1) -> bool:
    """The seed's trigger: distance between mean embeddings above a fixed threshold."""
    return float(np.linalg.norm(reference.mean(axis=0) - current.mean(axis=0))) > threshold


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--trials", type=int, default=500)
    parser.add_argument("--power-trials", type=int, default=100)
    parser.add_argument("--n", type=int, default=500)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--delta", type=float, default=0.32)
    parser.add_argument("--permutations", type=int, default=200)
    parser.add_argument("--seed-offset", type=int, default=0, help="another set of null data sets")
    parser.add_argument("--detectors", nargs="+", default=[*DETECTORS, "default"])
    args = parser.parse_args()

    rows = {}
    for name in [n if n != "default" else "default set (mmd+mean, Holm)" for n in args.detectors]:
        detectors = ["mmd", "mean"] if name.startswith("default") else [name]
        config = DriftConfig(detectors=detectors, permutations=args.permutations, min_rows=10, max_rows=10**7)
        started = time.perf_counter()
        false_alarms = sum(detect_drift(*sample(args, trial, 0.0), config).drift for trial in range(args.trials))
        hits = sum(
            detect_drift(*sample(args, 10**6 + trial, args.delta), config).drift for trial in range(args.power_trials)
        )
        seconds = (time.perf_counter() - started) / (args.trials + args.power_trials)
        rows[name] = (false_alarms / args.trials, hits / args.power_trials, seconds)
        print(f"{name}: false alarms {rows[name][0]:.3f}, power {rows[name][1]:.2f}", flush=True)
    seed_fa = sum(seed_check(*sample(args, t, 0.0)) for t in range(args.trials)) / args.trials
    seed_power = (
        sum(seed_check(*sample(args, 10**6 + t, args.delta)) for t in range(args.power_trials)) / args.power_trials
    )

    print(
        f"\nn = {args.n} per side, d = {args.dim}, alpha 0.05, {args.trials} null trials, "
        f"{args.power_trials} shifted trials (delta {args.delta} on 5 dims), B = {args.permutations}"
    )
    print(f"{'detector':32s} {'false alarms':>12s} {'in [0.03,0.07]':>15s} {'power':>6s} {'s/trial':>8s}")
    for name, (fa, power, seconds) in rows.items():
        print(f"{name:32s} {fa:12.3f} {str(0.03 <= fa <= 0.07):>15s} {power:6.2f} {seconds:8.3f}")
    print(f"{'seed: ||mean diff|| > 0.1':32s} {seed_fa:12.3f} {str(0.03 <= seed_fa <= 0.07):>15s} {seed_power:6.2f}")


def sample(args: argparse.Namespace, seed: int, delta: float) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed + args.seed_offset)
    reference = rng.standard_normal((args.n, args.dim), dtype=np.float32)
    current = rng.standard_normal((args.n, args.dim), dtype=np.float32)
    current[:, :5] += delta
    return reference, current


if __name__ == "__main__":
    main()
