"""The replay buffer and the training-set mix.

Every finished cycle adds its data to the buffer (one Parquet file per cycle, rows tagged with the
cycle id and with the split they were in: `train` or `holdout`; `buffer.json` keeps the cycles in
the order they were added). A new training set is the new records plus a seeded sample of past
`train` rows sized by tokens; past `holdout` rows, which no adapter has trained on, measure
forgetting.

Sampling strategies (`replay.strategy`): `uniform` over all past rows; `balanced`, an equal share
of the replayed *tokens* per past cycle or per source (rows differ in length; equal rows would
favour groups of long rows); `recency`, each cycle's share of the replayed rows proportional to
`recency_decay ** age`, whatever the cycle's size (weights are per cycle, spread over its rows).
With `replay.buffer_rows` (and `buffer_holdout_rows`) the buffer is a reservoir sample: it stays
bounded however many cycles pass, and every row ever added has the same chance to be in it. A cap
lowered later shrinks the buffer at the next cycle (a uniform subsample, which keeps that chance
equal).
"""

from __future__ import annotations

import heapq
import math
import random
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from ctloop.config import ReplayConfig
from ctloop.data.records import Record, read_parquet, write_parquet
from ctloop.errors import DataError
from ctloop.fileio import read_json, write_json


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
        return (
            f"training set: {m['new_rows']} new + {m['replayed_rows']} replayed rows "
            f"({m['replayed_tokens']} of {m['total_tokens']} tokens replayed, target ratio {m['ratio']}, "
            f"{m['strategy']}); replay holdout {len(self.replay_holdout)} rows"
        )


class ReplayBuffer:
    """Past cycles' data, one Parquet file per cycle; adding a cycle twice never duplicates rows."""

    def __init__(
        self, root: Path, max_train_rows: int | None = None, max_holdout_rows: int | None = None, seed: int = 0
    ):
        self.root = root
        self.caps = {"train": max_train_rows, "holdout": max_holdout_rows}
        self.seed = seed

    @classmethod
    def for_config(cls, root: Path, config: ReplayConfig, seed: int) -> ReplayBuffer:
        return cls(root, config.buffer_rows, config.buffer_holdout_rows, seed)

    def _state(self) -> dict:
        path = self.root / "buffer.json"
        state = read_json(path) if path.is_file() else {}
        if "cycles" not in state:  # buffers written before buffer.json: order by file time
            files = sorted(self.root.glob("cycle-*.parquet"), key=lambda p: p.stat().st_mtime)
            state = {"cycles": [p.stem.removeprefix("cycle-") for p in files], "seen": {}}
        return state

    def add_cycle(self, cycle_id: str, train: list[Record], holdout: list[Record], tokens: dict[str, int]) -> Path:
        """Add a cycle's rows (re-adding a cycle replaces its rows); then apply the reservoir caps."""
        state = self._state()
        path = self.root / f"cycle-{cycle_id}.parquet"
        new_rows = [BufferRow(r, cycle_id, "train", tokens[r.id]) for r in train] + [
            BufferRow(r, cycle_id, "holdout", tokens[r.id]) for r in holdout
        ]
        if cycle_id in state["cycles"]:
            self._write(
                cycle_id,
                new_rows if not any(self.caps.values()) else [row for row in self.rows() if row.cycle_id == cycle_id],
            )
            return path
        state["cycles"].append(cycle_id)
        kept = self.rows()
        seen = state.setdefault("seen", {})
        rng = random.Random(f"{self.seed}:{cycle_id}")
        for split in ("train", "holdout"):
            cap = self.caps[split]
            incoming = [row for row in new_rows if row.split == split]
            if cap is None:
                kept.extend(incoming)
                continue
            pool = [row for row in kept if row.split == split]
            others = [row for row in kept if row.split != split]
            count = seen.get(split, len(pool))
            if len(pool) > cap:  # the cap was lowered: a uniform subsample of a reservoir is one too
                pool = rng.sample(pool, cap)
            for row in incoming:  # Algorithm R: row n survives with probability cap / n
                count += 1
                if len(pool) < cap:
                    pool.append(row)
                else:
                    slot = rng.randrange(count)
                    if slot < cap:
                        pool[slot] = row
            seen[split] = count
            kept = others + pool
        for cycle in state["cycles"]:
            self._write(cycle, [row for row in kept if row.cycle_id == cycle])
        write_json(self.root / "buffer.json", state)
        return path

    def _write(self, cycle_id: str, rows: list[BufferRow]) -> None:
        path = self.root / f"cycle-{cycle_id}.parquet"
        write_parquet(
            path,
            [row.record for row in rows],
            extra={
                "cycle_id": [row.cycle_id for row in rows],
                "split": [row.split for row in rows],
                "n_tokens": [row.n_tokens for row in rows],
            },
        )

    def drop_cycle(self, cycle_id: str) -> int:
        """Remove a cycle's rows from the buffer (`ctloop replay drop`); returns how many rows went."""
        state = self._state()
        if cycle_id not in state["cycles"]:
            raise DataError(
                f"the replay buffer holds no cycle {cycle_id!r}; it holds {', '.join(state['cycles']) or 'none'}"
            )
        path = self.root / f"cycle-{cycle_id}.parquet"
        dropped = len(read_parquet(path)[0]) if path.is_file() else 0
        state["cycles"].remove(cycle_id)
        write_json(self.root / "buffer.json", state)
        path.unlink(missing_ok=True)
        return dropped

    def cycles(self) -> list[str]:
        """Cycle ids in the order they were added (oldest first)."""
        return list(self._state()["cycles"])

    def rows(self, exclude_cycle: str | None = None) -> list[BufferRow]:
        out: list[BufferRow] = []
        for cycle in self.cycles():
            path = self.root / f"cycle-{cycle}.parquet"
            if cycle == exclude_cycle or not path.is_file():
                continue
            records, extra = read_parquet(path)
            out.extend(
                BufferRow(record, c, split, n)
                for record, c, split, n in zip(
                    records, extra["cycle_id"], extra["split"], extra["n_tokens"], strict=True
                )
            )
        return out


