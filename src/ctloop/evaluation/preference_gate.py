"""The gate's rules for preference training, on held-out feedback (the new data's holdout rows that
carry a preference), each with a paired-bootstrap bound like the other rules:

- **Preference accuracy, DPO pairs** (`preference_chosen` / `preference_rejected`, aligned): a
  model prefers the chosen answer when it gives it the higher log-probability. The candidate's
  share of pairs preferred must beat the reference's by `gate.min_preference_gain` (lower bound).
- **Preference accuracy, KTO answers** (`preference_desirable` / `preference_undesirable`): each
  answer's implicit reward is its log-probability under the model minus under the bare base model
  (so that prompts of differing difficulty compare); the accuracy is the AUC, the chance that a
  rated-up answer outranks a rated-down one (0.5 for the base model itself). Its bootstrap
  resamples the rated-up and the rated-down answers' placements apart (DeLong's decomposition of
  the AUC into per-answer terms).
- **Length guard**: the candidate's greedy answers to held-out prompts, against the reference's:
  the median of (candidate words + 1) / (reference words + 1) may exceed 1 by at most
  `gate.max_length_growth` (upper bound). Preference training is known to lengthen answers. The
  answers are capped at eval.max_new_tokens tokens: growth past the cap is not seen.
- **Agreement probes** (`agreement_disagreeing` / `agreement_agreeing`, aligned; from
  `eval.agreement_probes`, for every objective): false-premise prompts with a correct answer that
  disagrees with the user and one that agrees. The share of probes where the model gives the
  agreeing answer the higher log-probability may rise over the champion's by at most
  `gate.max_agreement_gain` (upper bound): thumbs can reward telling users what they want to hear.
- **KL to the reference**: the mean token KL(candidate || reference) on the new data's holdout,
  teacher-forced; a cheap predictor of forgetting. Reported always, gated with
  `gate.max_kl_to_champion` (upper bound).
"""

from __future__ import annotations

import numpy as np

from ctloop.config import GateConfig
from ctloop.evaluation.evaluate import EvalReport
from ctloop.evaluation.gate import CANDIDATE, FAIL, INCONCLUSIVE, NEW_SET, PASS, RuleResult, _replicates

CHOSEN, REJECTED = "preference_chosen", "preference_rejected"
DESIRABLE, UNDESIRABLE = "preference_desirable", "preference_undesirable"
DISAGREEING, AGREEING = "agreement_disagreeing", "agreement_agreeing"
BASE = "base"


def preference_rules(evaluation: EvalReport, config: GateConfig, reference: str) -> list[tuple[RuleResult, str]]:
    """The rules that apply to an evaluation, each with its metrics key."""
    losses, tokens = evaluation.losses, evaluation.tokens
    rules: list[tuple[RuleResult, str]] = []
    if _scored(losses, CHOSEN, reference) and _scored(losses, REJECTED, reference):
        rules.append((_pair_rule(losses, tokens, reference, config), "preference_gain"))
    if _scored(losses, DESIRABLE, reference) and _scored(losses, UNDESIRABLE, reference):
        rules.append((_rated_rule(losses, tokens, reference, config), "preference_gain"))
    if _scored(losses, DISAGREEING, reference) and _scored(losses, AGREEING, reference):
        rules.append((_agreement_rule(losses, tokens, reference, config), "agreement_gain"))
    predictions = evaluation.predictions
    for name in (CHOSEN, DESIRABLE):
        answers = predictions.get(name, {})
        if CANDIDATE in answers and reference in answers:
            rules.append((_length_rule(answers[reference], answers[CANDIDATE], reference, config), "length_growth"))
    kl = evaluation.kl.get(NEW_SET, {}).get(CANDIDATE)
    if kl is not None:
        rules.append((_kl_rule(kl, reference, config), "kl_to_reference"))
    return rules


def _scored(losses: dict, name: str, reference: str) -> bool:
    return CANDIDATE in losses.get(name, {}) and reference in losses.get(name, {})


