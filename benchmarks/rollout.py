"""The canary's decisions under repeated looks, simulated: false rollbacks and false advances at
the limit, and how fast it rolls back a bad candidate or advances a good one.

    python benchmarks/rollout.py [--rollouts 1000] [--power-rollouts 100]

Each simulated rollout runs ctloop's own decision (`serving.rollout.decide`, default settings:
steps 5/25/50/100%, 200 candidate answers per step at least, error-rate limit +1 point, alpha 0.05)
on live traffic drawn request by request: the champion fails at 2%, the candidate at 2% + delta.
It looks every 2,000 requests; a step that neither advances nor rolls back within 50 looks (250 in
the power cases) ends the rollout as held. The step to 100% is the promotion. The baseline is what the rollout tools do (Flagger, Argo Rollouts): compare the
two observed error rates at every look against the same limit, without a sequential bound.

- At the limit (delta = +1 point) neither decision is right: advancing claims "no worse than
  +1 point", rolling back claims "worse than +1 point"; each is counted as a false decision.
- delta = 0 (as good) and delta = +5 points (clearly worse) show the power: share of rollouts that
  complete, or are rolled back, and at what share of traffic.
Rates come with Clopper-Pearson 95% intervals. Figures printed last.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from _intervals import interval

from ctloop.config import RolloutConfig
from ctloop.serving.rollout import ADVANCE, ROLLBACK, Rollout, decide

LOOK_EVERY = 2000
MAX_LOOKS_PER_STEP = 50
POWER_LOOKS = 250  # power cases: up to 500,000 requests a step
CHAMPION_ERRORS = 0.02


def simulate(
    delta: float, rng: np.random.Generator, config: RolloutConfig, naive: bool, max_looks: int
) -> tuple[str, float, int, int]:
    """(outcome, share of traffic when it ended, steps advanced, requests seen): completed,
    rolled_back or held. The step to 100% is the promotion (nothing is compared there)."""
    advanced = requests = 0
    for step, share in enumerate(config.steps):
        if share >= 1.0:
            break
        rollout = Rollout(2, 1, tuple(config.steps), step=step)
        n_cand = k_cand = n_champ = k_champ = 0
        for _ in range(max_looks):
            requests += LOOK_EVERY
            cand = rng.binomial(LOOK_EVERY, share)
            n_cand, n_champ = n_cand + cand, n_champ + LOOK_EVERY - cand
            k_cand += rng.binomial(cand, CHAMPION_ERRORS + delta)
            k_champ += rng.binomial(LOOK_EVERY - cand, CHAMPION_ERRORS)
            if naive:
                gap = (k_cand / n_cand if n_cand else 0.0) - (k_champ / n_champ if n_champ else 0.0)
                if gap > config.max_error_rate_increase:
                    return "rolled_back", share, advanced, requests
                advance = n_cand >= config.min_requests_per_step and gap <= config.max_error_rate_increase
                decision = ADVANCE if advance else None
            else:
                zero = {"negative": 0, "corrections": 0}
                counts = {
                    "candidate": zero | {"requests": n_cand, "errors": k_cand},
                    "champion": zero | {"requests": n_champ, "errors": k_champ},
                }
                decision = decide(rollout, counts, config, explain=False).decision
                if decision == ROLLBACK:
                    return "rolled_back", share, advanced, requests
            if decision == ADVANCE:
                advanced += 1
                break
        else:
            return "held", share, advanced, requests
    return "completed", 1.0, advanced, requests


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rollouts", type=int, default=1000, help="rollouts at the limit (the error rates)")
    parser.add_argument("--power-rollouts", type=int, default=100, help="rollouts per power case")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    config = RolloutConfig()
    limit = config.max_error_rate_increase
    rng = np.random.default_rng(args.seed)
    started = time.monotonic()
    rows = []
    for label, delta in (("at the limit", limit), ("as good", 0.0), ("clearly worse", 5 * limit)):
        for method, naive in (("ctloop", False), ("observed rates", True)):
            count, looks = (args.rollouts, MAX_LOOKS_PER_STEP) if delta == limit else (args.power_rollouts, POWER_LOOKS)
            outcomes = [simulate(delta, rng, config, naive, looks) for _ in range(count)]
            rows.append((label, delta, method, outcomes))
            print(f"{label} ({method}) done after {time.monotonic() - started:.0f} s", flush=True)
    print(
        f"\n{args.rollouts} simulated rollouts at the limit, {args.power_rollouts} per power case; champion error rate {CHAMPION_ERRORS:.0%}, candidate +delta; "
        f"steps {config.steps}, min {config.min_requests_per_step} candidate answers a step, a look every "
        f"{LOOK_EVERY} requests (at most {MAX_LOOKS_PER_STEP} a step at the limit, {POWER_LOOKS} in power cases), limit +{limit:.0%}, alpha {config.alpha}"
    )
    for label, delta, method, outcomes in rows:
        n = len(outcomes)
        kinds = [o[0] for o in outcomes]
        done, back, held = (kinds.count(k) for k in ("completed", "rolled_back", "held"))
        any_advance = sum(1 for o in outcomes if o[2])
        shares = sorted(o[1] for o in outcomes if o[0] == "rolled_back")
        median_share = f", median share at rollback {shares[len(shares) // 2]:.0%}" if shares else ""
        spent = sorted(o[3] for o in outcomes if o[0] in ("completed", "rolled_back"))
        median_share += f", median {spent[len(spent) // 2]:,} requests to decide" if spent else ""
        print(f"{label} (delta +{delta:.0%}), {method}:")
        if delta == limit:
            print(f"  false advance (any step advanced): {interval(any_advance, n)}; completed {done}")
            print(f"  false rollback: {interval(back, n)}")
        else:
            print(f"  completed: {interval(done, n)}; rolled back: {interval(back, n)}{median_share}; held {held}")


if __name__ == "__main__":
    main()
