"""The configuration: one YAML file validated into frozen pydantic models, one section per stage.

Unknown keys are rejected, and `load_config` reports every problem at once, each naming the key,
the value, the rule and the fix.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import math
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ctloop.errors import ConfigError

DEFAULT_WORKSPACE = Path("ctloop-workspace")


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelConfig(Section):
    """The base causal LM the adapter is trained on."""

    base: str = Field(description="local path or hub id of the base causal LM")
    revision: str | None = Field(None, description="hub revision (commit) to pin; local paths are hashed")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32",
        description="the base model's weights in memory (training may compute in bf16 anyway: train.precision)",
    )
    attn_implementation: str | None = Field(
        None,
        description="transformers attention kernel (sdpa, eager, "
        "flash_attention_2, flex_attention); default for "
        "training: ctloop's eager variant on CPU; on CUDA "
        "flash_attention_2 for bf16/fp16 on Ampere or newer "
        "with flash-attn installed, else flex_attention for "
        "packed rows (sdpa unpacked); elsewhere "
        "transformers' own",
    )
    max_seq_tokens: int = Field(512, ge=8, description="rows longer than this (prompt + completion) are quarantined")
    device: str = Field(
        "auto",
        description="where the model runs for training, evaluation, serving and the base-model embedder: "
        "auto (a CUDA GPU when torch sees one, else the CPU), cpu, cuda or cuda:N; under torchrun each "
        "process trains on its own GPU. Not part of the training hash: it changes speed, not results",
    )
    threads: int | None = Field(
        None,
        ge=1,
        description="CPU threads torch uses for training, evaluation and serving; None: OMP_NUM_THREADS when set, "
        "else the CPUs this process may use (its affinity and cgroup quota, as in a container or an Airflow "
        "worker), not the machine's cores. Not part of the training hash",
    )

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        if value in ("auto", "cpu", "cuda") or (value.startswith("cuda:") and value[5:].isdigit()):
            return value
        raise ValueError(f"got {value!r}; use auto, cpu, cuda, or cuda:N with N a GPU index")


class DataConfig(Section):
    """Validation of incoming records and the holdout split of new data."""

    min_rows: int = Field(20, ge=1, description="fewest good rows a cycle needs")
    max_bad_fraction: float = Field(0.1, ge=0, le=1, description="largest share of bad rows before the cycle stops")
    holdout_fraction: float = Field(0.1, gt=0, lt=1, description="share of good new rows kept for evaluation")
    max_holdout_rows: int = Field(500, ge=1, description="cap on the new-data holdout size")
    drop_duplicates: bool = Field(
        True, description="rows repeating an earlier row's prompt and completion go to quarantine (reason duplicate)"
    )


class ReplayConfig(Section):
    """Mixing a sample of past cycles' training data into the new training set."""

    enabled: bool = Field(
        True, description="mix replayed rows into training, and measure forgetting on past held-out rows"
    )
    ratio: float = Field(0.25, ge=0, lt=1, description="share of training tokens drawn from the buffer")
    holdout_rows: int = Field(200, ge=0, description="past held-out rows used to measure forgetting")
    strategy: Literal["uniform", "balanced", "recency"] = Field(
        "uniform",
        description="how replayed rows are drawn: uniform over the buffer, balanced over balance_by groups, or recency (recency_decay)",
    )
    balance_by: Literal["cycle", "source"] = Field(
        "cycle", description="groups that `balanced` gives equal shares of the replayed tokens"
    )
    recency_decay: float = Field(
        0.5,
        gt=0,
        le=1,
        description="`recency`: a cycle k cycles old gets decay**k times the newest cycle's share of the replayed "
        "rows, whatever the cycles' sizes",
    )
    buffer_rows: int | None = Field(
        None,
        ge=1,
        description="reservoir cap on past training rows (lowered: shrinks at the next cycle); null: keep all",
    )
    buffer_holdout_rows: int | None = Field(None, ge=1, description="reservoir cap on past held-out rows")


class DriftConfig(Section):
    """The trigger: embed new and reference data, run calibrated two-sample tests, decide.

    The reference is the champion's training data (from the registry lineage) unless `reference`
    names a file. No champion yet: the cycle trains.
    """

    enabled: bool = Field(True, description="false: no drift check, every cycle trains")
    embedder: str = Field(
        "minilm", min_length=1, description="minilm | base_model | a sentence-transformers path or id"
    )
    text: Literal["prompt", "completion", "both"] = Field(
        "prompt", description="what is embedded and compared: the prompts, the completions, or both"
    )
    detectors: list[Literal["mean", "mmd", "rff_mmd", "pca_ks", "classifier"]] = Field(
        default_factory=lambda: ["mmd", "mean"],
        min_length=1,
        description="the tests run on the embeddings: mean (mean shift), mmd (kernel MMD), rff_mmd (its random-feature "
        "approximation for large samples), pca_ks (per-component KS), classifier (a ridge classifier's held-out AUC)",
    )
    alpha: float = Field(0.05, gt=0, lt=1, description="false-alarm rate of one drift check (Holm over the detectors)")
    permutations: int = Field(
        500,
        ge=19,
        le=100_000,
        description="permutations of each permutation test (mean, mmd, rff_mmd): more give finer p-values, slower",
    )
    min_rows: int = Field(50, ge=5, description="fewest rows per side for a decision")
    max_rows: int = Field(5000, ge=10, description="larger sides are subsampled (seeded) to this many rows")
    pca_components: int = Field(
        10, ge=1, description="pca_ks: principal components tested, a Kolmogorov-Smirnov test each (Bonferroni)"
    )
    rff_features: int = Field(
        1024, ge=16, description="rff_mmd: random Fourier features approximating the Gaussian kernel"
    )
    reference: Path | None = Field(None, description="explicit reference file; default: the champion's training data")
    cooldown_hours: float = Field(0.0, ge=0, description="after a training, ignore drift for this long")
    retrain_after_days: float | None = Field(None, gt=0, description="train anyway when the last training is older")
    seed: int = Field(0, description="seed of the subsampling, the permutations and the projections")

    @model_validator(mode="after")
    def _can_fire(self) -> DriftConfig:
        # A permutation p-value is at least 1/(B+1), and Holm multiplies the smallest by the number of
        # detectors m: with only permutation detectors, drift can be flagged only if m/(B+1) <= alpha.
        permutation_tests = {"mean", "mmd", "rff_mmd"}
        m = len(self.detectors)
        if self.enabled and set(self.detectors) <= permutation_tests and m / (self.permutations + 1) > self.alpha:
            needed = math.ceil(m / self.alpha) - 1
            raise ValueError(
                f"drift.permutations={self.permutations} can never flag drift with {m} permutation detectors at "
                f"alpha={self.alpha} (smallest Holm-adjusted p = {m}/({self.permutations}+1)); use at least {needed}"
            )
        return self


