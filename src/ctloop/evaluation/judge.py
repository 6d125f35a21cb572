"""Judges of answer pairs, and whether one can be trusted.

A judge takes (prompt, answer_a, answer_b) and returns 'a', 'b' or 'tie'. The shadow comparison
asks it twice per pair, with the answers' places swapped. Two things decide whether its verdicts
may count toward a decision:

- **Calibration** (`ctloop judge calibrate`): its agreement with what users said. The labels are
  the ones ctloop already has: a correction is preferred to the answer it corrected, and an answer
  rated up is preferred to an answer to the same prompt rated down. Each labelled pair is shown in
  both orders; Cohen's kappa between the judge's verdicts (a, b or tie) and the users' (a or b) is
  0 for a judge that answers by position, by coin or always 'tie', and 1 for one that always
  agrees. Its 95% interval is a percentile bootstrap over pairs (both orders of a pair move
  together). A judge is calibrated when the kappa's lower bound reaches `judge.min_agreement`.
- **Position-swap consistency**: the share of pairs whose verdict names the same answer (or a tie)
  in both orders, with a Wilson interval. A judge shown below `judge.min_consistency` judges by
  position, in calibration or on the shadow pairs, and is not counted.

The built-in `likelihood` judge needs no network: the base model (no adapter) scores each answer
alone, by its log-probability per character after `judge.instruction` and the request. Since each
answer is scored alone, swapping places cannot change its verdict.
"""

from __future__ import annotations

import hashlib
import inspect
import math
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ctloop.config import JudgeConfig, ModelConfig
from ctloop.data.preference import CORRECTION, RATED_DOWN, RATED_UP, feedback_kind
from ctloop.data.records import Record
from ctloop.errors import ConfigError, CtloopError, DataError
from ctloop.fileio import nan_for_none, read_json, strict_json, write_json

LIKELIHOOD = "likelihood"
CALIBRATION_FOLDER = Path("judge")
BOOTSTRAP_RESAMPLES = 2000
Judge = Callable[[str, str, str], str]


@dataclass(frozen=True)
class LabelledPair:
    """Two answers to one prompt and the one users preferred."""

    id: str
    prompt: str
    preferred: str
    other: str
    source: str  # correction | ratings


def labelled_pairs(records: Iterable[Record]) -> list[LabelledPair]:
    """The pairs users' feedback labels: each correction against the answer it corrected, and per
    prompt, its answers rated up against its answers rated down (paired in order, each used once)."""
    pairs: list[LabelledPair] = []
    up: dict[str, list[Record]] = defaultdict(list)
    down: dict[str, list[Record]] = defaultdict(list)
    seen: set[str] = set()
    for record in records:
        if record.id in seen:
            continue  # the same harvested row in two files
        seen.add(record.id)
        kind = feedback_kind(record)
        if kind == CORRECTION:
            original = str(record.metadata.get("rejected_answer") or "")
            if original.strip() and original.strip() != record.completion.strip():
                pairs.append(LabelledPair(record.id, record.prompt, record.completion, original, "correction"))
        elif kind in (RATED_UP, RATED_DOWN):
            (up if kind == RATED_UP else down)[record.prompt].append(record)
    for prompt, liked in up.items():
        for good, bad in zip(liked, down.get(prompt, []), strict=False):
            if good.completion.strip() != bad.completion.strip():
                pairs.append(LabelledPair(f"{good.id}>{bad.id}", prompt, good.completion, bad.completion, "ratings"))
    return pairs


def both_ways(judge: Judge, prompt: str, first: str, second: str) -> tuple[str, str]:
    """The judge's verdict with `first` in place a, then in place b: each 'first', 'second' or 'tie'.
    A verdict other than 'a', 'b' or 'tie' (any case) is an error, never read as a tie."""
    as_a, as_b = _verdict(judge(prompt, first, second)), _verdict(judge(prompt, second, first))
    return (
        {"a": "first", "b": "second"}.get(as_a, "tie"),
        {"a": "second", "b": "first"}.get(as_b, "tie"),
    )


def _verdict(value: Any) -> str:
    verdict = value.strip().lower() if isinstance(value, str) else value
    if verdict not in ("a", "b", "tie"):
        raise ConfigError("shadow.judge", [f"the judge returned {value!r}; it must return 'a', 'b' or 'tie'"])
    return verdict


