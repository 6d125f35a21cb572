"""The holdout split of a cycle's new data."""

from __future__ import annotations

import hashlib

from ctloop.config import DataConfig
from ctloop.data.records import Record


def split_holdout(records: list[Record], config: DataConfig, seed: int) -> tuple[list[Record], list[Record]]:
    """Seeded split by record id, independent of row order: the same data always splits the same way.
    Holds out `holdout_fraction` of the rows (at least one, at most `max_holdout_rows`)."""
    n_holdout = min(config.max_holdout_rows, max(1, round(config.holdout_fraction * len(records))))
    ranked = sorted(records, key=lambda r: hashlib.sha256(f"{seed}:{r.id}".encode()).hexdigest())
    held = {r.id for r in ranked[:n_holdout]}
    return [r for r in records if r.id not in held], [r for r in records if r.id in held]