MAX_WATCH_PERMUTATIONS = 1_000_000
# The detector whose p-value a lifetime watch trusts in the far tail (1e-6 and below): the KS
# distribution over PCA components, with Simes' combination. classifier's Mann-Whitney p-value is a
# normal approximation, which over-rejected even at 0.05 on real text, so it is left out there.
LIFETIME_DETECTORS = ("pca_ks",)


class WatchConfig(Section):
    """`ctloop watch` and the production drift-watch DAG test live traffic again and again. A budget
    of false alarms is spread over each period of `period_looks` looks: every look tests at
    false_alarm_budget / period_looks (Bonferroni), so the chance of any false alarm in a period is at
    most `false_alarm_budget`, however much the looks' windows overlap. The permutation tests draw
    as many permutations as that alpha needs, and stop early when a look is clearly quiet."""

    false_alarm_budget: float = Field(0.05, gt=0, lt=1, description="chance of any false alarm in a period")
    period_looks: int = Field(
        168, ge=1, le=100_000, description="looks per period (168: a week of hourly looks); 1: each look at the budget"
    )
    alpha_spending: Literal["period", "lifetime"] = Field(
        "period",
        description="period: each period of period_looks looks shares the budget, so at most the budget of false "
        "alarms is expected per period; lifetime: one budget for the watch's whole life, look k testing at "
        "budget / (2.10975 (k+1) ln^2(k+1)), so the chance of any false alarm ever is at most the budget. Those "
        "shares shrink without end (a year of hourly looks: 3e-8), which permutation tests cannot resolve, so a "
        "lifetime watch runs only pca_ks (an analytic p-value) of drift.detectors",
    )


class LoraConfig(Section):
    r: int = Field(16, ge=1, le=1024, description="LoRA rank")
    alpha: float = Field(32, gt=0, description="LoRA scaling numerator: the update is scaled by alpha / r")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the LoRA path's input")
    target_modules: str | list[str] = Field(
        "all-linear",
        description="modules the adapter wraps: 'all-linear' (every linear layer but the output head) or a list of module names",
    )


class DpoConfig(Section):
    """DPO on corrections: the correction is the chosen answer, the answer it corrected the rejected one."""

    beta: float = Field(0.1, gt=0, le=10, description="strength of the pull toward the reference (the champion)")
    loss: Literal["sigmoid", "robust"] = Field(
        "sigmoid", description="sigmoid: the DPO loss; robust: unbiased under label noise at rate label_noise"
    )
    label_noise: float = Field(0.1, ge=0, lt=0.5, description="robust only: the assumed share of flipped preferences")


class KtoConfig(Section):
    """KTO on rated answers: rated up (and corrections) desirable, rated down (and corrected answers) undesirable."""

    beta: float = Field(0.1, gt=0, le=10, description="strength of the pull toward the reference (the champion)")
    desirable_weight: float | None = Field(
        None, gt=0, description="weight of desirable answers' loss; default: the inverse class ratio (see below)"
    )
    undesirable_weight: float | None = Field(
        None,
        gt=0,
        description="default: the class ratio's inverse, so that the rarer kind weighs (more common / rarer) "
        "and the other 1, as the KTO paper recommends for imbalanced feedback",
    )


PREFERENCE_OBJECTIVES = ("dpo", "kto", "sft+dpo", "sft+kto")
PREFERENCE_SETTINGS = ("sft_weight", "preference_batch_size", "min_preference_rows", "dpo", "kto")
# Settings that change what a cycle computes, added after ctloop 0.1: while at their defaults they are
# left out of the training hash, so cycles keep the ids they had (a finished one is not redone, a
# crashed one resumes).
ADDED_SINCE_0_1 = {
    "train": ("chat_loss",),
    "gate": (
        "require_seed_calibration",
        "max_rejected_answer_gain",
        "max_rejected_share",
        "traffic_weighted",
        "min_stratum_rows",
        "max_unweighed_traffic",
    ),
    "eval": ("rejected_max_age_days", "rejected_versions", "traffic_strata"),
}


class TrainConfig(Section):
    seed: int = Field(0, description="seed of the adapter's initial weights, the batch order and dropout")
    chat_loss: Literal["last", "all_assistant"] = Field(
        "last",
        description="chat records (messages): the loss on the last assistant turn only, or on every assistant "
        "turn (each conditioned on the conversation before it, in one sequence); evaluation scores the last",
    )
    objective: Literal["sft", "dpo", "kto", "sft+dpo", "sft+kto"] = Field(
        "sft",
        description="sft: supervised rows (corrections and answers rated up); dpo: corrections against the answers "
        "they corrected; kto: answers rated up and down; sft+dpo / sft+kto: both terms, the supervised one weighed "
        "by sft_weight. Preference objectives add a supervised term on replayed rows, against forgetting",
    )
    sft_weight: float = Field(1.0, ge=0, le=100, description="weight of the supervised term in preference objectives")
    preference_batch_size: int = Field(
        8, ge=2, le=4096, description="preference examples per step (pairs for dpo, answers for kto)"
    )
    min_preference_rows: int = Field(
        16, ge=1, description="fewer preference examples than this: the cycle stops before training"
    )
    dpo: DpoConfig = Field(default_factory=DpoConfig, description="DPO's settings (objective dpo or sft+dpo)")
    kto: KtoConfig = Field(default_factory=KtoConfig, description="KTO's settings (objective kto or sft+kto)")
    epochs: float = Field(1.0, gt=0, description="passes over the training rows (fractions allowed)")
    learning_rate: float = Field(
        2e-4,
        gt=0,
        lt=1,
        description="peak learning rate of the adapter (AdamW; linear warm-up, then cosine decay to zero)",
    )
    warmup_fraction: float = Field(
        0.05, ge=0, lt=1, description="share of the optimizer steps spent warming the learning rate up from zero"
    )
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay on the adapter's weights")
    batch_tokens: int = Field(4096, ge=16, description="token slots (rows x longest row) per optimizer step")
    packing: bool = Field(
        True,
        description="pack samples into fixed-width rows with per-sample attention (almost no "
        "padding, one batch shape); false: length-grouped padded batches; "
        "'auto' (earlier default) means true",
    )
    max_grad_norm: float = Field(1.0, gt=0, description="gradients are clipped to this global norm")
    log_every: int = Field(
        10, ge=1, description="optimizer steps between logged losses (progress bar, training curve, MLflow)"
    )
    checkpoint_every: int = Field(50, ge=0, description="steps between resumable checkpoints; 0: none")
    activation_checkpointing: bool = Field(False, description="trade ~20% speed for much less memory")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto",
        description="bf16: frozen base in bf16 + autocast; auto: bf16 where the hardware has fast bf16 "
        "(CUDA with bf16; CPUs with AMX for hidden size >= 512), else fp32",
    )
    init: Literal["fresh", "champion"] = Field(
        "fresh",
        description="fresh adapter from the base model, or continue the champion's (LR re-warmed); preference "
        "objectives always continue the champion's, their reference",
    )

    @field_validator("packing", mode="before")
    @classmethod
    def _auto_packs(cls, value: object) -> object:
        return True if value == "auto" else value


