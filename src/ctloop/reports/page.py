"""A report page: a title and sections, rendered by Jinja2 with autoescaping.

A section's parts are plain strings (a paragraph; escaped), `Text` (a paragraph with a pass/fail
style), `Bullets`, `Table`, `Answers` (texts side by side, long ones folded), `Link`, or `Markup` from
`charts` (inline SVG, already escaped there). Nothing
else reaches the page unescaped, so a reason such as "loss <= 0.5" shows as written.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from markupsafe import Markup

from ctloop.fileio import write_text


@dataclass(frozen=True)
class Text:
    text: str
    style: str = ""  # "pass" or "fail" colours it
    bold: bool = False


@dataclass(frozen=True)
class Bullets:
    items: tuple[str, ...]
    folded: str = ""  # set: the list opens on a click on this summary (the statistics under a decision)


@dataclass(frozen=True)
class Table:
    rows: tuple[tuple[str, ...], ...]
    header: tuple[str, ...] = ()  # none: the first column is a row header


@dataclass(frozen=True)
class Answers:
    """Answers side by side: per example a heading and (label, text) cells, e.g. the prompt, the
    reference, the champion's and the candidate's answers. Long texts fold."""

    examples: tuple[tuple[str, tuple[tuple[str, str], ...]], ...]


@dataclass(frozen=True)
class Link:
    """A link to a page next to this one (a relative path), e.g. the drift report of a cycle."""

    text: str
    href: str


FOLD_CHARS = 400  # a longer text shows its start, and opens on a click

Part = str | Text | Bullets | Table | Markup | Answers | Link

PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>{{ title }}</title>
<style>
body{font-family:system-ui,sans-serif;max-width:960px;margin:2em auto;color:#1a202c}
th{text-align:left;padding-right:1em;vertical-align:top}td{font-family:monospace;padding-right:1em;overflow-wrap:anywhere}
figure{margin:1em 0}figcaption{font-weight:600;margin-bottom:.3em}
.pass{color:#276749}.fail{color:#c53030}
.answers{border-top:1px solid #e2e8f0;padding:.4em 0}.answers th{width:9em;font-weight:600}
.answers table{table-layout:fixed;width:100%}.answers td{white-space:pre-wrap;overflow-wrap:anywhere;font-family:monospace}summary{cursor:pointer}
</style></head>
<body><h1>{{ title }}</h1>
{% for heading, parts in sections %}<h2>{{ heading }}</h2>
{% for part in parts %}{% if part is markup %}{{ part }}
{% elif part is text %}<p class="{{ part.style }}">{% if part.bold %}<b>{{ part.text }}</b>{% else %}{{ part.text }}{% endif %}</p>
{% elif part is link %}<p><a href="{{ part.href }}">{{ part.text }}</a></p>
{% elif part is answers %}{% for heading, cells in part.examples %}<div class="answers"><b>{{ heading }}</b><table>
{% for label, text in cells %}<tr><th>{{ label }}</th><td>{% if text|length > fold %}<details><summary>{{ text[:fold] }}… ({{ text|length }} characters)</summary>{{ text[fold:] }}</details>{% else %}{{ text }}{% endif %}</td></tr>
{% endfor %}</table></div>{% endfor %}
{% elif part is bullets %}{% if part.folded %}<details><summary>{{ part.folded }}</summary>{% endif %}<ul>{% for item in part.items %}<li>{{ item }}</li>{% endfor %}</ul>{% if part.folded %}</details>{% endif %}
{% elif part is table %}<table>{% if part.header %}<tr>{% for cell in part.header %}<th>{{ cell }}</th>{% endfor %}</tr>{% endif %}
{% for row in part.rows %}<tr>{% for cell in row %}{% if loop.first and not part.header %}<th>{{ cell }}</th>{% else %}<td class="{{ {'PASS': 'pass', 'FAIL': 'fail'}.get(cell, '') }}">{{ cell }}</td>{% endif %}{% endfor %}</tr>
{% endfor %}</table>
{% else %}<p>{{ part }}</p>
{% endif %}{% endfor %}{% endfor %}
</body></html>
"""


def render_page(title: str, sections: list[tuple[str, list[Part]]]) -> str:
    from jinja2 import Environment

    environment = Environment(autoescape=True)
    environment.tests.update(
        markup=lambda part: isinstance(part, Markup),
        text=lambda part: isinstance(part, Text),
        bullets=lambda part: isinstance(part, Bullets),
        table=lambda part: isinstance(part, Table),
        answers=lambda part: isinstance(part, Answers),
        link=lambda part: isinstance(part, Link),
    )
    return environment.from_string(PAGE).render(title=title, sections=sections, fold=FOLD_CHARS)


def write_page(path: Path, title: str, sections: list[tuple[str, list[Part]]]) -> Path:
    """Write a self-contained HTML page (atomically) and return its path."""
    write_text(path, render_page(title, sections))
    return path
