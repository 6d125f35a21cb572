"""Calibrated two-sample tests on embeddings: is the new data distributed like the reference?

Every detector returns a statistic and a valid p-value. The permutation tests share one engine:
the pooled sample Z (reference rows first), B random relabellings with the original group sizes,
and p = (1 + #{null >= observed}) / (1 + B), never 0. Preprocessing is label-free (fitted on the
pooled sample, a symmetric function of it) so it cannot break calibration.

Detectors:
- `mean`:       ||mean(X) - mean(Y)||^2 with a permutation null (the seed's statistic, calibrated);
- `mmd`:        unbiased MMD^2, Gaussian kernel, median-heuristic bandwidth on the pooled sample,
                exact permutation test computed in row blocks: memory O(block * n + n * B), never n^2;
- `rff_mmd`:    MMD^2 on random Fourier features: linear in n, for hundreds of thousands of rows;
- `pca_ks`:     two-sample KS per component of a pooled PCA, Benjamini-Hochberg across components
                (Simes' global p-value), which also says which directions moved;
- `classifier`: a linear classifier trained on one half, AUC on the other half, Mann-Whitney p-value.

`detect_drift` runs the configured detectors, combines their p-values with Holm's step-down
procedure, and returns a frozen DriftReport.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from functools import partial

import numpy as np

from ctloop.config import DriftConfig
from ctloop.errors import DataError

DETECTORS = ("mean", "mmd", "rff_mmd", "pca_ks", "classifier")
PERMUTATION_DETECTORS = ("mean", "mmd", "rff_mmd")
EXPLAIN_ROWS = 5000  # rows per side the explanation (nearest-reference outliers) looks at


@dataclass(frozen=True)
class DetectorResult:
    name: str
    statistic: float
    p_value: float
    drift: bool = False  # after Holm's adjustment across detectors
    adjusted_p: float = float("nan")
    details: dict = field(default_factory=dict)


@dataclass(frozen=True)
class DriftReport:
    outcome: str  # "drift", "no_drift" or "not_enough_data"
    n_reference: int
    n_current: int
    alpha: float
    detectors: tuple[DetectorResult, ...]
    reasons: tuple[str, ...]
    explanation: dict = field(default_factory=dict)
    effect: dict = field(default_factory=dict)  # see `mean_distance_effect`

    @property
    def drift(self) -> bool:
        return self.outcome == "drift"

    def evidence(self) -> str:
        tests = ", ".join(f"{d.name} p={d.p_value:.4g}" for d in self.detectors) or "no test run"
        return f"reference {self.n_reference} rows, current {self.n_current}; {tests}"

    def summary(self) -> str:
        return f"drift check: {self.outcome} ({self.evidence()})"

    def to_dict(self) -> dict:
        out = asdict(self)
        out["drift"] = self.drift
        out["detectors"] = [{k: v for k, v in asdict(d).items()} for d in self.detectors]
        return out


def check_embeddings(reference: np.ndarray, current: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Reject what no test can use: wrong shapes, mismatched dimensions, NaN or inf."""
    for name, array in (("reference", reference), ("current", current)):
        if array.ndim != 2:
            raise DataError(f"{name} embeddings must be a 2-D array (rows x dims), got shape {array.shape}")
        if not np.isfinite(array).all():
            bad = int((~np.isfinite(array)).any(axis=1).sum())
            raise DataError(f"{name} embeddings have {bad} rows with NaN or inf; fix the embedder or drop those rows")
    if reference.shape[1] != current.shape[1]:
        raise DataError(
            f"embedding dimensions differ: reference {reference.shape[1]}, current "
            f"{current.shape[1]}; embed both with the same model"
        )
    return reference.astype(np.float32, copy=False), current.astype(np.float32, copy=False)


