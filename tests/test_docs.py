"""The docs stay true to the code: generated tables are current, every page is reachable
from the README, and the README stays a short front page."""

from __future__ import annotations

import re
from pathlib import Path

from casbah import kinds_doc

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"


def test_generated_blocks_are_current() -> None:
    stale = [path.relative_to(ROOT) for path, (old, new) in kinds_doc.regenerate(ROOT).items() if old != new]
    assert not stale, f"generated docs are stale, run ./scripts/gendocs: {stale}"


def test_storage_doc_lists_every_registered_kind_with_its_yaml_keys() -> None:
    from casbah.storage.loader import KINDS, load_builtin_kinds

    load_builtin_kinds()
    text = (ROOT / "docs" / "storage.md").read_text()
    for name, kind in KINDS.items():
        assert f"### `{name}`" in text
        for field_name, field in kind.options.model_fields.items():
            if field_name not in ("kind", "verify"):
                assert f"`{field.alias or field_name}`" in text, (name, field_name)


def test_replace_block_refuses_a_file_without_markers() -> None:
    try:
        kinds_doc.replace_block("no markers here", "storage kinds", "x")
    except ValueError as exc:
        assert "BEGIN GENERATED: storage kinds" in str(exc)
    else:
        raise AssertionError("replace_block accepted a file without markers")


def test_every_docs_page_is_linked_from_the_readme() -> None:
    linked = set(re.findall(r"\]\((docs/[^)#\s]+\.md)(?:#[^)]*)?\)", README.read_text()))
    pages = {f"docs/{p.name}" for p in (ROOT / "docs").glob("*.md")}
    assert pages <= linked, f"not linked from README.md: {sorted(pages - linked)}"


def test_readme_is_at_most_10_kib() -> None:
    size = len(README.read_bytes())
    assert size <= 10 * 1024, f"README.md is {size} bytes; move detail into docs/"


def test_relative_links_between_docs_resolve() -> None:
    """A moved section must not leave a link to a file that is not there (security.md is written
    separately, so a link to it is allowed before it lands)."""
    broken = []
    for page in [README, *sorted((ROOT / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)#\s:]+)(?:#[^)]*)?\)", page.read_text()):
            path = (page.parent / target).resolve()
            if not path.exists() and path != ROOT / "docs" / "security.md":
                broken.append(f"{page.relative_to(ROOT)} -> {target}")
    assert not broken, broken
