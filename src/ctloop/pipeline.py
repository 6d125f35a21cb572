"""One continuous-training cycle, top to bottom:

    validate -> split -> replay mix -> train -> evaluate -> gate -> register -> replay buffer

The cycle key is a hash of the validated data's fingerprint, the config and the base model
revision. A cycle writes everything into `cycles/<key>/`; a retried or repeated cycle re-uses what
is already there (a trained adapter is not trained again, the registry gains no duplicate version).
"""

from __future__ import annotations

import hashlib
import html
import shutil
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from ctloop import __version__
from ctloop.config import CtloopConfig, RegistryConfig
from ctloop.console import console
from ctloop.errors import DataError, WorkspaceError
from ctloop.evaluate import EvalReport, evaluate
from ctloop.gate import CANDIDATE, NEW_SET, OLD_SET, GateDecision, decide
from ctloop.modeling import base_model_revision, load_tokenizer, token_counter
from ctloop.drift import detect_drift
from ctloop.embed import embed_records, make_embedder, texts_of
from ctloop.records import Record, fingerprint, read_parquet, read_raw_rows, read_records, write_parquet
from ctloop.registry import CHALLENGER, CHAMPION, Registry
from ctloop.replay import ReplayBuffer, build_training_set
from ctloop.reports import grouped_bars, line_chart, table, write_drift_report, write_html
from ctloop.train import TrainResult, train_adapter
from ctloop.trigger import TriggerDecision, decide_trigger
from ctloop.validate import ValidationReport, validate_records
from ctloop.workspace import Workspace, read_json, write_json

SETTINGS_FILE = "ctloop.json"
FINISHED = ("registered", "rejected", "inconclusive")  # a cycle in one of these states is never redone


@dataclass(frozen=True)
class CycleResult:
    cycle_id: str
    status: str  # "registered", "rejected", "inconclusive", "skipped" or "already_done"
    cycle_dir: str
    run_id: str
    version: int | None
    champion_before: int | None
    means: dict[str, dict[str, float]] = field(default_factory=dict)
    gate: dict = field(default_factory=dict)
    validation: dict = field(default_factory=dict)
    trigger: str = ""

    @property
    def trained(self) -> bool:
        return self.status in FINISHED

    @property
    def passed(self) -> bool:
        return bool(self.gate.get("passed"))

    def summary(self) -> str:
        if self.status == "skipped":
            return f"cycle {self.cycle_id}: skipped, not trained - {self.trigger}"
        where = f"version {self.version}" if self.version else "not registered"
        return f"cycle {self.cycle_id}: {self.status} ({where}); gate {self.gate.get('outcome', '?')}"

    def to_dict(self) -> dict:
        return asdict(self)


def open_registry(config: RegistryConfig, workspace: Workspace) -> Registry:
    return Registry(workspace.tracking_uri(config.tracking_uri), config.model_name, config.experiment,
                    workspace.artifacts_dir)


def registry_settings(workspace: Workspace) -> RegistryConfig:
    """The registry settings the workspace's last cycle used, so commands need no --config."""
    path = workspace.root / SETTINGS_FILE
    if not workspace.root.is_dir():
        raise WorkspaceError(f"no workspace at {workspace.root}; run `ctloop demo` or `ctloop run` first, "
                             f"or pass --workspace")
    return RegistryConfig(**read_json(path)["registry"]) if path.is_file() else RegistryConfig()


