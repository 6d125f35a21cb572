"""Every HTML report opened in headless Chromium (#29 item 3): its charts drawn (matplotlib SVG, none
empty), nothing wider than the window, and a screenshot that is not blank. The pages come from
scripts/report_examples.py (made-up, seeded inputs); the docs' screenshots are made the same way."""

from __future__ import annotations

import os
import sys

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / "scripts"))
import report_examples  # noqa: E402


@pytest.fixture(scope="module")
def pages(tmp_path_factory):
    if report_examples.chromium() is None:
        if os.environ.get("CTLOOP_REQUIRE_CHROMIUM") == "1":
            pytest.fail("CTLOOP_REQUIRE_CHROMIUM=1 but there is no chromium on PATH (apt-get install chromium)")
        pytest.skip("no chromium on PATH: apt-get install chromium (.ci/run installs it)")
    return report_examples.write_examples(tmp_path_factory.mktemp("reports"))


@pytest.mark.parametrize("name", ["shadow", "cycle", "rollout"])
def test_a_report_renders_its_charts_within_the_window(pages, name, tmp_path):
    from PIL import Image

    screenshot = tmp_path / f"{name}.png"
    measured = report_examples.render(pages[name], screenshot)
    assert measured["figures"] >= 1 and measured["empty"] == 0, measured
    assert measured["overflowing"] == 0 and measured["scroll"] <= measured["width"], measured
    colors = Image.open(screenshot).convert("RGB").getcolors(maxcolors=1 << 20)
    assert colors is not None and len(colors) > 50  # text, axes and data in more than a few colours: not blank


def test_the_reports_say_their_decision_in_words_first(pages):
    shadow = pages["shadow"].read_text()
    assert shadow.index("can replace the champion") < shadow.index("<svg")
    assert "largest disagreements" in shadow and "random sample" in shadow and "<details>" in shadow
    cycle = pages["cycle"].read_text()
    assert cycle.index("so it was registered") < cycle.index("<svg")
    assert "the candidate&#39;s worst-scored examples" in cycle and "reference" in cycle
