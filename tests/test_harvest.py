"""`ctloop harvest`: the request log and its feedback -> the next cycle's records, on a real SQLite
log store; and a cycle run on harvested records carries the harvest in its lineage."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import quickstart_rows
from ctloop.config import HarvestConfig, config_from_dict
from ctloop.data.harvest import commit_harvest, decide_rows, harvest
from ctloop.fileio import read_json
from ctloop.logstore.requests import FeedbackRecord, LogReader, RequestLog, RequestRecord
from ctloop.workspace import Workspace


def _row(rid: str, answer: str = "an answer", feedback: dict | None = None, prompt: str = "a question") -> dict:
    return {
        "request_id": rid,
        "prompt": prompt,
        "answer": answer,
        "created_at": 1_800_000_000.0,
        "model_version": "1",
        "feedback": feedback,
    }


@pytest.mark.parametrize(
    ("feedback", "reason", "kept", "completion"),
    [
        ({"feedback_id": "f", "score": 0.0, "correction": "fixed"}, "correction", True, "fixed"),
        ({"feedback_id": "f", "score": 1.0, "correction": None}, "rated_up", True, "an answer"),
        ({"feedback_id": "f", "score": 0.0, "correction": None}, "rejected", False, "an answer"),
        ({"feedback_id": "f", "score": 0.6, "correction": None}, "middling_rating", False, None),
        (None, "no_feedback", False, None),
    ],
    ids=["correction", "rated-up", "rated-down", "middling", "unrated"],
)
def test_each_request_gets_one_reason(feedback, reason, kept, completion):
    [(decision, record)] = decide_rows([_row("r1", feedback=feedback)], HarvestConfig(), set())
    assert (decision.reason, decision.kept) == (reason, kept)
    assert (record.completion if record else None) == completion
    if record is not None:
        assert record.metadata["request_id"] == "r1" and record.source == "production"


def test_unrated_answers_only_when_asked_and_duplicates_and_empties_are_dropped():
    seen: set[str] = set()
    rows = [_row("a"), _row("b"), _row("c", answer="  ")]
    decided = decide_rows(rows, HarvestConfig(include_unrated=True), seen)
    assert [(d.reason, d.kept) for d, _ in decided] == [("unrated", True), ("duplicate", False), ("empty", False)]


def test_secrets_are_redacted_before_they_reach_training_data():
    row = _row("r", prompt="mail bob@example.com", feedback={"feedback_id": "f", "score": 1.0, "correction": None})
    [(_, record)] = decide_rows([row], HarvestConfig(), set())
    assert "example.com" not in record.prompt and "[email]" in record.prompt


def _logged(workspace: Workspace, items: list[tuple[str, str, str, FeedbackRecord | None]]) -> str:
    url = workspace.shadow_store_url()
    writer = RequestLog(url)
    for rid, prompt, answer, _ in items:
        writer.put(
            RequestRecord(request_id=rid, model_version="1", endpoint="completions", prompt=prompt, answer=answer)
        )
    writer.close()
    reader = LogReader(url)
    reader.add_feedback([fb for *_, fb in items if fb is not None])
    reader.close()
    return url


def test_a_harvest_that_fails_after_sampling_the_traffic_leaves_no_sample(tmp_path, monkeypatch):
    """The traffic sample is moved into place with the records, not before: a harvest that fails
    later leaves neither (it used to leave an orphan `.traffic.jsonl`)."""
    from ctloop.data import harvest as harvesting

    workspace = Workspace(tmp_path / "ws").create()
    config = config_from_dict({"workspace": str(workspace.root), "model": {"base": "unused"}})
    _logged(workspace, [("r1", "q1", "wrong", FeedbackRecord("r1", rating=-1, correction="right"))])

    def broken(*args, **kwargs):
        raise RuntimeError("the disk filled up")

    monkeypatch.setattr(harvesting, "_decide_page", broken)
    with pytest.raises(RuntimeError, match="disk filled up"):
        harvest(config, workspace, since=time.time() - 3600)
    assert sorted(p.name for p in (workspace.root / "harvest").iterdir()) == []


def test_a_harvest_writes_records_rejected_decisions_and_manifest_and_never_twice(tmp_path):
    workspace = Workspace(tmp_path / "ws").create()
    config = config_from_dict({"workspace": str(workspace.root), "model": {"base": "unused"}})
    _logged(
        workspace,
        [
            ("r1", "q1", "wrong", FeedbackRecord("r1", rating=-1, correction="right")),
            ("r2", "q2", "good", FeedbackRecord("r2", rating=1)),
            ("r3", "q3", "bad", FeedbackRecord("r3", rating=-1)),
            ("r4", "q4", "meh", None),
        ],
    )
    report = harvest(config, workspace, since=time.time() - 3600)
    assert report.kept == 2 and report.rejected == 1
    assert report.counts == {"correction": 1, "rated_up": 1, "rejected": 1, "no_feedback": 1}
    rows = [json.loads(line) for line in Path(report.out_path).read_text().splitlines()]
    # The rated-down answer is in the file too, marked: preference objectives learn from it (#27).
    kinds = {(r["prompt"], r["completion"]): r["metadata"]["feedback_kind"] for r in rows}
    assert kinds == {("q1", "right"): "correction", ("q2", "good"): "rated_up", ("q3", "bad"): "rated_down"}
    assert all(r["metadata"]["feedback_id"] and r["metadata"]["request_id"] for r in rows)
    rejected = [json.loads(line) for line in Path(report.rejected_path).read_text().splitlines()]
    # #23 item 7: the answer a correction replaced joins the rejected set, the clearest negative.
    assert [(r["prompt"], r["completion"], r["metadata"]["harvest_reason"]) for r in rejected] == [
        ("q1", "wrong", "corrected_original"),
        ("q3", "bad", "rejected"),
    ]
    assert report.corrected_originals == 1
    # #23 item 8: a sample of the window's requests, rated or not, to weigh the gate to traffic.
    traffic = [json.loads(line) for line in Path(report.traffic_sample_path).read_text().splitlines()]
    assert report.traffic_sample_rows == 4 and sorted(t["prompt"] for t in traffic) == ["q1", "q2", "q3", "q4"]
    decisions = {
        json.loads(line)["request_id"]: json.loads(line)["reason"]
        for line in Path(report.decisions_path).read_text().splitlines()
    }
    # Requests without feedback never leave the database (#26): counted by reason, not listed.
    assert decisions == {"r1": "correction", "r2": "rated_up", "r3": "rejected"}
    assert read_json(Path(report.out_path + ".manifest.json"))["counts"] == report.counts

    # No cycle has trained on it yet (skipped, failed): the same rows are harvested again...
    retried = harvest(config, workspace, since=time.time() - 3600)
    assert retried.kept == 2 and len(Path(report.rejected_path).read_text().splitlines()) == 2  # not doubled
    # ...until a cycle registers on it: then they are used, and the next harvest skips them.
    commit_harvest(workspace, read_json(Path(retried.out_path + ".manifest.json")))
    again = harvest(config, workspace, since=time.time() - 3600)
    assert again.kept == 0 and again.counts == {"already_harvested": 3, "no_feedback": 1}
    assert len(Path(report.rejected_path).read_text().splitlines()) == 2


def test_the_rejected_set_ages_out_by_time_and_by_version(tmp_path):
    """#23 item 7: rejected.jsonl no longer grows forever. A harvest drops rows older than
    eval.rejected_max_age_days; the gate uses the answers of the newest eval.rejected_versions."""
    from ctloop.config import EvalConfig
    from ctloop.data.records import Record
    from ctloop.data.rejected_set import select_rejected
    from ctloop.fileio import TIMESTAMP_FORMAT

    now = time.time()

    def stamp(days_ago: float) -> str:
        return time.strftime(TIMESTAMP_FORMAT, time.gmtime(now - days_ago * 86400))

    workspace = Workspace(tmp_path / "ws").create()
    config = config_from_dict(
        {"workspace": str(workspace.root), "model": {"base": "unused"}, "eval": {"rejected_max_age_days": 30}}
    )
    folder = workspace.root / "harvest"
    folder.mkdir(exist_ok=True)
    old_rows = [
        {"id": "ancient", "prompt": "p", "completion": "c", "timestamp": stamp(45), "metadata": {}},
        {"id": "recent", "prompt": "p", "completion": "c", "timestamp": stamp(5), "metadata": {}},
    ]
    (folder / "rejected.jsonl").write_text("".join(json.dumps(r) + "\n" for r in old_rows))
    _logged(workspace, [("r3", "q3", "bad", FeedbackRecord("r3", rating=-1))])
    report = harvest(config, workspace, since=now - 3600)
    ids = [json.loads(line)["id"] for line in Path(report.rejected_path).read_text().splitlines()]
    assert ids == ["recent", "prod-r3"] and report.aged_out == 1

    records = [
        Record(f"v{version}-{i}", "p", "c", timestamp=stamp(days), metadata={"model_version": str(version)})
        for version, days in ((1, 80), (2, 50), (3, 20), (10, 2))
        for i in range(2)
    ]
    chosen = select_rejected(records, EvalConfig(rejected_max_age_days=60, rejected_versions=2), now)
    assert [r.id for r in chosen.records] == ["v3-0", "v3-1", "v10-0", "v10-1"]  # 10 > 3 as numbers
    assert chosen.left_out == {
        "older_than_eval.rejected_max_age_days": 2,
        "older_versions_than_eval.rejected_versions": 2,
    }
    everything = select_rejected(records, EvalConfig(rejected_max_age_days=None, rejected_versions=None), now)
    assert len(everything.records) == 8 and everything.left_out == {}


def test_preference_exports_use_trls_formats(tmp_path):
    workspace = Workspace(tmp_path / "ws").create()
    config = config_from_dict({"workspace": str(workspace.root), "model": {"base": "unused"}})
    _logged(
        workspace,
        [
            ("r1", "q1", "wrong", FeedbackRecord("r1", rating=-1, correction="right")),
            ("r2", "q2", "good", FeedbackRecord("r2", rating=1)),
            ("r3", "q3", "bad", FeedbackRecord("r3", rating=-1)),
        ],
    )
    dpo = harvest(config, workspace, since=0, out=tmp_path / "dpo.jsonl", fmt="dpo")
    assert [json.loads(x) for x in Path(dpo.out_path).read_text().splitlines()] == [
        {"prompt": "q1", "chosen": "right", "rejected": "wrong"}
    ]
    workspace2 = Workspace(tmp_path / "ws2").create()
    config2 = config_from_dict({"workspace": str(workspace2.root), "model": {"base": "unused"}})
    _logged(
        workspace2,
        [("r2", "q2", "good", FeedbackRecord("r2", rating=1)), ("r3", "q3", "bad", FeedbackRecord("r3", rating=-1))],
    )
    kto = harvest(config2, workspace2, since=0, out=tmp_path / "kto.jsonl", fmt="kto")
    assert sorted(json.dumps(json.loads(x), sort_keys=True) for x in Path(kto.out_path).read_text().splitlines()) == [
        json.dumps({"completion": "bad", "label": False, "prompt": "q3"}, sort_keys=True),
        json.dumps({"completion": "good", "label": True, "prompt": "q2"}, sort_keys=True),
    ]


def test_harvested_rows_that_overlap_an_eval_set_are_dropped(tmp_path):
    golden = tmp_path / "golden.jsonl"
    golden.write_text(
        json.dumps({"prompt": "what is the capital of france", "completion": "paris is the capital"}) + "\n"
    )
    workspace = Workspace(tmp_path / "ws").create()
    config = config_from_dict(
        {
            "workspace": str(workspace.root),
            "model": {"base": "unused"},
            "eval": {"golden": {"faq": str(golden)}, "ngram": 3},
        }
    )
    _logged(
        workspace,
        [
            ("r1", "what is the capital of france", "paris is the capital", FeedbackRecord("r1", rating=1)),
            ("r2", "q2", "good", FeedbackRecord("r2", rating=1)),
        ],
    )
    report = harvest(config, workspace, since=0)
    assert report.counts == {"overlaps_eval_set": 1, "rated_up": 1} and report.kept == 1


@pytest.mark.slow
def test_a_cycle_on_harvested_records_names_the_harvest_in_its_lineage(tiny_base, tmp_path):
    import yaml

    workspace = Workspace(tmp_path / "ws").create()
    raw = {
        "workspace": str(workspace.root),
        "model": {"base": str(tiny_base), "max_seq_tokens": 96},
        "data": {"min_rows": 20, "holdout_fraction": 0.15},
        "train": {"epochs": 1, "learning_rate": 0.01, "batch_tokens": 512},
        "gate": {"first_cycle": "accept"},
        "registry": {"model_name": "harvested"},
    }
    config_path = tmp_path / "ctloop.yaml"
    config_path.write_text(yaml.safe_dump(raw))
    items = []
    for i, line in enumerate(quickstart_rows("old_domain.jsonl")[:120]):
        fields = json.loads(line)
        if isinstance(fields.get("prompt"), str) and isinstance(fields.get("completion"), str):
            items.append(
                (
                    f"r{i}",
                    fields["prompt"],
                    "not this",
                    FeedbackRecord(f"r{i}", rating=-1, correction=fields["completion"]),
                )
            )
    _logged(workspace, items)
    result = subprocess.run(
        [sys.executable, "-m", "ctloop", "run", "--config", str(config_path), "--from-production", "--since", "1h"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lineage = subprocess.run(
        [sys.executable, "-m", "ctloop", "lineage", "1", "--workspace", str(workspace.root)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert f"harvest: {len(items)} rows from production feedback (ctloop) between" in lineage.stdout, lineage.stdout
    # The harvest's traffic sample travelled into the cycle, and each held-out row has its stratum (#23 item 8).
    [cycle_dir] = (workspace.root / "cycles").iterdir()
    stored = json.loads((cycle_dir / "eval.json").read_text())
    assert (cycle_dir / "traffic_sample.jsonl").is_file()
    assert len(stored["traffic"]["strata"]) == len(stored["ids"]["new_holdout"]) > 0
    assert sum(stored["traffic"]["counts"]) == len(items)


def test_secrets_the_patterns_missed_are_scrubbed_from_everything_the_harvest_writes(tmp_path):
    """#24 item 4: with default settings these reached the records, DPO, KTO and rejected files."""
    secrets = {
        "json password": '{"password": "Tr0ub4dor3xyz"}',
        "spoken password": "my password is Tr0ub4dor3xyz",
        "slack webhook": "https://hooks.slack.com/services/T0ABCDEF1/B0ABCDEF2/abcdefghijklmnopqrstuvwx",
        "azure key": "AccountKey=Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==;",
        "hex api key": "api key: 9f8e7d6c5b4a39281706f5e4d3c2b1a0",
    }
    leaks = [
        "Tr0ub4dor3xyz",
        "abcdefghijklmnopqrstuvwx",
        "Eby8vdM02x",
        "9f8e7d6c5b4a39281706f5e4d3c2b1a0",
        "bob.x@example.com",
    ]
    workspace = Workspace(tmp_path / "ws").create()
    config = config_from_dict({"workspace": str(workspace.root), "model": {"base": "unused"}})
    items = []
    for i, (name, secret) in enumerate(secrets.items()):
        items.append(
            (
                f"s{i}",
                f"help me with {name}: {secret}",
                "an answer",
                FeedbackRecord(f"s{i}", rating=-1, correction=f"use {secret}"),
            )
        )
        items.append((f"t{i}", f"question about {name}", f"the answer is {secret}", FeedbackRecord(f"t{i}", rating=-1)))
    items.append(("bob.x@example.com", "q", "a", FeedbackRecord("bob.x@example.com", rating=1)))
    _logged(workspace, items)
    written = ""
    for fmt in ("records", "dpo", "kto"):
        report = harvest(config, workspace, since=time.time() - 3600, out=tmp_path / f"{fmt}.jsonl", fmt=fmt)
        written += Path(report.out_path).read_text() + Path(report.decisions_path).read_text()
    written += (workspace.root / "harvest" / "rejected.jsonl").read_text()
    assert report.kept == 6 and report.rejected == 5
    assert [leak for leak in leaks if leak in written] == []


