"""Production traffic as MLflow traces: the `mlflow` production source.

Each trace of `production.experiment` whose root span holds an OpenAI request and its response
(what `mlflow.openai.autolog()` records around the SDK's calls) is a request. Its feedback comes
from the trace's HUMAN assessments: the latest Feedback (of `production.rating_names`, or any name
when that is empty) is the rating (a boolean is a thumb, a number in [0, 1] a score), and the
latest Expectation named `production.correction_name` (`expected_response`, as MLflow's own
scorers name it) is the correction. Traces are read in pages of the window, never whole; the row
id is the trace id, so lineage names traces.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from typing import Any

from ctloop.data.sources import BadExchange, StreamedSource, exchange_row, feedback_of
from ctloop.registry.client import Registry

PAGE = 500


class MlflowTraceSource(StreamedSource):
    name = "mlflow"

    def __init__(self, tracking_uri: str, experiment: str, rating_names: list[str], correction_name: str):
        self.registry = Registry(tracking_uri, "unused", experiment, None)
        self.experiment = experiment
        self.rating_names = set(rating_names)
        self.correction_name = correction_name
        self.problems: Counter[str] = Counter()

    def _experiment_id(self) -> str | None:
        found = self.registry._call(
            "get_experiment_by_name", self.registry.client.get_experiment_by_name, self.experiment
        )
        return None if found is None else found.experiment_id

    def _rows(self, since: float, until: float) -> Iterator[dict[str, Any]]:
        self.problems = Counter()
        experiment_id = self._experiment_id()
        if experiment_id is None:
            return
        window = f"trace.timestamp_ms >= {int(since * 1000)} AND trace.timestamp_ms < {int(until * 1000)}"
        token = None
        while True:
            page = self.registry._call(
                "search_traces",
                self.registry.client.search_traces,
                locations=[experiment_id],
                filter_string=window,
                max_results=PAGE,
                order_by=["timestamp_ms ASC"],
                page_token=token,
            )
            for trace in page:
                try:
                    yield self._row(trace)
                except BadExchange as bad:
                    self.problems[bad.reason] += 1
            token = page.token
            if not token:
                return

    def _row(self, trace: Any) -> dict[str, Any]:
        info = trace.info
        try:
            request = json.loads(trace.data.request) if trace.data.request else None
            response = json.loads(trace.data.response) if trace.data.response else None
        except (TypeError, ValueError):
            raise BadExchange("span_not_json") from None
        if response is None:
            raise BadExchange("span_without_output")
        rating = correction = None
        for assessment in sorted(info.assessments or [], key=lambda a: a.create_time_ms or 0):
            # `valid` is None when the assessment came over HTTP (only the SQL store sets it): not invalid
            if assessment.valid is False or str(assessment.source.source_type) != "HUMAN":
                continue
            kind = type(assessment).__name__
            if kind == "Feedback" and (not self.rating_names or assessment.name in self.rating_names):
                rating = assessment.value
            elif kind == "Expectation" and assessment.name == self.correction_name:
                correction = assessment.value
        feedback = feedback_of(info.trace_id, rating, correction)
        return exchange_row(info.trace_id, info.request_time / 1000, request, response, feedback)
