"""The rollout's HTML report: its decision in words at the top, then each step's share and requests
per arm, and per metric the gap's always-valid bounds at every look against its limit."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from ctloop.fileio import TIMESTAMP_FORMAT
from ctloop.reports.charts import line_chart
from ctloop.reports.page import Bullets, Table, Text, write_page

WORDS = {
    "rolled_back": "was rolled back: users were sent back to the champion",
    "completed": "completed: it is the champion now",
    "running": "is running",
    "aborted": "was stopped by hand",
}


def write_rollout_report(path: Path, rollout: dict[str, Any], looks: list[dict[str, Any]]) -> Path:
    """`rollout`: the rollout's state (`Rollout.to_dict()`); `looks`: its journal, one dict a look."""
    candidate, champion = rollout["candidate"], rollout["champion"]
    ended = WORDS.get(rollout["state"], rollout["state"])
    last = looks[-1] if looks else None
    summary: list[Any] = [Text(f"v{candidate} against v{champion}: the rollout {ended}.", bold=True)]
    if last is not None and last["decision"] != "HOLD":
        summary.append(Bullets(tuple(last["reasons"])))
    summary.append(Bullets(tuple(rollout.get("history", ()))))
    steps = {}
    for look in looks:
        steps[look["step"]] = look
    step_rows = tuple(
        (
            f"{look['share']:.0%}",
            str(look["requests"].get("candidate", 0)),
            str(look["requests"].get("champion", 0)),
            look["decision"],
        )
        for _, look in sorted(steps.items())
    )
    sections: list[tuple[str, list]] = [
        ("Decision", summary),
        ("Steps", [Table(step_rows, header=("share", "candidate answers", "champion answers", "last look"))]),
    ]
    latest: dict[str, Any] = (last or {}).get("metrics", {})
    for key, measured in latest.items():
        label = str(measured["label"])
        limit = float(measured["limit"])
        points = [(float(i), float(look["metrics"][key]["at_most"])) for i, look in enumerate(looks, 1)]
        rows = tuple(
            (
                time.strftime(TIMESTAMP_FORMAT, time.gmtime(look["time"])),
                f"{look['share']:.0%}",
                f"{look['metrics'][key]['candidate']:.2%}",
                f"{look['metrics'][key]['champion']:.2%}",
                f"{look['metrics'][key]['worse_by']:+.2%}",
                f"{look['metrics'][key]['at_most']:+.2%}",
                look["decision"],
            )
            for look in looks
        )
        sections.append(
            (
                label,
                [
                    f"The candidate may be worse than the champion by at most {limit:.2%}. Each look bounds the gap "
                    "(candidate minus champion) from both sides, valid however often it is looked at: a lower bound "
                    "above the limit rolls back; an upper bound within it, on every metric, advances.",
                    line_chart(
                        f"{label}: upper bound of the gap at each look",
                        points,
                        "candidate minus champion (rate)",
                        x_label="look",
                        limit=limit,
                        limit_label=f"limit {limit:.2%}",
                    ),
                    Table(
                        rows,
                        header=(
                            "look",
                            "share",
                            "candidate",
                            "champion",
                            "gap, lower bound",
                            "gap, upper bound",
                            "decision",
                        ),
                    ),
                ],
            )
        )
    return write_page(path, f"ctloop rollout of v{candidate}", sections)
