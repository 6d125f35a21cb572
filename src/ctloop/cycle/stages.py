"""The stage functions of a cycle, in the order `declaration.CYCLE` runs them.

Each takes a `StageContext` and the artifacts it reads (`cycle/artifacts.py`), and returns the
artifacts it writes: the runner (`run.py`) loads the one and saves the other in the cycle's
folder, so `ctloop run` and the Airflow DAG run the very same code, and a retried stage re-uses
what a finished one left. The cycle's state (`cycle.json`: its MLflow run, the champion it is
compared with) is the folder's, read and updated here.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from ctloop import __version__
from ctloop.config import CtloopConfig
from ctloop.console import console
from ctloop.cycle.artifacts import (
    STATUS_OF_OUTCOME,
    Evaluation,
    GateResult,
    Holdouts,
    Registration,
    TrainedAdapter,
    TrainingSet,
    Triggered,
    Validated,
)
from ctloop.cycle.folder import CycleFolder, StageContext
from ctloop.cycle.reference import champion_reference, champion_training_rows
from ctloop.cycle.tracking import log_cycle_run
from ctloop.data.preference import PreferenceSet, preference_kind, preference_rows, preference_set, supervised_rows
from ctloop.data.records import Record, fingerprint
from ctloop.drift.trigger import TriggerDecision
from ctloop.errors import CtloopError, DataError
from ctloop.evaluation.gate import CANDIDATE, NEW_SET, OLD_SET
from ctloop.fileio import parse_utc, read_json, utc_now, write_json
from ctloop.registry.client import CHAMPION, Registry, open_registry
from ctloop.workspace import Workspace, save_settings

# -- 0. harvest (orchestration.source: production) ------------------------------------------------


def harvest_stage(ctx: StageContext) -> str:
    """Harvest the request log and its feedback of `orchestration.production_window` into records;
    return the records file, which validate then takes as the cycle's data."""
    from ctloop.data.harvest import harvest
    from ctloop.fileio import parse_since

    report = harvest(ctx.config, ctx.workspace, since=parse_since(ctx.config.orchestration.production_window))
    console.print(report.summary())
    return report.out_path


# -- 1. validate ----------------------------------------------------------------------------------


def validate_stage(ctx: StageContext) -> Validated:
    """Validate the records; file the quarantine; return the good ones and the report, named by the cycle id.

    The cycle id is a hash of the validated data's fingerprint, the config and the base model
    revision, so the same data and config always land in the same folder. Raises DataError when
    a limit (bad fraction, minimum rows) is crossed, after writing the quarantine."""
    from ctloop.data.harvest import harvest_manifest
    from ctloop.data.records import read_raw_rows
    from ctloop.data.validation import record_lengths, validate_records
    from ctloop.model.batching import token_counter
    from ctloop.model.chat import chat_format
    from ctloop.model.loading import base_model_revision, load_tokenizer

    config, workspace, data_path = ctx.config, ctx.workspace, ctx.data
    if data_path is not None and data_path.is_dir():
        raise DataError(f"{data_path} is a folder; pass one records file (.jsonl, .parquet or .csv)")
    if data_path is None or not data_path.is_file():
        raise DataError(f"{data_path}: no such file; check the --data path")
    workspace.create()
    save_settings(workspace, config)
    tokenizer = load_tokenizer(config.model)
    chat = chat_format(tokenizer)  # chat rows rendered with the base model's own template, when it has one
    staging = workspace.root / "incoming" / hashlib.sha256(str(data_path.resolve()).encode()).hexdigest()[:12]
    count = token_counter(tokenizer)
    good, report = validate_records(
        read_raw_rows(data_path),
        source=str(data_path),
        config=config.data,
        max_seq_tokens=config.model.max_seq_tokens,
        count_tokens=count,
        quarantine_path=staging / Validated.QUARANTINE,
        render_chat=chat.split_all if config.train.chat_loss == "all_assistant" else chat.split,
    )
    revision = base_model_revision(config.model)
    # A changed chat template is a changed cycle (the fallback format keeps the earlier ids).
    template = f"|{chat.template_hash}" if chat.template_hash else ""
    cycle_id = hashlib.sha256(
        f"{report.fingerprint}|{config.training_hash()}|{revision}{template}".encode()
    ).hexdigest()[:16]
    cycle = CycleFolder(workspace, cycle_id)
    cycle.dir.mkdir(parents=True, exist_ok=True)
    shutil.move(staging / Validated.QUARANTINE, cycle.path(Validated.QUARANTINE))
    shutil.rmtree(staging, ignore_errors=True)
    report = replace(report, quarantine_path=str(cycle.path(Validated.QUARANTINE)))
    if not report.passed:
        # Runs that fail validation can share a cycle id (no good rows): keep each run's quarantine
        # under the input's own fingerprint and the time, so a later run never overwrites it.
        kept = workspace.root / "quarantine" / f"{utc_now().replace(':', '')}-{_file_digest(data_path)}.jsonl"
        kept.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(cycle.path(Validated.QUARANTINE), kept)
        report = replace(report, quarantine_path=str(kept))
        write_json(cycle.path(Validated.REPORT), report.to_dict())  # a failed run's report, beside its quarantine
        console.print(report.summary())
        raise DataError(report.summary())
    console.print(report.summary())
    tokens = record_lengths(count, good)
    state = cycle.state()
    if "started" not in state:
        harvested = harvest_manifest(data_path)  # records harvested from production carry their window
        sample = Path((harvested or {}).get("traffic_sample_path") or "")
        if harvested and sample.is_file():  # what traffic was, for the gate's weighted new-data rule
            shutil.copyfile(sample, cycle.path(Validated.TRAFFIC_SAMPLE))
        cycle.update_state(
            cycle_id=cycle_id,
            data=str(data_path),
            started=utc_now(),
            base_revision=revision,
            chat_format=chat.describe(),
            data_fingerprint=report.fingerprint,
            **({"harvest": harvested} if harvested else {}),
        )
    traffic = cycle.path(Validated.TRAFFIC_SAMPLE)
    return Validated(report, good, tokens, traffic if traffic.is_file() else None, cycle_id=cycle_id)


