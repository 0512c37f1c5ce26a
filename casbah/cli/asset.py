"""`casbah asset push|fetch`: Remote Asset calls against any server, through the one
REAPI client (so with its retries)."""

from __future__ import annotations

import sys
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import click

from casbah.cli.options import apply_options, credential_options
from casbah.client.remote import RemoteClient
from casbah.digest import Digest, DigestFunction
from casbah.errors import CasbahError, NotFound
from casbah.reapi.channel import RemoteSpec
from casbah.reapi.retry import RetryPolicy

if TYPE_CHECKING:
    from casbah.protos.build.bazel.remote.asset.v1 import remote_asset_pb2 as asset_pb2


def remote_options(fn=None, *, required: bool = True):
    """The options every command that talks to a server takes."""
    if fn is None:
        return lambda f: remote_options(f, required=required)
    return apply_options(fn, [
        click.option("--remote", envvar="CASBAH_REMOTE", required=required, metavar="URL",
                     help="grpc://HOST:PORT, grpcs://HOST:PORT or unix:PATH (env CASBAH_REMOTE)."),
        click.option("--instance", default="", help="Remote instance name."),
        *credential_options(),
    ])


def spec_from(kwargs: dict) -> RemoteSpec:
    return RemoteSpec(
        url=kwargs.pop("remote"), instance=kwargs.pop("instance"), server_cert=kwargs.pop("server_cert"),
        client_key=kwargs.pop("client_key"), client_cert=kwargs.pop("client_cert"),
        token_file=kwargs.pop("token_file"),
    )


def _qualifiers(values: tuple[str, ...]) -> list[tuple[str, str]]:
    out = []
    for value in values:
        name, sep, val = value.partition("=")
        if not sep or not name:
            raise click.BadParameter(f"{value!r}: want NAME=VALUE", param_hint="--qualifier")
        out.append((name, val))
    return out


@click.group()
def asset() -> None:
    """Remote Asset API: name content by URIs and qualifiers."""


@asset.command()
@remote_options
@click.option("--uri", "uris", multiple=True, required=True, help="URI naming the asset (repeatable).")
@click.option("--qualifier", "qualifiers", multiple=True, metavar="NAME=VALUE", help="Qualifier (repeatable).")
@click.option("--directory", is_flag=True, help="Fetch a directory asset (default: a blob).")
@click.option("--blake3", is_flag=True, help="Use the BLAKE3 digest function.")
@click.option("--timeout", type=float, help="Seconds the server may spend fetching from the origin.")
def fetch(uris: tuple[str, ...], qualifiers: tuple[str, ...], directory: bool, blake3: bool,
          timeout: float | None, **kwargs) -> None:
    """Print HASH/SIZE of the asset's blob (or root directory); exit 1 on a miss."""
    spec = spec_from(kwargs)
    function = DigestFunction.BLAKE3 if blake3 else DigestFunction.SHA256
    named = _qualifiers(qualifiers)
    # The server may spend `timeout` fetching from the origin: wait for it, and then some.
    policy = RetryPolicy(request_timeout=max(60.0, (timeout or 0) + 30))
    response: asset_pb2.FetchBlobResponse | asset_pb2.FetchDirectoryResponse
    with RemoteClient(spec, policy) as client:
        try:
            if directory:
                response = client.run(client.client.fetch_directory(list(uris), named, function, timeout))
                digest = response.root_directory_digest
            else:
                response = client.run(client.client.fetch_blob(list(uris), named, function, timeout))
                digest = response.blob_digest
        except NotFound as exc:
            click.echo(f"miss: {exc}", err=True)
            sys.exit(1)
        except CasbahError as exc:
            raise click.ClickException(f"{exc.code.name}: {exc}") from None
    click.echo(f"{digest.hash}/{digest.size_bytes}")
    if response.uri:
        click.echo(f"uri: {response.uri}", err=True)
    for q in response.qualifiers:
        click.echo(f"qualifier: {q.name}={q.value}", err=True)


@asset.command()
@remote_options
@click.option("--uri", "uris", multiple=True, required=True, help="URI naming the asset (repeatable).")
@click.option("--qualifier", "qualifiers", multiple=True, metavar="NAME=VALUE", help="Qualifier (repeatable).")
@click.option("--digest", "digest_text", required=True, metavar="HASH/SIZE", help="Content already in CAS.")
@click.option("--directory", is_flag=True, help="The digest is a root Directory (default: a blob).")
@click.option("--blake3", is_flag=True, help="Use the BLAKE3 digest function.")
@click.option("--expire-at", type=click.DateTime(), help="When the name stops being valid (UTC).")
def push(uris: tuple[str, ...], qualifiers: tuple[str, ...], digest_text: str, directory: bool, blake3: bool,
         expire_at: datetime | None, **kwargs) -> None:
    """Name content that is already in CAS."""
    spec = spec_from(kwargs)
    function = DigestFunction.BLAKE3 if blake3 else DigestFunction.SHA256
    try:
        digest = Digest.parse(digest_text, function)
    except CasbahError as exc:
        raise click.BadParameter(str(exc), param_hint="--digest") from None
    expire = expire_at.replace(tzinfo=UTC).timestamp() if expire_at is not None else None
    with RemoteClient(spec) as client:
        push_call = client.client.push_directory if directory else client.client.push_blob
        try:
            client.run(push_call(list(uris), digest, _qualifiers(qualifiers), expire))
        except CasbahError as exc:
            raise click.ClickException(f"{exc.code.name}: {exc}") from None
    click.echo(f"pushed {digest_text} as {', '.join(uris)}")
