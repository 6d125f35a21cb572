"""Promotion policy, in one place: which version may become `challenger` or `champion`, and when.

- A version that passed the gate becomes `challenger` (`offer_as_challenger`); with
  `gate.require_approval` it waits for `approve` first. With no champion yet and
  `registry.promote_first`, the first passing version also becomes `champion`.
- `promote` moves `champion` to a version (the challenger by default). With a shadow check it
  refuses unless the shadow comparison decides PROMOTE. A promoted challenger stops being the
  challenger: after a promotion nothing is pending until the next cycle registers a version.
- `rollback` moves `champion` back to the version it replaced.

A version's place in that lifecycle is one `VersionState`, read from the registry by
`version_state`: registered (passed, not or no longer offered) -> pending approval -> challenger
-> champion -> retired (replaced by a later champion) or rolled back. `ALLOWED` lists the moves;
`register_passed` is the register stage's entry (it records the approval the gate requires and
offers the version), and `ctloop status` shows each version's state.

The champion history is an append-only log of events on the registered model (one tag per event),
so two promoters at once never lose an entry; the `champion` alias is then set to the top of the
history as replayed after the write, so both writers converge on the same alias. The CLI, the
server's admin endpoints, the demo and the cycle's register stage all call these functions.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

from ctloop.errors import RegistryError
from ctloop.fileio import utc_now
from ctloop.registry.client import CHALLENGER, CHAMPION, Registry
from ctloop.registry.publishing import Publisher

HISTORY_PREFIX = "ctloop.champion_event"
LEGACY_HISTORY_TAG = "ctloop.champion_history"  # ctloop 0.1.0 kept the history as one JSON list
APPROVAL_TAG = "ctloop.approval"
PROMOTE, HOLD, REJECT = "PROMOTE", "HOLD", "REJECT"  # the shadow comparison's decisions (serving/compare.py)

# (champion, challenger) -> (decision, reasons): the shadow comparison, supplied by the caller.
ShadowCheck = Callable[[int, int], tuple[str, str]]


class VersionState(StrEnum):
    """Where a registered version stands (only versions that passed the gate are registered)."""

    REGISTERED = "registered"  # passed; not offered yet, or a newer challenger took its place
    PENDING_APPROVAL = "pending approval"  # gate.require_approval: waits for `ctloop approve`
    CHALLENGER = "challenger"  # shadowed next to the champion, awaiting evidence and promotion
    CHAMPION = "champion"  # serves production
    RETIRED = "retired"  # was champion; a later champion replaced it
    ROLLED_BACK = "rolled back"  # was champion; the champion moved back past it


# The moves promote, rollback, approve and offer_as_challenger make (a retired or rolled-back
# version may be promoted again by hand).
ALLOWED: dict[VersionState, frozenset[VersionState]] = {
    VersionState.PENDING_APPROVAL: frozenset({VersionState.CHALLENGER, VersionState.CHAMPION}),
    VersionState.REGISTERED: frozenset({VersionState.CHALLENGER, VersionState.CHAMPION}),
    VersionState.CHALLENGER: frozenset({VersionState.CHAMPION, VersionState.REGISTERED}),
    VersionState.CHAMPION: frozenset({VersionState.RETIRED, VersionState.ROLLED_BACK}),
    VersionState.RETIRED: frozenset({VersionState.CHAMPION}),
    VersionState.ROLLED_BACK: frozenset({VersionState.CHAMPION}),
}


def version_state(
    registry: Registry,
    version: int,
    tags: dict[str, str] | None = None,
    aliases: dict[str, int | None] | None = None,
    history: list[int] | None = None,
) -> VersionState:
    """The state of `version`; pass what the caller already read (its tags, the two aliases, the
    champion history) to spare the registry calls."""
    aliases = (
        aliases if aliases is not None else {CHAMPION: registry.alias(CHAMPION), CHALLENGER: registry.alias(CHALLENGER)}
    )
    if aliases.get(CHAMPION) == version:
        return VersionState.CHAMPION
    if aliases.get(CHALLENGER) == version:
        return VersionState.CHALLENGER
    tags = tags if tags is not None else registry.version(version).tags
    if tags.get(APPROVAL_TAG) == "pending":
        return VersionState.PENDING_APPROVAL
    history = history if history is not None else champion_history(registry)
    if version in history:  # below the champion in the history: replaced by a later champion
        return VersionState.RETIRED
    if "ctloop.rolled_back" in tags or "ctloop.promoted" in tags:  # was champion; a rollback took it out
        return VersionState.ROLLED_BACK
    return VersionState.REGISTERED


def registration_tags(require_approval: bool) -> dict[str, str]:
    """The tags a passing version is registered with: pending approval when the gate requires it."""
    return {APPROVAL_TAG: "pending"} if require_approval else {}


def register_passed(
    registry: Registry, version: int, promote_first: bool, publisher: Publisher | None = None
) -> VersionState:
    """After the register stage registered a passing version: it waits for approval when it was
    registered pending one, else it is offered as challenger (or champion, see
    `offer_as_challenger`). Returns the version's state."""
    if awaiting_approval(registry, version):
        return VersionState.PENDING_APPROVAL
    offer_as_challenger(registry, version, promote_first, publisher)
    return version_state(registry, version)