# -- 2. trigger ------------------------------------------------------------------------------------


def trigger_stage(ctx: StageContext, validated: Validated) -> Triggered:
    """Drift of the new data against the champion's training data (or drift.reference), then the
    trigger policy. A cycle that already started training is resumed, and one already triggered
    (say, by the drift-watch DAG) is not tested again: drift is computed once per cycle."""
    from ctloop.drift.detectors import detect_drift
    from ctloop.drift.embed import embed_records, make_embedder, texts_of
    from ctloop.drift.trigger import decide_trigger
    from ctloop.reports.drift import write_drift_report

    config, workspace, cycle_id, force = ctx.config, ctx.workspace, ctx.cycle_id, ctx.force
    cycle = CycleFolder(workspace, cycle_id)
    state = cycle.state()
    if "run_id" in state:
        console.print(f"resuming cycle {cycle_id}: finished stages are re-used, none is registered twice")
        return Triggered(TriggerDecision(True, state.get("trigger", "resumed")))
    registry = open_registry(config.registry, workspace)
    champion = registry.alias(CHAMPION)
    decided = state.get("status") == "triggered" and state.get("trigger_champion", -1) == champion
    if decided and Triggered.present(cycle.dir):  # its decision was saved (after the drift report)
        console.print(f"cycle {cycle_id} was already triggered ({state['trigger']}); not testing drift again")
        return Triggered(TriggerDecision(True, state["trigger"]))
    report = None
    if config.drift.enabled and (champion is not None or config.drift.reference is not None):
        new = validated.records
        reference = champion_reference(config, workspace, registry, champion)
        embedder = make_embedder(config.drift, config.model)
        cache = workspace.root / "embeddings"
        ref_emb = embed_records(reference, embedder, config.drift.text, cache)
        cur_emb = embed_records(new, embedder, config.drift.text, cache)
        report = detect_drift(ref_emb, cur_emb, config.drift)
        write_drift_report(
            cycle.path(Triggered.DRIFT_REPORT), report, ref_emb, cur_emb, texts_of(new, config.drift.text)
        )
        console.print(report.summary())
    decision = decide_trigger(
        report,
        has_champion=champion is not None,
        force=force,
        hours_since_training=_hours_since_training(workspace),
        config=config.drift,
    )
    console.print(decision.summary())
    cycle.update_state(
        trigger=decision.reason,
        status="triggered" if decision.train else "skipped",
        checked=utc_now(),
        trigger_champion=champion,  # a decision is re-used only while the champion it was made against holds
    )
    return Triggered(decision, report.to_dict() if report is not None else None)


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:12]


