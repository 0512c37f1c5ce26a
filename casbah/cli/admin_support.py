"""What `casbah admin` needs around its commands: talking to a running server's Admin
service (`--remote`), and refusing to touch a data directory a server holds.

A store is held while a process has it open: every process that opens a `disk` store
holds `<path>/open.lock` shared (docs/storage-engine.md, "Layout"), so if an exclusive
`flock` on it fails, a server (or another tool) has the store open right now.  The admin
commands then refuse instead of changing files behind that server's back (issue 13:
a scrub beside a live server left its index saying "present" for removed blobs).
"""

from __future__ import annotations

import fcntl
import os
from typing import Any

import click
import grpc

from casbah.cli.options import apply_options, credential_options
from casbah.config import ServerConfig
from casbah.reapi.channel import RemoteSpec, open_channel
from casbah.server.workers import disk_paths

#: The lock file every process holds (shared) while it has a disk store open.
OPEN_LOCK = "open.lock"


def remote_admin_options(fn: Any) -> Any:
    """`--remote` and the credentials for it: run the command inside that server."""
    return apply_options(fn, [
        click.option("--remote", envvar="CASBAH_REMOTE", metavar="URL",
                     help="Run it inside this running server: grpc://HOST:PORT, grpcs://… or unix:PATH "
                          "(needs the write scope when the server has auth)."),
        *credential_options(),
    ])


def remote_spec(kwargs: dict[str, Any]) -> RemoteSpec | None:
    url = kwargs.pop("remote")
    tls = {name: kwargs.pop(name) for name in ("server_cert", "client_key", "client_cert", "token_file")}
    return RemoteSpec(url=url, **tls) if url else None


def call_admin(spec: RemoteSpec, method: str, request: Any) -> Any:
    """One Admin call; a failure becomes a one-line error with the server's status."""
    from casbah.errors import CasbahError
    from casbah.protos.casbah.admin.v1 import admin_pb2_grpc

    try:
        with open_channel(spec) as channel:
            stub = admin_pb2_grpc.AdminStub(channel)
            return getattr(stub, method)(request, metadata=spec.metadata())
    except grpc.RpcError as err:
        code = err.code()
        hint = " (is that a casbah server of this version?)" if code == grpc.StatusCode.UNIMPLEMENTED else ""
        raise click.ClickException(f"{spec.url}: {method} failed: {code.name}: {err.details()}{hint}") from None
    except CasbahError as exc:
        raise click.ClickException(str(exc)) from None


def store_in_use(path: str) -> bool:
    """Whether another process has the disk store at `path` open (holds its open lock)."""
    try:
        fd = os.open(os.path.join(path, OPEN_LOCK), os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return False  # never opened: nobody holds it
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing drops the probe's lock
    return False


def refuse_if_served(config: ServerConfig, command: str) -> None:
    """Exit with one clear line when a running server holds any store of the config."""
    for path in disk_paths(config):
        if store_in_use(path):
            how = (f"run `casbah admin {command} --remote URL` to do it inside that server, or stop it first"
                   if command != "migrate" else "stop it first (a server migrates a store when it opens it)")
            raise click.ClickException(f"the store at {path} is open in a running server: {how}")
