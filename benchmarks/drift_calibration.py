"""Drift detectors: false-alarm rate over null trials and power at a small shift, side by side
with the seed's fixed-threshold check (mean-embedding distance > 0.1).

    OMP_NUM_THREADS=1 python benchmarks/drift_calibration.py [--trials 500] [--n 500]

Data: unit-norm 384-d embeddings shaped like real sentence embeddings, so that the seed's fixed
threshold meets the distances it would see in production: each row is normalise(m + G z), z
standard normal, with the mean direction m and the covariance G G' of all-MiniLM-L6-v2 on Debian
package summaries (|m| = 0.49, trace 0.76, about 90 effective dimensions; fitted on the real
embeddings when CTLOOP_BENCH_DATA is set, else the same figures as a power-law spectrum). With
no drift, two samples of 500 rows have mean embeddings about 0.055 apart. Shift: the current
sample's m moves by --delta along a random direction. Every trial of every run is pooled; a
false-alarm rate comes with its Clopper-Pearson 95% interval (a calibrated test at alpha 0.05
covers 0.05). Figures are printed last.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from _intervals import interval

from ctloop.config import DriftConfig
from ctloop.drift.detectors import DETECTORS, detect_drift


def seed_check(reference: np.ndarray, current: np.ndarray, threshold: float = 0.1) -> bool:
    """The seed's trigger: distance between mean embeddings above a fixed threshold."""
    return float(np.linalg.norm(reference.mean(axis=0) - current.mean(axis=0))) > threshold


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--trials", type=int, default=500)
    parser.add_argument("--power-trials", type=int, default=200)
    parser.add_argument("--n", type=int, default=500)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--delta", type=float, default=0.04, help="shift of the current sample's mean direction")
    parser.add_argument("--permutations", type=int, default=200)
    parser.add_argument("--detectors", nargs="+", default=[*DETECTORS, "default"])
    args = parser.parse_args()
    args.seed_offset = 0
    args.model = EmbeddingModel(args.dim)

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
        rows[name] = (false_alarms, hits, seconds)
        print(f"{name}: false alarms {false_alarms}/{args.trials}, power {hits}/{args.power_trials}", flush=True)
    seed_fa = sum(seed_check(*sample(args, t, 0.0)) for t in range(args.trials))
    seed_power = sum(seed_check(*sample(args, 10**6 + t, args.delta)) for t in range(args.power_trials))
    null_distance = np.median(
        [np.linalg.norm(np.subtract(*(s.mean(axis=0) for s in sample(args, t, 0.0)))) for t in range(50)]
    )

    print(
        f"\n{args.model.source}; n = {args.n} per side, d = {args.dim}, alpha 0.05, {args.trials} null trials, "
        f"{args.power_trials} shifted trials (mean direction moved by {args.delta}), B = {args.permutations}; "
        f"one run, every trial pooled; median no-drift mean distance {null_distance:.4f}"
    )
    print(f"{'detector':32s} {'false alarms [95% CI]':>44s} {'power [95% CI]':>44s} {'s/trial':>8s}")
    for name, (fa, power, seconds) in rows.items():
        print(f"{name:32s} {interval(fa, args.trials):>44s} {interval(power, args.power_trials):>44s} {seconds:8.3f}")
    print(
        f"{'seed: ||mean diff|| > 0.1':32s} {interval(seed_fa, args.trials):>44s} "
        f"{interval(seed_power, args.power_trials):>44s}"
    )


class EmbeddingModel:
    """normalise(m + G z): real sentence embeddings' first two moments, on the unit sphere."""

    def __init__(self, dim: int):
        from _debian_text import sections

        real = sections({"libs": ("libs", "libdevel")}) if dim == 384 else None
        if real is not None:
            rows = real["libs"].astype(np.float64)
            self.mean = rows.mean(axis=0)
            values, vectors = np.linalg.eigh(np.cov(rows.T))
            self.factor = vectors * np.sqrt(np.clip(values, 0, None))
            self.source = "fitted on all-MiniLM-L6-v2 embeddings of Debian libs summaries"
        else:
            rng = np.random.default_rng(2024)
            direction = rng.normal(size=dim)
            self.mean = 0.49 * direction / np.linalg.norm(direction)
            spectrum = np.arange(1, dim + 1, dtype=np.float64) ** -0.75
            spectrum *= 0.76 / spectrum.sum()
            basis, _ = np.linalg.qr(rng.normal(size=(dim, dim)))
            self.factor = basis * np.sqrt(spectrum)
            self.source = (
                "MiniLM-like moments (|m| 0.49, trace 0.76, power-law spectrum); set CTLOOP_BENCH_DATA to fit them"
            )
        self.shift = np.random.default_rng(99).normal(size=dim)
        self.shift /= np.linalg.norm(self.shift)

    def sample(self, rng: np.random.Generator, n: int, delta: float) -> np.ndarray:
        rows = self.mean + delta * self.shift + rng.standard_normal((n, len(self.mean))) @ self.factor.T
        return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


def sample(args: argparse.Namespace, seed: int, delta: float) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed + args.seed_offset)
    return args.model.sample(rng, args.n, 0.0), args.model.sample(rng, args.n, delta)


if __name__ == "__main__":
    main()