def _hours_since_training(workspace: Workspace) -> float | None:
    finished = [read_json(p).get("finished") for p in workspace.cycles_dir.glob("*/cycle.json")]
    stamps = [parse_utc(f) for f in finished if f]
    return (time.time() - max(stamps)) / 3600 if stamps else None


# -- 3. prepare: split the new data, mix in replay, open the MLflow run ----------------------------


def prepare_stage(ctx: StageContext, validated: Validated) -> tuple[TrainingSet, Holdouts]:
    """Holdout split and replay mix (deterministic, so a retry makes the same sets); the MLflow
    run and the champion to compare against are fixed here, once per cycle."""
    from ctloop.data.replay import ReplayBuffer, build_training_set
    from ctloop.data.split import split_holdout

    config, workspace, cycle_id = ctx.config, ctx.workspace, ctx.cycle_id
    cycle = CycleFolder(workspace, cycle_id)
    new, tokens = validated.records, validated.tokens_by_id
    new_train, new_holdout = split_holdout(new, config.data, seed=config.train.seed)
    objective = config.train.objective
    kind = preference_kind(objective)
    preference_train = preference_rows(new_train)
    if kind is not None:
        _require_preference_rows(preference_set(preference_train, kind), config)
    # The supervised term: the new rows an answer can be learned from as it stands (never a rated-down
    # one), and replay sized by them; a dpo or kto cycle sizes replay by its preference rows and
    # trains on the replayed rows alone in that term.
    supervised_new = supervised_rows(new_train) if kind is None or objective.startswith("sft+") else []
    buffer = ReplayBuffer.for_config(workspace.replay_dir, config.replay, config.train.seed)
    mix = build_training_set(
        supervised_new or preference_train,
        tokens,
        buffer.rows(exclude_cycle=cycle_id),
        config.replay,
        seed=config.train.seed,
    )
    if not supervised_new:
        sized_by = {r.id for r in preference_train}
        mix = replace(mix, records=[r for r in mix.records if r.id not in sized_by])
    if kind is None and not supervised_new:  # replay alone would train a cycle that learns nothing new
        raise DataError(
            f"no row to train on: the new data's {len(new_train)} training rows are all rated down; "
            "set train.objective to kto to learn from them, or collect corrections and answers rated up"
        )
    console.print(mix.summary())
    new_ids = {r.id for r in new_train}
    manifest = mix.manifest | {"replay_fingerprint": fingerprint(r for r in mix.records if r.id not in new_ids)}
    state = cycle.state()
    if "run_id" not in state:
        registry = open_registry(config.registry, workspace)
        # Read before the run opens: an unreachable registry raises here (RegistryUnavailable), so
        # the cycle fails and resumes, and is never fixed to the base model by a failed read.
        champion_before = registry.alias(CHAMPION)
        run_id = registry.start_run(
            f"cycle-{cycle_id}", {"ctloop.cycle_id": cycle_id, "ctloop.data_fingerprint": state["data_fingerprint"]}
        )
        state = cycle.update_state(run_id=run_id, champion_before=champion_before)
    # Held-out answers are references to score against: a rated-down one is none.
    holdouts = Holdouts(supervised_rows(new_holdout), mix.replay_holdout, preference_rows(new_holdout))
    return TrainingSet(mix.records, preference_train, manifest), holdouts


def _require_preference_rows(data: PreferenceSet, config: CtloopConfig) -> None:
    """Stop before training when the objective has too little to learn from."""
    need = config.train.min_preference_rows
    if len(data) >= need:
        return
    what = "corrections with the answer they corrected" if data.objective == "dpo" else "rated answers"
    raise DataError(
        f"train.objective={config.train.objective} needs at least {need} {what} (train.min_preference_rows); "
        f"the new data's training rows hold {len(data)}: {data.describe()}. Collect more feedback, lower "
        "train.min_preference_rows, or train with train.objective: sft"
    )


# -- 4. train ----------------------------------------------------------------------------------------


