"""One registry of config kinds, shared by every backend family.

Storage nodes, ActionCache backends and asset indexes are all written in config
as a mapping with a `kind` and that kind's options.  Each backend module
registers its kind with a pydantic options model; a family's loader asks its
`Registry` to turn a raw mapping into (kind, validated options) and then calls
the kind's builder with whatever context that family needs.  Keeping the lookup
and validation here means every family reports an unknown kind or an unknown key
with the same message, and no family hand-checks keys.

Kinds whose client library is an optional extra (boto3, redis, psycopg) are
registered *lazily*, by module path: the module is imported only when a config
names the kind (or the docs are generated).  A server with disk storage alone
then never imports those libraries (they cost a noticeable part of start-up),
and a config naming a kind whose library is missing fails with one line that
says which extra to install instead of a traceback from deep inside an import.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from casbah.config import ConfigError, format_validation_error

B = TypeVar("B")


class KindOptions(BaseModel):
    """Base of every kind's options model: unknown keys are errors, aliases and names both accepted."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    kind: str


@dataclass(frozen=True)
class LazyKind:
    """A kind not yet imported: the module that registers it and the extra that provides its library."""

    module: str
    #: The optional dependency group (`pip install 'casbah[<extra>]'`) holding the kind's client library.
    extra: str
    #: Top-level modules the kind needs, imported first so a missing one is named exactly.
    requires: tuple[str, ...] = ()


@dataclass(frozen=True)
class Kind(Generic[B]):
    """A registered kind: its name, its options model and its builder."""

    name: str
    options: type[KindOptions]
    #: Called with the validated options first; the rest of the arguments are the family's.
    build: Callable[..., B]


class Registry(Generic[B]):
    """The kinds of one family (`storage`, `ActionCache`, `asset-index`).

    `modules` are imported on `load_builtin()` so that each registers its kinds;
    importing them lazily keeps a registry importable from the modules it lists.
    `lazy` maps a kind name to the module registering it, imported on first use.
    """

    def __init__(self, family: str, modules: Iterable[str] = (), lazy: Mapping[str, LazyKind] | None = None) -> None:
        self.family = family
        self.kinds: dict[str, Kind[B]] = {}
        self._modules = tuple(modules)
        self._lazy: dict[str, LazyKind] = dict(lazy or {})

    def register(self, name: str, options: type[KindOptions]) -> Callable[[Callable[..., B]], Callable[..., B]]:
        """Decorator for a builder `(options, *context) -> backend`."""

        def wrap(build: Callable[..., B]) -> Callable[..., B]:
            self.kinds[name] = Kind(name, options, build)
            return build

        return wrap

    def load_builtin(self) -> None:
        """Import the modules of the eager kinds (the lazy ones wait until a config names them)."""
        for module in self._modules:
            importlib.import_module(module)

    def load_all(self) -> dict[str, Kind[B]]:
        """Every kind, the lazy ones imported too (for the generated docs); ConfigError if a library is missing."""
        self.load_builtin()
        for name in list(self._lazy):
            self.get(name)
        return self.kinds

    def known(self) -> list[str]:
        """Every kind name, imported or not."""
        return sorted(set(self.kinds) | set(self._lazy))

    def has(self, name: object) -> bool:
        """Whether `name` is a kind of this family (without importing it)."""
        return name in self.kinds or name in self._lazy

    def get(self, name: str, path: str = "") -> Kind[B] | None:
        """The kind called `name`, importing its module first if it is lazy; None if there is no such kind.

        `path` (the config node's) prefixes the error when the kind's library is missing.
        """
        kind = self.kinds.get(name)
        if kind is not None or name not in self._lazy:
            return kind
        lazy = self._lazy[name]
        missing: str | None = None
        for library in lazy.requires:
            try:
                importlib.import_module(library)
            except ImportError:
                missing = library
                break
        if missing is None:
            try:
                importlib.import_module(lazy.module)
            except ModuleNotFoundError as exc:
                if not exc.name or exc.name.split(".")[0] == "casbah":
                    raise
                missing = exc.name.split(".")[0]
        if missing is not None:
            where = f"{path}.kind: " if path else ""
            raise ConfigError(
                f"{where}{self.family} kind {name!r} needs {missing}: "
                f"install casbah with the {lazy.extra!r} extra: pip install 'casbah[{lazy.extra}]'"
            )
        kind = self.kinds.get(name)
        if kind is None:
            raise RuntimeError(f"{lazy.module} did not register {self.family} kind {name!r}")
        return kind

    def parse(self, node: Any, path: str) -> tuple[Kind[B], KindOptions]:
        """The kind of a raw config mapping and its validated options (ConfigError naming the key otherwise)."""
        if not isinstance(node, dict) or "kind" not in node:
            raise ConfigError(f"{path}: a {self.family} node needs a 'kind'")
        kind = self.get(node["kind"], path) if isinstance(node["kind"], str) else None
        if kind is None:
            raise ConfigError(
                f"{path}.kind: unknown {self.family} kind {node['kind']!r}; known: {', '.join(self.known())}"
            )
        try:
            return kind, kind.options.model_validate(node)
        except ValidationError as exc:
            raise ConfigError(format_validation_error(exc, path)) from None