class EvalConfig(Section):
    batch_tokens: int = Field(8192, ge=16, description="token slots (rows x longest row) per evaluation batch")
    slice_by: str | None = Field(
        None,
        description="report (and with gate.per_slice, gate) per value of `source` "
        "or of a metadata field, written `metadata.<key>`",
    )
    cluster_by: str | None = Field(
        None,
        description="a metadata key (`metadata.<key>` or `<key>`) whose rows belong together (a user, a session, a "
        "document): the gate's bootstrap then resamples those groups, not rows; harvested rows carry `user`",
    )
    generate: bool = Field(False, description="also decode greedily and score exact match, token F1, ROUGE-L")
    max_new_tokens: int = Field(
        32,
        ge=1,
        le=4096,
        description="length of the greedy answers behind the text metrics (exact match, token F1, custom metrics)",
    )
    custom_metrics: dict[str, str] = Field(
        default_factory=dict,
        description="name -> 'module:function' taking (prediction, reference) -> float; "
        "scored with the built-in metrics when generate is on",
    )
    generation_batch: int = Field(16, ge=1, description="prompts answered at once for the text metrics")
    report_examples: int = Field(
        4,
        ge=0,
        le=50,
        description="the cycle report shows this many new-data examples of each kind, the candidate's worst-scored "
        "and a seeded sample, with every model's greedy answer beside the reference; 0: none",
    )
    golden: dict[str, Path] = Field(default_factory=dict, description="fixed regression sets: name -> records file")
    agreement_probes: Path | None = Field(
        None,
        description="false-premise prompts (a records file): each completion disagrees with the user's premise, "
        "its metadata.agreeing_answer agrees with it; the gate checks the candidate does not come to prefer "
        "agreeing more often than the champion",
    )
    rejected_answers: bool = Field(
        True,
        description="gate on the answers production rated down (<workspace>/harvest/rejected.jsonl, written by "
        "ctloop harvest): a candidate may not make them likelier than gate.max_rejected_gain allows",
    )
    traffic_strata: int = Field(
        8,
        ge=1,
        le=64,
        description="prompt clusters (k-means on the drift embedder's embeddings of the harvest's traffic sample) "
        "the new-data rule is weighted over",
    )
    rejected_max_age_days: float | None = Field(
        90.0,
        gt=0,
        description="the rejected-answers rules use answers given at most this many days ago (null: all); "
        "ctloop harvest also drops older ones from the rejected set",
    )
    rejected_versions: int | None = Field(
        3,
        ge=1,
        description="the rejected-answers rules use answers of the newest this many model versions that gave "
        "them (null: all versions): what long-gone versions said is not what the champion says",
    )
    contamination: Literal["drop", "fail", "off"] = Field(
        "drop", description="evaluation rows found in the training set: drop and count them, or fail the cycle"
    )
    ngram: int = Field(8, ge=1, le=64, description="word n-gram size of the near-duplicate check")
    max_overlap: float = Field(
        0.5, gt=0, le=1, description="share of a row's n-grams seen in training that makes it a near duplicate"
    )


class HarvestConfig(Section):
    """`ctloop harvest`: the request log and its feedback -> the next cycle's records.

    A correction becomes the completion; an answer whose latest rating (on [0, 1]: thumbs up 1,
    thumbs down 0) is at least `min_rating` is kept as it was; one rated below `rejected_below`
    without a correction goes to the rejected set, never to training."""

    min_rating: float = Field(0.75, ge=0, le=1, description="keep an uncorrected answer rated at least this")
    rejected_below: float = Field(0.5, ge=0, le=1, description="an uncorrected answer rated below this is rejected")
    include_unrated: bool = Field(False, description="keep answers nobody rated, as they were")
    redact: bool = Field(True, description="replace e-mail addresses, phone numbers and keys in harvested text")
    audit_rows: int = Field(
        1000,
        ge=0,
        le=100_000,
        description="a seeded sample of this many of the window's requests, rated or not, kept with the harvest "
        "(<harvest>.traffic.jsonl): the gate weighs the new-data rule to traffic with it, since users rate some "
        "prompts far more than others; 0: none, and the gate says its new-data rule is about rated prompts only",
    )


class ProductionConfig(Section):
    """Where production traffic and its feedback are read from, for the drift watch and the harvest.

    ctloop: the request log `ctloop serve` writes (default). mlflow: traces in an MLflow experiment
    (what `mlflow.openai.autolog()` records) with their HUMAN feedback assessments, and corrections
    as an expectation named `correction_name`. jsonl: files of one exchange per line,
    {"id", "created_at", "request": <an OpenAI request body>, "response": <its response body>,
    "feedback": {"rating", "correction"}} (feedback optional), as gateways and batch jobs write them.
    phoenix: OpenInference LLM spans in an Arize Phoenix project (what
    openinference-instrumentation-openai records), with HUMAN span annotations as feedback."""

    source: Literal["ctloop", "mlflow", "jsonl", "phoenix"] = Field(
        "ctloop",
        description="where live traffic is read: ctloop (the request log), mlflow (traces), jsonl (gateway files), phoenix (spans)",
    )
    path: str | None = Field(None, description="jsonl: a file, or a glob of files")
    experiment: str | None = Field(None, description="mlflow: the experiment holding the traces")
    tracking_uri: str | None = Field(None, description="mlflow: default registry.tracking_uri / the workspace's")
    phoenix_url: str = Field("http://127.0.0.1:6006", description="phoenix: the Phoenix server")
    project: str = Field("default", min_length=1, description="phoenix: the project holding the spans")
    phoenix_api_key_env: str = Field(
        "PHOENIX_API_KEY", description="phoenix: the environment variable with its API key (unset: none sent)"
    )
    rating_names: list[str] = Field(
        default_factory=list,
        description="mlflow, phoenix: the feedback (annotation) names that count as ratings; empty: every one but "
        "correction_name",
    )
    correction_name: str = Field(
        "expected_response",
        description="mlflow: the expectation holding a correction; phoenix: the annotation whose explanation holds it",
    )

    @model_validator(mode="after")
    def _complete(self) -> ProductionConfig:
        if self.source == "jsonl" and not self.path:
            raise ValueError("production.source is jsonl: set production.path to the file (or a glob of files)")
        if self.source == "mlflow" and not self.experiment:
            raise ValueError("production.source is mlflow: set production.experiment to the experiment of the traces")
        return self


