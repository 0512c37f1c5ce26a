"""Server configuration: a validated YAML file, `${VAR}` expansion, CLI overrides.

The file declares listeners, named storage nodes (shared by reference) and
instances.  A storage node is a mapping with a `kind` and that kind's options;
wherever a node is expected, a string names a node of `storages:` instead, so one
disk store can back several instances or sit under several decorators.  Each
kind's options are validated by the model its module registers with the loader.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from casbah.digest import DEFAULT_FUNCTIONS, DigestFunction
from casbah.errors import InvalidArgument

DEFAULT_LISTEN = "127.0.0.1:50051"
DEFAULT_DATA_DIR = "./casbah-data"
DEFAULT_QUOTA = "20G"
ALL_SERVICES = ("capabilities", "cas", "bytestream", "action-cache", "asset", "references")

_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([kmgtp]?)(i?b?)?\s*", re.IGNORECASE | re.ASCII)  # fullmatch only
_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


class ConfigError(InvalidArgument):
    """A config problem, with the offending key in the message."""


def parse_size(value: int | str) -> int:
    """`20G`, `512MiB`, `1.5T` or a plain byte count.  Units are binary (1K = 1024)."""
    if isinstance(value, int):
        return value
    match = _SIZE.fullmatch(str(value))
    if not match:
        raise ValueError(f"{value!r} is not a size (examples: 1048576, 512M, 20G, 1.5TiB)")
    number, unit = float(match.group(1)), match.group(2).lower()
    return int(number * 1024 ** "bkmgtp".index(unit or "b"))


def check_address(address: str) -> str:
    """`HOST:PORT`, `[IPV6]:PORT` or `unix:PATH`, checked before anything binds: a
    missing or non-numeric port is an error here, not a surprise at bind time (grpc
    would take `127.0.0.1` alone as port 443)."""
    if address.startswith("unix:"):
        if not address.removeprefix("unix:").removeprefix("//"):
            raise ValueError(f"{address!r}: a unix socket needs a path (unix:PATH)")
        return address
    host, sep, port = address.rpartition(":")
    if not sep or (host.startswith("[") != host.endswith("]")) or (":" in host and not host.startswith("[")):
        raise ValueError(f"{address!r} needs a port (HOST:PORT, e.g. 127.0.0.1:50051, or [::1]:50051)")
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{address!r}: the port {port!r} is not a number from 0 to 65535")
    if not host.strip("[]"):
        raise ValueError(f"{address!r} needs a host (HOST:PORT; 0.0.0.0:{port} for every interface)")
    return address


def expand_env(value: Any, where: str = "") -> Any:
    """Replace `${VAR}` and `${VAR:-default}` in every string of a loaded YAML tree."""
    if isinstance(value, str):
        def repl(match: re.Match) -> str:
            name, default = match.group(1), match.group(2)
            if name in os.environ:
                return os.environ[name]
            if default is not None:
                return default
            raise ConfigError(f"{where or 'config'}: environment variable ${{{name}}} is not set")
        return _ENV.sub(repl, value)
    if isinstance(value, dict):
        return {k: expand_env(v, f"{where}.{k}" if where else str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [expand_env(v, f"{where}[{i}]") for i, v in enumerate(value)]
    return value


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True, validate_default=True)


class OriginFetchConfig(_Model):
    """Opt-in: on an asset miss, download from the origin when a URI matches `allow`."""

    allow: list[str] = Field(min_length=1, description="regular expressions matched against the start of a URI")
    git: str = "git"
    #: Largest download one fetch may make (a blob, or a git fetch and its checkout);
    #: unset: 4G, or the instance store's quota when that is smaller.
    max_size: int | str | None = Field(default=None, alias="max-size")

    @field_validator("max_size")
    @classmethod
    def _size(cls, value: int | str | None) -> int | None:
        if value is None:
            return None
        size = parse_size(value)
        if size <= 0:
            raise ValueError("must be a positive size")
        return size


class ChunkingConfig(_Model):
    """FastCDC 2020 parameters an instance splits blobs with and advertises (docs/chunking.md)."""

    #: Off: SplitBlob/SpliceBlob answer UNIMPLEMENTED and are not advertised.
    enabled: bool = True
    #: Average chunk size, a power of 2 from 1 KiB to 1 MiB; min is a quarter, max four times it.
    avg_chunk_size: int | str = Field(default="512K", alias="avg-chunk-size")
    seed: int = Field(default=0, ge=0, lt=1 << 32)  # uint32 on the wire

    @field_validator("avg_chunk_size")
    @classmethod
    def _avg(cls, value: int | str) -> int:
        size = parse_size(value)
        if not 1024 <= size <= 1 << 20 or size & (size - 1):
            raise ValueError(f"{size} must be a power of 2 from 1K to 1M")
        return size


class InstanceConfig(_Model):
    """One instance name: its CAS storage, its ActionCache, and what it serves."""

    storage: str | dict[str, Any] = "default"
    action_cache: str | dict[str, Any] | None = Field(default=None, alias="action-cache")
    services: list[str] = Field(default_factory=lambda: list(ALL_SERVICES))
    #: Report an ActionCache entry as missing when its outputs are gone from CAS.
    check_action_results: bool = Field(default=True, alias="check-action-results")
    read_only: bool = Field(default=False, alias="read-only")
    #: Overrides `auth.anonymous` for this instance (e.g. a public read-only mirror).
    anonymous: str | None = Field(default=None, pattern="^(read-write|read-only|none)$")
    #: Where Remote Asset and ReferenceStorage names live: `sqlite` (persistent, under
    #: data-dir/assets/), `memory`, or {kind: sqlite, path: FILE}.
    asset_index: str | dict[str, Any] = Field(default="sqlite", alias="asset-index")
    #: How an asset miss is answered: `auto` (RPC NOT_FOUND for Bazel, response status
    #: for everyone else), `status`, or `rpc-error`.
    asset_miss: str = Field(default="auto", alias="asset-miss", pattern="^(auto|status|rpc-error)$")
    origin_fetch: OriginFetchConfig | None = Field(default=None, alias="origin-fetch")
    #: Where the HTTP front keeps opaque entries (ccache, sccache, non-ActionResult `/ac/`):
    #: a storage node with `verify: false`; default the `opaque` node (disk under data-dir).
    opaque_store: str | dict[str, Any] | None = Field(default=None, alias="opaque-store")
    #: The digest functions this instance serves and advertises, by REAPI lowercase name.
    #: Default: all but sha1 and md5, which legacy clients may have enabled per instance.
    digest_functions: list[str] = Field(
        default_factory=lambda: [f.value for f in DEFAULT_FUNCTIONS], alias="digest-functions", min_length=1
    )

    #: Where split records of spliced and split blobs live (blob digest -> chunk list): a
    #: storage node with `verify: false`; default the `splits` node (disk under data-dir).
    split_index: str | dict[str, Any] | None = Field(default=None, alias="split-index")
    chunking: ChunkingConfig = Field(default_factory=ChunkingConfig)

    @field_validator("digest_functions")
    @classmethod
    def _known_functions(cls, value: list[str]) -> list[str]:
        known = [f.value for f in DigestFunction]
        unknown = [v for v in value if v not in known]
        if unknown:
            raise ValueError(f"unknown digest function(s) {unknown}; casbah computes: {', '.join(known)}")
        if len(set(value)) != len(value):
            raise ValueError(f"digest function listed twice in {value}")
        return value

    @field_validator("services")
    @classmethod
    def _known_services(cls, value: list[str]) -> list[str]:
        unknown = sorted(set(value) - set(ALL_SERVICES))
        if unknown:
            raise ValueError(f"unknown service(s) {unknown}; known: {', '.join(ALL_SERVICES)}")
        return value


class ListenerConfig(_Model):
    """One address: `HOST:PORT` or `unix:PATH`, optionally with TLS (and mTLS)."""

    address: str
    tls_cert: str | None = Field(default=None, alias="tls-cert")
    tls_key: str | None = Field(default=None, alias="tls-key")
    #: CA bundle that client certificates must chain to; set = mTLS required.
    tls_client_ca: str | None = Field(default=None, alias="tls-client-ca")
    #: File mode of a unix socket, e.g. "0660" (group members may connect).
    unix_mode: str | None = Field(default=None, alias="unix-mode", pattern="^0?[0-7]{3}$")

    @field_validator("address")
    @classmethod
    def _address(cls, value: str) -> str:
        return check_address(value)


class LimitsConfig(_Model):
    """Protection against overload and slow clients; every value has a sane default."""

    #: Calls whose handlers run at once; further calls wait (casbah.server.admission).
    max_concurrent_rpcs: int = Field(default=2000, alias="max-concurrent-rpcs", gt=0)
    #: Calls that may wait for a slot; beyond, RESOURCE_EXHAUSTED with a RetryInfo.
    max_queued_rpcs: int = Field(default=10000, alias="max-queued-rpcs", ge=0)
    #: Above a burst's size, so HTTP/2 never refuses (REFUSED_STREAM) what casbah would queue.
    max_streams_per_connection: int = Field(default=4096, alias="max-streams-per-connection", gt=0)
    upload_bytes_in_flight: int | str = Field(default="2G", alias="upload-bytes-in-flight")
    #: Seconds a streaming call may wait for the client's next message.
    idle_timeout: float = Field(default=60.0, alias="idle-timeout", gt=0)
    #: Seconds a connection with no call in progress stays open.
    connection_idle: float = Field(default=600.0, alias="connection-idle", gt=0)

    @field_validator("upload_bytes_in_flight")
    @classmethod
    def _size(cls, value: int | str) -> int:
        return parse_size(value)


class AuthConfig(_Model):
    """Who may read and write.  With no method configured, anonymous clients may write."""

    #: `read-write`, `read-only` or `none`; default: read-write when no other method is set, else none.
    anonymous: str | None = Field(default=None, pattern="^(read-write|read-only|none)$")
    #: File of `sha256:<hex of token> read|write [INSTANCE…]` lines.
    tokens: str | None = None
    jwt: dict[str, Any] | None = None
    #: mTLS client subject (or CN) -> "read|write [INSTANCE…]".
    mtls_subjects: dict[str, str] = Field(default_factory=dict, alias="mtls-subjects")
    #: `any` (write scope suffices) or `authenticated` (anonymous writers may not poison the ActionCache).
    action_cache_writers: str = Field(default="any", alias="action-cache-writers", pattern="^(any|authenticated)$")


class ServerConfig(_Model):
    listen: list[str | ListenerConfig] = Field(default_factory=lambda: [DEFAULT_LISTEN])
    tls_cert: str | None = Field(default=None, alias="tls-cert")
    tls_key: str | None = Field(default=None, alias="tls-key")
    tls_client_ca: str | None = Field(default=None, alias="tls-client-ca")
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    auth: AuthConfig = Field(default_factory=AuthConfig)
    metrics_listen: str | None = Field(default=None, alias="metrics-listen")
    #: `HOST:PORT` of the HTTP cache front (Bazel HTTP, ccache, sccache WebDAV); off when unset.
    http_listen: str | None = Field(default=None, alias="http-listen")
    log_format: str = Field(default="text", alias="log-format", pattern="^(text|json)$")
    data_dir: str = Field(default=DEFAULT_DATA_DIR, alias="data-dir")
    quota: int | str = DEFAULT_QUOTA
    #: Largest gRPC message the server accepts or sends.
    max_message_size: int | str = Field(default="64M", alias="max-message-size")
    #: Advertised max_batch_total_size_bytes.  2 MiB leaves room for ~26,000 blobs' worth
    #: of protobuf overhead in a BatchReadBlobs response that a client with gRPC's
    #: default 4 MiB receive limit must accept.
    max_batch_size: int | str = Field(default="2M", alias="max-batch-size")
    storages: dict[str, dict[str, Any]] = Field(default_factory=dict)
    instances: dict[str, InstanceConfig] = Field(default_factory=dict)
    grace_seconds: float = Field(default=30.0, alias="grace-seconds")
    #: Seconds between checks of the TLS and tokens files for changes (SIGHUP reloads at once).
    reload_interval: float = Field(default=5.0, alias="reload-interval", gt=0)
    #: Seconds between purges of expired Remote Asset entries.
    asset_purge_interval: float = Field(default=600.0, alias="asset-purge-interval", gt=0)

    @field_validator("listen")
    @classmethod
    def _addresses(cls, value: list[str | ListenerConfig]) -> list[str | ListenerConfig]:
        for item in value:
            if isinstance(item, str):
                check_address(item)
        return value

    @field_validator("metrics_listen")
    @classmethod
    def _metrics_address(cls, value: str | None) -> str | None:
        if value is not None and value.startswith("unix:"):
            raise ValueError(f"{value!r}: the metrics endpoint listens on HOST:PORT")
        return check_address(value) if value is not None else None

    @field_validator("quota", "max_message_size", "max_batch_size")
    @classmethod
    def _size(cls, value: int | str) -> int:
        return parse_size(value)

    def with_defaults(self) -> ServerConfig:
        """Fill in the embedded default: disk under data-dir, one instance ''."""
        data = Path(self.data_dir)
        storages = dict(self.storages)
        storages.setdefault("default", {"kind": "disk", "path": str(data / "cas"), "max-size": self.quota})
        storages.setdefault(
            "action-cache", {"kind": "disk", "path": str(data / "ac"), "max-size": "1G", "verify": False}
        )
        # Opaque HTTP entries (ccache, sccache): their own node, so no REAPI call reaches them.
        storages.setdefault(
            "opaque", {"kind": "disk", "path": str(data / "opaque"), "max-size": max(self.quota // 4, 1 << 20),
                       "verify": False}
        )
        # Split records (SpliceBlob/SplitBlob): small, keyed by the blob digest, not its hash.
        storages.setdefault(
            "splits", {"kind": "disk", "path": str(data / "splits"), "max-size": "1G", "verify": False}
        )
        instances = dict(self.instances) or {"": InstanceConfig()}
        for inst in instances.values():
            if inst.action_cache is None:
                inst.action_cache = "action-cache"
            if inst.split_index is None:
                inst.split_index = "splits"
        return self.model_copy(update={"storages": storages, "instances": instances})

    def listeners(self) -> list[ListenerConfig]:
        """Every listener, plain addresses getting the top-level TLS settings."""
        out = []
        for item in self.listen:
            if isinstance(item, str):
                item = ListenerConfig(address=item, tls_cert=self.tls_cert, tls_key=self.tls_key,
                                      tls_client_ca=self.tls_client_ca)
            out.append(item)
        return out


def format_validation_error(exc: ValidationError, source: str) -> str:
    lines = [f"invalid configuration in {source}:"]
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"])
        lines.append(f"  {key}: {err['msg']}")
    return "\n".join(lines)


def load_config(path: str | os.PathLike | None, overrides: dict[str, Any] | None = None) -> ServerConfig:
    """Load, expand and validate; command-line `overrides` win over the file."""
    raw: dict[str, Any] = {}
    source = "command line"
    if path is not None:
        source = str(path)
        try:
            loaded = yaml.safe_load(Path(path).read_text())
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
            raise ConfigError(f"cannot read config {path}: {exc}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config {path} must be a mapping at the top level")
        raw = expand_env(loaded or {})
    for key, value in (overrides or {}).items():
        if value is not None:
            raw[key] = value
    try:
        return ServerConfig.model_validate(raw).with_defaults()
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, source)) from None
