"""The exceptions ctloop raises on purpose. Each message names the problem and the fix."""

from __future__ import annotations


class CtloopError(Exception):
    """Base class: anything ctloop raises deliberately, shown to users without a traceback."""


class ConfigError(CtloopError):
    """The config file is missing, unreadable, or breaks one or more rules (all listed at once)."""

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = problems
        count = f"{len(problems)} problem{'s' if len(problems) != 1 else ''}"
        super().__init__(f"{count} in {source}:\n" + "\n".join(f"  - {p}" for p in problems))


class DataError(CtloopError):
    """Input data cannot be read, or too much of it is bad to go on."""


class RegistryError(CtloopError):
    """The model registry is unreachable or does not hold what a command needs."""


class RegistryUnavailable(RegistryError):
    """The registry did not answer (transport, server or database error), after retries where the
    call is idempotent. Never to be read as "nothing registered"."""


class WorkspaceError(CtloopError):
    """The workspace folder is missing, locked, or not a ctloop workspace."""


class ModelError(CtloopError):
    """The base model or an adapter cannot be loaded."""
