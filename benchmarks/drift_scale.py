"""Drift detection speed and memory at scale, side by side with the seed's mean-distance check.

    OMP_NUM_THREADS=1 python benchmarks/drift_scale.py [--sizes 5000 10000 100000 1000000]

Each size runs in a fresh subprocess so its peak memory (max RSS) is its own. Exact MMD runs up
to 10,000 per side (its cost grows with n^2, its memory only with n); the linear-time detectors
(mean, random-Fourier-feature MMD) run at every size. Null data N(0, I_384). Figures printed last.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

EXACT_MMD_LIMIT = 10_000


def measure(n: int, detector: str, permutations: int) -> dict:
    import numpy as np

    from ctloop.config import DriftConfig
    from ctloop.drift.detectors import detect_drift

    rng = np.random.default_rng(n)
    reference = rng.standard_normal((n, 384), dtype=np.float32)
    current = rng.standard_normal((n, 384), dtype=np.float32)
    data_bytes = reference.nbytes + current.nbytes
    started = time.perf_counter()
    seed_distance = float(np.linalg.norm(reference.mean(axis=0) - current.mean(axis=0)))
    seed_seconds = time.perf_counter() - started
    config = DriftConfig(detectors=[detector], permutations=permutations, max_rows=10**8, min_rows=10)
    started = time.perf_counter()
    report = detect_drift(reference, current, config)
    seconds = time.perf_counter() - started
    return {
        "n": n,
        "detector": detector,
        "seconds": seconds,
        "p_value": report.detectors[0].p_value,
        "drift": report.drift,
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "data_gb": data_bytes / 2**30,
        "seed_seconds": seed_seconds,
        "seed_distance": seed_distance,
        "seed_drift": seed_distance > 0.1,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="+", default=[5000, 10000, 100000, 1000000])
    parser.add_argument("--permutations", type=int, default=200)
    parser.add_argument("--one", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(int(args.one[0]), args.one[1], args.permutations)))
        return
    results = []
    for n in args.sizes:
        for detector in ("mean", "rff_mmd", "mmd"):
            if detector == "mmd" and n > EXACT_MMD_LIMIT:
                continue
            out = subprocess.run(
                [sys.executable, __file__, "--one", str(n), detector, "--permutations", str(args.permutations)],
                capture_output=True,
                text=True,
            )
            if out.returncode != 0:
                print(out.stderr[-2000:], file=sys.stderr)
                continue
            results.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(results[-1], flush=True)
    print(f"\nnull data, d = 384, B = {args.permutations} permutations, alpha 0.05; seed = ||mean diff|| > 0.1")
    print(
        f"{'n per side':>10s} {'detector':>8s} {'seconds':>8s} {'p':>7s} {'drift':>6s} {'peak GB':>8s} "
        f"{'data GB':>8s} {'seed says drift':>16s}"
    )
    for r in results:
        print(
            f"{r['n']:>10,d} {r['detector']:>8s} {r['seconds']:8.2f} {r['p_value']:7.3f} {str(r['drift']):>6s} "
            f"{r['peak_rss_gb']:8.2f} {r['data_gb']:8.2f} {str(r['seed_drift']):>16s}"
        )


if __name__ == "__main__":
    main()