@dataclass(frozen=True)
class ChampionChange:
    """What a promotion or rollback did."""

    before: int | None
    after: int
    changed: bool

    def summary(self) -> str:
        if not self.changed:
            return f"version {self.after} is already the champion; nothing changed"
        return f"champion: v{self.before if self.before is not None else '-'} -> v{self.after}"


def champion_history(registry: Registry) -> list[int]:
    """The champions in order, oldest first, as the event log says; rolled-back entries are gone.
    A registry written by ctloop 0.1.0 starts from its history tag."""
    stack: list[int] = [int(v) for v in json.loads(registry.model_tag(LEGACY_HISTORY_TAG) or "[]")]
    for event in registry.model_events(HISTORY_PREFIX):
        if event["action"] == "promote" and (not stack or stack[-1] != event["version"]):
            stack.append(event["version"])
        elif event["action"] == "rollback" and len(stack) >= 2 and stack[-1] == event["from"]:
            stack.pop()
    return stack


def previous_champion(history: list[int], champion: int | None) -> int | None:
    """The champion before the current one, the version a rollback returns to: the history's
    second-to-last entry when the history ends at the champion. With a champion the history does
    not end at (an alias set outside ctloop), the last entry that is not it, which the servers keep
    loaded for an instant switch back."""
    if history and history[-1] == champion:
        return history[-2] if len(history) >= 2 else None
    return next((v for v in reversed(history) if v != champion), None)


def awaiting_approval(registry: Registry, version: int) -> bool:
    return registry.version(version).tags.get(APPROVAL_TAG) == "pending"


def offer_as_challenger(
    registry: Registry, version: int, promote_first: bool, publisher: Publisher | None = None
) -> None:
    """A version that passed the gate (and, where required, was approved) becomes `challenger`;
    with no champion yet and `promote_first`, it becomes `champion` at once. A version that is or
    was champion is never offered again (a retried register stage, a late approval)."""
    if registry.alias(CHAMPION) == version or version in champion_history(registry):
        return
    if registry.alias(CHAMPION) is None and promote_first:
        promote(registry, version, by="ctloop", note="first version to pass the gate", publisher=publisher)
        return
    _publish(publisher, version, "challenger")  # shadow traffic needs it served too
    registry.set_alias(CHALLENGER, version)


def promote(
    registry: Registry,
    version: int | None = None,
    *,
    by: str,
    note: str,
    shadow_check: ShadowCheck | None = None,
    publisher: Publisher | None = None,
) -> ChampionChange:
    """Move `champion` to `version` (default: the challenger). With `shadow_check`, refuse unless
    the shadow comparison of the champion and that version decides PROMOTE."""
    target = version if version is not None else registry.alias(CHALLENGER)
    if target is None:
        raise RegistryError("there is no challenger to promote; pass a version (see `ctloop status`)")
    before = registry.alias(CHAMPION)
    if before == target:
        return ChampionChange(before, target, changed=False)
    if awaiting_approval(registry, target):  # also fails clearly when the version does not exist
        raise RegistryError(
            f"version {target} awaits approval (gate.require_approval); "
            f"run `ctloop approve {target} --by NAME --note TEXT` first"
        )
    if shadow_check is not None:
        if before is None:
            raise RegistryError("there is no champion to compare with in shadow; promote without requiring shadow")
        decision, reasons = shadow_check(before, target)
        if decision != PROMOTE:
            raise RegistryError(
                f"the shadow decision for v{target} is {decision}, not {PROMOTE} ({reasons}); "
                f"serve more traffic, or promote without requiring shadow"
            )
    _publish(publisher, target, "champion")  # servable everywhere before traffic can switch to it
    registry.add_model_event(
        HISTORY_PREFIX, {"action": "promote", "version": target, "by": by, "note": note, "at": utc_now()}
    )
    _took_effect(registry, target, f"promoting v{target}")
    registry.set_version_tags(target, {"ctloop.promoted": f"{utc_now()} by {by}: {note}"})
    if registry.alias(CHALLENGER) == target:  # read just before: a new challenger may have just arrived
        registry.delete_alias(CHALLENGER)
    _retire(publisher, registry, {target, before})
    return ChampionChange(before, target, changed=True)


