"""Production sources: where the drift watch and the harvest read live traffic and its feedback.

`production.source` picks one (see `ProductionConfig`):

- `ctloop`: the request log `ctloop serve` writes (`LogStoreSource`, over the store's indexes);
- `jsonl`: files of one exchange per line, as gateways and batch jobs write them (`JsonlSource`);
- `mlflow`: traces in an MLflow experiment with their feedback assessments
  (`ctloop.registry.traces.MlflowTraceSource`, in the registry: the only package that imports mlflow);
- `phoenix`: OpenInference LLM spans in an Arize Phoenix project, with HUMAN span annotations as
  feedback (`PhoenixSource`, over Phoenix's REST API: no Phoenix package needed).

Every source gives the same rows (request_id, prompt, answer, created_at, model_version, messages,
and the latest feedback as {feedback_id, score, correction}), reads its window in pages, never
whole, and counts the rows it cannot use by reason (`problems`) instead of stopping on them.
"""

from __future__ import annotations

import datetime
import glob
import hashlib
import json
import random
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

from ctloop.config import CtloopConfig
from ctloop.data.records import chat_prompt
from ctloop.errors import DataError
from ctloop.workspace import Workspace

PAGE = 1000


class ProductionSource(Protocol):
    name: str
    problems: Counter[str]  # rows of the last pass that could not be used, by reason

    def count(self, since: float, until: float) -> int: ...

    def rated(self, since: float, until: float) -> Iterator[list[dict[str, Any]]]: ...

    def unrated(self, since: float, until: float) -> Iterator[list[dict[str, Any]]]: ...

    def sample(self, since: float, until: float, n: int, seed: int) -> tuple[list[dict[str, Any]], int]: ...

    def close(self) -> None: ...


class BadExchange(ValueError):
    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def exchange_row(
    exchange_id: str, created_at: float, request: Any, response: Any, feedback: dict[str, Any] | None
) -> dict[str, Any]:
    """One exchange (an OpenAI completions or chat request body and its response body) as a source
    row; BadExchange names what is missing."""
    if not isinstance(request, dict):
        raise BadExchange("request_not_an_object")
    if not isinstance(response, dict):
        raise BadExchange("no_response")
    messages = request.get("messages")
    choices = response.get("choices") or []
    first = choices[0] if choices and isinstance(choices[0], dict) else {}
    prompt: Any
    answer: Any
    if messages is not None:
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            raise BadExchange("messages_not_a_list")
        turns = [{"role": str(m.get("role", "")), "content": _text(m.get("content"))} for m in messages]
        prompt, answer = chat_prompt(turns), _text((first.get("message") or {}).get("content"))
    else:
        prompt, answer = request.get("prompt"), first.get("text")
        prompt = prompt[0] if isinstance(prompt, list) and len(prompt) == 1 else prompt
    if not isinstance(prompt, str) or not prompt.strip():
        raise BadExchange("no_prompt")
    if not isinstance(answer, str):
        raise BadExchange("no_answer")
    return {
        "request_id": exchange_id,
        "prompt": prompt,
        "answer": answer,
        "created_at": created_at,
        "model_version": str(request.get("model", "")),
        "messages": messages,
        "request_metadata": {},
        "feedback": feedback,
    }


def feedback_of(exchange_id: str, rating: Any, correction: Any) -> dict[str, Any] | None:
    """A rating (a boolean is a thumb; +1/-1 thumbs; a number in [0, 1] a score) and/or a correction,
    in the shape the harvest reads; None when there is neither. BadExchange for a rating of another kind."""
    score = None
    if isinstance(rating, bool):
        score = 1.0 if rating else 0.0
    elif isinstance(rating, int | float):
        if rating in (1, -1):
            score = 1.0 if rating == 1 else 0.0
        elif 0 <= rating <= 1:
            score = float(rating)
        else:
            raise BadExchange("rating_out_of_range")
    elif rating is not None:
        raise BadExchange("rating_not_a_number")
    correction = correction if isinstance(correction, str) and correction.strip() else None
    if score is None and correction is None:
        return None
    return {"feedback_id": f"{exchange_id}:feedback", "score": score, "correction": correction}


def _text(content: Any) -> str:
    if isinstance(content, list):
        return "".join(str(p.get("text", "")) for p in content if isinstance(p, dict) and p.get("type") == "text")
    return content if isinstance(content, str) else ""


def _timestamp(value: Any) -> float:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        try:
            parsed = datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            raise BadExchange("bad_created_at") from None
        return (parsed if parsed.tzinfo else parsed.replace(tzinfo=datetime.UTC)).timestamp()
    raise BadExchange("no_created_at")


def reservoir(rows: Iterator[dict[str, Any]], n: int, seed: int) -> tuple[list[dict[str, Any]], int]:
    """A seeded uniform sample of at most `n` rows of a stream (Algorithm R), and the stream's size."""
    rng = random.Random(seed)
    kept: list[dict[str, Any]] = []
    total = 0
    for row in rows:
        total += 1
        if len(kept) < n:
            kept.append(row)
        else:
            slot = rng.randrange(total)
            if slot < n:
                kept[slot] = row
    return kept, total