def run_cycle(config: CtloopConfig, data_path: Path, workspace: Workspace, force: bool = False) -> CycleResult:
    """Run one cycle on the records in `data_path`; see the module docstring for the stages.

    `force` trains even when the trigger (drift, schedule) says there is no need."""
    if not data_path.is_file():
        raise DataError(f"{data_path}: no such file; check the --data path")
    workspace.create()
    write_json(workspace.root / SETTINGS_FILE, {"registry": config.registry.model_dump(mode="json")})
    tokenizer = load_tokenizer(config.model)
    revision = base_model_revision(config.model)
    good, report, cycle_id, cycle_dir = _validate(config, data_path, workspace, tokenizer, revision)

    state_path = cycle_dir / "cycle.json"
    state = read_json(state_path) if state_path.is_file() else {}
    if state.get("status") in FINISHED:
        console.print(f"cycle {cycle_id} already ran on this data and config: nothing to do")
        return CycleResult(**{**state["result"], "status": "already_done"})
    registry = open_registry(config.registry, workspace)
    if "run_id" in state:
        console.print(f"resuming cycle {cycle_id}: finished stages are re-used, none is registered twice")
    else:
        done = registry.find_by_cycle_key(cycle_id)
        if done is not None:  # registered from another workspace, or this one was lost and recreated
            console.print(f"cycle {cycle_id} is already registered as version {done.version}: nothing to do")
            return CycleResult(cycle_id, "already_done", str(cycle_dir), done.run_id, done.version, None)
        trigger = _check_trigger(config, workspace, registry, good, cycle_dir, force)
        if not trigger.train:
            write_json(state_path, {"cycle_id": cycle_id, "data": str(data_path), "started": _now(),
                                    "status": "skipped", "trigger": trigger.reason})
            return CycleResult(cycle_id, "skipped", str(cycle_dir), "", None, registry.alias(CHAMPION),
                               validation=report.to_dict(), trigger=trigger.reason)
        state = {"cycle_id": cycle_id, "data": str(data_path), "started": _now(), "trigger": trigger.reason,
                 "champion_before": registry.alias(CHAMPION),
                 "run_id": registry.start_run(f"cycle-{cycle_id}", {"ctloop.cycle_id": cycle_id,
                                                                     "ctloop.data_fingerprint": report.fingerprint})}
        write_json(state_path, state)

    run_id = state["run_id"]
    try:
        result = _train_evaluate_register(config, workspace, registry, cycle_id, cycle_dir, good, report.fingerprint,
                                          revision, run_id, state["champion_before"], tokenizer)
    except BaseException:
        registry.end_run(run_id, "FAILED")
        raise
    result = replace(result, trigger=state.get("trigger", ""))
    state.update(status=result.status, finished=_now(), result=result.to_dict())
    write_json(state_path, state)
    registry.end_run(run_id)
    return result


def _validate(config: CtloopConfig, data_path: Path, workspace: Workspace, tokenizer,
              revision: str) -> tuple[list[Record], ValidationReport, str, Path]:
    """Validate into a staging folder (the cycle key depends on the validated data), then file the
    report and quarantine under the cycle's folder. Raises DataError when a limit is crossed."""
    staging = workspace.root / "incoming" / hashlib.sha256(str(data_path.resolve()).encode()).hexdigest()[:12]
    good, report = validate_records(
        read_raw_rows(data_path), source=str(data_path), config=config.data,
        max_seq_tokens=config.model.max_seq_tokens, count_tokens=token_counter(tokenizer),
        quarantine_path=staging / "quarantine.jsonl")
    cycle_id = hashlib.sha256(f"{report.fingerprint}|{config.training_hash()}|{revision}".encode()).hexdigest()[:16]
    cycle_dir = workspace.cycle_dir(cycle_id)
    cycle_dir.mkdir(parents=True, exist_ok=True)
    quarantine = cycle_dir / "quarantine.jsonl"
    shutil.move(staging / "quarantine.jsonl", quarantine)
    shutil.rmtree(staging, ignore_errors=True)
    report = replace(report, quarantine_path=str(quarantine))
    write_json(cycle_dir / "validation.json", report.to_dict())
    console.print(report.summary())
    if not report.passed:
        raise DataError(report.summary())
    return good, report, cycle_id, cycle_dir


def _check_trigger(config: CtloopConfig, workspace: Workspace, registry: Registry, good: list[Record],
                   cycle_dir: Path, force: bool) -> TriggerDecision:
    """Drift of the new data against the champion's training data (or drift.reference), then the policy."""
    champion = registry.alias(CHAMPION)
    report = None
    if config.drift.enabled and (champion is not None or config.drift.reference is not None):
        reference = _reference_records(config, workspace, registry, champion)
        embedder = make_embedder(config.drift, config.model)
        cache = workspace.root / "embeddings"
        ref_emb = embed_records(reference, embedder, config.drift.text, cache)
        cur_emb = embed_records(good, embedder, config.drift.text, cache)
        report = detect_drift(ref_emb, cur_emb, config.drift)
        write_json(cycle_dir / "drift.json", report.to_dict())
        write_drift_report(cycle_dir / "drift.html", report, ref_emb, cur_emb, texts_of(good, config.drift.text))
        console.print(report.summary())
    decision = decide_trigger(report, has_champion=champion is not None, force=force,
                              hours_since_training=_hours_since_training(workspace), config=config.drift)
    console.print(decision.summary())
    return decision


def _reference_records(config: CtloopConfig, workspace: Workspace, registry: Registry,
                       champion: int | None) -> list[Record]:
    if config.drift.reference is not None:
        records, _ = read_records(config.drift.reference)
        return records
    info = registry.version(champion)
    local = workspace.cycle_dir(info.tags.get("ctloop.cycle_id", "?")) / "train.parquet"
    if local.is_file():
        return read_parquet(local)[0]
    fetched = registry.download_run_file(info.run_id, "data/train.parquet", workspace.root / "registry-cache")
    if fetched is None:
        raise DataError(f"cannot find the training data of champion v{champion} (not in this workspace, not in its "
                        f"MLflow run); set drift.reference to a file of reference records")
    return read_parquet(fetched)[0]


