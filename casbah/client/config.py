"""The client's own config file: `~/.config/casbah/config.yaml` (or `$CASBAH_CONFIG`).

    cache-dir: ~/.cache/casbah
    quota: 20G
    remotes:
      - url: grpcs://cache.example.com:443
        instance: main
        server-cert: ca.pem        # client-key, client-cert, token-file as the CLI's options
        push: true                 # `cache push` sends here (default false: pull only)
      - url: grpc://mirror.lan:50051

The remotes are tried in order on pull (the first that has the ref serves it) and
every `push: true` remote gets a push.  `--remote` on the command line replaces the
list.  An unknown key is refused with one line naming it, so a typo is not silently
ignored; a missing file is an empty config (the file is optional).
"""

from __future__ import annotations

import os
from pathlib import Path

import yaml
from pydantic import Field, ValidationError, field_validator

from casbah.config import ConfigError, _Model, expand_env, parse_size
from casbah.errors import CasbahError
from casbah.reapi.channel import RemoteSpec

DEFAULT_PATH = "~/.config/casbah/config.yaml"
ENV = "CASBAH_CONFIG"


class RemoteEntry(_Model):
    url: str
    instance: str = ""
    server_cert: str | None = Field(default=None, alias="server-cert")
    client_key: str | None = Field(default=None, alias="client-key")
    client_cert: str | None = Field(default=None, alias="client-cert")
    token_file: str | None = Field(default=None, alias="token-file")
    push: bool = False

    @field_validator("url")
    @classmethod
    def _valid_url(cls, value: str) -> str:
        try:
            RemoteSpec(url=value)  # checks scheme, host and port
        except CasbahError as exc:
            raise ValueError(str(exc)) from None
        return value

    def spec(self) -> RemoteSpec:
        return RemoteSpec(url=self.url, instance=self.instance, server_cert=_path(self.server_cert),
                          client_key=_path(self.client_key), client_cert=_path(self.client_cert),
                          token_file=_path(self.token_file), push=self.push)


class ClientConfig(_Model):
    cache_dir: str | None = Field(default=None, alias="cache-dir")
    #: Bytes; the local cache keeps itself under it on commit and pull.
    quota: int | None = None
    remotes: list[RemoteEntry] = Field(default_factory=list)

    @field_validator("quota", mode="before")
    @classmethod
    def _size(cls, value: object) -> int | None:
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int | str):
            raise ValueError("want a size such as 50M or 20G")
        return parse_size(value)


def config_path() -> Path:
    return Path(os.environ.get(ENV) or DEFAULT_PATH).expanduser()


def load_client_config(path: str | os.PathLike | None = None) -> ClientConfig:
    """The config at `path` (default: `$CASBAH_CONFIG` or ~/.config/casbah/config.yaml).
    An absent file is an empty config, except when named explicitly (`$CASBAH_CONFIG`
    or `path`): a typo in that name should not silently mean "no remotes"."""
    explicit = path is not None or bool(os.environ.get(ENV))
    file = Path(path).expanduser() if path is not None else config_path()
    try:
        text = file.read_text()
    except FileNotFoundError:
        if explicit:
            raise ConfigError(f"client config {file} does not exist") from None
        return ClientConfig()
    except OSError as exc:
        raise ConfigError(f"cannot read client config {file}: {exc.strerror or exc}") from None
    try:
        loaded = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"client config {file}{where}: not valid YAML") from None
    if loaded is not None and not isinstance(loaded, dict):
        raise ConfigError(f"client config {file} must be a mapping at the top level")
    try:
        return ClientConfig.model_validate(expand_env(loaded or {}))
    except ValidationError as exc:
        err = exc.errors()[0]
        key = ".".join(str(p) for p in err["loc"])
        more = f" (and {len(exc.errors()) - 1} more)" if len(exc.errors()) > 1 else ""
        raise ConfigError(f"client config {file}: {key}: {_message(err)}{more}") from None


def _message(err: dict) -> str:
    if err["type"] == "extra_forbidden":
        return "unknown key"
    return str(err["msg"]).removeprefix("Value error, ")


def _path(value: str | None) -> str | None:
    return os.path.expanduser(value) if value else None