def paged(rows: Iterator[dict[str, Any]], page: int = PAGE) -> Iterator[list[dict[str, Any]]]:
    batch: list[dict[str, Any]] = []
    for row in rows:
        batch.append(row)
        if len(batch) == page:
            yield batch
            batch = []
    if batch:
        yield batch


class StreamedSource:
    """A source read as one stream of rows per pass (`_rows`, which also refills `problems`):
    counting, the rated and unrated pages and the sample are each one pass, never the whole window
    in memory."""

    problems: Counter[str]

    def _rows(self, since: float, until: float) -> Iterator[dict[str, Any]]:
        raise NotImplementedError

    def count(self, since: float, until: float) -> int:
        return sum(1 for _ in self._rows(since, until))

    def rated(self, since: float, until: float) -> Iterator[list[dict[str, Any]]]:
        return paged(row for row in self._rows(since, until) if row["feedback"] is not None)

    def unrated(self, since: float, until: float) -> Iterator[list[dict[str, Any]]]:
        return paged(row for row in self._rows(since, until) if row["feedback"] is None)

    def sample(self, since: float, until: float, n: int, seed: int) -> tuple[list[dict[str, Any]], int]:
        return reservoir(self._rows(since, until), n, seed)

    def close(self) -> None:
        pass


class JsonlSource(StreamedSource):
    """Exchanges in files (`production.path`, a file or a glob): {"id", "created_at" (unix seconds or
    ISO 8601), "request", "response", "feedback": {"rating", "correction"}} per line; read line by
    line, never whole."""

    name = "jsonl"

    def __init__(self, pattern: str):
        self.pattern = pattern
        self.files = sorted(Path(p) for p in glob.glob(pattern)) or ([Path(pattern)] if Path(pattern).is_file() else [])
        if not self.files:
            raise DataError(
                f"production.path {pattern!r} matches no file; point it at the exchanges (a file or a glob)"
            )
        self.problems: Counter[str] = Counter()

    def _rows(self, since: float, until: float) -> Iterator[dict[str, Any]]:
        self.problems = Counter()
        for path in self.files:
            with path.open("rb") as handle:
                for number, raw in enumerate(handle, start=1):
                    if not raw.strip():
                        continue
                    try:
                        line = json.loads(raw.decode("utf-8"))
                        if not isinstance(line, dict):
                            raise BadExchange("not_an_object")
                        created = _timestamp(line.get("created_at"))
                        if not since <= created < until:
                            continue
                        # no id: a hash of the line (a position would repeat across rotated files)
                        exchange_id = str(line.get("id") or "jsonl-" + hashlib.sha256(raw).hexdigest()[:24])
                        given = line.get("feedback") or {}
                        if not isinstance(given, dict):
                            raise BadExchange("feedback_not_an_object")
                        feedback = feedback_of(exchange_id, given.get("rating"), given.get("correction"))
                        yield exchange_row(exchange_id, created, line.get("request"), line.get("response"), feedback)
                    except BadExchange as bad:
                        self.problems[bad.reason] += 1
                    except (UnicodeDecodeError, json.JSONDecodeError):
                        self.problems["invalid_json"] += 1


class LogStoreSource:
    """The request log of `ctloop serve`, read through the store's indexes (`LogReader`)."""

    name = "ctloop"

    def __init__(self, reader: Any):
        self.reader = reader
        self.problems: Counter[str] = Counter()

    def count(self, since: float, until: float) -> int:
        return self.reader.count_requests(since, until)

    def rated(self, since: float, until: float) -> Iterator[list[dict[str, Any]]]:
        return self.reader.rated_requests(since, until)

    def unrated(self, since: float, until: float) -> Iterator[list[dict[str, Any]]]:
        return self.reader.unrated_requests(since, until)

    def sample(self, since: float, until: float, n: int, seed: int) -> tuple[list[dict[str, Any]], int]:
        return self.reader.sample_requests(since, until, n, seed)

    def close(self) -> None:
        self.reader.close()


THUMBS = {"thumbs_up": True, "up": True, "positive": True, "good": True, "correct": True, "thumbs_down": False}
THUMBS |= {"down": False, "negative": False, "bad": False, "incorrect": False}


