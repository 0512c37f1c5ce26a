"""Command-line options shared by every command that talks to a server.

Defined once so the flag names and their help read the same in `cas`, `cache`, `asset`,
`source` and `admin`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click


def credential_options() -> list[Callable[[Any], Any]]:
    """The TLS and token options of every command that talks to a server (one definition,
    so their names and help agree everywhere)."""
    return [
        click.option("--server-cert", type=click.Path(exists=True), help="CA certificate for grpcs://."),
        click.option("--client-key", type=click.Path(exists=True), help="Client key for mTLS."),
        click.option("--client-cert", type=click.Path(exists=True), help="Client certificate for mTLS."),
        click.option("--token-file", type=click.Path(exists=True), help="File holding a bearer token."),
    ]


def apply_options(fn: Any, options: list[Callable[[Any], Any]]) -> Any:
    """Decorate `fn` with `options`, listed in the order `--help` shows them."""
    for option in reversed(options):
        fn = option(fn)
    return fn