def detect_drift(
    reference: np.ndarray,
    current: np.ndarray,
    config: DriftConfig,
    on_progress: Callable[[int], None] | None = None,
    alpha: float | None = None,
) -> DriftReport:
    """Run the configured detectors on two embedding matrices and decide (Holm across detectors).

    `alpha` overrides `config.alpha` (the drift watch passes its per-look share of a budget). When it
    is so small that `config.permutations` cannot resolve it, the permutation tests draw more
    permutations in rounds, up to `permutations_needed`, and stop as soon as the p-value can no
    longer fall to alpha: the decision is that of the full test, at a fraction of its cost when
    nothing drifted."""
    alpha = config.alpha if alpha is None else alpha
    reference, current = check_embeddings(reference, current)
    n_ref, n_cur = len(reference), len(current)
    if min(n_ref, n_cur) < config.min_rows:
        return DriftReport(
            "not_enough_data",
            n_ref,
            n_cur,
            alpha,
            (),
            (
                f"reference has {n_ref} rows and current {n_cur}; each needs at least drift.min_rows="
                f"{config.min_rows} for a decision (collect more data or lower the limit)",
            ),
        )
    rng = np.random.default_rng(config.seed)
    reference = reference[_subsample(len(reference), config.max_rows, rng)]
    current_rows = _subsample(n_cur, config.max_rows, rng)
    current = current[current_rows]
    pooled = np.concatenate([reference, current])
    n_x = len(reference)
    labels = _permutation_labels(n_x, len(pooled), config.permutations, rng)
    limit = permutations_needed(len(config.detectors), alpha, config.permutations)
    results = []
    for index, name in enumerate(config.detectors):
        run = partial(_run_detector, name, pooled, n_x, config, (config.seed, index))
        result = run(labels)
        if name in PERMUTATION_DETECTORS and limit > config.permutations:
            result = _more_permutations(run, result, limit, alpha, config.permutations, n_x, len(pooled), rng)
        results.append(result)
        if on_progress:
            on_progress(1)
    adjusted = holm(np.array([r.p_value for r in results]))
    results = [
        DetectorResult(r.name, r.statistic, r.p_value, bool(a <= alpha), float(a), r.details)
        for r, a in zip(results, adjusted, strict=True)
    ]
    drifted = [r for r in results if r.drift]
    reasons = [
        f"{r.name}: statistic {r.statistic:.4g}, p {r.p_value:.4g}, Holm-adjusted {r.adjusted_p:.4g} "
        f"{'<=' if r.drift else '>'} alpha {alpha:.4g}"
        for r in results
    ]
    if max(n_ref, n_cur) > config.max_rows:
        reasons.append(
            f"each side subsampled to drift.max_rows={config.max_rows} rows (seeded): power is "
            f"that of {config.max_rows} rows per side"
        )
    effect = mean_distance_effect(pooled, labels, rng)
    reasons.append(
        f"effect: mean embedding distance {effect['estimate']:.4g}, bias-corrected (95% bootstrap interval {effect['lower']:.4g}-"
        f"{effect['upper']:.4g}; with no drift it is typically {effect['null_median']:.4g} at these sample sizes)"
    )
    # The nearest-reference search is O(n_ref x n_cur): explain on a seeded sample of each side.
    ref_sample = _subsample(len(reference), EXPLAIN_ROWS, rng)
    cur_sample = _subsample(len(current), EXPLAIN_ROWS, rng)
    explanation = explain(reference[ref_sample], current[cur_sample], results, current_rows[cur_sample])
    return DriftReport(
        "drift" if drifted else "no_drift", n_ref, n_cur, alpha, tuple(results), tuple(reasons), explanation, effect
    )