def wilson_interval(successes: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson's 95% interval of a proportion (good at small n and at 0 or 1)."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass(frozen=True)
class JudgeCalibration:
    """A judge's agreement with users' labels, and whether that trusts it."""

    judge: str  # the spec, as in shadow.judge
    identity: str  # what the verdicts depend on (`judge_identity`): a calibration trusts only this judge
    pairs: int
    sources: dict[str, int]
    accuracy: float  # share of verdicts (both orders) naming the answer users preferred
    accuracy_interval: tuple[float, float]
    kappa: float
    kappa_interval: tuple[float, float]
    consistency: float
    consistency_interval: tuple[float, float]
    tie_share: float
    calibrated: bool
    reasons: tuple[str, ...]
    settings: dict[str, float]
    created_at: float

    def to_dict(self) -> dict[str, Any]:
        return strict_json(asdict(self))

    def save(self, path: Path) -> None:
        write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: Path) -> JudgeCalibration:
        raw = nan_for_none(read_json(path))
        for key in ("accuracy_interval", "kappa_interval", "consistency_interval", "reasons"):
            raw[key] = tuple(raw[key])
        return cls(**raw)

    @staticmethod
    def path(workspace_root: Path, identity: str) -> Path:
        """Where the calibration of the judge `identity` is kept: one file per judge."""
        return workspace_root / CALIBRATION_FOLDER / f"{hashlib.sha256(identity.encode()).hexdigest()[:16]}.json"

    def summary(self) -> str:
        verdict = "calibrated" if self.calibrated else "NOT calibrated: its verdicts do not count"
        sources = ", ".join(f"{n} from {source}" for source, n in sorted(self.sources.items())) or "none"
        lines = [
            f"judge {self.judge}: {verdict}",
            f"  labelled pairs: {self.pairs} ({sources}), each judged in both orders",
            f"  Cohen's kappa {self.kappa:.3f} (95% interval {self.kappa_interval[0]:.3f} to "
            f"{self.kappa_interval[1]:.3f}); accuracy {self.accuracy:.1%} ({self.accuracy_interval[0]:.1%} to "
            f"{self.accuracy_interval[1]:.1%}); ties {self.tie_share:.1%}",
            f"  position-swap consistency {self.consistency:.1%} ({self.consistency_interval[0]:.1%} to "
            f"{self.consistency_interval[1]:.1%})",
        ]
        return "\n".join(lines + [f"  - {reason}" for reason in self.reasons])


def calibrate(
    judge: Judge, spec: str, pairs: list[LabelledPair], settings: JudgeConfig, identity: str | None = None
) -> JudgeCalibration:
    """Judge every labelled pair both ways and measure the agreement; see the module docstring."""
    n = len(pairs)
    right = np.zeros((n, 2))  # per order: the verdict names the preferred answer
    tie = np.zeros((n, 2))
    consistent = 0
    for i, pair in enumerate(pairs):
        verdicts = both_ways(judge, pair.prompt, pair.preferred, pair.other)
        right[i] = [v == "first" for v in verdicts]
        tie[i] = [v == "tie" for v in verdicts]
        consistent += verdicts[0] == verdicts[1]
    sources = {source: sum(p.source == source for p in pairs) for source in {p.source for p in pairs}}
    kappa = accuracy = tie_share = float("nan")
    kappa_interval = accuracy_interval = (float("nan"), float("nan"))
    if n:
        accuracy, kappa, tie_share = (float(x) for x in _agreement(right.mean(axis=1), tie.mean(axis=1)))
        resampled = np.random.default_rng(settings.seed).integers(0, n, size=(BOOTSTRAP_RESAMPLES, n))
        boot_accuracy, boot_kappa, _ = _agreement(right.mean(axis=1)[resampled], tie.mean(axis=1)[resampled])
        accuracy_interval = _percentiles(boot_accuracy)
        kappa_interval = _percentiles(boot_kappa)
    consistency_interval = wilson_interval(consistent, n)
    reasons = below_floors(n, kappa_interval[0], consistency_interval[1], settings)
    return JudgeCalibration(
        judge=spec,
        identity=identity or spec,
        pairs=n,
        sources=sources,
        accuracy=accuracy,
        accuracy_interval=accuracy_interval,
        kappa=kappa,
        kappa_interval=kappa_interval,
        consistency=consistent / n if n else float("nan"),
        consistency_interval=consistency_interval,
        tie_share=tie_share,
        calibrated=not reasons,
        reasons=tuple(reasons) or ("kappa's lower bound and the consistency clear their floors",),
        settings={k: getattr(settings, k) for k in ("min_agreement", "min_consistency", "min_pairs")},
        created_at=time.time(),
    )


