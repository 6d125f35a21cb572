"""A report page: a title and sections, rendered by Jinja2 with autoescaping.

A section's parts are plain strings (a paragraph; escaped), `Text` (a paragraph with a pass/fail
style), `Bullets`, `Table`, or `Markup` from `charts` (inline SVG, already escaped there). Nothing
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


@dataclass(frozen=True)
class Table:
    rows: tuple[tuple[str, ...], ...]
    header: tuple[str, ...] = ()  # none: the first column is a row header


Part = str | Text | Bullets | Table | Markup

PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>{{ title }}</title>
<style>
body{font-family:system-ui,sans-serif;max-width:960px;margin:2em auto;color:#1a202c}
th{text-align:left;padding-right:1em;vertical-align:top}td{font-family:monospace;padding-right:1em}
figure{margin:1em 0}figcaption{font-weight:600;margin-bottom:.3em}
.pass{color:#276749}.fail{color:#c53030}
</style></head>
<body><h1>{{ title }}</h1>
{% for heading, parts in sections %}<h2>{{ heading }}</h2>
{% for part in parts %}{% if part is markup %}{{ part }}
{% elif part is text %}<p class="{{ part.style }}">{% if part.bold %}<b>{{ part.text }}</b>{% else %}{{ part.text }}{% endif %}</p>
{% elif part is bullets %}<ul>{% for item in part.items %}<li>{{ item }}</li>{% endfor %}</ul>
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
    )
    return environment.from_string(PAGE).render(title=title, sections=sections)


def write_page(path: Path, title: str, sections: list[tuple[str, list[Part]]]) -> Path:
    """Write a self-contained HTML page (atomically) and return its path."""
    write_text(path, render_page(title, sections))
    return path
