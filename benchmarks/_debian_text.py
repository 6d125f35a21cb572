"""Real text for the drift benchmarks: Debian package summaries by section, embedded once with
all-MiniLM-L6-v2 and cached (the embedding takes minutes on two cores; the trials take seconds).

The JSONL list (package, section, description) is named by CTLOOP_BENCH_DATA; `sections` returns
None when it is unset or missing, and each benchmark says so."""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import numpy as np

DATA = Path(os.environ.get("CTLOOP_BENCH_DATA", "/nonexistent"))
CACHE = Path(os.environ.get("CTLOOP_BENCH_CACHE", "/tmp/ctloop-bench-embeddings"))


def sections(groups: dict[str, tuple[str, ...]]) -> dict[str, np.ndarray] | None:
    """{group: unit-norm MiniLM embeddings of '<package>: <description>' for the group's sections}."""
    if not DATA.is_file():
        return None
    rows = [json.loads(line) for line in DATA.read_text().splitlines()]
    out = {}
    for group, names in groups.items():
        texts = [f"{r['package']}: {r['description']}" for r in rows if r["section"] in names]
        key = hashlib.sha256("\n".join(texts).encode()).hexdigest()[:16]
        cached = CACHE / f"minilm-{group}-{key}.npy"
        if cached.is_file():
            out[group] = np.load(cached)
            continue
        from ctloop.drift.embed import SentenceTransformerEmbedder

        started = time.perf_counter()
        embedded = SentenceTransformerEmbedder("minilm").embed(texts)
        print(f"embedded {len(texts)} {group} rows in {time.perf_counter() - started:.0f} s", flush=True)
        CACHE.mkdir(parents=True, exist_ok=True)
        np.save(cached, embedded)
        out[group] = embedded
    return out
