"""The cycle's declaration: every stage names a real stage function, and the roles are in order."""

from __future__ import annotations

import inspect

from ctloop.cycle import stages
from ctloop.cycle.declaration import CYCLE, stage, up_to_decision


def test_every_declared_stage_has_its_function_and_a_unique_name():
    assert len({s.name for s in CYCLE}) == len(CYCLE)
    for declared in CYCLE:
        function = getattr(stages, declared.function)
        assert callable(function) and list(inspect.signature(function).parameters) == ["ctx"], declared.name
        assert declared.reads and declared.writes and declared.summary


def test_one_stage_opens_the_cycle_first_and_one_decides():
    assert [s.role for s in CYCLE][0] == "opens" and [s.role for s in CYCLE].count("opens") == 1
    assert [s.role for s in CYCLE].count("decides") == 1
    assert up_to_decision()[-1].role == "decides" and up_to_decision() == CYCLE[: len(up_to_decision())]
    assert stage("train").name == "train"
