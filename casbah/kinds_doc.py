"""Renders the reference tables of config kinds from their registries, into docs/*.md.

The options tables in the docs are generated, not written, because the pydantic
options models are the truth (they reject every key they do not declare): a
hand-written table drifts the day someone adds an option.  Each generated block
sits between two marker comments in a Markdown file; `python -m casbah.kinds_doc`
(or `scripts/gendocs`) rewrites the blocks, and `--check` (used by the tests)
fails when a file differs from what the registry says.

A family is any mapping `kind name -> entry`, where an entry has an `options`
pydantic model and names its backend by one of: a `backend` attribute, being a
class itself, or the return annotation of its `build` function (the storage
registry's shape).  Adding another family (ActionCache kinds, asset indexes) is
one line in `FAMILIES`.
"""

from __future__ import annotations

import argparse
import inspect
import re
import sys
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Family:
    """One generated block: which registry, which base options to list once, where it goes."""

    block: str  # the marker name: <!-- BEGIN GENERATED: {block} -->
    doc: str  # path relative to the repository root
    registry: Callable[[], Mapping[str, Any]]
    base: type[BaseModel] | None = None  # options every kind inherits, described once above the table


def _storage_kinds() -> Mapping[str, Any]:
    """The storage registry, every built-in backend imported, the lazy ones too (they register on import)."""
    from casbah.storage.loader import STORAGE

    return STORAGE.load_all()


def _storage_base() -> type[BaseModel]:
    from casbah.storage.loader import NodeOptions

    return NodeOptions


FAMILIES: list[Family] = [
    Family("storage kinds", "docs/storage.md", _storage_kinds, _storage_base()),
]


def backend_of(entry: Any) -> Any:
    """The class (or function) whose docstring describes a registered kind."""
    if inspect.isclass(entry) and not issubclass(entry, BaseModel):
        return entry
    backend = getattr(entry, "backend", None)
    if backend is not None:
        return backend
    build = getattr(entry, "build", None)
    if build is None:
        return entry
    returned = getattr(build, "__annotations__", {}).get("return")
    if isinstance(returned, str):  # `from __future__ import annotations`: resolve in the builder's module
        returned = getattr(build, "__globals__", {}).get(returned)
    return returned if returned is not None else build


def summary(entry: Any, kind: str) -> str:
    """First line of the backend's docstring, else of its module's, without a leading "`kind`: "."""
    backend = backend_of(entry)
    doc = inspect.getdoc(backend) if inspect.isclass(backend) and backend.__doc__ else None
    if not doc:
        module = inspect.getmodule(backend)
        doc = inspect.getdoc(module) if module is not None else None
    line = (doc or "").strip().splitlines()[0] if (doc or "").strip() else ""
    prefix = f"`{kind}`: "
    return line[len(prefix):] if line.startswith(prefix) else line


def type_name(tp: Any) -> str:
    """A type as a config author reads it: `int or str`, `list of str`, `{storage, weight, key}`."""
    if tp is type(None):
        return "null"
    if tp is Any:
        return "any"
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(type_name(a) for a in args if a is not type(None))
    if origin in (list, tuple, set):
        return f"list of {type_name(args[0])}" if args else "list"
    if origin is dict or tp is dict:
        return "mapping"
    if inspect.isclass(tp) and issubclass(tp, BaseModel):
        return "{" + ", ".join(yaml_name(n, f) for n, f in tp.model_fields.items()) + "}"
    return getattr(tp, "__name__", str(tp))


def yaml_name(name: str, field: FieldInfo) -> str:
    """The key as written in YAML: the alias when there is one."""
    return field.alias or name


