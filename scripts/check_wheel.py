"""Run by `make wheel-check` with the installed wheel's Python: the files that are not Python
modules (the quickstart's data and config, the migrations' template) and the migrations made it
into the wheel, and the package imports from site-packages, not from the checkout."""

from __future__ import annotations

from pathlib import Path

import ctloop
from ctloop.logstore.database import MIGRATIONS

root = Path(ctloop.__file__).parent
assert "site-packages" in str(root), f"ctloop imported from {root}, not from the installed wheel"
for relative in ("quickstart/quickstart.yaml", "quickstart/new_domain.jsonl", "quickstart/pretrain.jsonl"):
    assert (root / relative).is_file(), f"{relative} is missing from the wheel"
for name in ("env.py", "script.py.mako", "versions/0001_log_store.py"):
    assert (MIGRATIONS / name).is_file(), f"logstore/migrations/{name} is missing from the wheel"
print(f"ctloop {ctloop.__version__}: the wheel installs and has its data files")