def rollback(registry: Registry, by: str, publisher: Publisher | None = None) -> ChampionChange:
    """Move `champion` back to the version before it."""
    history = champion_history(registry)
    current = registry.alias(CHAMPION)
    target = previous_champion(history, current)
    if current is None or target is None or history[-1] != current:
        raise RegistryError("there is no previous champion to roll back to; `ctloop status` shows the champion history")
    _publish(publisher, target, "champion")
    registry.add_model_event(HISTORY_PREFIX, {"action": "rollback", "from": current, "by": by, "at": utc_now()})
    _took_effect(registry, target, f"rolling back from v{current}")
    registry.set_version_tags(current, {"ctloop.rolled_back": f"{utc_now()} by {by}: champion moved back to v{target}"})
    _retire(publisher, registry, {target, current})
    return ChampionChange(current, target, changed=True)


def approve(
    registry: Registry, version: int, by: str, note: str, promote_first: bool, publisher: Publisher | None = None
) -> None:
    """Record a human approval (who, when, why) of a version that passed the gate; it then
    becomes the challenger (or the champion, when there is none and `promote_first`)."""
    info = registry.version(version)
    if info.tags.get("ctloop.gate") != "PASS":
        raise RegistryError(
            f"version {version} did not pass the gate ({info.tags.get('ctloop.gate', 'no gate')}); "
            f"only passing versions can be approved"
        )
    registry.set_version_tags(
        version,
        {
            APPROVAL_TAG: "approved",
            "ctloop.approved_by": by,
            "ctloop.approved_at": utc_now(),
            "ctloop.approval_note": note,
        },
    )
    offer_as_challenger(registry, version, promote_first, publisher)


def _align_champion_alias(registry: Registry) -> int:
    """Point `champion` at the top of the history, re-reading until the two agree (a concurrent
    writer may have appended an event between our read and our alias write)."""
    for _ in range(5):
        top = champion_history(registry)[-1]
        registry.set_alias(CHAMPION, top)
        if champion_history(registry)[-1] == top:
            return top
    return top


def _took_effect(registry: Registry, expected: int, what: str) -> None:
    """Align the alias with the history; when a concurrent change landed after ours, say so."""
    winner = _align_champion_alias(registry)
    if winner != expected:
        raise RegistryError(
            f"{what} was overtaken by a concurrent change: the champion is now v{winner}; "
            f"`ctloop status` shows the history"
        )


def _publish(publisher: Publisher | None, version: int, role: str) -> None:
    """Publish before an alias moves; when too few replicas load it, stop with nothing changed."""
    if publisher is None or not publisher.active:
        return
    result = publisher.publish(version)
    if not result.enough(publisher.config.require):
        raise RegistryError(
            f"v{version} cannot become {role}: publish.require={publisher.config.require} not met "
            f"({result.failures()}); no alias moved. Fix those targets, then `ctloop publish {version}` "
            f"and promote again (or lower publish.require)"
        )


def _retire(publisher: Publisher | None, registry: Registry, keep: set[int | None]) -> None:
    """Unload what no role needs, read after the alias moved: champion, the one before it (answers in
    flight, an instant rollback), the challenger, and anything newer than the champion (a
    challenger being published at this moment)."""
    if publisher is None or not publisher.active:
        return
    history = champion_history(registry)
    needed = set(keep) | set(history[-2:]) | {registry.alias(CHAMPION), registry.alias(CHALLENGER)}
    newest = max((v for v in needed if v is not None), default=0)
    publisher.retire({v for v in needed if v is not None}, keep_newer_than=newest)
