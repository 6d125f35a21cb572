"""Strata for weighing a harvested holdout to traffic.

Rows harvested from production are the prompts users rated, and users rate some kinds of prompt far
more often than others. A gate on those rows answers "better on what users rate", not "better on
traffic": in a simulation where one kind was rated ten times as often, a candidate 0.6% worse on
traffic passed the new-data rule at +2.81% (bound +1.85%).

The harvest keeps a seeded sample of the window's requests, rated or not (`harvest.audit_rows`).
Here the prompts of that sample are clustered (k-means on their embeddings, `eval.traffic_strata`
clusters), and each held-out row is assigned to its nearest cluster. The gate then weighs the
held-out rows so that each cluster counts as much as its share of traffic (post-stratification:
inverse rating propensity by prompt cluster).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class TrafficStrata:
    """`strata[i]`: the cluster of held-out row i; `counts[c]`: the traffic sample's rows in cluster c."""

    strata: list[int]
    counts: list[int]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, stored: dict) -> TrafficStrata:
        return cls(strata=[int(s) for s in stored["strata"]], counts=[int(c) for c in stored["counts"]])

    def weighed(self, min_rows: int = 1) -> set[int]:
        """The clusters with at least `min_rows` held-out rows: those the gate can weigh."""
        sizes = Counter(self.strata)
        return {k for k, size in sizes.items() if size >= min_rows}

    def uncovered_share(self, min_rows: int = 1) -> float:
        """The share of traffic in clusters with fewer than `min_rows` held-out rows: what the
        gate cannot weigh (one or two rated rows cannot stand for a cluster's share of traffic)."""
        weighed = self.weighed(min_rows)
        total = sum(self.counts)
        return sum(c for k, c in enumerate(self.counts) if k not in weighed) / total if total else 1.0


def _normalised(points: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(points, axis=1, keepdims=True)
    return points / np.maximum(norms, 1e-12)


def kmeans(points: np.ndarray, k: int, seed: int = 0, iterations: int = 30) -> np.ndarray:
    """k centroids of `points` (k-means++ start, then Lloyd's iterations); fewer when there are
    fewer distinct points."""
    rng = np.random.default_rng(seed)
    unique = np.unique(points, axis=0)
    k = min(k, len(unique))
    centroids = [points[rng.integers(len(points))]]
    distance = ((points - centroids[0]) ** 2).sum(axis=1)
    for _ in range(1, k):
        if distance.sum() <= 0:
            break
        centroids.append(points[rng.choice(len(points), p=distance / distance.sum())])
        distance = np.minimum(distance, ((points - centroids[-1]) ** 2).sum(axis=1))
    centres = np.asarray(centroids, dtype=np.float64)
    for _ in range(iterations):
        labels = assign(points, centres)
        moved = np.asarray(
            [points[labels == c].mean(axis=0) if np.any(labels == c) else centres[c] for c in range(len(centres))]
        )
        if np.allclose(moved, centres):
            break
        centres = moved
    return centres


def assign(points: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """Each point's nearest centre (squared distances as |x|^2 - 2 x.c + |c|^2: memory n x k, not
    n x k x dims)."""
    distances = (points**2).sum(axis=1)[:, None] - 2 * points @ centres.T + (centres**2).sum(axis=1)[None]
    return np.argmin(distances, axis=1)


def traffic_strata(holdout: np.ndarray, traffic: np.ndarray, k: int, seed: int = 0) -> TrafficStrata:
    """Cluster the traffic sample's prompt embeddings into `k` strata and place each held-out row
    (its prompt's embedding) in its nearest one. Embeddings are compared by direction (cosine)."""
    traffic_points, holdout_points = (
        _normalised(np.asarray(traffic, np.float64)),
        _normalised(np.asarray(holdout, np.float64)),
    )
    centres = kmeans(traffic_points, k, seed)
    counts = np.bincount(assign(traffic_points, centres), minlength=len(centres))
    return TrafficStrata([int(s) for s in assign(holdout_points, centres)], [int(c) for c in counts])
