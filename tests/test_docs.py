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
    from casbah.storage.loader import STORAGE

    KINDS = STORAGE.load_all()
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
    """A moved section must not leave a link to a file that is not there."""
    broken = []
    for page in [README, *sorted((ROOT / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)#\s:]+)(?:#[^)]*)?\)", page.read_text()):
            path = (page.parent / target).resolve()
            if not path.exists():
                broken.append(f"{page.relative_to(ROOT)} -> {target}")
    assert not broken, broken


def _pages() -> list[Path]:
    return [README, *sorted((ROOT / "docs").glob("*.md"))]


def _fenced(text: str, languages: tuple[str, ...]) -> list[str]:
    """The contents of the fenced code blocks of `text` in one of `languages` ("" = no language)."""
    blocks: list[str] = []
    current: list[str] = []
    language: str | None = None
    for line in text.splitlines():
        if line.startswith("```"):
            if language is None:
                language, current = line[3:].strip(), []
            else:
                if language in languages:
                    blocks.append("\n".join(current) + "\n")
                language = None
        elif language is not None:
            current.append(line)
    return blocks


def _yaml_blocks() -> list[tuple[str, str]]:
    return [(page.name, block) for page in _pages() for block in _fenced(page.read_text(), ("yaml",))]


def test_documented_manifests_load(tmp_path: Path) -> None:
    """Every manifest shown in the docs is accepted by `casbah source fetch-all` as written
    (an unquoted `asset-push: on` is a YAML boolean and was refused)."""
    from casbah.cli.source import load_manifest

    manifests = [(name, block) for name, block in _yaml_blocks() if re.search(r"^sources:", block, re.M)]
    assert len(manifests) >= 2
    for name, block in manifests:
        path = tmp_path / "sources.yaml"
        path.write_text(block.replace("…", "0" * 40))
        spec = load_manifest(path)
        assert spec.sources, name
        for remote in spec.remotes:
            assert remote.asset_push in ("on", "off"), (name, remote)


def _storage_nodes(node: object, path: str) -> list[tuple[str, dict]]:
    """Every inline storage node under `node` (a node's own options may hold further nodes)."""
    found = []
    if isinstance(node, dict):
        if "kind" in node:
            found.append((path, node))
        for key, value in node.items():
            if key != "shard-defaults":
                found += _storage_nodes(value, f"{path}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            found += _storage_nodes(value, f"{path}[{i}]")
    return found


def test_documented_server_configs_validate(monkeypatch) -> None:
    """Every server config shown in the docs uses real keys: the top level and instances by the
    config model, every storage node by its kind's options model."""
    import yaml

    from casbah.config import ServerConfig, expand_env
    from casbah.storage.loader import STORAGE

    KINDS = STORAGE.load_all()
    monkeypatch.setenv("CASBAH_SHARDS", "grpc://a:1,grpc://b:2")
    top = {field.alias or name for name, field in ServerConfig.model_fields.items()}
    configs = []
    for name, block in _yaml_blocks():
        data = yaml.safe_load(block)
        if isinstance(data, dict) and set(data) <= top and not re.search(r"^sources:", block, re.M):
            configs.append((name, expand_env(data)))
    assert len(configs) >= 6, [n for n, _ in configs]
    for name, data in configs:
        ServerConfig.model_validate(data)
        trees = [("storages", data.get("storages", {}))]
        trees += [(f"instances.{i}.storage", inst.get("storage")) for i, inst in data.get("instances", {}).items()]
        for where, tree in trees:
            for path, node in _storage_nodes(tree, where):
                assert node["kind"] in KINDS, (name, path)
                KINDS[node["kind"]].options.model_validate(node)


def _click_command(words: list[str]):
    """Through click's `get_command`: the subcommand groups are loaded on lookup."""
    import click

    from casbah.cli import main

    command = main
    for word in words:
        sub = command.get_command(click.Context(command), word) if isinstance(command, click.Group) else None
        if sub is None:
            break
        command = sub
    return command


def test_documented_commands_and_flags_exist() -> None:
    """Every `casbah …` command line in the docs names a real command, and every --flag on it
    is one of that command's options."""
    import click

    lines = []
    for page in _pages():
        text = page.read_text()
        for block in _fenced(text, ("sh", "")):
            lines += [(page.name, line) for line in block.replace("\\\n", " ").splitlines()]
        lines += [(page.name, span) for span in re.findall(r"(?<!`)`(casbah [^`]+)`", text)]
    checked = 0
    for name, line in lines:
        line = line.split("#", 1)[0]
        match = re.search(r"\bcasbah ((?:[a-z][a-z-]* ?)+)(.*)", line)
        if not match or match.group(1).split()[0] not in ("serve", "cache", "cas", "asset", "source", "admin"):
            continue
        words = match.group(1).split()
        command = _click_command(words)
        flags = re.findall(r"(?<![\w-])(--?[a-z][a-z0-9-]*)", match.group(2))
        if isinstance(command, click.Group):  # `casbah cache` alone names the group
            assert not flags and words[-1] == command.name, f"{name}: {line.strip()!r} names no command"
            continue
        known = {opt for param in command.params for opt in (*param.opts, *param.secondary_opts)}
        for flag in flags:
            assert flag in known | {"--help", "-h"}, f"{name}: {line.strip()!r}: {flag} is not an option"
        checked += 1
    assert checked >= 20, checked