def train_stage(ctx: StageContext, training: TrainingSet) -> TrainedAdapter:
    """Train the adapter (the runner re-uses one an earlier attempt of this cycle finished)."""
    from ctloop.training.trainer import is_main_process, train_adapter

    config, workspace, cycle_id = ctx.config, ctx.workspace, ctx.cycle_id
    cycle = CycleFolder(workspace, cycle_id)
    adapter_dir = cycle.path(TrainedAdapter.ADAPTER)
    records = training.records
    champion = cycle.state().get("champion_before")
    kind = preference_kind(config.train.objective)
    # A preference objective measures every change against its reference, the champion: it starts
    # there (continuing the champion's adapter), whatever train.init says.
    continues = config.train.init == "champion" or kind is not None
    champion_adapter = None
    if champion is not None and continues:
        registry = open_registry(config.registry, workspace)
        champion_adapter = registry.download_adapter(champion, workspace.root / "registry-cache")
    preference = None
    if kind is not None:
        preference = preference_set(training.preference, kind)
        console.print(f"objective {config.train.objective}: {preference.describe()}")
    trained = train_adapter(
        records,
        model=config.model,
        lora=config.lora,
        train=config.train,
        out_dir=adapter_dir,
        checkpoint_dir=cycle.path(TrainedAdapter.CHECKPOINTS),
        warm_start_from=champion_adapter,
        preference=preference,
        reference_adapter=champion_adapter,  # the reference policy: the champion, or the bare base
    )
    if is_main_process():  # under torchrun, one process writes
        resolved = {
            key: getattr(trained, key)
            for key in ("compute_dtype", "attn_implementation", "row_width", "world_size", "libraries")
        }
        write_json(
            cycle.path(TrainedAdapter.MANIFEST),
            _lineage(config, cycle, training) | {"config": config.model_dump(mode="json"), "training": resolved},
        )
        console.print(trained.summary())
    return TrainedAdapter(trained, adapter_dir)


def _lineage(config: CtloopConfig, cycle: CycleFolder, training: TrainingSet) -> dict[str, Any]:
    state = cycle.state()
    return {
        "cycle_id": cycle.cycle_id,
        "base_model": config.model.base,
        "base_revision": state["base_revision"],
        "chat_format": state.get("chat_format", {"kind": "plain", "template_hash": ""}),
        "data_fingerprint": state["data_fingerprint"],
        "replay_fingerprint": training.manifest["replay_fingerprint"],
        "parent_version": state.get("champion_before"),
        "seed": config.train.seed,
        "objective": _objective_lineage(config, training),
        "config_hash": config.training_hash(),
        "ctloop_version": __version__,
        **({"harvest": _harvest_lineage(state["harvest"])} if state.get("harvest") else {}),
    }


def _objective_lineage(config: CtloopConfig, training: TrainingSet) -> str:
    """ "sft", or what the preference term trained on, as the lineage says it."""
    kind = preference_kind(config.train.objective)
    if kind is None:
        return config.train.objective
    described = preference_set(training.preference, kind).describe()
    return described if config.train.objective == kind else f"sft + {described}"


def _harvest_lineage(manifest: dict[str, Any]) -> str:
    counts = ", ".join(f"{k} {v}" for k, v in sorted(manifest["counts"].items()))
    down = f" and {manifest['rejected']} rated down" if manifest.get("rejected") else ""
    return (
        f"{manifest['kept']} rows{down} from production feedback ({manifest.get('source', 'ctloop')}) between "
        f"{manifest['since']} and {manifest['until']} "
        f"({counts})"
    )


# -- 5. evaluate -------------------------------------------------------------------------------------


