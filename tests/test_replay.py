"""The replay buffer (Parquet per cycle) and the token-sized training-set mix."""

from __future__ import annotations

import pytest

from ctloop.config import ReplayConfig
from ctloop.data.records import Record
from ctloop.data.replay import BufferRow, ReplayBuffer, build_training_set


def rec(tag: str, i: int) -> Record:
    return Record(id=f"{tag}-{i}", prompt=f"{tag} prompt {i}", completion=f" {tag} answer {i}")


def buffer_rows(cycles=("c1", "c2"), n_train: int = 60, n_holdout: int = 20) -> list[BufferRow]:
    rows = []
    for cycle in cycles:
        rows += [BufferRow(rec(f"{cycle}t", i), cycle, "train", 5 + i % 11) for i in range(n_train)]
        rows += [BufferRow(rec(f"{cycle}h", i), cycle, "holdout", 7) for i in range(n_holdout)]
    return rows


NEW = [rec("new", i) for i in range(20)]
NEW_TOKENS = {r.id: 10 for r in NEW}  # 200 new tokens
BUFFER = buffer_rows()
BY_ID = {row.record.id: row for row in BUFFER}
TRAIN_IDS = {row.record.id for row in BUFFER if row.split == "train"}
HOLDOUT_IDS = {row.record.id for row in BUFFER if row.split == "holdout"}


def mix(ratio=0.25, seed=0, enabled=True, holdout_rows=200, new=NEW, tokens=NEW_TOKENS, rows=BUFFER):
    config = ReplayConfig(enabled=enabled, ratio=ratio, holdout_rows=holdout_rows)
    return build_training_set(new, tokens, rows, config, seed=seed)


# -- the buffer ----------------------------------------------------------------------------------


def test_add_cycle_twice_overwrites(tmp_path):
    buffer = ReplayBuffer(tmp_path / "replay")
    first = [rec("a", i) for i in range(3)]
    second = [rec("b", i) for i in range(2)]
    held = [rec("h", 0)]
    tokens = {r.id: 4 for r in first + second + held}
    buffer.add_cycle("c1", first, held, tokens)
    path = buffer.add_cycle("c1", second, held, tokens)
    assert path == tmp_path / "replay" / "cycle-c1.parquet"
    rows = buffer.rows()
    assert [(r.record.id, r.split) for r in rows] == [("b-0", "train"), ("b-1", "train"), ("h-0", "holdout")]
    assert sorted(p.name for p in (tmp_path / "replay").iterdir()) == ["buffer.json", "cycle-c1.parquet"]
    assert buffer.cycles() == ["c1"]


def test_add_cycle_identical_twice_has_no_duplicate_rows(tmp_path):
    buffer = ReplayBuffer(tmp_path)
    train, held = [rec("a", i) for i in range(4)], [rec("h", i) for i in range(2)]
    tokens = {r.id: 3 for r in train + held}
    buffer.add_cycle("c1", train, held, tokens)
    buffer.add_cycle("c1", train, held, tokens)
    assert len(buffer.rows()) == 6


def test_rows_round_trip_and_exclude_cycle(tmp_path):
    buffer = ReplayBuffer(tmp_path)
    c1_train, c1_held = [rec("x", 0), rec("x", 1)], [rec("xh", 0)]
    c2_train, c2_held = [rec("y", 0)], [rec("yh", 0), rec("yh", 1)]
    tokens = {r.id: n for n, r in enumerate(c1_train + c1_held + c2_train + c2_held, start=10)}
    buffer.add_cycle("c2", c2_train, c2_held, tokens)
    buffer.add_cycle("c1", c1_train, c1_held, tokens)
    assert buffer.cycles() == ["c2", "c1"]  # the order they were added: oldest first
    everything = buffer.rows()
    assert everything == [
        BufferRow(rec("y", 0), "c2", "train", 13),
        BufferRow(rec("yh", 0), "c2", "holdout", 14),
        BufferRow(rec("yh", 1), "c2", "holdout", 15),
        BufferRow(rec("x", 0), "c1", "train", 10),
        BufferRow(rec("x", 1), "c1", "train", 11),
        BufferRow(rec("xh", 0), "c1", "holdout", 12),
    ]
    assert [r.record.id for r in buffer.rows(exclude_cycle="c1")] == ["y-0", "yh-0", "yh-1"]
    assert [r.record.id for r in buffer.rows(exclude_cycle="c2")] == ["x-0", "x-1", "xh-0"]
    assert buffer.rows(exclude_cycle="nope") == everything


def test_empty_buffer(tmp_path):
    buffer = ReplayBuffer(tmp_path / "missing")
    assert buffer.rows() == []
    assert buffer.cycles() == []


# -- the mix: sizes ------------------------------------------------------------------------------