def below_floors(pairs: int, kappa_low: float, consistency_high: float, settings: JudgeConfig) -> list[str]:
    """Why a calibration of `pairs` pairs does not trust its judge at the floors of `settings`: the
    one rule `calibrate` records and `judge_trust` applies again at the floors configured now."""
    problems = []
    if pairs < settings.min_pairs:
        problems.append(
            f"{pairs} labelled pairs, below judge.min_pairs={settings.min_pairs}; harvest more feedback "
            "(corrections, or answers to the same prompt rated up and down)"
        )
    if pairs and not kappa_low >= settings.min_agreement:
        problems.append(
            f"kappa's lower bound {kappa_low:.3f} is below judge.min_agreement={settings.min_agreement}: "
            "it does not agree with users often enough to count"
        )
    if pairs and consistency_high < settings.min_consistency:
        problems.append(
            f"position-swap consistency's upper bound {consistency_high:.1%} is below "
            f"judge.min_consistency={settings.min_consistency:.0%}: it judges by position"
        )
    return problems


def _agreement(right: np.ndarray, tie: np.ndarray) -> tuple[Any, Any, Any]:
    """(accuracy, Cohen's kappa, tie share) from per-pair shares of right and tied verdicts (the last
    axis is pairs). Users prefer a and b equally often by design, never a tie, so chance agreement is
    half the share of verdicts that are not ties."""
    accuracy, tie_share = right.mean(axis=-1), tie.mean(axis=-1)
    chance = 0.5 * (1 - tie_share)
    return accuracy, (accuracy - chance) / (1 - chance), tie_share


def _percentiles(values: np.ndarray) -> tuple[float, float]:
    low, high = np.percentile(values, [2.5, 97.5])
    return float(low), float(high)


@dataclass(frozen=True)
class JudgeTrust:
    """Whether a shadow comparison may count the judge's verdicts, and why."""

    trusted: bool
    reason: str
    min_consistency: float


def judge_trust(calibration: JudgeCalibration | None, identity: str, settings: JudgeConfig) -> JudgeTrust:
    """Trusted: a calibration of this very judge (`identity`, see `judge_identity`) that passed, at
    the floors configured now; or any judge, with `judge.require_calibration: false`."""

    def verdict(trusted: bool, reason: str) -> JudgeTrust:
        return JudgeTrust(trusted, reason, settings.min_consistency)

    if not settings.require_calibration:
        return verdict(True, "counted without a calibration check: judge.require_calibration is false")
    if calibration is None:
        return verdict(False, f"not calibrated against users' labels; run `ctloop judge calibrate` ({identity})")
    if calibration.identity != identity:
        return verdict(
            False, f"the calibration is of {calibration.identity}, not of {identity}; run `ctloop judge calibrate`"
        )
    low = calibration.kappa_interval[0]
    problems = below_floors(calibration.pairs, low, calibration.consistency_interval[1], settings)
    if problems:
        return verdict(False, "; ".join(problems))
    return verdict(
        True, f"calibrated on {calibration.pairs} pairs: kappa {calibration.kappa:.3f} (lower bound {low:.3f})"
    )


