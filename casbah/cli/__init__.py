"""The `casbah` command line.

Every command runs inside `CasbahGroup` (casbah/cli/errors.py): an expected failure is
one `Error:` line on stderr and a documented exit status; `--debug` adds the traceback.
"""

from __future__ import annotations

import asyncio
import sys

import click

from casbah.cli.errors import CasbahGroup
from casbah.config import ALL_SERVICES, ConfigError, check_address, load_config


def _setup_logging(level: str, fmt: str = "text") -> None:
    """Text or JSON lines on stderr, each carrying the ids of the request being handled."""
    from casbah.logs import setup_logging

    setup_logging(level, fmt)


#: The subcommand groups, imported only when named (see `CasbahGroup.lazy_commands`).
SUBCOMMANDS = {name: f"casbah.cli.{name}:{name}" for name in ("admin", "asset", "cache", "cas", "source")}


@click.group(cls=CasbahGroup, context_settings={"help_option_names": ["-h", "--help"]},
             lazy_commands=SUBCOMMANDS)
@click.version_option(package_name="casbah")
@click.option("--debug", is_flag=True, envvar="CASBAH_DEBUG",
              help="Print the traceback of a failure (env CASBAH_DEBUG=1).")
def main(debug: bool) -> None:
    """casbah: content-addressable storage for remote builds (REAPI, Remote Asset)."""
    CasbahGroup.debug = debug


def _addresses(ctx: click.Context, param: click.Parameter, value: tuple[str, ...] | str | None):
    """Listen addresses checked before anything starts: `127.0.0.1` alone is refused
    (grpc would pick a port), not discovered at bind time."""
    if value is None:
        return value
    try:
        for address in (value,) if isinstance(value, str) else value:
            check_address(address)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    return value


@main.command()
@click.option("--listen", "listen", multiple=True, metavar="HOST:PORT", callback=_addresses,
              help="Address to serve on (repeatable). Default 127.0.0.1:50051.")
@click.option("--data-dir", type=click.Path(file_okay=False),
              help="Where the disk storage lives. Default ./casbah-data.")
@click.option("--quota", metavar="SIZE", help="Disk quota of the default storage, e.g. 20G. Default 20G.")
@click.option("--instance", "instances", multiple=True, metavar="NAME",
              help="Extra instance name served from the same storage (repeatable).")
@click.option("--services", metavar="LIST",
              help=f"Comma-separated services to serve (default all: {','.join(ALL_SERVICES)}).")
@click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False), help="YAML config file.")
@click.option("--tls-cert", type=click.Path(exists=True, dir_okay=False), help="Server certificate (PEM): TLS.")
@click.option("--tls-key", type=click.Path(exists=True, dir_okay=False), help="Server private key (PEM).")
@click.option("--tls-client-ca", type=click.Path(exists=True, dir_okay=False),
              help="CA for client certificates: mTLS, clients without a valid certificate are refused.")
@click.option("--tokens", type=click.Path(exists=True, dir_okay=False),
              help="Bearer tokens file: 'sha256:<hex> read|write [INSTANCE...]' per line.")
@click.option("--metrics-listen", metavar="HOST:PORT", callback=_addresses,
              help="Serve /metrics and the status page here.")
@click.option("--http-listen", metavar="HOST:PORT", callback=_addresses,
              help="Also serve the HTTP cache protocol (Bazel HTTP, ccache, sccache WebDAV) here.")
@click.option("--log-format", type=click.Choice(["text", "json"]), default=None, help="Log line format.")
@click.option("--workers", default=1, show_default=True, type=click.IntRange(1, 64),
              help="Server processes sharing the port (SO_REUSEPORT); needs shareable storage.")
@click.option("--log-level", default="info", type=click.Choice(["debug", "info", "warning", "error"]))
def serve(listen: tuple[str, ...], data_dir: str | None, quota: str | None, instances: tuple[str, ...],
          services: str | None, config_file: str | None, tls_cert: str | None, tls_key: str | None,
          tls_client_ca: str | None, tokens: str | None, metrics_listen: str | None, http_listen: str | None,
          log_format: str | None,
          workers: int, log_level: str) -> None:
    """Run the REAPI server.  Flags override the config file."""
    _setup_logging(log_level, log_format or "text")
    from casbah.server.app import serve as run_server

    overrides = {"listen": list(listen) or None, "data-dir": data_dir, "quota": quota, "tls-cert": tls_cert,
                 "tls-key": tls_key, "tls-client-ca": tls_client_ca, "metrics-listen": metrics_listen,
                 "http-listen": http_listen, "log-format": log_format}
    # A failure (config, tokens file, bind, TLS material, a data dir) reaches CasbahGroup.
    config = load_config(config_file, overrides)
    config = _apply_instance_flags(config, instances, services)
    if config.log_format != (log_format or "text"):
        _setup_logging(log_level, config.log_format)  # the config file chose the format
    if tokens:
        config = config.model_copy(update={"auth": config.auth.model_copy(update={"tokens": tokens})})
    if workers > 1:
        from casbah.server.workers import run_workers

        sys.exit(run_workers(config, workers, log_level))
    try:
        asyncio.run(run_server(config))
    except KeyboardInterrupt:
        pass


def _apply_instance_flags(config, names: tuple[str, ...], services: str | None):
    """`--instance` adds names sharing the first instance's storage; `--services` applies to all."""
    instances = dict(config.instances)
    template = next(iter(instances.values()))
    for name in names:
        instances.setdefault(name, template.model_copy())
    if services is not None:
        wanted = [s.strip() for s in services.split(",") if s.strip()]
        unknown = sorted(set(wanted) - set(ALL_SERVICES))
        if unknown:
            raise ConfigError(f"--services: unknown service(s) {unknown}; known: {', '.join(ALL_SERVICES)}")
        instances = {n: i.model_copy(update={"services": wanted}) for n, i in instances.items()}
    return config.model_copy(update={"instances": instances})


if __name__ == "__main__":
    main()