@pytest.mark.parametrize("ratio", [0.1, 0.25, 0.5, 0.75], ids=["0.1", "0.25", "0.5", "0.75"])
def test_replayed_tokens_reach_target_within_one_row(ratio):
    m = mix(ratio=ratio).manifest
    target = round(200 * ratio / (1 - ratio))
    assert m["target_replay_tokens"] == target
    replayed = [BY_ID[entry["id"]].n_tokens for entry in m["replayed"]]
    assert m["replayed_tokens"] == sum(replayed)
    assert sum(replayed) >= target
    assert sum(replayed[:-1]) < target  # stops as soon as the target is reached
    assert sum(replayed) - target < max(replayed)
    assert m["total_tokens"] == 200 + m["replayed_tokens"]
    assert m["new_tokens"] == 200
    assert m["new_rows"] == 20


def test_replayed_share_of_tokens_is_close_to_ratio():
    m = mix(ratio=0.5).manifest
    assert m["replayed_tokens"] / m["total_tokens"] == pytest.approx(0.5, abs=15 / m["total_tokens"])


def test_small_buffer_is_replayed_entirely():
    rows = buffer_rows(cycles=("c1",), n_train=5, n_holdout=2)
    available = sum(r.n_tokens for r in rows if r.split == "train")
    m = mix(ratio=0.9, rows=rows).manifest
    assert m["target_replay_tokens"] == 1800 > available
    assert m["replayed_rows"] == 5
    assert m["replayed_tokens"] == available


def test_training_set_is_new_plus_replayed():
    ts = mix(ratio=0.5)
    replayed_ids = [entry["id"] for entry in ts.manifest["replayed"]]
    assert len(ts.records) == 20 + len(replayed_ids)
    assert sorted(r.id for r in ts.records) == sorted([r.id for r in NEW] + replayed_ids)
    assert {r.id: r for r in ts.records if r.id in BY_ID} == {i: BY_ID[i].record for i in replayed_ids}
    assert ts.manifest["replayed_rows"] == len(replayed_ids)


# -- the mix: which rows ---------------------------------------------------------------------------


def test_only_train_rows_replayed_and_holdout_only_from_holdout():
    ts = mix(ratio=0.9)  # target 1800 > all train tokens: every train row is replayed
    replayed = {entry["id"] for entry in ts.manifest["replayed"]}
    assert replayed == TRAIN_IDS
    holdout = [r.id for r in ts.replay_holdout]
    assert set(holdout) <= HOLDOUT_IDS
    assert len(holdout) == len(set(holdout)) == 40
    assert ts.manifest["replay_holdout"] == holdout
    assert not {r.id for r in ts.records} & HOLDOUT_IDS


def test_replay_holdout_is_capped_by_holdout_rows():
    ts = mix(holdout_rows=7)
    assert len(ts.replay_holdout) == 7
    assert {r.id for r in ts.replay_holdout} <= HOLDOUT_IDS
    assert mix(holdout_rows=0).replay_holdout == []


def test_rows_identical_to_new_rows_are_never_replayed():
    twins = [
        Record(id=f"twin-{i}", prompt=f"  {r.prompt} ", completion=r.completion + "\n") for i, r in enumerate(NEW[:5])
    ]
    rows = (
        BUFFER
        + [BufferRow(t, "c1", "train", 1) for t in twins[:3]]
        + [BufferRow(t, "c2", "holdout", 1) for t in twins[3:]]
    )
    ts = mix(ratio=0.9, rows=rows)
    replayed = {entry["id"] for entry in ts.manifest["replayed"]}
    assert replayed == TRAIN_IDS  # everything else was taken, the twins were not
    assert not any(r.id.startswith("twin-") for r in ts.records + ts.replay_holdout)
    assert len(ts.replay_holdout) == 40


def test_replay_holdout_never_overlaps_the_training_set():
    twin = Record(id="c2t-twin", prompt=rec("c1h", 0).prompt, completion=rec("c1h", 0).completion)
    rows = BUFFER + [BufferRow(twin, "c2", "train", 3)]  # c1's held-out row came back as c2 training data
    ts = mix(ratio=0.9, rows=rows)
    assert "c2t-twin" in {r.id for r in ts.records}
    trained = {r.content_key() for r in ts.records}
    assert [r.id for r in ts.replay_holdout if r.content_key() in trained] == []


# -- the mix: seeds, switches, manifest ----------------------------------------------------------


def test_same_seed_same_manifest():
    a, b = mix(ratio=0.5, seed=3), mix(ratio=0.5, seed=3)
    assert a.manifest == b.manifest
    assert [r.id for r in a.records] == [r.id for r in b.records]
    assert [r.id for r in a.replay_holdout] == [r.id for r in b.replay_holdout]


