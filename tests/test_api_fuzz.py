"""Property-based fuzzing of the HTTP API (#17): random JSON bodies, right and wrong types, odd
Unicode, on every POST endpoint of a real server. Never a 5xx, and every error in the OpenAI shape.
Bounded: a fixed number of examples per endpoint, derandomized so CI runs the same cases."""

from __future__ import annotations

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ctloop.serving.server import create_app, serve_in_background
from ctloop.training.tinymodel import random_adapter
from ctloop.workspace import Workspace
from shadow_helpers import register_versions, serving_config

pytestmark = pytest.mark.slow
TOKEN = "fuzz-token"

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=40),
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=8,
)
FIELDS = [
    "model",
    "prompt",
    "messages",
    "max_tokens",
    "temperature",
    "top_p",
    "stop",
    "seed",
    "n",
    "stream",
    "user",
    "metadata",
    "request_id",
    "rating",
    "correction",
    "comment",
    "lora_name",
    "lora_path",
    "version",
    "by",
]
bodies = st.dictionaries(st.sampled_from(FIELDS), values, max_size=6)


@pytest.fixture(scope="module")
def url(tiny_base, tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    config = serving_config(tiny_base, root / "ws", serve={"max_tokens": 8, "default_max_tokens": 4})
    register_versions(config, [random_adapter(tiny_base, root / "a1", 1)])
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CTLOOP_FEEDBACK_TOKEN", TOKEN)
        patch.setenv("CTLOOP_ADMIN_TOKEN", TOKEN)
        with serve_in_background(create_app(config, Workspace(config.workspace))) as base:
            yield base


@pytest.mark.parametrize(
    "path",
    ["/v1/completions", "/v1/chat/completions", "/v1/feedback", "/v1/load_lora_adapter", "/admin/promote"],
)
def test_no_body_makes_the_server_fail(url, path):
    @settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
    @given(body=bodies)
    def check(body):
        response = httpx.post(f"{url}{path}", json=body, headers={"authorization": f"Bearer {TOKEN}"}, timeout=60)
        assert response.status_code < 500, (body, response.text)
        if response.status_code >= 400:
            error = response.json()["error"]
            assert set(error) == {"message", "type", "param", "code"} and error["code"] == response.status_code

    check()