def evaluate_stage(
    ctx: StageContext, validated: Validated, training: TrainingSet, holdouts: Holdouts, adapter: TrainedAdapter
) -> Evaluation:
    """Candidate and reference (champion, or the bare base model in a first cycle) on the new and
    the replay holdouts, per example (the runner re-uses what an earlier attempt finished)."""
    from ctloop.evaluation.evaluate import evaluate
    from ctloop.evaluation.slices import cluster_labels, slice_indices, slice_means

    config, workspace, cycle_id = ctx.config, ctx.workspace, ctx.cycle_id
    cycle = CycleFolder(workspace, cycle_id)
    champion = cycle.state().get("champion_before")
    adapters: dict[str, Path | None] = {CANDIDATE: adapter.path}
    anchor = registry = anchor_rows = None
    if champion is not None:
        from ctloop.cycle.reference import anchor_holdout
        from ctloop.evaluation.gate import ANCHOR
        from ctloop.registry.promotion import champion_history

        registry = open_registry(config.registry, workspace)
        adapters["champion"] = registry.download_adapter(champion, workspace.root / "registry-cache")
        # The first champion, fixed for the model's life; none when the alias was set outside ctloop.
        anchor = next(iter(champion_history(registry)), None)
        if anchor is not None and config.gate.max_cumulative_regression is not None:
            anchor_rows = anchor_holdout(workspace, registry, anchor)  # its own era, kept from its cycle
            if anchor != champion:
                adapters[ANCHOR] = registry.download_adapter(anchor, workspace.root / "registry-cache")
    elif config.gate.first_cycle == "compare_to_base":
        adapters["base"] = None
    sets = {NEW_SET: holdouts.new, OLD_SET: holdouts.replay}
    if anchor_rows:
        from ctloop.evaluation.gate import ANCHOR_SET

        sets[ANCHOR_SET] = anchor_rows
    sets |= {f"golden_{name}": _golden(name, path) for name, path in config.eval.golden.items()}
    rejected = workspace.root / "harvest" / "rejected.jsonl"
    if config.eval.rejected_answers and rejected.is_file() and champion is not None:
        from ctloop.data.records import read_records
        from ctloop.data.rejected_set import select_rejected
        from ctloop.evaluation.gate import REJECTED_SET

        started = cycle.state().get("started")
        chosen = select_rejected(read_records(rejected)[0], config.eval, parse_utc(started) if started else time.time())
        sets[REJECTED_SET] = chosen.records
        for reason, n in chosen.left_out.items():
            console.print(f"rejected answers: {n} left out ({reason})")
    kind = preference_kind(config.train.objective)
    if kind is not None:  # held-out feedback, checked for contamination as rows before it is split in sides
        sets[PREFERENCE_HOLDOUT] = holdouts.preference
    sets = _without_contamination(config, cycle, training, sets, registry)
    if config.eval.agreement_probes is not None:  # after the contamination check: its sides stay aligned
        sets |= _agreement_sides(config.eval.agreement_probes)
    options: dict[str, Any] = {}
    if kind is not None:
        sides = _preference_sides(preference_set(sets.pop(PREFERENCE_HOLDOUT), kind))
        sets |= sides
        options = {
            "also_base": tuple(sides) if kind == "kto" else (),  # the implicit reward is relative to the base
            "generate_sets": tuple(sides)[:1],  # the length guard's answers
        }
    reference = "champion" if champion is not None else "base" if "base" in adapters else None
    if reference is not None:
        options["kl_to"] = (CANDIDATE, reference, (NEW_SET,))
    evaluation = evaluate(sets, adapters, model=config.model, config=config.eval, examples_of=(NEW_SET,), **options)
    traffic, traffic_note = _traffic_strata(config, workspace, cycle, validated, sets[NEW_SET])
    slices = slice_indices(sets, config.eval.slice_by)
    from ctloop.training.seeds import EVENT, recorded

    registry = registry or open_registry(config.registry, workspace)
    seed_spread = recorded(registry.model_events(EVENT), config)  # `ctloop calibrate-seeds` on this recipe
    console.print(evaluation.summary())
    return Evaluation(
        evaluation,
        slices=slices,
        clusters=cluster_labels(sets, config.eval.cluster_by),
        slice_means=slice_means(evaluation.losses, slices),
        fingerprints={name: fingerprint(records) for name, records in sets.items()},
        anchor_version=anchor,
        seed_spread=seed_spread.to_dict() if seed_spread is not None else None,
        traffic=traffic.to_dict() if traffic is not None else None,
        traffic_note=traffic_note,
    )