class GateRule(Section):
    """One extra rule: an absolute bound on the candidate's mean and/or a change bound vs the reference.

    The change is measured in the better direction: (candidate - reference) / |reference| when
    higher is better (relative), its negative when lower is better; `min_change` 0.02 means
    "at least 2% better", -0.01 means "may be up to 1% worse". Statistics as for the built-in
    rules, from the same replicates: the one-sided paired-bootstrap bound, with the training-seed
    noise (`gate.seed_spread`) added, must clear the bound."""

    metric: str = Field(
        min_length=1, description="loss, exact_match, token_f1, rouge_l, or an eval.custom_metrics name"
    )
    set: str = Field("new_holdout", min_length=1, description="new_holdout, replay_holdout or golden_<name>")
    slice: str | None = Field(None, description="a value of eval.slice_by; default: the whole set")
    higher_is_better: bool | None = Field(None, description="default: false for loss, true otherwise")
    min: float | None = Field(None, description="absolute lower bound on the candidate's mean")
    max: float | None = Field(None, description="absolute upper bound on the candidate's mean")
    min_change: float | None = Field(None, description="change bound vs the reference (see above)")
    change: Literal["relative", "absolute"] = Field(
        "relative",
        description="relative: the limit is a share of the reference's value; absolute: in the metric's own units",
    )


class GateConfig(Section):
    """Rules the candidate must meet against the champion (mean token loss, lower is better).

    Changes are relative: (champion - candidate) / champion on new data must be at least
    `min_new_improvement`; (candidate - champion) / champion on old data at most `max_old_regression`;
    each on its one-sided paired-bootstrap bound at `confidence`, not on the point estimate.
    """

    min_new_improvement: float = Field(
        0.01,
        ge=-1,
        lt=1,
        description="new data: the lower bound of (champion - candidate) / champion loss must reach this",
    )
    max_old_regression: float = Field(
        0.02,
        ge=0,
        lt=10,
        description="old data (the replay holdout): the upper bound of (candidate - champion) / champion loss may reach this",
    )
    max_golden_regression: float = Field(0.02, ge=0, lt=10, description="the same bound for each eval.golden set")
    max_cumulative_regression: float | None = Field(
        0.05,
        ge=0,
        lt=10,
        description="regression on old data and on each golden set against the first champion, however many "
        "cycles ago it was promoted: each cycle may lose up to max_old_regression against the current champion, "
        "this bounds what they lose together; null: off",
    )
    max_rejected_gain: float = Field(
        0.02, ge=0, lt=1, description="how much lower (relative) the candidate's loss on rejected answers may be"
    )
    traffic_weighted: bool = Field(
        True,
        description="on rows harvested with a traffic sample (harvest.audit_rows): also check the new-data rule "
        "with each row weighted to its prompt cluster's share of traffic",
    )
    min_stratum_rows: int = Field(
        10,
        ge=2,
        description="the weighted new-data rule weighs a prompt cluster only with at least this many held-out "
        "rated rows; the traffic of smaller clusters counts as unweighed",
    )
    max_unweighed_traffic: float = Field(
        0.5,
        ge=0,
        le=1,
        description="the weighted new-data rule is inconclusive when more than this share of traffic falls in "
        "prompt clusters with fewer than gate.min_stratum_rows held-out rated rows",
    )
    max_rejected_answer_gain: float = Field(
        0.10,
        gt=0,
        lt=1,
        description="rejected answers, each: an answer whose loss the candidate lowers by more than this share of "
        "the champion's loss on it counts as moved toward (wider than the per-answer noise between two seeds)",
    )
    max_rejected_share: float = Field(
        0.10,
        ge=0,
        lt=1,
        description="rejected answers, each: the share moved toward may not be shown above this (exact binomial "
        "lower bound at gate.confidence); tested at any size of the set",
    )
    rules: list[GateRule] = Field(default_factory=list, description="more rules, on any metric, set and slice")
    min_preference_gain: float = Field(
        0.0,
        ge=-1,
        le=1,
        description="preference objectives: the candidate's held-out preference accuracy minus the champion's, on "
        "its lower bound, must reach this (0: at least as good beyond the noise)",
    )
    max_length_growth: float = Field(
        0.2,
        ge=0,
        le=10,
        description="preference objectives: the median growth of greedy answers' length vs the champion, on its "
        "upper bound, may not exceed this",
    )
    max_agreement_gain: float = Field(
        0.05,
        ge=0,
        le=1,
        description="eval.agreement_probes: how much more often than the champion the candidate may prefer the "
        "agreeing answer (upper bound)",
    )
    max_kl_to_champion: float | None = Field(
        None, gt=0, description="bound on the mean token KL(candidate || champion) on new data; null: reported only"
    )
    per_slice: bool = Field(
        False,
        description="apply the new/old-data rules to every eval.slice_by slice too "
        "(slices under min_examples are reported, not gated)",
    )
    require_approval: bool = Field(
        False,
        description="a passing version waits for `ctloop approve` before it becomes challenger (and can be promoted)",
    )
    confidence: float = Field(0.95, ge=0.5, lt=1, description="one-sided level of the paired-bootstrap bound")
    seed_spread: float = Field(
        0.005,
        ge=0,
        lt=1,
        description="spread (standard deviation) of a rule's relative change between training seeds, added to the "
        "bootstrap's evaluation noise: the bootstrap resamples examples, not training runs. Default: the 95% upper "
        "limit of the spread measured on the quickstart's tiny model (0.35% over 20 seed pairs, "
        "benchmarks/gate_false_promotions.py); measure your model's (the same data trained with two seeds, a few "
        "times) and set it; 0: evaluation noise only",
    )
    require_seed_calibration: bool = Field(
        False,
        description="no PASS without a seed spread measured on this model and recipe (`ctloop calibrate-seeds`); "
        "false: gate.seed_spread is assumed, and the gate says so",
    )
    bootstrap_samples: int = Field(
        2000, ge=100, le=1_000_000, description="paired-bootstrap resamples behind every rule's bound"
    )
    min_examples: int = Field(30, ge=1, description="fewer examples in an evaluation set: INCONCLUSIVE")
    seed: int = Field(0, description="seed of the bootstrap and of the seed-noise draws")
    first_cycle: Literal["compare_to_base", "accept", "reject"] = Field(
        "compare_to_base", description="what to compare against when there is no champion yet"
    )


