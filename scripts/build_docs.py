"""Write the generated pages of the docs site, then (with --build) run `mkdocs build --strict`.

    .venv/bin/python scripts/build_docs.py [--build MKDOCS]   # make docs does both

Generated, never edited by hand:
- the README's stage table, from the cycle's declaration (`ctloop.cycle.declaration.stage_table`),
  rewritten in place between its markers;
- docs/from-readme/*.md: the sections the README keeps (what each decision guarantees, the
  production sources, the benchmarks), one page each, so they are written in one place; committed,
  since the guide links to them, and checked against the README by tests/test_docs.py;
- (git-ignored) docs/reference/configuration.md: every config section and field from the pydantic models, with
  its type, default and description (a field without a description is an error);
- docs/reference/cli.md: every command, its help and its options, from the typer app.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
DOCS = ROOT / "docs"
# README sections that become pages of the site: (heading, file name). The guide's other pages are
# written in docs/guide/.
GUIDE = [
    ("What each decision guarantees, and when", "statistics"),
    ("Already logging elsewhere?", "elsewhere"),
    ("Benchmarks", "benchmarks"),
]


def readme_sections(text: str) -> dict[str, str]:
    """The README's `## ` sections by heading, each with its subsections."""
    sections: dict[str, str] = {}
    for chunk in re.split(r"(?m)^## ", text)[1:]:
        heading, _, body = chunk.partition("\n")
        sections[heading.strip()] = body
    return sections


def guide_pages(readme: str) -> dict[str, str]:
    sections = readme_sections(readme)
    missing = [heading for heading, _ in GUIDE if heading not in sections]
    if missing:
        raise SystemExit(f"README sections not found (renamed?): {missing}; update GUIDE in {__file__}")
    # The README's subsections become the page's sections (### -> ##).
    return {name: f"# {heading}\n" + re.sub(r"(?m)^### ", "## ", sections[heading]) for heading, name in GUIDE}


def _type_name(annotation: Any) -> str:
    text = getattr(annotation, "__name__", None) if not getattr(annotation, "__args__", None) else None
    text = text or str(annotation)
    return text.replace("typing.", "").replace("pathlib.", "").replace("ctloop.config.", "")


def _default(field: Any) -> str:
    from pydantic_core import PydanticUndefined

    if field.default_factory is not None:
        try:
            value = field.default_factory()
        except TypeError:
            return "(computed)"
    elif field.default is PydanticUndefined:
        return "(required)"
    else:
        value = field.default
    if hasattr(value, "model_dump"):
        return "(section)"
    return f"`{value!r}`"


def _is_section(field: Any) -> bool:
    from pydantic import BaseModel

    return isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)


def configuration_page() -> str:
    """Every section of the config and each field: type, default, description."""
    from pydantic import BaseModel

    from ctloop.config import CtloopConfig

    lines = [
        "# Configuration reference",
        "",
        "Generated from the config's models (`src/ctloop/config.py`). Every key is optional but",
        "`model.base`; a YAML file names only what differs from the defaults. `ctloop validate-config FILE`",
        "checks a file and lists every problem at once.",
        "",
    ]
    undescribed: list[str] = []

    def section(path: str, model: type[BaseModel]) -> None:
        doc = " ".join((model.__doc__ or "").split())
        lines.extend([f"## `{path}`", "", doc, "", "| key | type | default | what it does |", "|---|---|---|---|"])
        nested: list[tuple[str, type[BaseModel]]] = []
        for name, field in model.model_fields.items():
            annotation = field.annotation
            if isinstance(annotation, type) and issubclass(annotation, BaseModel):
                nested.append((f"{path}.{name}", annotation))
                description = field.description or " ".join((annotation.__doc__ or "").split())
                lines.append(f"| `{name}` | section | see `{path}.{name}` | {description} |")
                continue
            if not field.description:
                undescribed.append(f"{path}.{name}")
            description = (field.description or "").replace("|", "\\|")
            type_name = _type_name(annotation).replace("|", "\\|")
            lines.append(
                f"| `{name}` | `{type_name}` | {_default(field).replace('|', chr(92) + '|')} | {description} |"
            )
        lines.append("")
        for child_path, child in nested:
            section(child_path, child)

    top = [(name, field) for name, field in CtloopConfig.model_fields.items() if not _is_section(field)]
    lines.extend(["## Top level", "", "| key | type | default | what it does |", "|---|---|---|---|"])
    for name, field in top:
        if not field.description:
            undescribed.append(name)
        type_name = _type_name(field.annotation).replace("|", "\\|")
        description = (field.description or "").replace("|", "\\|")
        lines.append(f"| `{name}` | `{type_name}` | {_default(field)} | {description} |")
    lines.append("")
    for name, field in CtloopConfig.model_fields.items():
        if _is_section(field):
            section(name, field.annotation)
    if undescribed:
        raise SystemExit(f"config fields without a description: {undescribed}; add Field(description=...)")
    return "\n".join(lines) + "\n"