def _traffic_strata(
    config: CtloopConfig, workspace: Workspace, cycle: CycleFolder, validated: Validated, holdout: list[Record]
):
    """(each new-data row's stratum of production traffic, or None; why there is none, when the
    cycle's rows were harvested). See `evaluation/traffic.py`. Best effort: an embedder that does
    not load leaves the weighted rule unchecked, with the reason, and fails nothing."""
    harvested = cycle.state().get("harvest") or {}
    path = validated.traffic_sample
    if not (config.gate.traffic_weighted and holdout and harvested):
        return None, ""
    if path is None:
        named = harvested.get("traffic_sample_path")
        return None, f"the harvest's traffic sample {named} was not found" if named else ""
    from ctloop.data.harvest import read_traffic_sample
    from ctloop.drift.embed import embed_records, make_embedder
    from ctloop.evaluation.traffic import traffic_strata

    sample = read_traffic_sample(path)
    if not sample:
        return None, "the harvest's traffic sample is empty"
    try:
        embedder = make_embedder(config.drift, config.model)
        cache = workspace.root / "embeddings"
        holdout_points = embed_records(holdout, embedder, "prompt", cache)
        traffic_points = embed_records(sample, embedder, "prompt", cache)
    except (CtloopError, OSError, RuntimeError, ValueError) as exc:
        console.print(f"traffic: the drift embedder did not embed the traffic sample ({exc}); not weighed")
        return None, f"the drift embedder ({config.drift.embedder}) failed on the traffic sample: {exc}"
    strata = traffic_strata(holdout_points, traffic_points, config.eval.traffic_strata, seed=config.train.seed)
    least = config.gate.min_stratum_rows
    console.print(
        f"traffic: {len(sample)} sampled requests in {len(strata.counts)} prompt clusters; "
        f"{strata.uncovered_share(least):.0%} of traffic in clusters with fewer than {least} held-out rated rows"
    )
    return strata, ""


PREFERENCE_HOLDOUT = "preference_holdout"


def _preference_training_rows(rows: list[Record], kind: str) -> list[Record]:
    """The rows a `kind` (dpo, kto) preference term learns from, each with what it trains toward or away from."""
    data = preference_set(rows, kind)
    used = {a.id.partition(":")[0] for a in data.answers} | {p.id for p in data.pairs}
    return [r for r in rows if r.id in used]


def _preference_sides(data: PreferenceSet) -> dict[str, list[Record]]:
    """The held-out feedback as aligned evaluation sets: chosen and rejected answers of each pair
    (dpo), or the desirable and the undesirable answers (kto)."""
    from ctloop.evaluation.preference_gate import CHOSEN, DESIRABLE, REJECTED, UNDESIRABLE

    if data.objective == "dpo":
        return {
            CHOSEN: [Record(p.id, p.prompt, p.chosen) for p in data.pairs],
            REJECTED: [Record(p.id, p.prompt, p.rejected) for p in data.pairs],
        }
    return {
        DESIRABLE: [Record(a.id, a.prompt, a.completion) for a in data.answers if a.desirable],
        UNDESIRABLE: [Record(a.id, a.prompt, a.completion) for a in data.answers if not a.desirable],
    }


def _agreement_sides(path: Path) -> dict[str, list[Record]]:
    """eval.agreement_probes as two aligned sets: the disagreeing (right) and the agreeing answers."""
    from ctloop.evaluation.preference_gate import AGREEING, DISAGREEING

    probes = _golden("agreement_probes", path)
    missing = [r.id for r in probes if not str(r.metadata.get("agreeing_answer") or "").strip()]
    if missing:
        raise DataError(
            f"eval.agreement_probes: {path} rows {', '.join(missing[:5])} lack metadata.agreeing_answer; every probe "
            "needs the answer that agrees with the user's false premise"
        )
    return {
        DISAGREEING: probes,
        AGREEING: [Record(r.id, r.prompt, str(r.metadata["agreeing_answer"])) for r in probes],
    }


def _golden(name: str, path: Path) -> list[Record]:
    from ctloop.data.records import read_records

    records, skipped = read_records(path)
    if skipped or not records:
        raise DataError(
            f"eval.golden.{name}: {path} has {skipped} invalid rows and {len(records)} valid ones; "
            f"a golden set must be clean - fix the file"
        )
    return records


