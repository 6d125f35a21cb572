"""The cycle's contract is code: each stage's reads and writes are its function's signature, the
declaration is checked when it is imported, the runner loads and saves the artifacts, and the
README's stage table is generated from the declaration."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from dataclasses import dataclass, replace
from pathlib import Path
from typing import ClassVar, Self

import pytest

from conftest import REPO
from ctloop.cycle.artifacts import Artifact, GateResult, Registration, TrainedAdapter, Validated
from ctloop.cycle.declaration import (
    CYCLE,
    DeclarationError,
    Stage,
    check_cycle,
    logged_files,
    stage,
    stage_table,
    up_to_decision,
    writer_of,
)
from ctloop.cycle.folder import StageContext
from ctloop.errors import WorkspaceError


def test_every_stage_reads_only_what_an_earlier_stage_writes_and_each_artifact_has_one_writer():
    check_cycle(CYCLE)
    written: list[type[Artifact]] = []
    for declared in CYCLE:
        assert set(declared.reads.values()) <= set(written), declared.name
        written += declared.writes
        assert declared.summary
    assert len(written) == len(set(written))
    assert writer_of(TrainedAdapter) == "train" and writer_of(GateResult) == "gate"
    assert stage("gate").reads == {"evaluation": stage("evaluate").writes[0]}


def test_one_stage_opens_the_cycle_first_one_decides_and_one_closes_it_last():
    roles = [s.role for s in CYCLE]
    assert roles[0] == "opens" and roles[-1] == "closes" and roles.count("decides") == 1
    assert up_to_decision()[-1].role == "decides" and up_to_decision() == CYCLE[: len(up_to_decision())]
    assert CYCLE[0].writes == (Validated,) and CYCLE[-1].writes == (Registration,)


def test_what_a_finished_cycle_logs_to_mlflow_is_derived_from_the_artifacts():
    logged = dict(logged_files())
    assert logged["train.parquet"] == "data" and logged["gate.json"] == "reports" and logged["adapter"] == "adapter"
    assert "registration.json" not in logged  # the closing stage's own record is not an input to it


def test_a_stage_reading_an_artifact_no_earlier_stage_writes_fails_when_its_module_is_imported(tmp_path):
    module = tmp_path / "my_cycle.py"
    module.write_text(
        textwrap.dedent(
            """
            from ctloop.cycle.artifacts import GateResult, Validated
            from ctloop.cycle.declaration import CYCLE, Stage, check_cycle

            def early_look(ctx, gate: GateResult) -> None:  # the gate has not run yet at this place
                return None

            MINE = (CYCLE[0], Stage("early_look", early_look, uses_registry=False), *CYCLE[1:])
            check_cycle(MINE)
            """
        )
    )
    done = subprocess.run(
        [sys.executable, "-c", "import my_cycle"], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert done.returncode != 0
    assert "DeclarationError: stage early_look reads GateResult (gate), which no earlier stage writes" in done.stderr


def test_a_stage_parameter_that_is_not_an_artifact_is_refused():
    def takes_a_dict(ctx, stored: dict) -> GateResult:  # the untyped hand-off this replaces
        raise AssertionError

    with pytest.raises(DeclarationError, match="parameter 'stored' of takes_a_dict is"):
        check_cycle((CYCLE[0], Stage("odd", takes_a_dict, uses_registry=False), *CYCLE[1:]))


def test_the_deciding_stage_must_return_a_decision():
    def decides_nothing(ctx, validated: Validated) -> Tally:
        raise AssertionError

    odd = (CYCLE[0], Stage("decide", decides_nothing, uses_registry=False, role="decides"), *CYCLE[2:])
    with pytest.raises(DeclarationError, match="deciding stage decide must return first an artifact with a proceed"):
        check_cycle(odd)


@dataclass(frozen=True)
class Tally(Artifact):
    """A new artifact for the test below: its file is named here only."""

    FILE: ClassVar = "tally.json"
    FILES: ClassVar = (FILE,)
    LOGGED: ClassVar = {FILE: "reports"}

    rows: int

    def save(self, folder: Path) -> None:
        (folder / self.FILE).write_text(json.dumps({"rows": self.rows}))

    @classmethod
    def load(cls, folder: Path) -> Self:
        return cls(json.loads((folder / cls.FILE).read_text())["rows"])


calls: list[str] = []


def tally_stage(ctx: StageContext, validated: Validated) -> Tally:
    calls.append(ctx.cycle_id)
    return Tally(len(validated.records))


def test_a_new_stage_costs_one_function_and_one_declaration_entry(tmp_path, tiny_base):
    """The runner loads the new stage's input, saves its output where a later stage can take it,
    re-uses it on a rerun, and names its writer when a later stage finds it missing."""
    from conftest import quickstart_rows
    from ctloop.config import config_from_dict
    from ctloop.cycle.run import run_stage
    from ctloop.workspace import Workspace

    def counted(ctx: StageContext, tally: Tally, validated: Validated) -> Registration:  # a closing stage
        assert tally.rows == len(validated.records)
        return Registration("rejected", "no-run")

    mine = (
        CYCLE[0],
        Stage("tally", tally_stage, uses_registry=False, summary="count the rows", reused_when_saved=True),
        Stage("decide", CYCLE[1].function, uses_registry=True, role="decides"),
        Stage("close", counted, uses_registry=False, role="closes"),
    )
    check_cycle(mine)
    assert "| tally | Validated | Tally (`tally.json`) | - | - | count the rows |" in stage_table(mine)
    assert ("tally.json", "reports") in logged_files(mine)

    data = tmp_path / "d.jsonl"
    data.write_bytes(b"\n".join(quickstart_rows("old_domain.jsonl")[:40]) + b"\n")
    config = config_from_dict({"model": {"base": str(tiny_base)}, "data": {"min_rows": 20}})
    workspace = Workspace(tmp_path / "ws")
    opened = run_stage(mine[0], StageContext(config, workspace, data=data, stages=mine))
    context = StageContext(config, workspace, opened.cycle_id, stages=mine)
    with pytest.raises(WorkspaceError, match=r"has no tally\.json; run the tally stage first"):
        run_stage(mine[3], context)
    calls.clear()
    run_stage(mine[1], context)
    run_stage(mine[1], context)  # saved already: re-used, not run again
    assert calls == [opened.cycle_id]
    again = replace(mine[1], reused_when_saved=False)  # a cheap stage (prepare, gate) always runs again
    run_stage(again, replace(context, stages=(mine[0], again, *mine[2:])))
    assert calls == [opened.cycle_id] * 2
    assert Tally.load(context.folder.dir).rows == 40
    run_stage(mine[3], context)
    assert context.folder.state()["status"] == "rejected"  # the closing stage's record finished the cycle
    assert Registration.load(context.folder.dir).run_id == "no-run"


def test_the_readme_stage_table_is_the_declarations():
    readme = (REPO / "README.md").read_text()
    begin, end = "<!-- stage table: generated from ctloop.cycle.declaration -->\n", "<!-- end of stage table -->"
    assert begin in readme and end in readme, "the README lost its stage-table markers"
    assert readme.split(begin, 1)[1].split(end, 1)[0] == stage_table(), (
        "the README's stage table is stale: run `make docs` (scripts/build_docs.py rewrites it)"
    )
