"""One registry of config kinds, shared by every backend family.

Storage nodes, ActionCache backends and asset indexes are all written in config
as a mapping with a `kind` and that kind's options.  Each backend module
registers its kind with a pydantic options model; a family's loader asks its
`Registry` to turn a raw mapping into (kind, validated options) and then calls
the kind's builder with whatever context that family needs.  Keeping the lookup
and validation here means every family reports an unknown kind or an unknown key
with the same message, and no family hand-checks keys.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable
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
class Kind(Generic[B]):
    name: str
    options: type[KindOptions]
    #: Called with the validated options first; the rest of the arguments are the family's.
    build: Callable[..., B]


class Registry(Generic[B]):
    """The kinds of one family (`storage`, `ActionCache`, `asset-index`).

    `modules` are imported on `load_builtin()` so that each registers its kinds;
    importing them lazily keeps a registry importable from the modules it lists.
    """

    def __init__(self, family: str, modules: Iterable[str] = ()) -> None:
        self.family = family
        self.kinds: dict[str, Kind[B]] = {}
        self._modules = tuple(modules)

    def register(self, name: str, options: type[KindOptions]) -> Callable[[Callable[..., B]], Callable[..., B]]:
        """Decorator for a builder `(options, *context) -> backend`."""

        def wrap(build: Callable[..., B]) -> Callable[..., B]:
            self.kinds[name] = Kind(name, options, build)
            return build

        return wrap

    def load_builtin(self) -> None:
        for module in self._modules:
            importlib.import_module(module)

    def known(self) -> list[str]:
        return sorted(self.kinds)

    def parse(self, node: Any, path: str) -> tuple[Kind[B], KindOptions]:
        """The kind of a raw config mapping and its validated options (ConfigError naming the key otherwise)."""
        if not isinstance(node, dict) or "kind" not in node:
            raise ConfigError(f"{path}: a {self.family} node needs a 'kind'")
        kind = self.kinds.get(node["kind"])
        if kind is None:
            raise ConfigError(
                f"{path}.kind: unknown {self.family} kind {node['kind']!r}; known: {', '.join(self.known())}"
            )
        try:
            return kind, kind.options.model_validate(node)
        except ValidationError as exc:
            raise ConfigError(format_validation_error(exc, path)) from None