def test_different_seed_different_sample():
    a, b = mix(ratio=0.25, seed=0).manifest, mix(ratio=0.25, seed=1).manifest
    assert {e["id"] for e in a["replayed"]} != {e["id"] for e in b["replayed"]}
    assert a["replay_holdout"] != b["replay_holdout"]
    assert (a["seed"], b["seed"]) == (0, 1)


def test_ratio_zero_replays_nothing():
    ts = mix(ratio=0.0)
    assert ts.manifest["replayed"] == []
    assert ts.manifest["replayed_tokens"] == 0
    assert ts.manifest["target_replay_tokens"] == 0
    assert sorted(r.id for r in ts.records) == sorted(r.id for r in NEW)
    assert len(ts.replay_holdout) == 40  # forgetting is still measured


def test_disabled_replays_nothing():
    ts = mix(ratio=0.5, enabled=False)
    assert ts.manifest["replayed"] == []
    assert ts.manifest["replayed_tokens"] == 0
    assert ts.manifest["ratio"] == 0.0
    assert ts.replay_holdout == []
    assert sorted(r.id for r in ts.records) == sorted(r.id for r in NEW)


def test_empty_buffer_replays_nothing():
    ts = mix(ratio=0.5, rows=[])
    assert ts.manifest["replayed"] == []
    assert ts.manifest["buffer_cycles"] == []
    assert ts.replay_holdout == []
    assert len(ts.records) == 20


def test_manifest_lists_ids_with_their_cycle():
    m = mix(ratio=0.5).manifest
    assert m["replayed"]
    assert all(set(entry) == {"id", "cycle"} for entry in m["replayed"])
    assert all(entry["cycle"] == BY_ID[entry["id"]].cycle_id for entry in m["replayed"])
    assert {entry["cycle"] for entry in m["replayed"]} == {"c1", "c2"}
    assert m["buffer_cycles"] == ["c1", "c2"]
    assert m["ratio"] == 0.5
    assert m["seed"] == 0


def test_summary_names_the_counts():
    ts = mix(ratio=0.5)
    m = ts.manifest
    assert ts.summary() == (
        f"training set: 20 new + {m['replayed_rows']} replayed rows "
        f"({m['replayed_tokens']} of {m['total_tokens']} tokens replayed, target ratio 0.5, uniform); "
        f"replay holdout 40 rows"
    )


# -- strategies and the bounded buffer -------------------------------------------------------------


def _past(cycles: int, rows_per_cycle: int, source_of=lambda c, i: "") -> list[BufferRow]:
    return [
        BufferRow(
            Record(id=f"c{c}-{i}", prompt=f"p{c}-{i}", completion=f"c{c}-{i}", source=source_of(c, i)),
            f"c{c}",
            "train",
            10,
        )
        for c in range(cycles)
        for i in range(rows_per_cycle)
    ]


def _replayed_by_cycle(training_set) -> dict[str, int]:
    counts: dict[str, int] = {}
    for item in training_set.manifest["replayed"]:
        counts[item["cycle"]] = counts.get(item["cycle"], 0) + 1
    return counts


def test_balanced_gives_every_past_cycle_an_equal_share():
    past = _past(cycles=3, rows_per_cycle=100)[:100] + _past(3, 100)[100:120] + _past(3, 100)[200:300]
    new = [rec("n", i) for i in range(30)]
    config = ReplayConfig(ratio=0.5, strategy="balanced")
    counts = _replayed_by_cycle(build_training_set(new, {r.id: 10 for r in new}, past, config, seed=0))
    assert counts == {"c0": 10, "c1": 10, "c2": 10}  # uniform would take ~5x more from c0 and c2 than c1


def test_balanced_by_source():
    past = _past(2, 60, source_of=lambda c, i: "games" if i < 50 else "sound")
    new = [rec("n", i) for i in range(20)]
    config = ReplayConfig(ratio=0.5, strategy="balanced", balance_by="source")
    mix = build_training_set(new, {r.id: 10 for r in new}, past, config, seed=0)
    sources = [r.source for r in mix.records if r.id.startswith("c")]
    assert sources.count("games") == sources.count("sound") == 10


def test_recency_prefers_recent_cycles():
    past = _past(cycles=4, rows_per_cycle=100)  # c0 oldest ... c3 newest
    new = [rec("n", i) for i in range(40)]
    config = ReplayConfig(ratio=0.5, strategy="recency", recency_decay=0.5)
    counts = _replayed_by_cycle(build_training_set(new, {r.id: 10 for r in new}, past, config, seed=0))
    assert counts.get("c3", 0) > counts.get("c2", 0) > counts.get("c0", 0)