def build_training_set(
    new_train: list[Record], tokens: dict[str, int], buffer_rows: list[BufferRow], config: ReplayConfig, seed: int
) -> TrainingSet:
    """Mix new records with a seeded, token-sized sample of past training rows.

    `config.ratio` is the share of the mixed set's tokens that come from the buffer, so the
    replay target is ratio / (1 - ratio) times the new tokens. Past rows whose prompt and
    completion equal a new row's are never replayed. `buffer_rows` come oldest cycle first.
    """
    rng = random.Random(seed)
    new_keys = {r.content_key() for r in new_train}
    new_tokens = sum(tokens[r.id] for r in new_train)
    candidates = [row for row in buffer_rows if row.split == "train" and row.record.content_key() not in new_keys]
    # Forgetting is measured only on rows no adapter trained on: not new rows, not any past train row.
    trained_keys = new_keys | {row.record.content_key() for row in buffer_rows if row.split == "train"}
    holdout_pool = [
        row for row in buffer_rows if row.split == "holdout" and row.record.content_key() not in trained_keys
    ]
    target = round(new_tokens * config.ratio / (1 - config.ratio)) if config.enabled else 0

    replayed: list[BufferRow] = []
    replayed_tokens = 0
    for row in _replay_order(candidates, config, rng):
        if replayed_tokens >= target:
            break
        replayed.append(row)
        replayed_tokens += row.n_tokens

    rng.shuffle(holdout_pool)
    replay_holdout = [row.record for row in holdout_pool[: config.holdout_rows]] if config.enabled else []

    mixed = new_train + [row.record for row in replayed]
    rng.shuffle(mixed)
    by_cycle: dict[str, int] = defaultdict(int)
    for row in replayed:
        by_cycle[row.cycle_id] += row.n_tokens
    manifest = {
        "ratio": config.ratio if config.enabled else 0.0,
        "strategy": config.strategy,
        "seed": seed,
        "new_rows": len(new_train),
        "new_tokens": new_tokens,
        "target_replay_tokens": target,
        "replayed_rows": len(replayed),
        "replayed_tokens": replayed_tokens,
        "replayed_tokens_by_cycle": dict(by_cycle),
        "total_tokens": new_tokens + replayed_tokens,
        "buffer_cycles": list(dict.fromkeys(row.cycle_id for row in buffer_rows)),
        "replayed": [{"id": row.record.id, "cycle": row.cycle_id} for row in replayed],
        "replay_holdout": [record.id for record in replay_holdout],
    }
    return TrainingSet(records=mixed, replay_holdout=replay_holdout, manifest=manifest)


def _replay_order(candidates: list[BufferRow], config: ReplayConfig, rng: random.Random) -> list[BufferRow]:
    """The order in which past rows are taken until the token target is reached."""
    if config.strategy == "uniform":
        order = list(candidates)
        rng.shuffle(order)
        return order
    if config.strategy == "balanced":
        groups: dict[str, list[BufferRow]] = defaultdict(list)
        for row in candidates:
            groups[row.cycle_id if config.balance_by == "cycle" else row.record.source].append(row)
        for rows in groups.values():
            rng.shuffle(rows)
        keys = sorted(groups)
        rng.shuffle(keys)
        # The next row always comes from the group with the fewest tokens taken so far, so every
        # group gets an equal share of tokens (ties: the shuffled group order).
        taken = [(0, position, key) for position, key in enumerate(keys)]
        heapq.heapify(taken)
        order, next_row = [], dict.fromkeys(keys, 0)
        while taken:
            tokens, position, key = heapq.heappop(taken)
            row = groups[key][next_row[key]]
            order.append(row)
            next_row[key] += 1
            if next_row[key] < len(groups[key]):
                heapq.heappush(taken, (tokens + row.n_tokens, position, key))
        return order
    # recency: a weighted random order (Efraimidis-Spirakis keys). A cycle's weight, decay ** age, is
    # spread over its rows, so its share does not grow with its size.
    cycles = list(dict.fromkeys(row.cycle_id for row in candidates))  # oldest first
    age = {cycle: len(cycles) - 1 - i for i, cycle in enumerate(cycles)}
    size: defaultdict[str, int] = defaultdict(int)
    for row in candidates:
        size[row.cycle_id] += 1
    weight = {cycle: config.recency_decay ** age[cycle] / size[cycle] for cycle in cycles}
    keyed = [(math.log(1.0 - rng.random()) / weight[row.cycle_id], row) for row in candidates]  # log u ** (1/w)
    return [row for _, row in sorted(keyed, key=lambda pair: -pair[0])]
