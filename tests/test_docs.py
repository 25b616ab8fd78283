"""The documentation holds together: every relative link and image resolves (to a file, and to a heading where it
names one), every page under docs/ is reachable from the README or docs/README.md, the README stays one short page
with its two commands on the first screen, and every field of the config schema says what it is."""

import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [README, *DOCS, ROOT / "config" / "README.md"]
SCHEMA = ROOT / "workflow" / "schemas" / "config.schema.yaml"

README_LINES = 170  # a README of about 150 lines: what the project is, the commands, results, links
FIRST_SCREEN = 40  # lines: the title, one paragraph, one figure and the two commands
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
EXTERNAL = re.compile(r"^[a-z][a-z0-9+.-]*:", re.I)  # https:, mailto:, ...


def prose(text: str) -> str:
    """The text without fenced code blocks and inline code, where brackets are not links."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    return re.sub(r"`[^`\n]*`", "", text)


def links(page: Path) -> list[str]:
    return LINK.findall(prose(page.read_text()))


def anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]|\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    headings = re.findall(r"^#{1,6}\s+(.+?)\s*#*$", prose(page.read_text()), re.M)
    return {anchor(heading) for heading in headings}


def targets(page: Path) -> list[tuple[str, Path, str]]:
    """(link as written, file it names, anchor) for every relative link and image of a page."""
    found = []
    for link in links(page):
        if EXTERNAL.match(link):
            continue
        path, _, fragment = link.partition("#")
        found.append((link, (page.parent / path).resolve() if path else page, fragment))
    return found


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(ROOT)))
def test_relative_links_and_images_resolve(page):
    broken = [link for link, path, _ in targets(page) if not path.exists()]
    assert not broken, f"{page.relative_to(ROOT)}: links to files that do not exist: {broken}"
    wrong = [
        link
        for link, path, fragment in targets(page)
        if fragment and path.suffix == ".md" and fragment not in anchors(path)
    ]
    assert not wrong, f"{page.relative_to(ROOT)}: links to headings that do not exist: {wrong}"


def test_every_docs_page_is_linked_from_the_readme_or_the_index():
    linked = {path for page in (README, ROOT / "docs" / "README.md") for _, path, _ in targets(page)}
    orphans = [str(page.relative_to(ROOT)) for page in DOCS if page.resolve() not in linked]
    assert not orphans, f"docs pages linked from neither README.md nor docs/README.md: {orphans}"


def test_the_readme_is_one_short_page_with_the_two_commands_first():
    lines = README.read_text().splitlines()
    assert len(lines) <= README_LINES, f"README.md has {len(lines)} lines (at most {README_LINES}): move it to docs/"
    first = "\n".join(lines[:FIRST_SCREEN])
    assert "![" in first  # one figure on the first screen
    commands = re.findall(r"```bash\n(.*?)\n```", first, re.S)
    assert len(commands) >= 2 and "snakemake --cores all" in commands[0] and "python -m pytest" in commands[1]


def schema_fields(node, path=""):
    """(path, schema) of every property of the schema, at any depth: under properties, items, additionalProperties
    and $defs."""
    if not isinstance(node, dict):
        return
    for name, field in (node.get("properties") or {}).items():
        yield f"{path}.{name}", field
        yield from schema_fields(field, f"{path}.{name}")
    for key in ("items", "additionalProperties"):
        yield from schema_fields(node.get(key), f"{path}[{key}]")
    for name, field in (node.get("$defs") or {}).items():
        yield from schema_fields(field, f"$defs.{name}")


def test_every_schema_field_has_a_description():
    schema = yaml.safe_load(SCHEMA.read_text())
    fields = list(schema_fields(schema))
    assert len(fields) > 100
    missing = [path for path, field in fields if not (isinstance(field, dict) and field.get("description"))]
    assert not missing, f"{SCHEMA.relative_to(ROOT)}: fields without a description: {missing}"
    # an unquoted comma in a flow mapping ({description: a, b}) cuts the description and adds a key without a value
    cut = [(path, key) for path, field in fields for key, value in field.items() if value is None]
    assert not cut, f"{SCHEMA.relative_to(ROOT)}: descriptions cut at a comma (quote them): {cut}"