def _without_contamination(
    config: CtloopConfig,
    cycle: CycleFolder,
    training: TrainingSet,
    sets: dict[str, list[Record]],
    registry: Registry | None,
) -> dict[str, list[Record]]:
    """Drop (and count) evaluation rows that the candidate or the champion trained on, or fail, per
    eval.contamination. Rows the champion saw favour the champion as much as the candidate's own
    favour the candidate. `registry`: open when the cycle has a champion."""
    from ctloop.data.contamination import find_contamination

    if config.eval.contamination == "off":
        return sets
    train = list(training.records)
    kind = preference_kind(config.train.objective)
    if kind is not None:  # what the preference term trained on
        train += _preference_training_rows(training.preference, kind)
    checked_against = ["the candidate's training rows"]
    champion = cycle.state().get("champion_before")
    if champion is not None and registry is not None:
        theirs = champion_training_rows(cycle.workspace, registry, champion)
        if theirs is None:
            console.print(
                f"contamination: champion v{champion}'s training rows not found; checked the candidate's only"
            )
        else:
            known = {r.id for r in train}
            train = train + [r for r in theirs if r.id not in known]
            checked_against.append(f"champion v{champion}'s")
    from ctloop.evaluation.gate import REJECTED_SET

    # Rejected answers overlapping training data are what their rule exists to catch: never dropped.
    checked = {name: records for name, records in sets.items() if name != REJECTED_SET}
    reports = find_contamination(train, checked, config.eval.ngram, config.eval.max_overlap)
    write_json(
        cycle.path(Evaluation.CONTAMINATION),
        {name: r.to_dict() for name, r in reports.items()} | {"checked_against": " and ".join(checked_against)},
    )
    dirty = [r for r in reports.values() if r.contaminated]
    for report in dirty:
        console.print(f"contamination: {report.summary()}")
    if dirty and config.eval.contamination == "fail":
        raise DataError(
            "evaluation rows overlap the training set: "
            + "; ".join(r.summary() for r in dirty)
            + "; remove them from the evaluation data, or set eval.contamination: drop"
        )
    dropped = {name: set(report.dropped_ids) for name, report in reports.items()}
    return {name: [r for r in records if r.id not in dropped.get(name, set())] for name, records in sets.items()}


# -- 6. gate -----------------------------------------------------------------------------------------


def gate_stage(ctx: StageContext, evaluation: Evaluation) -> GateResult:
    from ctloop.evaluation.gate import ANCHOR, INCONCLUSIVE, PASS, decide
    from ctloop.evaluation.preference_gate import preference_rules
    from ctloop.evaluation.traffic import TrafficStrata

    config, workspace, cycle_id = ctx.config, ctx.workspace, ctx.cycle_id
    cycle = CycleFolder(workspace, cycle_id)
    scores = evaluation.report
    champion = cycle.state().get("champion_before")
    evaluated = {model for by_model in scores.losses.values() for model in by_model}
    reference = "champion" if champion is not None else "base"
    anchor_version = evaluation.anchor_version
    anchor = (
        ANCHOR
        if ANCHOR in evaluated
        else "champion"
        if anchor_version is not None and anchor_version == champion
        else None
    )
    gate_config, seed_note = _seed_noise(config.gate, evaluation.seed_spread)
    decision = decide(
        scores.losses,
        gate_config,
        has_champion=champion is not None,
        slices=evaluation.slices or None,
        metrics=scores.metrics,
        anchor=anchor if champion is not None else None,
        anchor_recorded=anchor_version is not None,
        clusters=evaluation.clusters or None,
        extra=tuple(preference_rules(scores, config.gate, reference)) if reference in evaluated else (),
        traffic=TrafficStrata.from_dict(evaluation.traffic) if evaluation.traffic else None,
        rated_only="harvest" in cycle.state(),
        traffic_note=evaluation.traffic_note,
    )
    decision = replace(decision, reasons=(*decision.reasons, seed_note))
    if decision.outcome == PASS and evaluation.seed_spread is None and config.gate.require_seed_calibration:
        decision = replace(
            decision,
            outcome=INCONCLUSIVE,
            reasons=(
                *decision.reasons,
                "gate.require_seed_calibration: no measured seed spread for this model and recipe, so no PASS; "
                "run `ctloop calibrate-seeds`",
            ),
        )
    console.print(decision.summary())
    return GateResult(decision)


def _seed_noise(settings, measured: dict | None):
    """The gate's settings with the measured seed spread (its upper limit) when there is one, and a
    line saying which spread the bounds carry."""
    if measured is None:
        return settings, (
            f"seed noise: assumed gate.seed_spread={settings.seed_spread:.2%} (measured on the quickstart's tiny "
            "model, not on this one; `ctloop calibrate-seeds` measures it)"
        )
    upper = float(measured["upper"])
    note = (
        f"seed noise: measured on this model and recipe, {float(measured['spread']):.2%} between two seeds "
        f"({float(measured['confidence']):.0%} upper limit {upper:.2%} over {len(measured['seeds'])} seeds, used)"
    )
    return settings.model_copy(update={"seed_spread": upper}), note


