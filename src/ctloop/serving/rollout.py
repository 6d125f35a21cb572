"""The canary after shadow: a candidate answers a growing share of live traffic, and at every look
each step advances, holds or rolls back on always-valid bounds of the arms' rates.

Shadow traffic shows whether the challenger breaks on real prompts; users never see its answers.
A rollout lets them: the candidate (the challenger) answers `rollout.steps[i]` of live traffic,
assigned stably by user (else by the client's request id, else by request), and every request-log
row names the version that answered. At each look, per metric (error rate, share of answers rated
below `harvest.rejected_below`, share corrected), the candidate's and the champion's rates since
the step began get confidence-sequence bounds (`serving.sequential`, valid at every look):

- ROLLBACK, at once, when some metric shows the candidate worse than the champion by more than
  its `rollout.max_*_increase` (lower bound of the candidate's rate minus upper bound of the
  champion's). Its share goes to 0; the alias does not move; the version is tagged with why.
- ADVANCE when every metric shows it no worse than that (upper minus lower bound within the limit)
  with at least `rollout.min_requests_per_step` candidate answers. The step to 100% is the
  promotion itself (with all the traffic the champion would answer nothing to compare with): the
  candidate becomes champion through `promotion.promote`.
- HOLD otherwise, with how many more candidate answers the widest bound needs if the rates stay.

`rollout.alpha` is split over the steps compared, the metrics, the two sides and the arms' bounds (Bonferroni), so the chance of any
wrong decision over the whole rollout, however often it is looked at, is at most alpha, for
requests independent given their arm. Requests of one user are not independent; assigning by user
keeps them in one arm, but a few heavy users can still make the bounds too narrow.

The state lives on the candidate's version in the registry (tag `ctloop.rollout`, JSON), so every
replica routes the same share and a restarted server resumes at its step.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from ctloop.config import CtloopConfig, RolloutConfig
from ctloop.errors import RegistryError
from ctloop.fileio import strict_json, utc_now
from ctloop.registry.client import CHALLENGER, CHAMPION, Registry

TAG = "ctloop.rollout"
RUNNING, ROLLED_BACK, COMPLETED, ABORTED = "running", "rolled_back", "completed", "aborted"
ADVANCE, HOLD, ROLLBACK = "ADVANCE", "HOLD", "ROLLBACK"
METRICS = (("errors", "error rate", "max_error_rate_increase"),)
LATENCY_METRICS = (("slow", "share slower than rollout.latency_slo_ms", "max_slow_rate_increase"),)
FEEDBACK_METRICS = (
    ("negative", "negative-feedback rate", "max_negative_rate_increase"),
    ("corrections", "correction rate", "max_correction_rate_increase"),
)


@dataclass(frozen=True)
class Rollout:
    candidate: int
    champion: int
    steps: tuple[float, ...]
    step: int = 0
    state: str = RUNNING
    step_started: float = 0.0  # epoch seconds: the step's counts start here
    skip_shadow: bool = False
    history: tuple[str, ...] = ()  # one line per decision that moved it

    @property
    def share(self) -> float:
        """The candidate's share of live traffic now (0 unless running)."""
        return self.steps[self.step] if self.state == RUNNING else 0.0

    def to_dict(self) -> dict:
        return asdict(self) | {"share": self.share}

    def to_tag(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_tag(cls, text: str) -> Rollout:
        raw = json.loads(text)
        return cls(**raw | {"steps": tuple(raw["steps"]), "history": tuple(raw.get("history", ()))})

    def summary(self) -> str:
        where = f"step {self.step + 1}/{len(self.steps)} at {self.share:.0%}" if self.state == RUNNING else self.state
        return f"rollout of v{self.candidate} against v{self.champion}: {where}"


@dataclass(frozen=True)
class Look:
    """One look's decision, with each metric's rates and bounds."""

    decision: str
    reasons: tuple[str, ...]
    requests: dict[str, int]  # arm -> live answers since the step began
    more_needed: int = 0  # HOLD: candidate answers the widest bound needs, if the rates stay
    # metric -> {label, limit, the gap's bounds: worse_by (lower) and at_most (upper), per-arm rates}
    metrics: dict[str, dict[str, float | str]] = field(default_factory=dict)


def takes_candidate(key: str, share: float) -> bool:
    """Whether the request (by its user, else the client's id, else its own id) is in the candidate's
    arm: a stable hash, so one user sees one version throughout a step, and a user in the arm at a
    smaller share stays in it at a larger one."""
    digest = hashlib.sha256(f"ctloop-rollout:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < share


def active(registry: Registry) -> Rollout | None:
    """The challenger's rollout, if it is running."""
    challenger = registry.alias(CHALLENGER)
    if challenger is None:
        return None
    tag = registry.version(challenger).tags.get(TAG)
    if not tag:
        return None
    rollout = Rollout.from_tag(tag)
    return rollout if rollout.state == RUNNING else None


def start(registry: Registry, config: RolloutConfig, version: int | None = None, skip_shadow: bool = False) -> Rollout:
    """Start a rollout of `version` (default: the challenger) against the champion. Needs a shadow
    PROMOTE against that champion unless `skip_shadow` (recorded in the rollout)."""
    champion = registry.alias(CHAMPION)
    candidate = version if version is not None else registry.alias(CHALLENGER)
    if champion is None or candidate is None:
        raise RegistryError("a rollout needs a champion and a candidate (the challenger, or --version N)")
    if candidate == champion:
        raise RegistryError(f"v{candidate} is the champion already")
    from ctloop.registry.promotion import awaiting_approval

    if awaiting_approval(registry, candidate):
        raise RegistryError(
            f"v{candidate} awaits approval (gate.require_approval); run `ctloop approve {candidate} --by NAME "
            "--note TEXT` before its rollout"
        )
    tags = registry.version(candidate).tags
    decision = tags.get("ctloop.shadow_decision", "")
    if not skip_shadow and not decision.startswith(f"PROMOTE vs v{champion} "):
        raise RegistryError(
            f"v{candidate} has no shadow PROMOTE against champion v{champion} (its shadow decision: "
            f"{decision or 'none'}); run `ctloop shadow report` until it decides PROMOTE, or start with --skip-shadow"
        )
    if registry.alias(CHALLENGER) != candidate:
        registry.set_alias(CHALLENGER, candidate)
    rollout = Rollout(
        candidate,
        champion,
        tuple(config.steps),
        step_started=time.time(),
        skip_shadow=skip_shadow,
        history=(f"{utc_now()} started" + (" without shadow evidence (--skip-shadow)" if skip_shadow else ""),),
    )
    registry.set_version_tags(candidate, {TAG: rollout.to_tag()})
    return rollout


def abort(registry: Registry, by: str) -> Rollout:
    rollout = active(registry)
    if rollout is None:
        raise RegistryError("no rollout is running")
    stopped = replace(rollout, state=ABORTED, history=(*rollout.history, f"{utc_now()} aborted by {by}"))
    registry.set_version_tags(rollout.candidate, {TAG: stopped.to_tag()})
    return stopped


def decide(rollout: Rollout, counts: dict[str, dict[str, int]], config: RolloutConfig, explain: bool = True) -> Look:
    """The decision at one look, from each arm's counts since the step began (`counts[arm]` with
    requests, errors, negative, corrections; arms "candidate" and "champion"). `explain=False`
    leaves out HOLD's estimate of the answers still needed (a search; simulations skip it)."""
    from ctloop.serving.sequential import confidence_bound

    metrics = METRICS + (LATENCY_METRICS if config.latency_slo_ms is not None else ()) + FEEDBACK_METRICS
    # Split over the steps compared (all but the last, 100%: there the champion answers nothing),
    # the metrics, the two sides (rollback, advance) and the two arms' bounds.
    compared = max(1, sum(1 for share in rollout.steps if share < 1.0))
    confidence = 1 - config.alpha / (compared * len(metrics) * 2 * 2)
    cand, champ = counts.get("candidate", {}), counts.get("champion", {})
    reasons, worse, unsure = [], [], []
    more = 0
    measured: dict[str, dict[str, float | str]] = {}
    for key, label, limit_name in metrics:
        # Errors and latency are known at once; feedback rates are out of the answers old enough to be rated.
        of = "settled" if (key, label, limit_name) in FEEDBACK_METRICS else "requests"
        n_cand, n_champ = cand.get(of, cand.get("requests", 0)), champ.get(of, champ.get("requests", 0))
        limit = getattr(config, limit_name)
        k_cand, k_champ = cand.get(key, 0), champ.get(key, 0)
        low_cand = confidence_bound(k_cand, n_cand, confidence, upper=False)
        high_cand = confidence_bound(k_cand, n_cand, confidence, upper=True)
        low_champ = confidence_bound(k_champ, n_champ, confidence, upper=False)
        high_champ = confidence_bound(k_champ, n_champ, confidence, upper=True)
        rate_cand, rate_champ = (k_cand / n_cand if n_cand else 0.0), (k_champ / n_champ if n_champ else 0.0)
        measured[key] = {
            "label": label,
            "limit": limit,
            "candidate": rate_cand,
            "champion": rate_champ,
            "worse_by": low_cand - high_champ,  # the gap's lower bound: above the limit is ROLLBACK
            "at_most": high_cand - low_champ,  # its upper bound: within the limit counts toward ADVANCE
        }
        line = (
            f"{label}: candidate {k_cand}/{n_cand} ({rate_cand:.2%}), champion {k_champ}/{n_champ} ({rate_champ:.2%})"
        )
        if low_cand - high_champ > limit:
            worse.append(
                f"{line}: worse by more than rollout.{limit_name}={limit:.2%} (bounds {low_cand:.2%} vs {high_champ:.2%})"
            )
        elif high_cand - low_champ <= limit:
            reasons.append(f"{line}: within rollout.{limit_name}={limit:.2%}")
        else:
            unsure.append(
                f"{line}: not yet within rollout.{limit_name}={limit:.2%} (gap bound {high_cand - low_champ:.2%})"
            )
            if explain:
                more = max(more, _needed(k_cand, n_cand, k_champ, n_champ, limit, confidence) - n_cand)
    requests = {"candidate": cand.get("requests", 0), "champion": champ.get("requests", 0)}
    settled = cand.get("settled", requests["candidate"])  # the fewest any metric is out of
    if worse:
        return Look(ROLLBACK, tuple(worse + unsure + reasons), requests, metrics=measured)
    if not unsure and settled >= config.min_requests_per_step:
        return Look(ADVANCE, tuple(reasons), requests, metrics=measured)
    if settled < config.min_requests_per_step:
        aged = f" old enough to be rated (rollout.feedback_settle_s={config.feedback_settle_s:g})"
        unsure.append(
            f"{settled} candidate answers{aged if config.feedback_settle_s else ''} "
            f"of rollout.min_requests_per_step={config.min_requests_per_step}"
        )
        more = max(more, config.min_requests_per_step - settled)
    return Look(HOLD, tuple(unsure + reasons), requests, more_needed=more, metrics=measured)


def arm_counts(reader, rollout: Rollout, config: CtloopConfig, now: float | None = None) -> dict:
    """Each arm's live requests and errors since the rollout's step began, and the feedback on those
    answered at least `rollout.feedback_settle_s` ago (`LogReader.arm_counts`)."""
    now = time.time() if now is None else now
    arms = {"candidate": str(rollout.candidate), "champion": str(rollout.champion)}
    return reader.arm_counts(
        rollout.step_started,
        arms,
        config.harvest.rejected_below,
        settled_before=now - config.rollout.feedback_settle_s,
        slower_than_ms=config.rollout.latency_slo_ms,
    )


def _needed(k_cand: int, n_cand: int, k_champ: int, n_champ: int, limit: float, confidence: float) -> int:
    """Candidate answers at which the gap bound would fall within `limit`, if both rates stayed and
    the arms kept their ratio (doubling search; capped at 10 million)."""
    from ctloop.serving.sequential import confidence_bound

    rate_cand = k_cand / n_cand if n_cand else 0.0
    rate_champ = k_champ / n_champ if n_champ else 0.0
    ratio = n_champ / n_cand if n_cand else 1.0
    n = max(n_cand, 16)
    while n < 10_000_000:
        m = max(1, round(n * ratio))
        gap = confidence_bound(rate_cand * n, n, confidence, upper=True) - confidence_bound(
            rate_champ * m, m, confidence, upper=False
        )
        if gap <= limit:
            return n
        n *= 2
    return n


def journal_path(workspace_root: Path, candidate: int) -> Path:
    """Where a rollout's looks are kept, one JSON line a look (the report reads them)."""
    return workspace_root / "rollout" / f"v{candidate}.jsonl"


def record(journal: Path, rollout: Rollout, result: Look) -> None:
    """Append one look to the rollout's journal."""
    journal.parent.mkdir(parents=True, exist_ok=True)
    entry = {"time": time.time(), "step": rollout.step, "share": rollout.share} | asdict(result)
    with journal.open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(strict_json(entry)) + "\n")


def report(registry: Registry, workspace_root: Path, candidate: int) -> Path:
    """Write the rollout's HTML report next to its journal and log it on the candidate's MLflow run."""
    from ctloop.reports.rollout import write_rollout_report

    tag = registry.version(candidate).tags.get(TAG)
    if not tag:
        raise RegistryError(f"v{candidate} has had no rollout; `ctloop rollout start` begins one")
    journal = journal_path(workspace_root, candidate)
    looks = [json.loads(line) for line in journal.read_text().splitlines()] if journal.is_file() else []
    path = write_rollout_report(journal.with_suffix(".html"), Rollout.from_tag(tag).to_dict(), looks)
    run_id = registry.version(candidate).run_id
    if run_id:
        registry.log_artifact(run_id, path, "rollout")
    return path


def look(
    registry: Registry,
    config: CtloopConfig,
    counts_since,
    publisher=None,
    by: str = "ctloop rollout",
    workspace_root: Path | None = None,
) -> tuple[Rollout, Look] | None:
    """One look at the running rollout: decide on the counts since its step began
    (`counts_since(rollout) -> counts`), then advance, roll back or hold. None when none runs. A
    look that finds the rollout moved on meanwhile (another replica looked) changes nothing."""
    from ctloop.registry.promotion import promote

    rollout = active(registry)
    if rollout is None:
        return None
    if registry.alias(CHAMPION) != rollout.champion:
        stopped = replace(rollout, state=ABORTED, history=(*rollout.history, f"{utc_now()} the champion moved"))
        registry.set_version_tags(rollout.candidate, {TAG: stopped.to_tag()})
        return stopped, Look(HOLD, ("the champion moved during the rollout; it stopped",), {})
    result = decide(rollout, counts_since(rollout), config.rollout)
    if workspace_root is not None:
        record(journal_path(workspace_root, rollout.candidate), rollout, result)
    if result.decision == HOLD:
        return rollout, result
    current = active(registry)
    if current != rollout:  # someone else moved it since we read it
        return current or rollout, result
    stamp = f"{utc_now()} {result.decision} at {rollout.share:.0%}: " + "; ".join(result.reasons)
    if result.decision == ROLLBACK:
        moved = replace(rollout, state=ROLLED_BACK, history=(*rollout.history, stamp))
        registry.set_version_tags(rollout.candidate, {TAG: moved.to_tag(), "ctloop.rollout_decision": stamp[:4000]})
        if workspace_root is not None:
            report(registry, workspace_root, rollout.candidate)
        return moved, result
    next_share = rollout.steps[rollout.step + 1] if rollout.step + 1 < len(rollout.steps) else 1.0
    if next_share < 1.0:
        moved = replace(rollout, step=rollout.step + 1, step_started=time.time(), history=(*rollout.history, stamp))
        registry.set_version_tags(rollout.candidate, {TAG: moved.to_tag()})
        return moved, result
    promote(
        registry,
        rollout.candidate,
        by=by,
        note=f"rollout completed: {'; '.join(result.reasons)}"[:500],
        publisher=publisher,
    )
    moved = replace(rollout, state=COMPLETED, history=(*rollout.history, stamp))
    registry.set_version_tags(rollout.candidate, {TAG: moved.to_tag(), "ctloop.rollout_decision": stamp[:4000]})
    if workspace_root is not None:
        report(registry, workspace_root, rollout.candidate)
    return moved, result
