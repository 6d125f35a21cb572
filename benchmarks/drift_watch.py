"""The drift watch over time: false alarms per period and detection delay, with each look tested
at drift.alpha (what a cron job re-running a drift check does) against the watch's budget
(`watch.false_alarm_budget` spread over `watch.period_looks`, what `ctloop watch` does).

    OMP_NUM_THREADS=1 python benchmarks/drift_watch.py [--watches 200] [--looks 24]

Each simulated watch: a reference of --reference rows; traffic arrives hourly (--per-hour rows);
every hour one look tests the last --window hours (the windows overlap) with the default
detectors (mmd + mean, Holm). Quiet watches draw all traffic like the reference; drifting watches
switch --drift-share of each hour's rows to another domain from hour --onset on. Text: real
Debian package summaries (libs against games) embedded with all-MiniLM-L6-v2, from the JSONL
named by CTLOOP_BENCH_DATA; without it, synthetic unit-norm embeddings (384 dims, a random
anisotropic cloud; the other domain is a shifted cloud), and the output says which.
Rates come with Clopper-Pearson 95% intervals; every watch run is pooled. Figures printed last.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from _debian_text import sections
from _intervals import interval

from ctloop.config import DriftConfig, WatchConfig
from ctloop.drift.budget import take_look
from ctloop.drift.detectors import detect_drift


def embeddings() -> tuple[np.ndarray, np.ndarray, str]:
    """(home domain, other domain, description) as unit-norm float32 rows."""
    real = sections({"libs": ("libs", "libdevel"), "games": ("games",)})
    if real is not None:
        return real["libs"], real["games"], "real text: Debian libs+libdevel (home) vs games, all-MiniLM-L6-v2"
    rng = np.random.default_rng(12345)
    scales = np.geomspace(1.0, 0.02, 384)
    centre = rng.normal(size=384)

    def cloud(n: int, offset: np.ndarray) -> np.ndarray:
        rows = centre + offset + rng.normal(size=(n, 384)) * scales * 0.6
        return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)

    return (
        cloud(20_000, 0.0),
        cloud(5_000, rng.normal(size=384) * scales * 0.6),
        "synthetic unit-norm 384-d clouds (set CTLOOP_BENCH_DATA for real text)",
    )


def run_watch(home, other, args, seed: int, drifting: bool, state: Path) -> list[dict]:
    """Per policy (every look at alpha, then the budget): the looks that alarmed."""
    rng = np.random.default_rng(seed)
    hours = args.looks + args.window
    order = rng.permutation(len(home))[: args.reference + hours * args.per_hour]
    reference = home[order[: args.reference]]
    traffic = home[order[args.reference :]].reshape(hours, args.per_hour, -1).copy()
    if drifting:
        switched = int(round(args.drift_share * args.per_hour))
        for hour in range(args.window + args.onset, hours):
            traffic[hour, :switched] = other[rng.choice(len(other), size=switched, replace=False)]
    config = DriftConfig(detectors=["mmd", "mean"], permutations=args.permutations, min_rows=10, seed=seed)
    settings = WatchConfig(false_alarm_budget=args.alpha, period_looks=args.looks)
    state.unlink(missing_ok=True)
    alarms: list[list[int]] = [[], []]
    for look in range(args.looks):  # look k tests hours k+1 .. k+window; drifted hours start at look `onset`
        window = traffic[look + 1 : look + 1 + args.window].reshape(-1, traffic.shape[-1])
        for k, alpha in enumerate((args.alpha, take_look(state, settings).alpha)):
            if detect_drift(reference, window, config, alpha=alpha).drift:
                alarms[k].append(look)
    return [{"alarms": looks} for looks in alarms]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--watches", type=int, default=200, help="quiet watches (and as many drifting ones)")
    parser.add_argument("--looks", type=int, default=24, help="looks per period (one per hour)")
    parser.add_argument("--window", type=int, default=6, help="hours each look tests")
    parser.add_argument("--per-hour", type=int, default=20)
    parser.add_argument("--reference", type=int, default=500)
    parser.add_argument("--alpha", type=float, default=0.05, help="per-look alpha, and the period's budget")
    parser.add_argument("--permutations", type=int, default=200)
    parser.add_argument("--onset", type=int, default=6, help="drifting watches: first hour of other-domain rows")
    parser.add_argument("--drift-share", type=float, default=0.15)
    parser.add_argument("--state", type=Path, default=Path("/tmp/ctloop-bench-watch-state.json"))
    args = parser.parse_args()
    home, other, source = embeddings()
    started = time.perf_counter()
    quiet = [run_watch(home, other, args, seed, False, args.state) for seed in range(args.watches)]
    print(f"quiet watches done in {time.perf_counter() - started:.0f} s", flush=True)
    drifting = [run_watch(home, other, args, 10**6 + s, True, args.state) for s in range(args.watches)]
    print(f"\n{source}")
    print(
        f"{args.watches} quiet and {args.watches} drifting watches; a period = {args.looks} hourly looks, each testing "
        f"the last {args.window} h ({args.window * args.per_hour} rows) against {args.reference} reference rows; "
        f"mmd + mean (Holm), B = {args.permutations} (extended as alpha needs)"
    )
    print(f"drifting: from hour {args.onset} on, {args.drift_share:.0%} of each hour's rows from the other domain")
    for k, name in enumerate(("every look at alpha", f"budget {args.alpha} over {args.looks} looks")):
        quiet_alarms = [q[k]["alarms"] for q in quiet]
        before = [[a for a in d[k]["alarms"] if a < args.onset] for d in drifting]
        after = [[a for a in d[k]["alarms"] if a >= args.onset] for d in drifting]
        delays = [looks[0] - args.onset for looks in after if looks]
        delay = f"median {np.median(delays):.0f} looks after the onset" if delays else "never"
        print(f"\n{name} (alpha per look {args.alpha if k == 0 else args.alpha / args.looks:.4g}):")
        print(f"  quiet periods with a false alarm: {interval(sum(bool(a) for a in quiet_alarms), args.watches)}")
        print(f"  false alarms per quiet period: {sum(len(a) for a in quiet_alarms) / args.watches:.2f}")
        print(f"  drifting periods with an alarm before the onset (false): {sum(bool(b) for b in before)}")
        print(f"  drifting periods with an alarm at or after the onset: {interval(len(delays), args.watches)}; {delay}")


if __name__ == "__main__":
    main()