def _hours_since_training(workspace: Workspace) -> float | None:
    import calendar
    import time

    finished = [read_json(p).get("finished") for p in workspace.cycles_dir.glob("*/cycle.json")]
    stamps = [calendar.timegm(time.strptime(f, "%Y-%m-%dT%H:%M:%SZ")) for f in finished if f]
    return (time.time() - max(stamps)) / 3600 if stamps else None


def _train_evaluate_register(config: CtloopConfig, workspace: Workspace, registry: Registry, cycle_id: str,
                             cycle_dir: Path, good: list[Record], data_fingerprint: str, revision: str,
                             run_id: str, champion: int | None, tokenizer) -> CycleResult:
    """Stages 2-7 for a validated cycle. A finished adapter from an interrupted attempt is re-used; the
    other stages are deterministic and cheap, so they simply run again."""
    # 2. split the new data; mix in replay
    counts = token_counter(tokenizer)
    tokens = _token_counts(good, counts)
    new_train, new_holdout = split_holdout(good, config, seed=config.train.seed)
    buffer = ReplayBuffer(workspace.replay_dir)
    mix = build_training_set(new_train, tokens, buffer.rows(exclude_cycle=cycle_id), config.replay,
                             seed=config.train.seed)
    console.print(mix.summary())
    write_parquet(cycle_dir / "train.parquet", mix.records)
    write_parquet(cycle_dir / "new_holdout.parquet", new_holdout)
    write_parquet(cycle_dir / "replay_holdout.parquet", mix.replay_holdout)
    replay_fingerprint = fingerprint(r for r in mix.records if r.id not in {x.id for x in new_train})
    write_json(cycle_dir / "replay_manifest.json", mix.manifest | {"replay_fingerprint": replay_fingerprint})

    # 3. train (skipped when a finished adapter from an interrupted attempt is there)
    adapter_dir = cycle_dir / "adapter"
    training_path = cycle_dir / "training.json"
    if (adapter_dir / "adapter_config.json").is_file() and training_path.is_file():
        trained = TrainResult(**read_json(training_path))
        console.print(f"re-using the adapter trained earlier in this cycle: {adapter_dir}")
    else:
        trained = train_adapter(mix.records, model=config.model, lora=config.lora, train=config.train,
                                out_dir=adapter_dir)
        write_json(training_path, trained.to_dict())
        console.print(trained.summary())
    lineage = {
        "cycle_id": cycle_id, "base_model": config.model.base, "base_revision": revision,
        "data_fingerprint": data_fingerprint, "replay_fingerprint": replay_fingerprint,
        "parent_version": champion, "seed": config.train.seed, "config_hash": config.training_hash(),
        "ctloop_version": __version__,
    }
    write_json(adapter_dir / "ctloop_manifest.json", lineage | {"config": config.model_dump(mode="json")})

    # 4. evaluate candidate and reference on new and old held-out data
    adapters: dict[str, Path | None] = {CANDIDATE: adapter_dir}
    if champion is not None:
        adapters["champion"] = registry.download_adapter(champion, workspace.root / "registry-cache")
    elif config.gate.first_cycle == "compare_to_base":
        adapters["base"] = None
    evaluation = evaluate({NEW_SET: new_holdout, OLD_SET: mix.replay_holdout}, adapters, model=config.model,
                          config=config.eval)
    write_json(cycle_dir / "eval.json", evaluation.to_dict())
    console.print(evaluation.summary())

    # 5. gate
    decision = decide(evaluation.losses, config.gate, has_champion=champion is not None)
    write_json(cycle_dir / "gate.json", decision.to_dict())
    console.print(decision.summary())

    # 6. track and register
    report_path = _write_report(cycle_dir, cycle_id, trained, evaluation, decision, lineage)
    _log_run(registry, run_id, config, cycle_dir, trained, evaluation, decision, lineage)
    version = None
    if decision.passed:
        tags = {f"ctloop.{k}": str(v) for k, v in lineage.items()}
        tags |= {"ctloop.gate": decision.outcome, "ctloop.gate_reasons": " | ".join(decision.reasons)[:4000]}
        info = registry.register(run_id, cycle_id, tags, description=decision.summary()[:4000])
        version = info.version
        registry.set_alias(CHALLENGER, version)
        if registry.alias(CHAMPION) is None and config.registry.promote_first:
            registry.make_champion(version, by="ctloop", note="first version to pass the gate")
        console.print(f"registered {registry.model_name} version {version} as '{CHALLENGER}'")

    # 7. this cycle's data joins the replay buffer, whatever the gate said: it is real data
    buffer.add_cycle(cycle_id, new_train, new_holdout, tokens)
    console.print(f"cycle report: {report_path}")
    status = {"PASS": "registered", "FAIL": "rejected", "INCONCLUSIVE": "inconclusive"}[decision.outcome]
    return CycleResult(cycle_id, status, str(cycle_dir), run_id, version,
                       champion, evaluation.means, decision.to_dict(),
                       read_json(cycle_dir / "validation.json"))


