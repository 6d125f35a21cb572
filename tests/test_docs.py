"""The docs site's generated pages (#29 item 1): the configuration reference covers every field of
the config and fails on one without a description; the command line reference covers every
command; the README's kept sections are pages of the site and every guide page is in its nav.
`make docs` (in .ci/run) then builds the site with mkdocs --strict."""

from __future__ import annotations

import sys

import pytest
import typer.main

from conftest import REPO

sys.path.insert(0, str(REPO / "scripts"))
import build_docs  # noqa: E402

from ctloop.cli import app  # noqa: E402
from ctloop.config import CtloopConfig, ModelConfig  # noqa: E402


def _fields(model, path=""):
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and hasattr(annotation, "model_fields"):
            yield from _fields(annotation, f"{path}{name}.")
        else:
            yield path.rstrip("."), name


def test_the_configuration_reference_lists_every_field():
    page = build_docs.configuration_page()
    for section, name in _fields(CtloopConfig):
        heading = f"## `{section}`" if section else "## Top level"
        assert heading in page and f"| `{name}` |" in page.split(heading, 1)[1], (section, name)


def test_a_field_without_a_description_fails_the_reference(monkeypatch):
    monkeypatch.setattr(ModelConfig.model_fields["dtype"], "description", None)
    with pytest.raises(SystemExit, match=r"model\.dtype"):
        build_docs.configuration_page()


def test_the_command_line_reference_lists_every_command():
    page = build_docs.cli_page()

    def commands(group, path="ctloop"):
        for name, command in group.commands.items():
            if hasattr(command, "commands"):
                yield from commands(command, f"{path} {name}")
            else:
                yield f"{path} {name}"

    names = list(commands(typer.main.get_command(app)))
    assert "ctloop judge calibrate" in names and "ctloop doctor" in names
    for name in names:
        assert f"## `{name}`" in page, name


def test_the_pages_from_the_readme_and_the_guide_are_all_on_the_site():
    """The README keeps three sections the site renders (statistics, production sources,
    benchmarks); the guide's other pages are written in docs/guide/. Each is in the site's nav, and
    the README links every guide page."""
    import yaml

    pages = build_docs.guide_pages((REPO / "README.md").read_text())
    assert set(pages) == {"statistics", "elsewhere", "benchmarks"}
    assert "| decision | error it bounds |" in pages["statistics"] and "production.source" in pages["elsewhere"]
    nav = yaml.safe_load((REPO / "mkdocs.yml").read_text())["nav"]

    def files(entries):
        for entry in entries:
            value = next(iter(entry.values())) if isinstance(entry, dict) else entry
            yield from files(value) if isinstance(value, list) else [value]

    listed = set(files(nav))
    guide = sorted(f"guide/{path.name}" for path in (REPO / "docs" / "guide").glob("*.md"))
    assert len(guide) >= 10 and set(guide) <= listed and {f"from-readme/{n}.md" for n in pages} <= listed
    readme = (REPO / "README.md").read_text()
    assert all(f"](docs/{page})" in readme for page in guide), [p for p in guide if f"](docs/{p})" not in readme]


def test_the_pages_from_the_readme_are_committed_as_generated():
    """docs/guide/ links to them, so they are in the repository (readable on a forge without a
    docs build); `make docs` writes them again, and this fails when they lag the README."""
    for path, text in build_docs.generated_pages().items():
        if path.parent.name == "from-readme":
            assert path.read_text() == text, f"{path} is stale: run `make docs` (or scripts/build_docs.py)"