class RegistryConfig(Section):
    model_name: str = Field(
        "ctloop-adapter",
        min_length=1,
        pattern=r"^[A-Za-z0-9_.\-]+$",
        description="the registered model's name in MLflow",
    )
    experiment: str = Field("ctloop", min_length=1, description="the MLflow experiment holding each cycle's run")
    tracking_uri: str | None = Field(
        None, description="MLflow URI; default: MLFLOW_TRACKING_URI, else SQLite in the workspace"
    )
    promote_first: bool = Field(True, description="make the first passing version champion right away")
    retry_delays_s: list[Annotated[float, Field(ge=0, le=600)]] = Field(
        [1.0, 4.0, 16.0],
        max_length=10,
        description="seconds to wait before each retry of an idempotent registry call that hit a transport, "
        "server or database error; then the stage fails (and resumes when run again)",
    )
    artifact_location: str | None = Field(
        None,
        description="where a new experiment keeps its artifacts (s3://..., gs://...); default: with a tracking "
        "server, the server's own store (mlflow-artifacts:/); without one, <workspace>/mlartifacts",
    )


class PublishTarget(Section):
    """One place a promoted version must be servable before the alias moves.

    vllm: each replica's runtime LoRA API (POST /v1/load_lora_adapter, also SGLang), told to load
    `lora_path` (a template with {name} and {version}: where that server reads the adapter, on a
    shared volume). ctloop: other `ctloop serve` instances, same API; each downloads the version
    from the registry itself. directory: an atomic copy to `path`/<name>-v<N>/, for vLLM's
    filesystem resolver or any engine that watches a folder."""

    kind: Literal["vllm", "ctloop", "directory"] = Field(
        description="vllm (its runtime LoRA API, SGLang's too), ctloop (other ctloop serve replicas, same API) or "
        "directory (an atomic copy into a folder an engine reads)"
    )
    urls: list[str] = Field(default_factory=list, description="vllm, ctloop: each replica's base URL")
    path: str | None = Field(None, description="directory: the folder; vllm: the lora_path template")
    token_env: str | None = Field(None, description="env var holding the bearer token (ctloop: its admin token)")
    timeout_s: float = Field(30.0, gt=0, description="a publish call taking longer fails (and is retried)")

    @model_validator(mode="after")
    def _complete(self) -> PublishTarget:
        if self.kind in ("vllm", "ctloop") and not self.urls:
            raise ValueError(f"a {self.kind} publish target needs urls: the base URL of every replica")
        if self.kind in ("vllm", "directory") and not self.path:
            what = "the folder to copy into" if self.kind == "directory" else "the lora_path template"
            raise ValueError(f"a {self.kind} publish target needs path: {what}")
        if self.kind == "vllm":
            try:
                self.path.format(name="model", version=1)
            except (KeyError, IndexError, ValueError) as exc:
                raise ValueError(
                    f"publish target path {self.path!r} is not a template of {{name}} and {{version}} ({exc!r})"
                ) from None
        return self


class PublishConfig(Section):
    """Where promoted, rolled-back and challenger versions are published, as `<name>-v<N>` (never a
    reused name), before any alias moves."""

    targets: list[PublishTarget] = Field(
        default_factory=list, description="where a version is loaded before an alias moves to it; empty: nowhere"
    )
    require: Literal["all"] | int = Field(
        "all", description="all: every replica must load the version; N: at least N replicas"
    )

    @model_validator(mode="after")
    def _reachable(self) -> PublishConfig:
        replicas = sum(len(t.urls) if t.kind != "directory" else 1 for t in self.targets)
        if self.require != "all" and not 1 <= self.require <= max(replicas, 1):
            raise ValueError(
                f"publish.require={self.require} must be 'all' or between 1 and the {replicas} replicas listed"
            )
        return self

    attempts: int = Field(3, ge=1, le=20, description="tries per replica, with backoff")


class OrchestrationConfig(Section):
    """How the Airflow DAGs (dags/ctloop_dag.py) run this config."""

    data: Path | None = Field(None, description="file where new records land; a run's conf {'data': ...} overrides it")
    schedule: str | None = Field("@weekly", description="cron or preset for the cycle DAG; null: manual only")
    drift_watch_schedule: str | None = Field("@hourly", description="how often the watch DAG checks for drift")
    retries: int = Field(1, ge=0, le=20, description="Airflow task retries")
    retry_delay_minutes: float = Field(5.0, ge=0, description="minutes between Airflow retries")
    lock_wait_seconds: float = Field(600.0, ge=0, description="how long a task waits for a busy workspace")
    source: Literal["files", "production"] = Field(
        "files",
        description="files: cycles run on `data` (or a run's conf); production: the cycle DAG harvests the request "
        "log and feedback first, and the watch DAG checks live traffic for drift",
    )
    production_window: str = Field(
        "7d", description="source production: how far back the harvest and the drift watch look (24h, 7d, ...)"
    )

    @field_validator("production_window")
    @classmethod
    def _window(cls, value: str) -> str:
        from ctloop.fileio import parse_since

        parse_since(value)  # raises ValueError naming the two accepted forms
        return value