class PhoenixSource(StreamedSource):
    """OpenInference LLM spans of a Phoenix project, read page by page through Phoenix's REST API
    (`GET /v1/projects/{project}/spans`, then their annotations). A span's `input.value` and
    `output.value` hold the OpenAI request and response bodies. Of its HUMAN annotations, the latest
    named in `rating_names` (every name but `correction_name` when empty) is the rating: its score
    (+1/-1, or in [0, 1]), else its label (thumbs_up / thumbs_down, up / down, ...); the latest named
    `correction_name` holds a correction in its explanation."""

    name = "phoenix"

    def __init__(self, url: str, project: str, rating_names: list[str], correction_name: str, api_key: str | None):
        import httpx

        self.url = url.rstrip("/")
        self.project = project
        self.rating_names = set(rating_names)
        self.correction_name = correction_name
        headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.Client(base_url=self.url, headers=headers, timeout=60)
        self.problems: Counter[str] = Counter()

    def _get(self, path: str, params: Any) -> dict[str, Any]:
        import httpx

        try:
            response = self.client.get(path, params=params)
        except httpx.HTTPError as exc:
            raise DataError(
                f"production.phoenix_url={self.url!r}: {exc.__class__.__name__} ({exc}); check that Phoenix is up"
            ) from exc
        if response.status_code == 404 and "/spans" in path:
            raise DataError(f"Phoenix has no project {self.project!r}; set production.project to one it lists")
        if response.status_code >= 400:
            raise DataError(f"Phoenix answered {response.status_code} for {path}: {response.text[:300]}")
        return response.json()

    def _rows(self, since: float, until: float) -> Iterator[dict[str, Any]]:
        self.problems = Counter()
        window = {
            "start_time": datetime.datetime.fromtimestamp(since, datetime.UTC).isoformat(),
            "end_time": datetime.datetime.fromtimestamp(until, datetime.UTC).isoformat(),
            "span_kind": "LLM",
            "limit": PAGE,
        }
        cursor = None
        path = f"/v1/projects/{self.project}/spans"
        while True:
            page = self._get(path, window | ({"cursor": cursor} if cursor else {}))
            spans = [s for s in page.get("data") or [] if s.get("span_kind") == "LLM"]
            annotations = self._annotations([s["context"]["span_id"] for s in spans])
            for span in spans:
                try:
                    yield self._row(span, annotations.get(span["context"]["span_id"], []))
                except BadExchange as bad:
                    self.problems[bad.reason] += 1
            cursor = page.get("next_cursor")
            if not cursor:
                return

    def _annotations(self, span_ids: list[str]) -> dict[str, list[dict[str, Any]]]:
        found: dict[str, list[dict[str, Any]]] = {}
        path = f"/v1/projects/{self.project}/span_annotations"
        for start in range(0, len(span_ids), 100):
            cursor = None
            while True:
                params: dict[str, Any] = {"span_ids": span_ids[start : start + 100], "limit": PAGE}
                page = self._get(path, params | ({"cursor": cursor} if cursor else {}))
                for annotation in page.get("data") or []:
                    found.setdefault(annotation["span_id"], []).append(annotation)
                cursor = page.get("next_cursor")
                if not cursor:
                    break
        return found

    def _row(self, span: dict[str, Any], annotations: list[dict[str, Any]]) -> dict[str, Any]:
        attributes = span.get("attributes") or {}
        try:
            request = json.loads(attributes["input.value"])
            response = json.loads(attributes["output.value"])
        except KeyError:
            raise BadExchange("span_without_input_or_output") from None
        except (TypeError, ValueError):
            raise BadExchange("span_not_json") from None
        rating = correction = None
        for annotation in sorted(annotations, key=lambda a: str(a.get("updated_at") or a.get("created_at") or "")):
            if str(annotation.get("annotator_kind", "")).upper() != "HUMAN":
                continue
            result = annotation.get("result") or {}
            name = annotation.get("name")
            if name == self.correction_name:
                correction = result.get("explanation")
            elif not self.rating_names or name in self.rating_names:
                score, label = result.get("score"), str(result.get("label") or "").lower()
                given = score if score is not None else THUMBS.get(label)
                rating = rating if given is None else given  # an unknown label ("neutral") erases nothing
        span_id = span["context"]["span_id"]
        created = _timestamp(span.get("start_time"))
        return exchange_row(span_id, created, request, response, feedback_of(span_id, rating, correction))

    def close(self) -> None:
        self.client.close()


def open_source(config: CtloopConfig, workspace: Workspace) -> ProductionSource:
    """The source `production.source` names."""
    import os

    settings = config.production
    if settings.source == "jsonl":
        return JsonlSource(str(settings.path))
    if settings.source == "phoenix":
        key = os.environ.get(settings.phoenix_api_key_env) or None
        return PhoenixSource(
            settings.phoenix_url, settings.project, settings.rating_names, settings.correction_name, key
        )
    if settings.source == "mlflow":
        from ctloop.registry.traces import MlflowTraceSource

        uri = settings.tracking_uri or workspace.tracking_uri(config.registry.tracking_uri)
        return MlflowTraceSource(uri, str(settings.experiment), settings.rating_names, settings.correction_name)
    from ctloop.logstore.requests import LogReader

    return LogStoreSource(
        LogReader(workspace.shadow_store_url(config.shadow.store_url), redact_pii=config.serve.redact)
    )