def split_holdout(records: list[Record], config: CtloopConfig, seed: int) -> tuple[list[Record], list[Record]]:
    """Seeded split by record id, independent of row order: the same data always splits the same way."""
    n_holdout = min(config.data.max_holdout_rows, max(1, round(config.data.holdout_fraction * len(records))))
    ranked = sorted(records, key=lambda r: hashlib.sha256(f"{seed}:{r.id}".encode()).hexdigest())
    held = {r.id for r in ranked[:n_holdout]}
    return [r for r in records if r.id not in held], [r for r in records if r.id in held]


def _token_counts(records: list[Record], count) -> dict[str, int]:
    prompts = count([r.prompt for r in records])
    completions = count([r.completion for r in records])
    return {r.id: p + c + 2 for r, p, c in zip(records, prompts, completions, strict=True)}


def _log_run(registry: Registry, run_id: str, config: CtloopConfig, cycle_dir: Path, trained: TrainResult,
             evaluation: EvalReport, decision: GateDecision, lineage: dict) -> None:
    registry.log_params(run_id, _flatten(config.model_dump(mode="json")))
    registry.log_series(run_id, "train_loss", trained.losses)
    registry.log_series(run_id, "learning_rate", trained.learning_rates)
    metrics = {"train_tokens": trained.tokens, "train_seconds": trained.seconds, "train_steps": trained.steps}
    metrics |= {f"{s}_{m}_loss": v for s, by_model in evaluation.means.items() for m, v in by_model.items()}
    metrics |= {f"gate_{k}": v for k, v in decision.metrics.items()} | {"gate_passed": float(decision.passed)}
    registry.log_metrics(run_id, metrics)
    registry.set_run_tags(run_id, {f"ctloop.{k}": str(v) for k, v in lineage.items()} | {
        "ctloop.gate": decision.outcome})
    for name in ("validation.json", "drift.json", "drift.html", "replay_manifest.json", "training.json",
                 "eval.json", "gate.json", "quarantine.jsonl", "report.html"):
        if (cycle_dir / name).is_file():
            registry.log_artifact(run_id, cycle_dir / name, "reports")
    registry.log_artifact(run_id, cycle_dir / "train.parquet", "data")  # the next drift check's reference
    registry.log_artifact(run_id, cycle_dir / "adapter", "adapter")


def _write_report(cycle_dir: Path, cycle_id: str, trained: TrainResult, evaluation: EvalReport,
                  decision: GateDecision, lineage: dict) -> Path:
    validation = read_json(cycle_dir / "validation.json")
    css = "pass" if decision.passed else "fail"
    gate_html = f"<p class='{css}'><b>{decision.outcome}</b> vs {decision.reference}</p><ul>" + "".join(
        f"<li>{html.escape(r)}</li>" for r in decision.reasons) + "</ul>"
    return write_html(cycle_dir / "report.html", f"ctloop cycle {cycle_id}", [
        ("Gate", gate_html),
        ("Evaluation", grouped_bars("mean token loss per example (lower is better)", evaluation.means, "loss")),
        ("Training", line_chart("training loss", [(float(s), v) for s, v in trained.losses], "loss")
         + table([("steps", str(trained.steps)), ("examples", str(trained.examples)),
                  ("tokens", str(trained.tokens)), ("seconds", str(trained.seconds))])),
        ("Validation", table([("rows", str(validation["total_rows"])), ("good", str(validation["good_rows"]))]
                             + [(f"quarantined: {k}", str(v)) for k, v in validation["bad_by_reason"].items()])),
        ("Lineage", table([(k, str(v)) for k, v in lineage.items()])),
    ])


def _flatten(value: dict, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for key, item in value.items():
        name = f"{prefix}{key}"
        if isinstance(item, dict):
            out |= _flatten(item, name + ".")
        else:
            out[name] = item
    return out


def _now() -> str:
    import time

    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())

