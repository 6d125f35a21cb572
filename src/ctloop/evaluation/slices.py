"""Evaluation per slice: the examples of each value of `source` or `metadata.<key>`."""

from __future__ import annotations

from ctloop.data.records import Record


def slice_indices(sets: dict[str, list[Record]], slice_by: str | None) -> dict[str, dict[str, list[int]]]:
    """Example indices per value of `source` or `metadata.<key>`, per evaluation set."""
    if not slice_by:
        return {}
    key = slice_by.removeprefix("metadata.")
    out: dict[str, dict[str, list[int]]] = {}
    for name, records in sets.items():
        for index, record in enumerate(records):
            value = record.source if slice_by == "source" else record.metadata.get(key, "")
            out.setdefault(name, {}).setdefault(str(value) or "(none)", []).append(index)
    return out


def slice_means(
    losses: dict[str, dict[str, list[float]]], slices: dict[str, dict[str, list[int]]]
) -> dict[str, dict[str, dict[str, float]]]:
    """Mean loss per model in each slice of each set, with the slice's size as `n`."""
    return {
        name: {
            value: {
                model: sum(per_example[i] for i in rows) / len(rows)
                for model, per_example in losses.get(name, {}).items()
            }
            | {"n": len(rows)}
            for value, rows in by_value.items()
        }
        for name, by_value in slices.items()
        if name in losses
    }


def cluster_labels(sets: dict[str, list[Record]], cluster_by: str | None) -> dict[str, list[str]]:
    """Per evaluation set, each row's group (`metadata.<key>`; a row without it is a group of its own)."""
    if not cluster_by:
        return {}
    key = cluster_by.removeprefix("metadata.")
    return {
        name: [str(r.metadata[key]) if r.metadata.get(key) not in (None, "") else f"row:{r.id}" for r in records]
        for name, records in sets.items()
    }