class LikelihoodJudge:
    """The base model, no adapter, scores each answer by its log-probability per character after
    the instruction and the request; the likelier answer wins by at least `margin`, else a tie. An
    empty answer loses to any other. Scores are kept, so the swapped second call costs nothing."""

    def __init__(self, model: Any, tokenizer: Any, instruction: str, margin: float) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.instruction, self.margin = instruction, margin
        self.max_tokens = getattr(getattr(model, "config", None), "max_position_embeddings", None)
        self._scores: dict[tuple[str, str], float] = {}

    @classmethod
    def from_config(cls, model_config: ModelConfig, settings: JudgeConfig) -> LikelihoodJudge:
        from ctloop.model.loading import load_base_model, load_tokenizer

        model = load_base_model(model_config)
        model.eval()
        return cls(model, load_tokenizer(model_config), settings.instruction, settings.margin)

    def __call__(self, prompt: str, answer_a: str, answer_b: str) -> str:
        a, b = self.scores(prompt, [answer_a, answer_b])
        if math.isnan(a) or math.isnan(b) or a == b or abs(a - b) <= self.margin:  # a == b: both empty too
            return "tie"
        return "a" if a > b else "b"

    def scores(self, prompt: str, answers: list[str]) -> list[float]:
        """Each answer's log-probability (end of text included) per character; -inf when empty. Per
        character, not per token: answers split into many short tokens would otherwise score higher.
        A context longer than the model's positions loses its oldest tokens (the instruction and the
        start of the request); an answer that alone does not fit scores NaN (a tie)."""
        import torch

        from ctloop.model.batching import collate, encode
        from ctloop.model.losses import token_losses

        missing = list(dict.fromkeys(a for a in answers if a.strip() and (prompt, a) not in self._scores))
        if missing:
            context = f"{self.instruction}\n\n{prompt}"
            examples = [self._fitted(e) for e in encode([Record("", context, a) for a in missing], self.tokenizer)]
            fits = [e is not None for e in examples]
            for answer, fitted in zip(missing, fits, strict=True):
                if not fitted:
                    self._scores[(prompt, answer)] = math.nan
            missing = [a for a, fitted in zip(missing, fits, strict=True) if fitted]
            examples = [e for e in examples if e is not None]
        if missing:
            batch = collate(examples, self.tokenizer.pad_token_id)
            with torch.inference_mode():
                nll, mask = token_losses(self.model, {k: v.to(self.model.device) for k, v in batch.items()})
            totals = (nll * mask).sum(dim=1).tolist()
            for answer, total in zip(missing, totals, strict=True):
                self._scores[(prompt, answer)] = -total / (len(answer) + 1)  # + 1: the end of text
        return [self._scores.get((prompt, a), -math.inf) if a.strip() else -math.inf for a in answers]

    def _fitted(self, example: Any) -> Any:
        """The example within the model's positions: context cut from the left after `<s>`; None
        when the answer alone does not fit."""
        from ctloop.model.batching import Example

        ids, limit = example.input_ids, self.max_tokens
        if limit is None or len(ids) <= limit:
            return example
        answer = len(ids) - example.prompt_len
        if answer > limit - 2:
            return None
        keep = limit - 1 - answer  # context tokens kept after <s>
        return Example(
            [ids[0], *ids[example.prompt_len - keep : example.prompt_len], *ids[example.prompt_len :]], keep + 1
        )


def judge_identity(spec: str, settings: JudgeConfig, model_config: ModelConfig | None) -> str:
    """What a judge's verdicts depend on, so a calibration trusts only the judge it measured: for
    'likelihood', the base model (path or hub id, revision, dtype), the instruction and the margin;
    for 'module:function', the spec and a hash of the function's source when it can be read."""
    if spec == LIKELIHOOD:
        if model_config is None:
            return LIKELIHOOD
        parts = [
            model_config.base,
            model_config.revision or "",
            model_config.dtype,
            settings.instruction,
            str(settings.margin),
        ]
        return f"likelihood[{model_config.base}; {hashlib.sha256(repr(parts).encode()).hexdigest()[:12]}]"
    try:
        source = inspect.getsource(load_judge(spec, settings, model_config))
    except (OSError, TypeError, ConfigError):
        return spec
    return f"{spec}[{hashlib.sha256(source.encode()).hexdigest()[:12]}]"


_LOADED: dict[str, Judge] = {}  # the likelihood judge of this process, by identity: one base model copy


def load_judge(spec: str, settings: JudgeConfig, model_config: ModelConfig | None) -> Judge:
    """The judge `shadow.judge` names: 'likelihood' (built from the base model) or 'module:function'."""
    if spec == LIKELIHOOD:
        if model_config is None:
            raise DataError("the likelihood judge needs the model section; pass --config")
        identity = judge_identity(spec, settings, model_config)
        if identity not in _LOADED:
            _LOADED.clear()  # at most one base model held for judging
            _LOADED[identity] = LikelihoodJudge.from_config(model_config, settings)
        return _LOADED[identity]
    from ctloop.plugins import import_callable

    return import_callable(spec, "shadow.judge")


def load_calibration(workspace_root: Path, identity: str) -> JudgeCalibration | None:
    """The workspace's calibration of the judge `identity`, or None (also for a file that cannot be
    read as one: the judge is then not trusted, and calibrating it again rewrites the file)."""
    path = JudgeCalibration.path(workspace_root, identity)
    if not path.is_file():
        return None
    try:
        return JudgeCalibration.load(path)
    except (CtloopError, ValueError, TypeError, KeyError, AttributeError):
        return None
