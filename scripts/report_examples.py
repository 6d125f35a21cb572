"""Example HTML reports (shadow, cycle, rollout) from made-up but realistic inputs, for the docs'
screenshots (`scripts/build_docs.py --screenshots`) and the test that renders every report in
headless Chromium (`tests/test_report_pages.py`). Seeded: the same pages on every run."""

from __future__ import annotations

import html
import json
import random
import re
import shutil
import subprocess
from pathlib import Path

PROMPTS = [
    ("Describe the Debian package python3-requests:", " elegant and simple HTTP library for Python3"),
    ("Describe the Debian package libsdl2-mixer-2.0-0:", " mixer library for Simple DirectMedia Layer 2"),
    ("Describe the Debian package perl-tk:", " Perl module providing the Tk graphics library"),
    ("Describe the Debian package audacity:", " fast, cross-platform audio editor"),
    ("Describe the Debian package python3-numpy:", " fast array facility to the Python 3 language"),
    ("Describe the Debian package libgl1-mesa-dri:", " free implementation of the OpenGL API -- DRI modules"),
]


def _answer(reference: str, rng: random.Random, good: float) -> str:
    words = reference.split()
    kept = [w for w in words if rng.random() < good] or words[:1]
    return " " + " ".join(kept + (["library"] if rng.random() < 0.3 else []))


def shadow_example(folder: Path) -> Path:
    from ctloop.config import ShadowConfig
    from ctloop.reports.shadow import write_shadow_report
    from ctloop.serving.compare import compare

    rng = random.Random(0)
    rows = []
    for i in range(400):
        prompt, reference = PROMPTS[i % len(PROMPTS)]
        latency = rng.lognormvariate(3.3, 0.35)
        champion, challenger = _answer(reference, rng, 0.7), _answer(reference, rng, 0.85)
        if i == 7:  # an answer with a 300-character word (a URL, a hash): it must wrap, not widen the page
            challenger = " see https://example.org/" + "a1b2c3" * 50
        rows.append(
            {
                "request_id": f"req-{i:04d}",
                "prompt": prompt,
                "champion_output": champion,
                "challenger_output": challenger,
                "status": "completed",
                "champion_version": "3",
                "challenger_version": "4",
                "champion_latency_ms": latency,
                "challenger_latency_ms": latency * rng.uniform(0.85, 1.2),
                "champion_tokens": len(champion.split()),
                "challenger_tokens": len(challenger.split()),
                "created_at": 1_700_000_000 + i * 2.0,
            }
        )
    settings = ShadowConfig(min_pairs=100, embedding_similarity=False, error_block_s=0, min_duration_s=0)
    report = compare(rows, settings, "3", "4")
    return write_shadow_report(report, rows, folder / "shadow.html")


def cycle_example(folder: Path) -> Path:
    from ctloop.data.records import Record
    from ctloop.evaluation.evaluate import EvalReport
    from ctloop.reports.cycle import write_cycle_report
    from ctloop.training.trainer import TrainResult

    rng = random.Random(1)
    cycle = folder / "cycle"
    cycle.mkdir(parents=True, exist_ok=True)
    records = [Record(f"new-{i:03d}", *PROMPTS[i % len(PROMPTS)]) for i in range(60)]
    losses = {
        "champion": [rng.uniform(1.6, 2.6) for _ in records],
        "candidate": [rng.uniform(1.3, 2.4) for _ in records],
    }
    ids = [r.id for r in records]
    worst = sorted(range(len(records)), key=lambda i: -losses["candidate"][i])[:4]
    sample = sorted(rng.sample([i for i in range(len(records)) if i not in worst], 4))
    answers = {
        model: [_answer(records[i].completion, rng, good) for i in worst + sample]
        for model, good in (("champion", 0.6), ("candidate", 0.8))
    }
    evaluation = EvalReport(
        ids={"new_holdout": ids},
        losses={"new_holdout": losses},
        examples={"new_holdout": {"worst": worst, "sample": sample, "answers": answers}},
    )
    trained = TrainResult(
        adapter_dir=str(cycle / "adapter"),
        steps=60,
        examples=628,
        tokens=188_400,
        loss_tokens=61_000,
        seconds=41.7,
        losses=[(s, 2.4 * 0.985**s + rng.uniform(-0.03, 0.03)) for s in range(1, 61)],
        learning_rates=[],
        compute_dtype="bfloat16",
        attn_implementation="ctloop_cpu_eager",
    )
    gate = {
        "outcome": "PASS",
        "reference": "champion",
        "passed": True,
        "reasons": [
            "new data: loss 2.104 -> 1.856, improvement +11.8% (95% lower bound +9.1%, n=60) >= required +1.00%",
            "old data: loss 1.912 -> 1.931, regression +1.0% (95% upper bound +1.8%, n=200) <= allowed +2.00%",
        ],
        "rules": [
            {"name": "new data", "outcome": "PASS", "estimate": 0.118, "bound": 0.091, "n": 60, "limit": 0.01},
            {"name": "old data", "outcome": "PASS", "estimate": 0.010, "bound": 0.018, "n": 200, "limit": 0.02},
        ],
    }
    lineage = {"data": "new_domain.jsonl (628 good rows)", "replay": "25% of training tokens from cycles 1-3"}
    registered = {"version": 4, "state": "challenger", "at": "2026-12-02T09:41:07Z"}
    return write_cycle_report(
        cycle / "report.html",
        "4063818ba1859455",
        trained,
        evaluation,
        gate,
        lineage,
        validation={"total_rows": 640, "good_rows": 628, "bad_by_reason": {"duplicate": 9, "empty": 3}},
        slice_means={},
        holdout=records,
        registered=registered,
    )


