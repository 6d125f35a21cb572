"""The replay buffer and the training-set mix.

Every finished cycle adds its data to the buffer (one Parquet file per cycle, rows tagged with the
cycle id and with the split they were in: `train` or `holdout`). A new training set is the new
records plus a seeded sample of past `train` rows sized by tokens; past `holdout` rows, which no
adapter has trained on, measure forgetting.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

from ctloop.config import ReplayConfig
from ctloop.records import Record, read_parquet, write_parquet


@dataclass(frozen=True)
class BufferRow:
    record: Record
    cycle_id: str
    split: str
    n_tokens: int


@dataclass(frozen=True)
class TrainingSet:
    records: list[Record]
    replay_holdout: list[Record]
    manifest: dict = field(default_factory=dict)

    def summary(self) -> str:
        m = self.manifest
        return (f"training set: {m['new_rows']} new + {m['replayed_rows']} replayed rows "
                f"({m['replayed_tokens']} of {m['total_tokens']} tokens replayed, target ratio {m['ratio']}); "
                f"replay holdout {len(self.replay_holdout)} rows")


class ReplayBuffer:
    """Past cycles' data, one Parquet file per cycle; adding a cycle twice overwrites, never duplicates."""

    def __init__(self, root: Path):
        self.root = root

    def add_cycle(self, cycle_id: str, train: list[Record], holdout: list[Record],
                  tokens: dict[str, int]) -> Path:
        rows = train + holdout
        path = self.root / f"cycle-{cycle_id}.parquet"
        write_parquet(path, rows, extra={
            "cycle_id": [cycle_id] * len(rows),
            "split": ["train"] * len(train) + ["holdout"] * len(holdout),
            "n_tokens": [tokens[r.id] for r in rows],
        })
        return path

    def cycles(self) -> list[str]:
        return sorted(p.stem.removeprefix("cycle-") for p in self.root.glob("cycle-*.parquet"))

    def rows(self, exclude_cycle: str | None = None) -> list[BufferRow]:
        out: list[BufferRow] = []
        for path in sorted(self.root.glob("cycle-*.parquet")):
            records, extra = read_parquet(path)
            for record, cycle, split, n in zip(records, extra["cycle_id"], extra["split"], extra["n_tokens"],
                                               strict=True):
                if cycle != exclude_cycle:
                    out.append(BufferRow(record, cycle, split, n))
        return out


def build_training_set(new_train: list[Record], tokens: dict[str, int], buffer_rows: list[BufferRow],
                       config: ReplayConfig, seed: int) -> TrainingSet:
    """Mix new records with a seeded, token-sized sample of past training rows.

    `config.ratio` is the share of the mixed set's tokens that come from the buffer, so the
    replay target is ratio / (1 - ratio) times the new tokens. Past rows whose prompt and
    completion equal a new row's are never replayed.
    """
    rng = random.Random(seed)
    new_keys = {r.content_key() for r in new_train}
    new_tokens = sum(tokens[r.id] for r in new_train)
    candidates = [row for row in buffer_rows if row.split == "train" and row.record.content_key() not in new_keys]
    # Forgetting is measured only on rows no adapter trained on: not new rows, not any past train row.
    trained_keys = new_keys | {row.record.content_key() for row in buffer_rows if row.split == "train"}
    holdout_pool = [row for row in buffer_rows
                    if row.split == "holdout" and row.record.content_key() not in trained_keys]
    target = round(new_tokens * config.ratio / (1 - config.ratio)) if config.enabled else 0

    rng.shuffle(candidates)
    replayed: list[BufferRow] = []
    replayed_tokens = 0
    for row in candidates:
        if replayed_tokens >= target:
            break
        replayed.append(row)
        replayed_tokens += row.n_tokens

    rng.shuffle(holdout_pool)
    replay_holdout = [row.record for row in holdout_pool[: config.holdout_rows]] if config.enabled else []

    mixed = new_train + [row.record for row in replayed]
    rng.shuffle(mixed)
    manifest = {
        "ratio": config.ratio if config.enabled else 0.0,
        "seed": seed,
        "new_rows": len(new_train),
        "new_tokens": new_tokens,
        "target_replay_tokens": target,
        "replayed_rows": len(replayed),
        "replayed_tokens": replayed_tokens,
        "total_tokens": new_tokens + replayed_tokens,
        "buffer_cycles": sorted({row.cycle_id for row in buffer_rows}),
        "replayed": [{"id": row.record.id, "cycle": row.cycle_id} for row in replayed],
        "replay_holdout": [row.id for row in replay_holdout],
    }
    return TrainingSet(records=mixed, replay_holdout=replay_holdout, manifest=manifest)