class ServeConfig(Section):
    """`ctloop serve`: the OpenAI-compatible server that answers with the champion and shadows the challenger."""

    host: str = Field("127.0.0.1", description="bind address of ctloop serve")
    port: int = Field(8000, ge=0, le=65535, description="port of ctloop serve (0: any free port)")
    backend: Literal["in_process", "openai"] = Field(
        "in_process",
        description="in_process: the base model + adapters in this process; openai: an "
        "OpenAI-compatible server (vLLM, TGI) that serves the adapters by name",
    )
    upstream_url: str | None = Field(None, description="openai backend: base URL, e.g. http://vllm:8000/v1")
    upstream_model: str = Field(
        "{name}-v{version}",
        description="openai backend: the upstream model name of a version ({name}: registry.model_name)",
    )
    upstream_api_key_env: str = Field("CTLOOP_UPSTREAM_API_KEY", description="env var holding the upstream key")
    upstream_timeout_s: float = Field(
        60.0, gt=0, description="openai backend: a call to the engine taking longer fails (504)"
    )
    max_batch_size: int = Field(
        16,
        ge=1,
        description="in_process backend: sequences decoded together, across adapters (continuous batching, user "
        "requests before shadow calls); 1: one request at a time",
    )
    max_batch_tokens: int = Field(
        8192,
        ge=1,
        description="in_process backend: cap on prompt + max_tokens summed over a batch (bounds its KV cache); a "
        "larger single request still runs, alone",
    )
    max_tokens: int = Field(256, ge=1, le=32768, description="cap on a request's max_tokens")
    default_max_tokens: int = Field(64, ge=1, description="max_tokens when a request gives none")
    max_body_bytes: int = Field(65536, ge=1024, description="larger request bodies get 413")
    body_timeout_s: float = Field(30.0, gt=0, description="a body that takes longer to arrive gets 408")
    header_timeout_s: float = Field(
        30.0, gt=0, description="a connection whose first request head takes longer is closed"
    )
    max_head_bytes: int = Field(65536, ge=4096, description="a larger request head (request line and headers) gets 431")
    max_headers: int = Field(100, ge=16, description="a request head with more header lines gets 431")
    keep_alive_s: int = Field(
        65,
        ge=1,
        description="an idle keep-alive connection is closed after this long; keep it above the clients' own pool "
        "expiry (httpx and the OpenAI SDK: 5 s), or a client may reuse a connection the server is closing",
    )
    admin_token_env: str = Field(
        "CTLOOP_ADMIN_TOKEN", description="env var holding the admin bearer token; unset: admin endpoints are disabled"
    )
    poll_seconds: float = Field(5.0, gt=0, description="how often the registry's aliases are checked")
    poll_timeout_s: float = Field(
        30.0,
        gt=0,
        description="a registry poll that takes longer counts as an outage (/healthz, ctloop_role_sync_errors_total) "
        "instead of waiting out MLflow's own retries (minutes); the roles in place keep serving",
    )
    drain_seconds: float = Field(10.0, ge=0, description="on shutdown, how long queued shadow calls may finish")
    log_fraction: float = Field(
        1.0,
        ge=0,
        le=1,
        strict=True,
        description="share of answered requests written to the request log (hash of the id); 0: none",
    )
    log_spool_bytes: int = Field(
        64 * 1024 * 1024,
        ge=0,
        description="rows the log store cannot take (down past the retries) wait in <workspace>/spool/ up to this "
        "size and are written back first once it can; 0: drop and count them",
    )
    log_retention_days: float | None = Field(
        30.0,
        gt=0,
        description="log store rows (requests, feedback, shadow pairs) older than this are purged, by the server "
        "every hour and by `ctloop logs purge`; null: kept forever",
    )
    redact: bool = Field(
        False, description="replace e-mail addresses, phone numbers and keys in the request log and feedback"
    )
    feedback_token_env: str = Field(
        "CTLOOP_FEEDBACK_TOKEN",
        description="env var holding the bearer token of POST /v1/feedback; unset: feedback is disabled (403)",
    )
    max_correction_chars: int = Field(16384, ge=1, description="a longer feedback correction gets 413")
    max_prompt_tokens: int | None = Field(
        None, ge=1, description="refuse longer prompts (400) below the model's own context length"
    )
    max_lora_rank: int = Field(
        64,
        ge=1,
        le=4096,
        description="in_process backend: adapters of a higher rank are refused before anything is allocated "
        "(as vLLM's --max-lora-rank)",
    )
    adapter_roots: list[Path] = Field(
        default_factory=list,
        description="folders /v1/load_lora_adapter may load a lora_path from; empty: only registry versions",
    )

    @model_validator(mode="after")
    def _consistent(self) -> ServeConfig:
        if self.default_max_tokens > self.max_tokens:
            raise ValueError(
                f"serve.default_max_tokens={self.default_max_tokens} is above serve.max_tokens={self.max_tokens}, "
                f"so every request without max_tokens would be refused; lower default_max_tokens or raise max_tokens"
            )
        return self


class RolloutConfig(Section):
    """The canary after shadow: the candidate answers a growing share of live traffic, and each step
    advances, holds or rolls back on always-valid bounds of its rates against the champion's."""

    steps: list[Annotated[float, Field(gt=0, le=1)]] = Field(
        [0.05, 0.25, 0.5, 1.0], min_length=1, description="the candidate's share of live traffic at each step"
    )
    min_requests_per_step: int = Field(200, ge=1, description="candidate answers a step needs before it advances")
    max_error_rate_increase: float = Field(
        0.01, gt=0, lt=1, description="candidate error rate minus the champion's, at most (absolute)"
    )
    max_negative_rate_increase: float = Field(
        0.02, gt=0, lt=1, description="share of answers rated below harvest.rejected_below, minus the champion's"
    )
    max_correction_rate_increase: float = Field(
        0.02, gt=0, lt=1, description="share of answers users corrected, minus the champion's"
    )
    latency_slo_ms: float | None = Field(
        None,
        gt=0,
        description="with it: the share of answers slower than this is a metric too (a latency quantile as a "
        "rate: at the champion's p95, about 5% of its answers are slower); None: latency not checked",
    )
    max_slow_rate_increase: float = Field(
        0.02, gt=0, lt=1, description="share of answers slower than latency_slo_ms, minus the champion's"
    )
    alpha: float = Field(
        0.05, gt=0, lt=0.5, description="chance of any wrong decision over the whole rollout, every look included"
    )
    look_every_s: float = Field(30.0, gt=0, description="how often `ctloop serve` looks at a running rollout")
    feedback_settle_s: float = Field(
        300.0,
        ge=0,
        description="feedback rates count only answers at least this old (their ratings have had time to "
        "arrive), so a step never advances on answers nobody has rated yet; errors count at once",
    )

    @field_validator("steps")
    @classmethod
    def _growing_to_all(cls, steps: list[float]) -> list[float]:
        if steps != sorted(set(steps)) or steps[-1] != 1.0 or len(steps) < 2:
            raise ValueError(
                "steps must grow strictly from a share below 1.0 and end at 1.0 (all live traffic: the promotion)"
            )
        return steps