def rollout_example(folder: Path) -> Path:
    from ctloop.reports.rollout import write_rollout_report

    rng = random.Random(2)
    looks = []
    start = 1_700_000_000.0
    for look in range(1, 13):
        step = min(2, (look - 1) // 4)
        gap = 0.012 / look**0.5
        looks.append(
            {
                "time": start + look * 600,
                "step": step,
                "share": (0.05, 0.25, 0.5)[step],
                "decision": "ADVANCE" if look in (4, 8, 12) else "HOLD",
                "reasons": ["error rate: within rollout.max_error_rate_increase=1.00%"],
                "requests": {"candidate": 400 * look, "champion": 7600 * look},
                "metrics": {
                    "errors": {
                        "label": "error rate",
                        "limit": 0.01,
                        "candidate": 0.004 + rng.uniform(-0.001, 0.001),
                        "champion": 0.005,
                        "worse_by": -gap - 0.004,
                        "at_most": gap,
                    }
                },
            }
        )
    state = {"candidate": 4, "champion": 3, "state": "completed", "history": ["v4 became champion after 3 steps"]}
    return write_rollout_report(folder / "rollout.html", state, looks)


def write_examples(folder: Path) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    return {"shadow": shadow_example(folder), "cycle": cycle_example(folder), "rollout": rollout_example(folder)}


MEASURE = """<script>
window.addEventListener("load", () => {
  const figures = [...document.querySelectorAll("figure svg")];
  const empty = figures.filter(svg => svg.getBoundingClientRect().width < 50
    || svg.querySelectorAll("path, use, rect").length < 3).length;
  const wide = [...document.querySelectorAll("body *")].filter(
    e => e.getBoundingClientRect().right > document.documentElement.clientWidth + 1).length;
  document.title = JSON.stringify({figures: figures.length, empty: empty, overflowing: wide,
    scroll: document.documentElement.scrollWidth, width: document.documentElement.clientWidth});
});
</script>"""


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def render(page: Path, screenshot: Path | None, width: int = 1100, height: int = 2400) -> dict:
    """Open `page` in headless Chromium: its figures, empty ones and elements wider than the
    window (measured in the page), and with `screenshot`, a PNG of its top."""
    browser = chromium()
    if browser is None:
        raise FileNotFoundError("no chromium on PATH (apt-get install chromium)")
    measured = page.with_name(page.stem + ".measured.html")
    measured.write_text(page.read_text(encoding="utf-8").replace("</body>", MEASURE + "</body>"), encoding="utf-8")
    flags = [
        browser,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",  # Docker's small /dev/shm crashes Chromium otherwise
        "--hide-scrollbars",
        f"--window-size={width},{height}",
    ]
    dom = subprocess.run(
        [*flags, "--virtual-time-budget=5000", "--dump-dom", measured.as_uri()],
        capture_output=True, text=True, timeout=120, check=True,
    ).stdout  # fmt: skip
    title = re.search(r"<title>(\{.*?\})</title>", dom, re.DOTALL)
    if title is None:
        raise RuntimeError(f"chromium did not run the page's measuring script on {page}")
    result = json.loads(html.unescape(title.group(1)))
    if screenshot is not None:
        subprocess.run(
            [*flags, f"--screenshot={screenshot}", page.as_uri()], capture_output=True, timeout=120, check=True
        )
    measured.unlink()
    return result
