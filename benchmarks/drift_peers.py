"""ctloop's drift tests vs alibi-detect and Evidently on the same data, side by side in one run.

    .venv-peers/bin/python benchmarks/drift_peers.py      # see benchmarks/requirements.txt

n = 5,000 per side, d = 384, N(0, I): one data set with no shift, one with +0.1 on 5 coordinates
(the issue's scenario). ctloop's exact MMD permutation test vs alibi-detect's MMDDrift (pytorch
backend, CPU) with the same number of permutations: time and decisions. Evidently's embedding-drift
defaults (`model()`, the public default, and `distance()`, the seed's statistic) on the same data:
time and decisions. Figures printed last.
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def scenario(shift: float, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    reference = rng.standard_normal((n, 384)).astype(np.float32)
    current = rng.standard_normal((n, 384)).astype(np.float32)
    current[:, :5] += shift
    return reference, current


def run_ctloop(reference, current, permutations: int) -> tuple[float, bool, float]:
    from ctloop.config import DriftConfig
    from ctloop.drift.detectors import detect_drift

    started = time.perf_counter()
    report = detect_drift(reference, current, DriftConfig(detectors=["mmd"], permutations=permutations, max_rows=10**7))
    return time.perf_counter() - started, report.drift, report.detectors[0].p_value


def run_alibi(reference, current, permutations: int) -> tuple[float, bool, float]:
    from alibi_detect.cd import MMDDrift

    started = time.perf_counter()
    detector = MMDDrift(reference, backend="pytorch", p_val=0.05, n_permutations=permutations, device="cpu")
    result = detector.predict(current)["data"]
    return time.perf_counter() - started, bool(result["is_drift"]), float(result["p_val"])


def run_evidently(reference, current, method_name: str) -> tuple[float, bool, float]:
    import pandas as pd
    from evidently.legacy.metrics.data_drift import embedding_drift_methods as methods

    method = getattr(methods, method_name)()
    started = time.perf_counter()
    score, drift, _ = method(pd.DataFrame(current), pd.DataFrame(reference))
    return time.perf_counter() - started, bool(drift), float(score)


def main() -> None:
    import torch

    torch.set_num_threads(1)
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=5000)
    parser.add_argument("--permutations", type=int, default=100)
    args = parser.parse_args()
    rows = []
    for label, shift in (("no shift", 0.0), ("shift 0.1 x 5 dims", 0.1)):
        reference, current = scenario(shift, args.n, seed=1)
        for name, runner in (
            ("ctloop mmd", lambda: run_ctloop(reference, current, args.permutations)),
            ("alibi-detect MMDDrift", lambda: run_alibi(reference, current, args.permutations)),
            ("evidently model()", lambda: run_evidently(reference, current, "model")),
            ("evidently distance()", lambda: run_evidently(reference, current, "distance")),
        ):
            seconds, drift, value = runner()
            rows.append((label, name, seconds, drift, value))
            print(rows[-1], flush=True)

    print(f"\nn = {args.n} per side, d = 384, B = {args.permutations} permutations, 1 CPU thread")
    print(f"{'data':20s} {'method':24s} {'seconds':>8s} {'drift':>6s} {'p / score':>10s} {'correct':>8s}")
    for label, name, seconds, drift, value in rows:
        correct = drift == (label != "no shift")
        print(f"{label:20s} {name:24s} {seconds:8.2f} {str(drift):>6s} {value:10.4g} {str(correct):>8s}")
    for label in ("no shift", "shift 0.1 x 5 dims"):
        ours = next(r for r in rows if r[0] == label and r[1] == "ctloop mmd")
        alibi = next(r for r in rows if r[0] == label and r[1] == "alibi-detect MMDDrift")
        print(
            f"{label}: ctloop mmd is {alibi[2] / ours[2]:.1f}x faster than alibi-detect; same decision: "
            f"{ours[3] == alibi[3]}"
        )


if __name__ == "__main__":
    main()