def cli_page() -> str:
    """Every command of `ctloop`, its help and options, from the typer app."""
    import typer.main

    from ctloop.cli import app

    lines = [
        "# Command line reference",
        "",
        "Generated from the typer app (`src/ctloop/cli.py`). `ctloop COMMAND --help` says the same.",
        "",
    ]

    def command(path: str, cmd: Any) -> None:
        if hasattr(cmd, "commands"):  # a group (typer's own Group class, not always click's)
            for name in sorted(cmd.commands):
                command(f"{path} {name}", cmd.commands[name])
            return
        lines.extend([f"## `{path}`", "", " ".join((cmd.help or "").split()), ""])
        options = [p for p in cmd.params if p.name != "help"]
        if options:
            lines.extend(["| argument or option | default | what it is |", "|---|---|---|"])
            for param in options:
                is_option = type(param).__name__.endswith("Option")
                names = ", ".join(f"`{o}`" for o in param.opts) if is_option else f"`{(param.name or '').upper()}`"
                default = (
                    "(required)" if param.required else ("" if param.default in (None, False) else f"`{param.default}`")
                )
                help_text = (getattr(param, "help", None) or "").replace("|", "\\|")
                lines.append(f"| {names} | {default} | {help_text} |")
            lines.append("")

    command("ctloop", typer.main.get_command(app))
    return "\n".join(lines) + "\n"


def generated_pages() -> dict[Path, str]:
    pages = {
        DOCS / "from-readme" / f"{name}.md": text
        for name, text in guide_pages((ROOT / "README.md").read_text()).items()
    }
    pages[DOCS / "reference" / "configuration.md"] = configuration_page()
    pages[DOCS / "reference" / "cli.md"] = cli_page()
    return pages


def screenshots() -> None:
    """docs/images/<report>.png: the example reports of scripts/report_examples.py in headless Chromium."""
    import tempfile

    import report_examples

    images = DOCS / "images"
    images.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        for name, page in report_examples.write_examples(Path(tmp)).items():
            report_examples.render(page, images / f"{name}-report.png", width=1000, height=1800)


STAGE_TABLE_BEGIN = "<!-- stage table: generated from ctloop.cycle.declaration -->\n"
STAGE_TABLE_END = "<!-- end of stage table -->"


def readme_with_stage_table(readme: str) -> str:
    """The README with its stage table regenerated from the cycle's declaration."""
    from ctloop.cycle.declaration import stage_table

    if STAGE_TABLE_BEGIN not in readme or STAGE_TABLE_END not in readme:
        sys.exit("README.md: the stage-table markers are missing; put them back around the table")
    before, rest = readme.split(STAGE_TABLE_BEGIN, 1)
    return before + STAGE_TABLE_BEGIN + stage_table() + STAGE_TABLE_END + rest.split(STAGE_TABLE_END, 1)[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--build", metavar="MKDOCS", help="then run this mkdocs executable: build --strict")
    parser.add_argument(
        "--screenshots",
        action="store_true",
        help="also write docs/images/*.png of the example reports (needs chromium)",
    )
    args = parser.parse_args()
    if args.screenshots:
        screenshots()
    readme = ROOT / "README.md"
    readme.write_text(readme_with_stage_table(readme.read_text(encoding="utf-8")), encoding="utf-8")
    for path, text in generated_pages().items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    if args.build:
        sys.exit(
            subprocess.call([args.build, "build", "--strict", "--site-dir", str(ROOT / "build" / "site")], cwd=ROOT)
        )


if __name__ == "__main__":
    main()
