"""Logging at the edges: JSON lines for log shippers, quiet terminals by default."""

from __future__ import annotations

import json
import logging

from ctloop.logs import JsonFormatter, configure_logging


def test_json_lines_carry_level_logger_message_and_exception():
    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.getLogger("ctloop.x").makeRecord(
            "ctloop.x", logging.ERROR, __file__, 1, "failed %s", ("a",), exc_info=__import__("sys").exc_info()
        )
    line = json.loads(JsonFormatter().format(record))
    assert line["level"] == "error" and line["logger"] == "ctloop.x" and line["message"] == "failed a"
    assert "ValueError: boom" in line["exception"] and line["time"].endswith("Z")


def test_levels_follow_the_format_and_the_environment(monkeypatch):
    logger = logging.getLogger("ctloop")
    for attribute in ("handlers", "level", "propagate"):  # restored afterwards: other tests log through it
        monkeypatch.setattr(logger, attribute, getattr(logger, attribute))
    monkeypatch.delenv("CTLOOP_LOG_LEVEL", raising=False)
    configure_logging(log_format="json")
    assert logging.getLogger("ctloop").level == logging.INFO
    configure_logging(log_format="text")
    assert logging.getLogger("ctloop").level == logging.WARNING
    monkeypatch.setenv("CTLOOP_LOG_LEVEL", "debug")
    configure_logging(log_format="text")
    assert logging.getLogger("ctloop").level == logging.DEBUG
    assert len(logging.getLogger("ctloop").handlers) == 1  # reconfiguring replaces, never stacks


def test_console_text_is_printed_as_written_never_read_as_markup():
    """A slice named [pypi] once vanished from "new data [pypi]": rich read it as a style tag (#29)."""
    from ctloop.console import console, error

    with console.capture() as captured:
        console.print("new data [pypi]: loss 1.2 -> 1.1 [bold] [/]")
        error("eval.golden.[x] is missing")
    assert captured.get() == "new data [pypi]: loss 1.2 -> 1.1 [bold] [/]\nerror: eval.golden.[x] is missing\n"
