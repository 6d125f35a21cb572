"""Build the sample data in examples/ from a list of Debian package descriptions.

The quickstart and the tests read only examples/, never that list, so this script is
run by a maintainer when the samples change, not by users or CI:

    python scripts/make_examples.py PATH/TO/debian_packages.jsonl

Three disjoint sets, seeded, written to src/ctloop/quickstart/ (shipped in the package, read by
`ctloop demo`), plus examples/broken.jsonl:
- pretrain.jsonl      general text for the demo's tiny base model (sections outside both domains)
- old_domain.jsonl    cycle 1 of the demo: Python and Perl packages
- new_domain.jsonl    cycle 2 of the demo: games, sound and graphics packages, plus a few broken
                      rows, so the demo shows quarantine at work
- broken.jsonl        one row per kind of problem the validator must catch
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

OLD_SECTIONS = {"python", "perl"}
NEW_SECTIONS = {"games", "sound", "graphics"}
PRETRAIN_SECTIONS = {
    "utils",
    "net",
    "admin",
    "text",
    "misc",
    "x11",
    "devel",
    "web",
    "mail",
    "editors",
    "database",
    "science",
    "math",
    "doc",
    "video",
}
SIZES = {"pretrain": 6000, "old_domain": 1200, "new_domain": 1200}

BROKEN_LINES = [
    b'{"prompt": "Describe the Debian package tuxkart:", "completion": "3D kart racing"',  # bad JSON
    b'{"prompt": "Describe the Debian package frozen-bubble:"}',  # missing completion
    b'{"prompt": "Describe the Debian package xmoto:", "completion": 42}',  # wrong type
    b'{"prompt": "Describe the Debian package lmms:", "completion": ""}',  # empty completion
    b'{"prompt": "Describe the Debian package caf\xe9-game:", "completion": "bad \xff bytes"}',  # invalid UTF-8
]


def _record(row: dict, index: int, domain: str) -> dict:
    return {
        "id": f"{domain}-{index:05d}",
        "prompt": f"Describe the Debian package {row['package']}:",
        "completion": " " + row["description"].strip(),
        "source": row["section"],
    }


def main(source: Path, out_dir: Path, examples_dir: Path) -> None:
    rows = [json.loads(line) for line in source.read_text().splitlines()]
    rng = random.Random(20261126)
    rng.shuffle(rows)
    groups: dict[str, list[dict]] = {"pretrain": [], "old_domain": [], "new_domain": []}
    for row in rows:
        if not row["description"].strip():
            continue
        section = row["section"]
        name = (
            "old_domain"
            if section in OLD_SECTIONS
            else "new_domain"
            if section in NEW_SECTIONS
            else "pretrain"
            if section in PRETRAIN_SECTIONS
            else None
        )
        if name and len(groups[name]) < SIZES[name]:
            groups[name].append(row)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, picked in groups.items():
        lines = [json.dumps(_record(row, i, name)).encode() for i, row in enumerate(picked)]
        if name == "new_domain":
            lines[100:100] = BROKEN_LINES[:3]
            lines[700:700] = BROKEN_LINES[3:]
            lines.append(lines[5])  # an exact duplicate
        (out_dir / f"{name}.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    good = [json.dumps(_record(row, i, "broken")).encode() for i, row in enumerate(groups["old_domain"][:20])]
    (examples_dir / "broken.jsonl").write_bytes(b"\n".join(good + BROKEN_LINES + [good[0]]) + b"\n")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path("src/ctloop/quickstart"), Path("examples"))
