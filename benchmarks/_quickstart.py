"""The quickstart's data and tiny base model, as the benchmarks that train use them."""

from __future__ import annotations

import json
from pathlib import Path

from ctloop.data.records import Record, record_from_fields

QUICKSTART = Path(__file__).resolve().parents[1] / "src" / "ctloop" / "quickstart"


def records(name: str) -> list[Record]:
    """The valid rows of a quickstart file (the shipped new-domain file holds a few deliberately broken ones)."""
    out = []
    for line in (QUICKSTART / name).read_bytes().splitlines():
        try:
            out.append(record_from_fields(json.loads(line)))
        except Exception:
            continue
    return out


def tiny_base(work: Path) -> Path:
    """The quickstart's tiny base model, pre-trained on its pretrain file (built once under `work`)."""
    from ctloop.training.tinymodel import TinyModelSpec, build_tiny_model

    texts = [
        json.loads(line)["prompt"] + json.loads(line)["completion"]
        for line in (QUICKSTART / "pretrain.jsonl").read_text().splitlines()
    ]
    return build_tiny_model(texts, work / "base", TinyModelSpec(pretrain_steps=300))