class JudgeConfig(Section):
    """When a judge of answer pairs (`shadow.judge`) is trusted: its agreement with what users said
    (corrections over the answers they corrected, an answer rated up over one rated down to the same
    prompt), measured by `ctloop judge calibrate`, and its consistency when the answers swap places."""

    min_agreement: float = Field(
        0.3,
        ge=-1,
        le=1,
        description="lower 95% bound of Cohen's kappa between the judge and users' labels that trusts a judge",
    )
    min_consistency: float = Field(
        0.8,
        ge=0,
        le=1,
        description="share of pairs whose verdict survives swapping the answers' places; a judge shown below it "
        "(in calibration or on the shadow pairs) judges by position and is not counted",
    )
    min_pairs: int = Field(30, ge=1, description="labelled pairs a calibration needs")
    require_calibration: bool = Field(
        True, description="false: an uncalibrated judge counts anyway (the shadow report says so)"
    )
    instruction: str = Field(
        "Below is a request and a helpful, correct and concise answer to it.",
        min_length=1,
        description="the likelihood judge: the text before the request each answer is scored under",
    )
    margin: float = Field(
        0.02, ge=0, description="the likelihood judge: log-probability per character that separates a win from a tie"
    )
    seed: int = Field(0, description="seed of the calibration's bootstrap")


class ShadowConfig(Section):
    """Mirroring to the challenger (router and log store) and the decision drawn from the pairs."""

    enabled: bool = Field(True, description="mirror live requests to the challenger and log both answers")
    fraction: float = Field(1.0, ge=0, le=1, description="share of requests mirrored (hash of the request id)")
    queue_size: int = Field(256, ge=1, description="shadow calls waiting; when full, new ones are dropped+counted")
    workers: int = Field(4, ge=1, le=256, description="shadow calls in flight at most")
    timeout_s: float = Field(30.0, gt=0, description="a shadow call taking longer is cancelled (timed_out)")
    breaker_window: int = Field(20, ge=1, description="recent shadow calls the circuit breaker looks at")
    breaker_failure_ratio: float = Field(0.5, gt=0, le=1, description="failed share of the window that opens it")
    breaker_cooldown_s: float = Field(30.0, ge=0, description="open time before a probe call is let through")
    store_url: str | None = Field(
        None,
        description="SQLAlchemy URL of the log store; default: SQLite "
        "<workspace>/shadow.db (postgresql+psycopg://... works)",
    )
    redact: bool = Field(False, description="replace e-mail addresses, phone numbers and keys before storing")
    min_pairs: int = Field(100, ge=1, description="completed pairs a PROMOTE needs")
    max_error_rate: float = Field(
        0.02,
        ge=0,
        le=1,
        description="challenger timeouts+errors (+ calls its open breaker skipped): REJECT when significantly "
        "above; PROMOTE needs the always-valid upper bound at or below it (0 failures: 224 pairs at 2%)",
    )
    error_block_s: float = Field(
        30.0,
        ge=0,
        description="the error rate is tested in blocks of this many seconds (failures come in outages, not one by "
        "one; keep it longer than an outage and breaker_cooldown_s); 0: every request its own block, for failures "
        "known to be independent",
    )
    min_duration_s: float = Field(
        600.0,
        ge=0,
        description="a PROMOTE needs pairs spread over at least this long (several breaker cycles)",
    )
    max_dropped_share: float = Field(
        0.05, ge=0, le=1, description="more of the mirrored requests dropped from a full queue than this: HOLD"
    )
    max_latency_ratio: float = Field(1.5, gt=0, description="median challenger/champion latency above this: REJECT")
    max_length_ratio: float = Field(2.0, gt=1, description="median output length ratio outside [1/x, x]: REJECT")
    min_judge_win_rate: float = Field(
        0.47, ge=0, le=1, description="with a judge: lower bound of the challenger's win rate a PROMOTE needs"
    )
    judge: str | None = Field(
        None,
        description="'module:function' taking (prompt, answer_a, answer_b) and returning 'a', 'b' or 'tie' "
        "(called twice, order swapped), or 'likelihood': the base model scores each answer; its verdicts count "
        "once `ctloop judge calibrate` has found it agreeing with users (section judge)",
    )
    embedding_similarity: bool = Field(True, description="score agreement by MiniLM cosine similarity too")
    confidence: float = Field(
        0.95, ge=0.5, lt=1, description="one-sided level of each shadow test (always valid, at any look)"
    )


class CtloopConfig(Section):
    """The root: one section per stage."""

    workspace: Path | None = Field(
        None,
        description="the workspace folder; relative to the config file; --workspace wins; default ./ctloop-workspace",
    )
    model: ModelConfig
    data: DataConfig = DataConfig()
    drift: DriftConfig = DriftConfig()
    watch: WatchConfig = WatchConfig()
    replay: ReplayConfig = ReplayConfig()
    lora: LoraConfig = LoraConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    gate: GateConfig = GateConfig()
    registry: RegistryConfig = RegistryConfig()
    orchestration: OrchestrationConfig = OrchestrationConfig()
    harvest: HarvestConfig = HarvestConfig()
    production: ProductionConfig = ProductionConfig()
    publish: PublishConfig = PublishConfig()
    serve: ServeConfig = ServeConfig()
    shadow: ShadowConfig = ShadowConfig()
    judge: JudgeConfig = JudgeConfig()
    rollout: RolloutConfig = RolloutConfig()

    @model_validator(mode="after")
    def _watch_is_affordable(self) -> CtloopConfig:
        if self.watch.alpha_spending == "lifetime":
            if not set(LIFETIME_DETECTORS) & set(self.drift.detectors):
                raise ValueError(
                    f"watch.alpha_spending=lifetime tests ever smaller shares of the budget, which only a detector "
                    f"with an analytic p-value resolves (pca_ks), and drift.detectors={self.drift.detectors} has "
                    f"none; add pca_ks to drift.detectors, or use watch.alpha_spending: period"
                )
            return self
        permutation_tests = {"mean", "mmd", "rff_mmd"} & set(self.drift.detectors)
        needed = math.ceil(len(self.drift.detectors) * self.watch.period_looks / self.watch.false_alarm_budget) - 1
        if permutation_tests and needed > MAX_WATCH_PERMUTATIONS:
            raise ValueError(
                f"watch.period_looks={self.watch.period_looks} with watch.false_alarm_budget="
                f"{self.watch.false_alarm_budget} tests each look at an alpha that needs {needed} permutations "
                f"per drifted look (over {MAX_WATCH_PERMUTATIONS}); use fewer looks per period or a larger budget"
            )
        return self

    def _added_at_default(self, section: str) -> set[str]:
        """The settings of `section` added after ctloop 0.1 that are at their defaults."""
        model = getattr(self, section)
        fields = type(model).model_fields
        return {name for name in ADDED_SINCE_0_1.get(section, ()) if getattr(model, name) == fields[name].default}

    def training_hash(self) -> str:
        """Hash of everything that changes what a cycle computes (not where it stores it)."""
        payload = self.model_dump(
            mode="json",
            exclude={
                **dict.fromkeys(
                    (
                        "workspace",
                        "registry",
                        "orchestration",
                        "serve",
                        "shadow",
                        "harvest",
                        "production",
                        "publish",
                        "watch",
                        "rollout",
                        "judge",
                    ),
                    True,
                ),
                "model": {"device", "threads"},
                "eval": {"report_examples", *self._added_at_default("eval")},  # report_examples: shown, not decided
                # a cycle keeps the id it had before these settings existed while they are at their defaults
                "train": {
                    *((*PREFERENCE_SETTINGS, "objective") if self.train.objective == "sft" else ()),
                    *self._added_at_default("train"),
                },
                "gate": self._added_at_default("gate"),
            },
        )
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def load_config(path: str | Path, base_dir: Path | None = None) -> CtloopConfig:
    """Read and validate a YAML config file; raise ConfigError listing every problem at once.

    A relative `workspace` is resolved against the config file's folder, and so is a relative
    `model.base` when that folder exists there (otherwise it is taken as a hub id), so a config
    means the same from any current directory.
    """
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            str(path), ["the file does not exist; check the path, or start from configs/production.example.yaml"]
        )
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(str(path), [f"not valid YAML ({exc}); fix the syntax at the position shown"]) from exc
    if not isinstance(raw, dict):
        raise ConfigError(str(path), ["the top level must be a mapping of sections (model:, data:, ...)"])
    return config_from_dict(raw, source=str(path), base_dir=base_dir or path.parent)


