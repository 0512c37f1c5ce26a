"""The remotes of `casbah cache push|pull`: `--remote` (repeatable) or the client
config's `remotes:` list (casbah/client/config.py)."""

from __future__ import annotations

import click

from casbah.cli.options import apply_options, credential_options
from casbah.client.config import config_path, load_client_config
from casbah.reapi.channel import RemoteSpec


def remotes_options(fn):
    """`--remote` repeatable; the TLS and token options apply to every `--remote` given
    (remotes that differ go in the config file, each with its own)."""
    return apply_options(fn, [
        click.option("--remote", "remotes", multiple=True, envvar="CASBAH_REMOTE", metavar="URL",
                     help="grpc://HOST:PORT, grpcs://HOST:PORT or unix:PATH (repeatable; env CASBAH_REMOTE). "
                          "Default: the remotes of the client config file."),
        click.option("--instance", default="", help="Remote instance name (for every --remote)."),
        *credential_options(),
    ])


def specs_from(kwargs: dict, for_push: bool) -> list[RemoteSpec]:
    """The remotes to use: every `--remote` given, else the config file's (for a push,
    its `push: true` ones).  Consumes the options from `kwargs`."""
    urls = kwargs.pop("remotes")
    common = {key: kwargs.pop(key) for key in ("instance", "server_cert", "client_key", "client_cert", "token_file")}
    if urls:
        return [RemoteSpec(url=url, push=True, **common) for url in urls]
    configured = [entry.spec() for entry in load_client_config().remotes]
    if for_push:
        configured = [spec for spec in configured if spec.push]
    if not configured:
        what = "remotes with `push: true`" if for_push else "remotes"
        raise click.UsageError(f"no remote: give --remote URL, or list {what} in {config_path()}")
    return configured