def test_reservoir_keeps_the_buffer_bounded_and_fair(tmp_path):
    kept_from_first = 0
    for trial in range(20):
        buffer = ReplayBuffer(tmp_path / f"r{trial}", max_train_rows=50, max_holdout_rows=5, seed=trial)
        for cycle in range(10):
            train = [rec(f"t{cycle}", i) for i in range(40)]
            held = [rec(f"h{cycle}", i) for i in range(4)]
            buffer.add_cycle(f"c{cycle}", train, held, {r.id: 5 for r in train + held})
        rows = buffer.rows()
        assert sum(r.split == "train" for r in rows) == 50 and sum(r.split == "holdout" for r in rows) == 5
        kept_from_first += sum(r.cycle_id == "c0" and r.split == "train" for r in rows)
        assert buffer.cycles() == [f"c{c}" for c in range(10)]
    # Each of the 400 rows survives with probability 50/400: cycle 0 keeps 5 rows on average.
    assert 3.0 <= kept_from_first / 20 <= 7.0


def test_reservoir_does_not_double_count_a_cycle_added_twice(tmp_path):
    buffer = ReplayBuffer(tmp_path, max_train_rows=10)
    train = [rec("t", i) for i in range(30)]
    buffer.add_cycle("c0", train, [], {r.id: 5 for r in train})
    before = buffer.rows()
    buffer.add_cycle("c0", train, [], {r.id: 5 for r in train})
    assert buffer.rows() == before


def test_recency_shares_do_not_grow_with_a_cycles_size():
    """#16 item 11: with no decay every cycle gets about the same share, however many rows it has
    (per-row weights gave the 300-row cycle ten times the 30-row cycle's share)."""
    small = [BufferRow(rec("s", i), "c0", "train", 10) for i in range(30)]
    large = [BufferRow(rec("l", i), "c1", "train", 10) for i in range(300)]
    new = [rec("n", i) for i in range(40)]
    config = ReplayConfig(ratio=0.5, strategy="recency", recency_decay=1.0)
    counts = _replayed_by_cycle(build_training_set(new, {r.id: 10 for r in new}, small + large, config, seed=0))
    assert counts["c0"] + counts["c1"] == 40 and counts["c0"] >= 13  # per-row weights: 3.6 expected


def test_balanced_gives_equal_tokens_not_equal_rows():
    short = [BufferRow(rec("s", i), "c0", "train", 5) for i in range(100)]
    long = [BufferRow(rec("l", i), "c1", "train", 20) for i in range(100)]
    new = [rec("n", i) for i in range(40)]
    config = ReplayConfig(ratio=0.5, strategy="balanced")
    mix = build_training_set(new, {r.id: 10 for r in new}, short + long, config, seed=0)
    tokens = {"c0": 0, "c1": 0}
    for item in mix.manifest["replayed"]:
        tokens[item["cycle"]] += 5 if item["cycle"] == "c0" else 20
    assert abs(tokens["c0"] - tokens["c1"]) <= 20  # equal rows would give c1 four times c0's tokens


def test_a_lowered_reservoir_cap_shrinks_the_buffer(tmp_path):
    wide = ReplayBuffer(tmp_path, max_train_rows=50)
    for cycle in range(3):
        train = [rec(f"t{cycle}", i) for i in range(40)]
        wide.add_cycle(f"c{cycle}", train, [], {r.id: 5 for r in train})
    assert sum(r.split == "train" for r in wide.rows()) == 50
    narrow = ReplayBuffer(tmp_path, max_train_rows=20)
    train = [rec("t3", i) for i in range(40)]
    narrow.add_cycle("c3", train, [], {r.id: 5 for r in train})
    assert sum(r.split == "train" for r in narrow.rows()) == 20


def test_ctloop_replay_drop_removes_a_cycles_rows(tmp_path):
    """#23 item 10: a cycle's rows can be taken out of the buffer, from the command line."""
    import subprocess
    import sys

    buffer = ReplayBuffer(tmp_path / "ws" / "replay")
    for cycle in ("c1", "c2"):
        rows = [rec(cycle, i) for i in range(5)]
        buffer.add_cycle(cycle, rows[:4], rows[4:], {r.id: 3 for r in rows})
    done = subprocess.run(
        [sys.executable, "-m", "ctloop", "replay", "drop", "c1", "--workspace", str(tmp_path / "ws")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0 and "dropped 5 rows of cycle c1" in done.stdout + done.stderr
    assert buffer.cycles() == ["c2"] and {row.cycle_id for row in buffer.rows()} == {"c2"}
    unknown = subprocess.run(
        [sys.executable, "-m", "ctloop", "replay", "drop", "c9", "--workspace", str(tmp_path / "ws")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert unknown.returncode == 2 and "holds no cycle 'c9'" in unknown.stderr and "Traceback" not in unknown.stderr