def config_from_dict(raw: dict[str, Any], source: str = "<config>", base_dir: Path | None = None) -> CtloopConfig:
    try:
        config = CtloopConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(source, [_describe(err) for err in exc.errors()]) from None
    if base_dir is not None:
        config = _resolve_relative_paths(config, base_dir)
    return config


def _resolve_relative_paths(config: CtloopConfig, base_dir: Path) -> CtloopConfig:
    """Relative paths in a config file mean "next to this file", whatever the current directory."""
    base = Path(config.model.base)
    updates: dict[str, Any] = {}
    if not base.is_absolute() and (base_dir / base).exists():  # else it may be a hub id
        updates["model"] = config.model.model_copy(update={"base": str((base_dir / base).resolve())})
    if config.workspace is not None and not config.workspace.is_absolute():
        updates["workspace"] = (base_dir / config.workspace).resolve()
    data = config.orchestration.data
    if data is not None and not data.is_absolute():
        updates["orchestration"] = config.orchestration.model_copy(update={"data": (base_dir / data).resolve()})
    golden = {
        name: path if path.is_absolute() else (base_dir / path).resolve() for name, path in config.eval.golden.items()
    }
    probes = config.eval.agreement_probes
    if probes is not None and not probes.is_absolute():
        probes = (base_dir / probes).resolve()
    if golden != config.eval.golden or probes != config.eval.agreement_probes:
        updates["eval"] = config.eval.model_copy(update={"golden": golden, "agreement_probes": probes})
    reference = config.drift.reference
    if reference is not None and not reference.is_absolute():
        updates["drift"] = config.drift.model_copy(update={"reference": (base_dir / reference).resolve()})
    return config.model_copy(update=updates) if updates else config


def _describe(err: dict[str, Any]) -> str:
    """One line per problem: key, value, rule, fix."""
    key = ".".join(str(part) for part in err["loc"])
    kind = err["type"]
    value = err.get("input")
    ctx = err.get("ctx", {})
    if kind == "extra_forbidden":
        parent = _model_at(err["loc"][:-1])
        allowed = sorted(parent.model_fields) if parent else []
        close = difflib.get_close_matches(str(err["loc"][-1]), allowed, n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        return f"{key}: unknown key; {hint}allowed keys here: {', '.join(allowed)}"
    if kind == "missing":
        return f"{key}: required but missing; add it (see configs/production.example.yaml for every key)"
    fixes = {
        "greater_than_equal": f"set it to a value >= {ctx.get('ge')}",
        "greater_than": f"set it to a value > {ctx.get('gt')}",
        "less_than_equal": f"set it to a value <= {ctx.get('le')}",
        "less_than": f"set it to a value < {ctx.get('lt')}",
        "literal_error": f"use one of {ctx.get('expected')}",
        "string_pattern_mismatch": f"use only characters matching {ctx.get('pattern')}",
    }
    if kind == "value_error":  # ctloop's own cross-field rules: the message names the keys and the fix
        return f"{key or 'config'}: {str(err['msg']).removeprefix('Value error, ')}"
    fix = fixes.get(kind, "correct the value's type or format")
    return f"{key}: got {value!r}; {err['msg'].lower()}; {fix}"


def _model_at(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    model: type[BaseModel] = CtloopConfig
    for part in loc:
        field = model.model_fields.get(str(part))
        annotation = field.annotation if field else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return None
        model = annotation
    return model


def config_warnings(config: CtloopConfig) -> list[str]:
    """Settings that are valid but cannot do what they are for: a gate that can never decide, a cycle
    of a handful of optimizer steps. `ctloop validate-config` prints them."""
    warnings = []
    data, gate, train = config.data, config.gate, config.train
    if data.max_holdout_rows < gate.min_examples:
        warnings.append(
            f"data.max_holdout_rows={data.max_holdout_rows} < gate.min_examples={gate.min_examples}: the new-data "
            "holdout can never be large enough, so every gate is INCONCLUSIVE; raise data.max_holdout_rows or lower "
            "gate.min_examples"
        )
    else:
        needed = math.ceil((gate.min_examples - 0.5) / data.holdout_fraction)  # the split rounds to nearest
        if needed > data.min_rows:
            warnings.append(
                f"data.holdout_fraction={data.holdout_fraction:g} and gate.min_examples={gate.min_examples}: a cycle "
                f"needs at least {needed} new rows to decide, but data.min_rows={data.min_rows} accepts fewer; "
                f"cycles of {data.min_rows}-{needed - 1} rows end INCONCLUSIVE (raise data.min_rows to {needed}, or "
                "raise data.holdout_fraction, or lower gate.min_examples)"
            )
    train_rows = data.min_rows - min(data.max_holdout_rows, max(1, round(data.holdout_fraction * data.min_rows)))
    most_steps = math.ceil(train.epochs * train_rows * config.model.max_seq_tokens / train.batch_tokens)
    if most_steps < 10:
        warnings.append(
            f"a cycle of data.min_rows={data.min_rows} rows trains at most {most_steps} optimizer steps (every row "
            f"{config.model.max_seq_tokens} tokens long, train.batch_tokens={train.batch_tokens}, "
            f"train.epochs={train.epochs:g}): too few to learn from; raise data.min_rows or train.epochs, or lower "
            "train.batch_tokens"
        )
    return warnings
