"""User code named in the config as 'module:function' (custom metrics, the shadow judge)."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from ctloop.errors import ConfigError


def import_callable(target: str, key: str) -> Callable[..., Any]:
    """Import 'module:function'; a ConfigError names the config `key` and the fix."""
    module, _, attribute = target.partition(":")
    try:
        found = getattr(importlib.import_module(module), attribute)
    except (ImportError, AttributeError, ValueError) as exc:
        raise ConfigError(
            "config", [f"{key}: cannot load {target!r} ({exc}); give 'module:function' importable where ctloop runs"]
        ) from None
    if not callable(found):
        raise ConfigError("config", [f"{key}: {target!r} is not callable"])
    return found