def mean_distance_effect(
    pooled: np.ndarray, labels: np.ndarray, rng: np.random.Generator, resamples: int = 200
) -> dict[str, float]:
    """How far apart the two samples are, in the embedding's own units: the distance between their
    mean embeddings, bias-corrected, with a 95% bootstrap interval (rows resampled within each side,
    each replicate corrected the same way), and the median of the same distance over the
    permutations (what sampling noise alone gives at these sizes).

    The plain distance between sample means is biased upwards: its square exceeds the true one by
    tr(S_x)/n_x + tr(S_y)/n_y on average. Its percentile bootstrap adds that bias again, so the
    interval could miss the estimate ("0.06495, interval 0.07944-0.114"). Subtracting it from the
    square (then the square root, at 0 when it goes below), and from each replicate's square once
    more for the resampling's own bias, fixes both; `raw` keeps the plain distance."""
    n_x = int(labels[:, 0].sum())
    reference, current = pooled[:n_x].astype(np.float64), pooled[n_x:].astype(np.float64)
    n_y = len(current)
    raw = float(np.linalg.norm(reference.mean(axis=0) - current.mean(axis=0)))
    observed = _corrected(reference.mean(axis=0), current.mean(axis=0), _spread(reference), _spread(current), n_x, n_y)

    def resampled(side: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per replicate: the resampled mean, and the resample's tr(S) (from counts, no copies)."""
        counts = rng.multinomial(len(side), np.full(len(side), 1 / len(side)), size=resamples).astype(np.float64)
        means = counts @ side / len(side)
        squares = counts @ np.einsum("ij,ij->i", side, side) / len(side)
        spread = (squares - np.einsum("ij,ij->i", means, means)) * len(side) / max(len(side) - 1, 1)
        return means, spread

    (mx, sx), (my, sy) = resampled(reference), resampled(current)
    # A resample's squared distance exceeds the observed one by the same bias again: take it off too,
    # so the replicates centre on the corrected estimate.
    bias = _spread(reference) / n_x + _spread(current) / n_y
    distances = _corrected(mx, my, sx + bias * n_x, sy, n_x, n_y)
    low, high = np.quantile(distances, [0.025, 0.975])
    squared_null = _mean_diff_statistics(pooled, labels)[1:] - _spread(pooled.astype(np.float64)) * (1 / n_x + 1 / n_y)
    return {
        "estimate": float(observed),
        "lower": float(low),
        "upper": float(high),
        "null_median": float(np.median(np.sqrt(np.maximum(squared_null, 0.0)))),
        "raw": raw,
    }


def _spread(side: np.ndarray) -> float:
    """tr of the sample covariance: the summed variance of the embedding's dimensions."""
    return float(side.var(axis=0, ddof=1).sum()) if len(side) > 1 else 0.0


def _corrected(mean_x, mean_y, spread_x, spread_y, n_x: int, n_y: int):
    """sqrt(max(0, |mean_x - mean_y|^2 - spread_x / n_x - spread_y / n_y)), elementwise over replicates."""
    difference = np.atleast_2d(mean_x - mean_y)
    squared = np.einsum("ij,ij->i", difference, difference) - np.asarray(spread_x) / n_x - np.asarray(spread_y) / n_y
    values = np.sqrt(np.maximum(squared, 0.0))
    return values if values.shape[0] > 1 or np.ndim(spread_x) else float(values[0])


# -- the permutation engine ----------------------------------------------------------------------


def _subsample(n: int, limit: int, rng: np.random.Generator) -> np.ndarray:
    """Row indices: all of them, or a seeded sample of `limit`."""
    if n <= limit:
        return np.arange(n)
    return np.sort(rng.choice(n, size=limit, replace=False))


def _permutation_labels(n_x: int, n: int, permutations: int, rng: np.random.Generator) -> np.ndarray:
    """Column 0: the observed split (first n_x rows are X). Columns 1..B: random splits, same sizes.

    float32 (n, B + 1) indicator of membership in X."""
    labels = np.zeros((n, permutations + 1), dtype=np.float32)
    labels[:n_x, 0] = 1.0
    for b in range(1, permutations + 1):
        labels[rng.permutation(n)[:n_x], b] = 1.0
    return labels


def _exceedances(observed: float, null: np.ndarray) -> int:
    return int(np.count_nonzero(null >= observed - 1e-12 * abs(observed)))


def permutation_p_value(observed: float, null: np.ndarray) -> float:
    """(1 + #{null >= observed}) / (1 + B): a valid p-value, never 0."""
    return float((1 + _exceedances(observed, null)) / (1 + len(null)))


def _permutation_result(name: str, stats: np.ndarray, details: dict | None = None) -> DetectorResult:
    """stats[0] is the observed statistic, stats[1:] its permutation null."""
    null = stats[1:]
    exceedances = _exceedances(float(stats[0]), null)
    return DetectorResult(
        name,
        float(stats[0]),
        (1 + exceedances) / (1 + len(null)),
        details={"permutations": len(null), "exceedances": exceedances} | (details or {}),
    )


def permutations_needed(detectors: int, alpha: float, permutations: int) -> int:
    """The most permutations a test may need: Holm's smallest threshold is alpha / detectors, and a
    permutation p-value is at least 1 / (B + 1)."""
    return max(permutations, math.ceil(detectors / alpha) - 1)


def _more_permutations(
    run: Callable[[np.ndarray], DetectorResult],
    first: DetectorResult,
    limit: int,
    alpha: float,
    chunk: int,
    n_x: int,
    n: int,
    rng: np.random.Generator,
) -> DetectorResult:
    """Draw permutations in rounds of `chunk` up to `limit` while the p-value with all `limit` of them,
    (1 + exceedances) / (1 + limit), could still be <= alpha. Stopping early changes no decision:
    the p-value reported then is above alpha, and so is the full test's."""
    exceedances, drawn = first.details["exceedances"], first.details["permutations"]
    while drawn < limit and (exceedances + 1) / (limit + 1) <= alpha:
        size = min(chunk, limit - drawn)
        more = run(_permutation_labels(n_x, n, size, rng))
        exceedances += more.details["exceedances"]
        drawn += size
    details = first.details | {"permutations": drawn, "exceedances": exceedances, "stopped_early": drawn < limit}
    return replace(first, p_value=(exceedances + 1) / (drawn + 1), details=details)


def _run_detector(
    name: str, pooled: np.ndarray, n_x: int, config: DriftConfig, seed: tuple[int, int], labels: np.ndarray
) -> DetectorResult:
    # A fresh generator per call: the bandwidth, features and split are the same in every round.
    rng = np.random.default_rng(seed)
    if name == "mean":
        return mean_shift_test(pooled, labels)
    if name == "mmd":
        return mmd_test(pooled, labels, rng)
    if name == "rff_mmd":
        return rff_mmd_test(pooled, labels, rng, config.rff_features)
    if name == "pca_ks":
        return pca_ks_test(pooled, n_x, config.pca_components)
    return classifier_test(pooled, n_x, rng)


def _mean_diff_statistics(features: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """||mean over X - mean over Y||^2 for every labelling column, via one GEMM per row chunk.

    Rows are centred on the pooled mean chunk by chunk (label-free; keeps float sums small
    without a second copy of the data)."""
    n = len(features)
    n_x = float(labels[:, 0].sum())
    centre = features.mean(axis=0, dtype=np.float64).astype(np.float32)
    sums_x = np.zeros((features.shape[1], labels.shape[1]), dtype=np.float64)
    total = np.zeros((features.shape[1], 1), dtype=np.float64)
    for start in range(0, n, 8192):
        chunk = features[start : start + 8192] - centre
        sums_x += (chunk.T @ labels[start : start + 8192]).astype(np.float64)
        total += chunk.sum(axis=0, dtype=np.float64)[:, None]
    diff = sums_x / n_x - (total - sums_x) / (n - n_x)
    return (diff**2).sum(axis=0)


def mean_shift_test(pooled: np.ndarray, labels: np.ndarray) -> DetectorResult:
    return _permutation_result("mean", _mean_diff_statistics(pooled, labels))


def _centred(pooled: np.ndarray) -> np.ndarray:
    # Mean in float64 for precision, subtraction in float32: no float64 copy of the whole sample.
    return pooled - pooled.mean(axis=0, dtype=np.float64).astype(np.float32)


def median_bandwidth(pooled: np.ndarray, rng: np.random.Generator, sample: int = 1000) -> float:
    """Median pairwise squared distance on a pooled subsample (label-free), the kernel's scale."""
    rows = pooled[rng.choice(len(pooled), size=min(sample, len(pooled)), replace=False)].astype(np.float64)
    sq = (rows**2).sum(axis=1)
    dist = sq[:, None] + sq[None, :] - 2 * rows @ rows.T
    upper = dist[np.triu_indices(len(rows), k=1)]
    median = float(np.median(upper[upper > 0])) if (upper > 0).any() else 1.0
    return median


def mmd_test(pooled: np.ndarray, labels: np.ndarray, rng: np.random.Generator, block: int = 1024) -> DetectorResult:
    """Unbiased MMD^2 with a Gaussian kernel, exact permutation test, K computed block by block.

    With indicator a (X rows) and b = 1 - a: S_xx = a'Ka, S_yy = b'Kb, S_xy = a'Kb, all from the
    blocks K[rows, :] @ [A, 1]. The kernel is centred (k - c) first: MMD^2_u does not change, but
    float32 sums no longer cancel catastrophically.
    """
    # The Gaussian kernel is shift-invariant: centring on the pooled mean (label-free) changes
    # nothing but keeps float32 distances precise when embeddings share a large offset.
    pooled = _centred(pooled)
    bandwidth = median_bandwidth(pooled, rng)
    gamma = 1.0 / bandwidth
    n = len(pooled)
    n_x = float(labels[:, 0].sum())
    n_y = n - n_x
    centre = math.exp(-1.0)  # k(x, y) at the median distance: roughly the mean kernel value
    ones_labels = np.concatenate([labels, np.ones((n, 1), dtype=np.float32)], axis=1)
    sq = (pooled.astype(np.float32) ** 2).sum(axis=1)
    q_xx = np.zeros(labels.shape[1], dtype=np.float64)
    q_row_total = np.zeros(labels.shape[1], dtype=np.float64)  # a' K 1
    total = 0.0
    for start in range(0, n, block):
        rows = slice(start, min(start + block, n))
        dist = sq[rows, None] + sq[None, :] - 2.0 * (pooled[rows] @ pooled.T)
        kernel = np.exp(-gamma * np.maximum(dist, 0.0)) - np.float32(centre)
        product = kernel @ ones_labels  # (block, B + 2)
        q_xx += (labels[rows] * product[:, :-1]).sum(axis=0, dtype=np.float64)
        q_row_total += (labels[rows] * product[:, -1:]).sum(axis=0, dtype=np.float64)
        total += float(product[:, -1].sum(dtype=np.float64))
    diag = 1.0 - centre
    q_yy = total - 2 * q_row_total + q_xx
    q_xy = q_row_total - q_xx
    stats = (q_xx - n_x * diag) / (n_x * (n_x - 1)) + (q_yy - n_y * diag) / (n_y * (n_y - 1)) - 2 * q_xy / (n_x * n_y)
    return _permutation_result("mmd", stats, {"bandwidth": bandwidth, "null": stats[1:].tolist()})


def rff_mmd_test(
    pooled: np.ndarray, labels: np.ndarray, rng: np.random.Generator, features: int = 1024
) -> DetectorResult:
    """MMD^2 approximated with random Fourier features of the same Gaussian kernel: linear in n."""
    pooled = _centred(pooled)  # shift-invariant kernel; keeps cos() arguments small in float32
    bandwidth = median_bandwidth(pooled, rng)
    weights = rng.normal(scale=math.sqrt(2.0 / bandwidth), size=(pooled.shape[1], features)).astype(np.float32)
    phase = rng.uniform(0, 2 * math.pi, size=features).astype(np.float32)
    n = len(pooled)
    n_x = float(labels[:, 0].sum())
    sums_x = np.zeros((features, labels.shape[1]), dtype=np.float64)
    total = np.zeros((features, 1), dtype=np.float64)
    scale = np.float32(math.sqrt(2.0 / features))
    for start in range(0, n, 8192):
        phi = scale * np.cos(pooled[start : start + 8192] @ weights + phase)
        sums_x += (phi.T @ labels[start : start + 8192]).astype(np.float64)
        total += phi.sum(axis=0, dtype=np.float64)[:, None]
    diff = sums_x / n_x - (total - sums_x) / (n - n_x)
    stats = (diff**2).sum(axis=0)
    return _permutation_result("rff_mmd", stats, {"bandwidth": bandwidth, "features": features})


def pooled_pca(pooled: np.ndarray, components: int) -> tuple[np.ndarray, np.ndarray]:
    """PCA fitted on the pooled sample (label-free): returns (projections, explained variance ratio)."""
    centred = pooled.astype(np.float64) - pooled.mean(axis=0)
    _, singular, vt = np.linalg.svd(centred, full_matrices=False)
    # Fix each axis' sign (largest loading positive), so the result does not depend on row order.
    signs = np.sign(vt[np.arange(len(vt)), np.abs(vt).argmax(axis=1)])
    vt = vt * np.where(signs == 0, 1.0, signs)[:, None]
    k = min(components, vt.shape[0])
    variance = singular**2
    return (centred @ vt[:k].T).astype(np.float32), variance[:k] / variance.sum()


def pca_ks_test(pooled: np.ndarray, n_x: int, components: int) -> DetectorResult:
    from scipy.stats import ks_2samp

    projections, explained = pooled_pca(pooled, components)
    tests = [ks_2samp(projections[:n_x, j], projections[n_x:, j]) for j in range(projections.shape[1])]
    p_values = np.array([t.pvalue for t in tests])
    adjusted = benjamini_hochberg(p_values)
    return DetectorResult(
        "pca_ks",
        float(max(t.statistic for t in tests)),
        float(adjusted.min()),
        details={
            "component_p_values": p_values.tolist(),
            "component_bh": adjusted.tolist(),
            "explained_variance": explained.tolist(),
        },
    )


def classifier_test(pooled: np.ndarray, n_x: int, rng: np.random.Generator) -> DetectorResult:
    """Ridge classifier (reference vs current) fitted on one half, AUC on the other half.

    The held-out scores are independent of the training half, so the one-sided Mann-Whitney test of
    "current scores higher" is a valid p-value; AUC 0.5 means the sets are indistinguishable.
    """
    from scipy.stats import mannwhitneyu

    target = np.r_[np.zeros(n_x), np.ones(len(pooled) - n_x)]
    order = rng.permutation(len(pooled))
    train, test = order[: len(order) // 2], order[len(order) // 2 :]
    features = pooled.astype(np.float64)
    mean = features[train].mean(axis=0)
    x_train = features[train] - mean
    y_train = target[train] - target[train].mean()
    ridge = 1.0 * len(train)
    weights = np.linalg.solve(x_train.T @ x_train + ridge * np.eye(x_train.shape[1]), x_train.T @ y_train)
    scores = (features[test] - mean) @ weights
    current, reference = scores[target[test] == 1], scores[target[test] == 0]
    if len(current) == 0 or len(reference) == 0:
        return DetectorResult("classifier", 0.5, 1.0, details={"auc": 0.5})
    result = mannwhitneyu(current, reference, alternative="greater")
    auc = float(result.statistic / (len(current) * len(reference)))
    return DetectorResult("classifier", auc, float(result.pvalue), details={"auc": auc, "held_out": len(test)})


# -- combining p-values --------------------------------------------------------------------------


def holm(p_values: np.ndarray) -> np.ndarray:
    """Holm's step-down adjusted p-values (family-wise error control across detectors)."""
    m = len(p_values)
    order = np.argsort(p_values)
    adjusted = np.empty(m)
    running = 0.0
    for rank, index in enumerate(order):
        running = max(running, (m - rank) * p_values[index])
        adjusted[index] = min(1.0, running)
    return adjusted


def benjamini_hochberg(p_values: np.ndarray) -> np.ndarray:
    """BH adjusted p-values (false discovery rate across components); min of them = Simes' test."""
    from scipy.stats import false_discovery_control

    return np.asarray(false_discovery_control(p_values, method="bh"), dtype=float)


# -- explanation ---------------------------------------------------------------------------------


def explain(
    reference: np.ndarray, current: np.ndarray, results: list[DetectorResult], current_rows: np.ndarray, top: int = 8
) -> dict:
    """Which current rows are least like the reference (distance to the nearest reference row),
    and which pooled PCA components moved most. `current_rows` maps back to the caller's rows."""
    ref_norm = reference / np.maximum(np.linalg.norm(reference, axis=1, keepdims=True), 1e-12)
    cur_norm = current / np.maximum(np.linalg.norm(current, axis=1, keepdims=True), 1e-12)
    nearest = np.empty(len(current), dtype=np.float32)
    for start in range(0, len(current), 2048):
        nearest[start : start + 2048] = (cur_norm[start : start + 2048] @ ref_norm.T).max(axis=1)
    outliers = np.argsort(nearest)[:top]
    out: dict = {
        "outliers": [
            {"index": int(current_rows[i]), "nearest_reference_similarity": float(nearest[i])} for i in outliers
        ],
        "median_nearest_similarity": float(np.median(nearest)),
    }
    components = next((r for r in results if r.name == "pca_ks"), None)
    if components is None:  # not a decision detector here; still the best summary of what moved
        components = pca_ks_test(np.concatenate([reference, current]), len(reference), 10)
    p_values = np.array(components.details["component_p_values"])
    out["component_p_values"] = p_values.tolist()
    out["top_components"] = [{"component": int(j), "p_value": float(p_values[j])} for j in np.argsort(p_values)[:5]]
    return out
