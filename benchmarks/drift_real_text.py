"""Drift on real text: Debian package descriptions embedded with all-MiniLM-L6-v2.

    OMP_NUM_THREADS=1 python benchmarks/drift_real_text.py [--n 1000] [--trials 5]

Two disjoint random samples of the same sections must not be flagged; libraries against games
must be. Reads the JSONL list of Debian package descriptions named by CTLOOP_BENCH_DATA (the
published figures used about 20,000 real rows; the benchmark says so and stops when it is unset).
Figures printed last.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
from pathlib import Path

from ctloop.config import DriftConfig
from ctloop.drift.detectors import detect_drift
from ctloop.drift.embed import SentenceTransformerEmbedder

DATA = Path(os.environ.get("CTLOOP_BENCH_DATA", "/nonexistent"))  # a large package-description list


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=1000, help="rows per side")
    parser.add_argument("--trials", type=int, default=5)
    args = parser.parse_args()
    if not DATA.is_file():
        sys.exit(
            "set CTLOOP_BENCH_DATA to a JSONL list of Debian package descriptions (package, section, "
            "description); this benchmark needs thousands of real rows per section"
        )
    rows = [json.loads(line) for line in DATA.read_text().splitlines()]
    by_section: dict[str, list[str]] = {}
    for row in rows:
        by_section.setdefault(row["section"], []).append(f"{row['package']}: {row['description']}")
    embedder = SentenceTransformerEmbedder("minilm")
    config = DriftConfig(detectors=["mmd", "mean"], permutations=500)
    results = []
    for trial in range(args.trials):
        rng = random.Random(trial)
        libs = rng.sample(by_section["libs"] + by_section["libdevel"], 2 * args.n)
        games = rng.sample(by_section["games"], args.n)
        reference = embedder.embed(libs[: args.n])
        same = detect_drift(reference, embedder.embed(libs[args.n :]), config)
        shifted = detect_drift(reference, embedder.embed(games), config)
        results.append((same, shifted))
        print(
            f"trial {trial}: same sections -> {same.outcome} ({same.evidence()}); libs vs games -> {shifted.outcome}",
            flush=True,
        )
    false_alarms = sum(same.drift for same, _ in results)
    detected = sum(shifted.drift for _, shifted in results)
    print(f"\nall-MiniLM-L6-v2 embeddings, {args.n} rows per side, detectors mmd + mean (Holm), alpha 0.05")
    print(f"same sections, disjoint samples: flagged in {false_alarms} of {args.trials} trials (expected ~5%)")
    print(f"libs vs games: flagged in {detected} of {args.trials} trials")


if __name__ == "__main__":
    main()