def _logps(losses: dict, tokens: dict, name: str, model: str) -> np.ndarray:
    return -np.asarray(losses[name][model], dtype=np.float64) * np.asarray(tokens[name], dtype=np.float64)


def _preferred(losses: dict, tokens: dict, first: str, second: str, model: str) -> np.ndarray:
    """Per aligned pair, 1 where the model gives `first`'s answer the higher log-probability (0.5 on ties)."""
    margin = _logps(losses, tokens, first, model) - _logps(losses, tokens, second, model)
    return (margin > 0) + 0.5 * (margin == 0)


def _pair_rule(losses: dict, tokens: dict, reference: str, config: GateConfig) -> RuleResult:
    ref, cand = (_preferred(losses, tokens, CHOSEN, REJECTED, m) for m in (reference, CANDIDATE))
    return _accuracy_rule("preference accuracy (pairs)", ref, cand, reference, config)


def _agreement_rule(losses: dict, tokens: dict, reference: str, config: GateConfig) -> RuleResult:
    name = "agreement probes"
    ref, cand = (_preferred(losses, tokens, AGREEING, DISAGREEING, m) for m in (reference, CANDIDATE))
    n = len(ref)
    if n < config.min_examples:
        return RuleResult(name, PASS, f"{name}: {n} probes < gate.min_examples: reported, not gated", n=n)
    estimate = float(cand.mean() - ref.mean())
    bound = float(np.quantile(_replicates(ref, cand, config).absolute_change(), config.confidence))
    ok = bound <= config.max_agreement_gain
    verdict = f"{'<=' if ok else '>'} allowed {config.max_agreement_gain:+.1%}"
    reason = (
        f"{name}: prefers agreeing {ref.mean():.1%} ({reference}) -> {cand.mean():.1%}, change {estimate:+.1%} "
        f"({config.confidence:.0%} upper bound {bound:+.1%}, n={n}) {verdict}"
    )
    return RuleResult(name, PASS if ok else FAIL, reason, estimate, bound, n)


def _rated_rule(losses: dict, tokens: dict, reference: str, config: GateConfig) -> RuleResult:
    name = "preference accuracy (rated)"
    if BASE not in losses[DESIRABLE] or BASE not in losses[UNDESIRABLE]:
        return RuleResult(name, INCONCLUSIVE, f"{name}: the base model's scores are missing; evaluate again")

    def placements(model: str) -> np.ndarray:
        up = _logps(losses, tokens, DESIRABLE, model) - _logps(losses, tokens, DESIRABLE, BASE)
        down = _logps(losses, tokens, UNDESIRABLE, model) - _logps(losses, tokens, UNDESIRABLE, BASE)
        if not len(up) or not len(down):
            return np.zeros(0)
        order = np.sort(down)
        below = np.searchsorted(order, up, side="left") + 0.5 * (
            np.searchsorted(order, up, side="right") - np.searchsorted(order, up, side="left")
        )
        order = np.sort(up)
        above = len(up) - np.searchsorted(order, down, side="right")
        ties = np.searchsorted(order, down, side="right") - np.searchsorted(order, down, side="left")
        return np.concatenate([below / len(down), (above + 0.5 * ties) / len(up)])

    n_up = len(losses[DESIRABLE][CANDIDATE])
    return _accuracy_rule(name, placements(reference), placements(CANDIDATE), reference, config, split=n_up)


def _auc_changes(ref: np.ndarray, cand: np.ndarray, split: int, config: GateConfig) -> np.ndarray:
    """Bootstrap replicates of AUC(candidate) - AUC(reference) from per-answer placements: the
    rated-up and the rated-down answers resampled apart, each replicate mean(up) + mean(down) - AUC
    (its variance is Var(up)/m + Var(down)/n, DeLong's), the same resample for both models; plus
    the training-seed noise as for the other rules."""
    rng = np.random.default_rng(config.seed)
    up_ref, down_ref, up_cand, down_cand = ref[:split], ref[split:], cand[:split], cand[split:]
    b = config.bootstrap_samples
    iu = rng.integers(0, len(up_ref), size=(b, len(up_ref)))
    idown = rng.integers(0, len(down_ref), size=(b, len(down_ref)))
    ref_auc = up_ref[iu].mean(axis=1) + down_ref[idown].mean(axis=1) - ref.mean()
    cand_auc = up_cand[iu].mean(axis=1) + down_cand[idown].mean(axis=1) - cand.mean()
    noise = rng.normal(0.0, config.seed_spread, size=b) * abs(ref.mean()) if config.seed_spread else 0.0
    return cand_auc - ref_auc + noise