def constraints(field: FieldInfo) -> list[str]:
    """Bounds and patterns the model enforces, as notes: `> 0`, `one of: a, b`."""
    notes = []
    for item in field.metadata:
        for attr, sign in (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<=")):
            if getattr(item, attr, None) is not None:
                notes.append(f"{sign} {getattr(item, attr)}")
        if getattr(item, "min_length", None):
            notes.append(f"at least {item.min_length}")
        pattern = getattr(item, "pattern", None)
        if pattern:
            choices = re.fullmatch(r"\^\(([\w|-]+)\)\$", pattern)
            notes.append("one of: " + ", ".join(f"`{c}`" for c in choices.group(1).split("|"))
                         if choices else f"matches `{pattern}`")
    return notes


def default_text(field: FieldInfo) -> str:
    """The default as a config author would write it (`required` when there is none)."""
    if field.is_required():
        return "required"
    value = field.default_factory() if field.default_factory is not None else field.default  # type: ignore[call-arg]
    if value is PydanticUndefined or value is None:
        return "unset"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if value == "":
        return '`""`'
    return f"`{value}`"


def notes(field: FieldInfo) -> list[str]:
    """What the table says beyond type and default: enforced bounds, then the field's description."""
    return constraints(field) + ([field.description] if field.description else [])


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render(registry: Mapping[str, Any], base: type[BaseModel] | None = None) -> str:
    """Markdown for every kind of a registry: a summary table, then each kind's options."""
    inherited = set(base.model_fields) if base is not None else set()
    out = ["| kind | what it is |", "|---|---|"]
    out += [f"| [`{kind}`](#{_anchor(kind)}) | {_cell(summary(registry[kind], kind))} |" for kind in sorted(registry)]
    if base is not None:
        common = [f"`{yaml_name(n, f)}` ({type_name(f.annotation)}, default {default_text(f)})"
                  for n, f in base.model_fields.items() if n != "kind"]
        if common:
            out += ["", "Every kind also accepts " + ", ".join(common) + "."]
    for kind in sorted(registry):
        entry = registry[kind]
        model: type[BaseModel] = entry.options
        line = summary(entry, kind)
        out += ["", f"### `{kind}`", "", line[:1].upper() + line[1:], ""]
        fields = [(n, f) for n, f in model.model_fields.items() if n not in inherited]
        if not fields:
            out.append("No options of its own.")
            continue
        out += ["| option | type | default | notes |", "|---|---|---|---|"]
        for name, field in fields:
            out.append(f"| `{yaml_name(name, field)}` | {_cell(type_name(field.annotation))} | "
                       f"{_cell(default_text(field))} | {_cell('; '.join(notes(field)))} |")
    return "\n".join(out) + "\n"


def _anchor(kind: str) -> str:
    """GitHub's heading anchor for "### `kind`"."""
    return "".join(c for c in kind.lower() if c.isalnum() or c in "-_ ").replace(" ", "-")


def markers(block: str) -> tuple[str, str]:
    """The comment lines around a generated block (the begin line says how to regenerate)."""
    return (f"<!-- BEGIN GENERATED: {block} (python -m casbah.kinds_doc; do not edit) -->",
            f"<!-- END GENERATED: {block} -->")


def replace_block(text: str, block: str, content: str) -> str:
    """`text` with the part between the block's markers replaced by `content`."""
    begin, end = markers(block)
    start, stop = text.find(begin), text.find(end)
    if start < 0 or stop < start:
        raise ValueError(f"markers for {block!r} not found; the file needs the lines:\n{begin}\n{end}")
    return text[: start + len(begin)] + "\n" + content + text[stop:]


def regenerate(root: Path = ROOT) -> dict[Path, tuple[str, str]]:
    """Every doc file with a generated block: (current text, text the registries give)."""
    files: dict[Path, tuple[str, str]] = {}
    for family in FAMILIES:
        path = root / family.doc
        old, new = files.get(path, (path.read_text(), path.read_text()))
        files[path] = (old, replace_block(new, family.block, render(family.registry(), family.base)))
    return files


def main(argv: list[str] | None = None) -> int:
    """Rewrite stale blocks, or with `--check` only report them (exit 1)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if a generated block is stale; write nothing")
    args = parser.parse_args(argv)
    stale = []
    for path, (old, new) in regenerate().items():
        if old != new:
            stale.append(path)
            if not args.check:
                path.write_text(new)
    for path in stale:
        print(f"{'stale' if args.check else 'rewrote'}: {path.relative_to(ROOT)}", file=sys.stderr)
    return 1 if stale and args.check else 0


if __name__ == "__main__":
    sys.exit(main())