def test_redaction_in_worker_processes_gives_the_same_harvest(tmp_path):
    """#26: redaction is about half of a large harvest's time, so from the second page on it runs in
    worker processes (one per usable CPU). The harvest it writes is the one a single process writes."""
    workspace = Workspace(tmp_path / "ws").create()
    items = []
    for i in range(1500):  # two pages of rated rows
        secret = f" my password is hunter{i:04d}x and mail me at user{i}@example.org" if i % 7 == 0 else ""
        rating = FeedbackRecord(
            f"r{i}", rating=1 if i % 3 else -1, correction=f"fixed {i}{secret}" if i % 5 == 0 else None
        )
        items.append((f"r{i}", f"question {i}{secret}", f"answer {i}", rating))
    _logged(workspace, items)
    # Each harvest in a fresh process: the workers are forked only from a process running one thread,
    # and this test process may hold other tests' threads.
    code = (
        "import json, sys, time; from pathlib import Path; import ctloop.data.harvest as h;"
        "from ctloop.config import config_from_dict; from ctloop.workspace import Workspace;"
        "workers = int(sys.argv[2]); h.usable_cpus = lambda: workers; used = [];"
        "page = h._Redactor.for_page;"
        "h._Redactor.for_page = lambda self, rows: (r := page(self, rows), used.append(self.pool is not None))[0];"
        "ws = Workspace(Path(sys.argv[1]));"
        "config = config_from_dict({'workspace': sys.argv[1], 'model': {'base': 'unused'}});"
        "report = h.harvest(config, ws, since=time.time() - 3600, out=Path(sys.argv[3]));"
        "print(json.dumps({'pool': any(used), 'counts': report.counts, 'decisions': report.decisions_path}))"
    )
    outputs = {}
    for workers in (1, 2):
        out = tmp_path / f"h{workers}.jsonl"
        done = subprocess.run(
            [sys.executable, "-c", code, str(workspace.root), str(workers), str(out)],
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr[-2000:]
        result = json.loads(done.stdout.strip().splitlines()[-1])
        outputs[workers] = (out.read_text(), Path(result["decisions"]).read_text(), result["counts"], result["pool"])
    assert [outputs[w][3] for w in (1, 2)] == [False, True]  # one process, then forked workers
    assert outputs[1][:3] == outputs[2][:3]
    assert "hunter0000x" not in outputs[2][0] and "user0@example.org" not in outputs[2][0]
    assert sum(outputs[2][2].values()) == 1500


def test_a_correction_that_only_edits_its_answer_leaves_no_negative(tmp_path):
    """Review of #23 item 7: a correction repeating its answer, or fixing a typo in it, put the
    answer the cycle trains on (nearly) into the rejected set, where the rules would fail a healthy
    candidate. Only a real replacement's original joins it."""
    workspace = Workspace(tmp_path / "ws").create()
    config = config_from_dict({"workspace": str(workspace.root), "model": {"base": "unused"}})
    _logged(
        workspace,
        [
            ("r1", "q1", "the same answer", FeedbackRecord("r1", rating=-1, correction="the same answer")),
            (
                "r2",
                "q2",
                "install it with apt get now",
                FeedbackRecord("r2", rating=-1, correction="install it with apt-get now"),
            ),
            ("r3", "q3", "a wrong answer", FeedbackRecord("r3", rating=-1, correction="the right one, entirely")),
        ],
    )
    report = harvest(config, workspace, since=time.time() - 3600)
    rejected = [json.loads(line)["completion"] for line in Path(report.rejected_path).read_text().splitlines()]
    assert rejected == ["a wrong answer"] and report.corrected_originals == 1