# -- 7. register ---------------------------------------------------------------------------------


def register_stage(
    ctx: StageContext,
    validated: Validated,
    training: TrainingSet,
    holdouts: Holdouts,
    adapter: TrainedAdapter,
    evaluation: Evaluation,
    gate: GateResult,
) -> Registration:
    """Log the cycle to its MLflow run; register a passing adapter as `challenger` (idempotent on the
    cycle id); add a registered cycle's data to the replay buffer. The runner then marks the cycle
    finished."""
    from ctloop.cycle.declaration import logged_files
    from ctloop.data.replay import ReplayBuffer
    from ctloop.registry.promotion import VersionState, register_passed, registration_tags
    from ctloop.registry.publishing import make_publisher
    from ctloop.reports.cycle import write_cycle_report

    config, workspace, cycle_id = ctx.config, ctx.workspace, ctx.cycle_id
    cycle = CycleFolder(workspace, cycle_id)
    state = cycle.state()
    registry = open_registry(config.registry, workspace)
    decision, trained = gate.decision, adapter.result
    lineage = _lineage(config, cycle, training)
    run_id = state["run_id"]
    logged = logged_files(ctx.stages or None)
    log_cycle_run(registry, run_id, config, cycle.dir, logged, trained, evaluation.report, decision, lineage)
    status = STATUS_OF_OUTCOME[decision.outcome]
    version = registered = None
    if decision.passed:
        tags = {f"ctloop.{k}": str(v) for k, v in lineage.items()}
        tags |= {
            "ctloop.gate": decision.outcome,
            "ctloop.gate_reasons": " | ".join(decision.reasons)[:4000],
            "ctloop.eval_fingerprints": json.dumps(evaluation.fingerprints, sort_keys=True),
            "ctloop.adapter_config": (adapter.path / "adapter_config.json").read_text()[:4000],
        }
        tags |= registration_tags(config.gate.require_approval)
        info = registry.register(
            run_id, cycle_id, tags, description=f"gate {decision.outcome}: " + "; ".join(decision.reasons)[:3900]
        )
        version = info.version
        publisher = make_publisher(config.publish, registry, workspace)
        standing = register_passed(registry, version, config.registry.promote_first, publisher)
        if standing == VersionState.PENDING_APPROVAL:
            console.print(
                f"registered {registry.model_name} version {version}; it awaits approval: "
                f"`ctloop approve {version} --by NAME --note TEXT`"
            )
        else:
            console.print(f"{registry.model_name} version {version} is now '{standing}'")
        registered = Registration(status, run_id, version, str(standing), utc_now())
    # The report once the version exists, so it can name it; logged here, with the run's other reports.
    report_path = write_cycle_report(
        cycle.path(Registration.REPORT),
        cycle_id,
        trained,
        evaluation.report,
        decision.to_dict(),
        lineage,
        validation=validated.report.to_dict(),
        slice_means=evaluation.slice_means,
        holdout=holdouts.new,
        drift_report=Triggered.DRIFT_REPORT if cycle.path(Triggered.DRIFT_REPORT).is_file() else None,
        registered=asdict(registered) if registered else None,
    )
    registry.log_artifact(run_id, report_path, Registration.LOGGED[Registration.REPORT])

    # The data of a registered cycle joins the replay buffer. A cycle that did not register keeps
    # its rows out: a retry on that data would replay its own new rows (and its holdout would then
    # be dropped as contaminated), and no model has been released on them.
    if version is not None:
        tokens = validated.tokens_by_id
        new = supervised_rows(validated.records)  # a rated-down answer is never replayed as one to learn
        holdout_ids = {r.id for r in holdouts.new}
        ReplayBuffer.for_config(workspace.replay_dir, config.replay, config.train.seed).add_cycle(
            cycle_id, [r for r in new if r.id not in holdout_ids], [r for r in new if r.id in holdout_ids], tokens
        )
    console.print(f"cycle report: {report_path}")
    if state.get("harvest"):  # the harvested rows are now used: later harvests skip them
        from ctloop.data.harvest import commit_harvest

        commit_harvest(workspace, state["harvest"], config.shadow.store_url)
    registry.end_run(run_id)  # before the cycle is marked finished: a retry after a failure here redoes both
    return registered or Registration(status, run_id)