def _accuracy_rule(
    name: str, ref: np.ndarray, cand: np.ndarray, reference: str, config: GateConfig, split: int | None = None
) -> RuleResult:
    n = len(ref)
    if n < config.min_examples:
        return RuleResult(
            name,
            INCONCLUSIVE,
            f"{name}: {n} held-out examples < gate.min_examples={config.min_examples}: inconclusive, "
            "collect more feedback",
            n=n,
        )
    estimate = float(cand.mean() - ref.mean())
    changes = (
        _replicates(ref, cand, config).absolute_change() if split is None else _auc_changes(ref, cand, split, config)
    )
    bound = float(np.quantile(changes, 1 - config.confidence))
    ok = bound >= config.min_preference_gain
    verdict = f"{'>=' if ok else '<'} required {config.min_preference_gain:+.1%}"
    reason = (
        f"{name}: {ref.mean():.1%} ({reference}) -> {cand.mean():.1%}, gain {estimate:+.1%} "
        f"({config.confidence:.0%} lower bound {bound:+.1%}, n={n}) {verdict}"
    )
    return RuleResult(name, PASS if ok else FAIL, reason, estimate, bound, n)


def _length_rule(reference_answers: list[str], candidate_answers: list[str], reference: str, config: GateConfig):
    name = "answer length"
    ratio = np.asarray(
        [(len(c.split()) + 1) / (len(r.split()) + 1) for r, c in zip(reference_answers, candidate_answers, strict=True)]
    )
    n = len(ratio)
    if n < config.min_examples:
        return RuleResult(name, PASS, f"{name}: {n} prompts < gate.min_examples: reported, not gated", n=n)
    rng = np.random.default_rng(config.seed)
    medians = np.median(ratio[rng.integers(0, n, size=(config.bootstrap_samples, n))], axis=1)
    growth, bound = float(np.median(ratio) - 1), float(np.quantile(medians, config.confidence) - 1)
    ok = bound <= config.max_length_growth
    verdict = f"{'<=' if ok else '>'} allowed {config.max_length_growth:+.0%}"
    reason = (
        f"{name}: median growth vs {reference} {growth:+.1%} ({config.confidence:.0%} upper bound {bound:+.1%}, "
        f"n={n}) {verdict}"
    )
    return RuleResult(name, PASS if ok else FAIL, reason, growth, bound, n)


def _kl_rule(kl: list[float], reference: str, config: GateConfig) -> RuleResult:
    name = f"KL to {reference}"
    values = np.asarray(kl, dtype=np.float64)
    n = len(values)
    mean = float(values.mean()) if n else float("nan")
    if config.max_kl_to_champion is None or n < config.min_examples:
        why = "gate.max_kl_to_champion unset" if config.max_kl_to_champion is None else "too few examples"
        return RuleResult(name, PASS, f"{name}: {mean:.4f} nats per token (n={n}); reported, not gated ({why})", mean)
    bound = float(np.quantile(_replicates(np.zeros(n), values, config).candidate_means(), config.confidence))
    ok = bound <= config.max_kl_to_champion
    verdict = f"{'<=' if ok else '>'} allowed {config.max_kl_to_champion:.4f}"
    reason = f"{name}: {mean:.4f} nats per token ({config.confidence:.0%} upper bound {bound:.4f}, n={n}) {verdict}"
    return RuleResult(name, PASS if ok else FAIL, reason, mean, bound, n)
