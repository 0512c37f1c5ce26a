"""A startup warning when the server is reachable from other machines without credentials.

casbah's defaults suit one developer's machine: it listens on 127.0.0.1 and, with
no authentication configured, anonymous callers may read and write.  The same
defaults on `0.0.0.0` let anyone on the network poison every build that reads the
cache (ActionCache entries and Remote Asset names are not verified against
anything), so the operator is told once, at startup, in the log.
"""

from __future__ import annotations

import ipaddress
import logging

from casbah.config import ListenerConfig
from casbah.server.base import Instances

log = logging.getLogger("casbah.server")


def is_loopback(address: str) -> bool:
    """True for unix sockets, `localhost`, 127.0.0.0/8 and ::1; False for any other
    address, wildcard (`0.0.0.0`, `[::]`, `:PORT`) or host name (it may resolve anywhere)."""
    if address.startswith(("unix:", "unix-abstract:")):
        return True
    host = address.removeprefix("ipv4:").removeprefix("ipv6:")
    if host.startswith("["):
        host = host[1:host.find("]")] if "]" in host else host[1:]
    else:
        try:
            return _loopback_ip(host)  # a bare IPv6 address without a port
        except ValueError:
            host = host.rpartition(":")[0] if ":" in host else host
    if host.lower() == "localhost":
        return True
    try:
        return _loopback_ip(host)
    except ValueError:
        return False


def _loopback_ip(text: str) -> bool:
    ip = ipaddress.ip_address(text)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped.is_loopback
    return ip.is_loopback


def warn_if_exposed(listeners: list[ListenerConfig], instances: Instances) -> None:
    """One WARNING line when a network-reachable listener lets anonymous callers write,
    a milder INFO line when they may only read.

    A listener that requires client certificates (`tls-client-ca`) is not open to
    anonymous callers whatever `auth.anonymous` says: only holders of a certificate
    from that CA get a connection.
    """
    exposed = [item.address for item in listeners if not is_loopback(item.address) and not item.tls_client_ca]
    if not exposed:
        return
    authorizer = instances.authorizer
    writable, readable = [], []
    for instance in instances:
        scopes = authorizer.anonymous_for(instance.name).scopes
        if "write" in scopes and not instance.read_only:
            writable.append(repr(instance.name))
        elif "read" in scopes:
            readable.append(repr(instance.name))
    where = ", ".join(exposed)
    if writable:
        log.warning(
            "%s is reachable from other machines and anonymous callers may WRITE instance(s) %s: anyone who can "
            "connect can poison the builds that read this cache. Configure auth (tokens, jwt or mtls-subjects) "
            "and auth.anonymous: none or read-only, or listen on 127.0.0.1 (see docs/security.md)",
            where, ", ".join(writable),
        )
    elif readable:
        log.info(
            "%s is reachable from other machines and anonymous callers may read instance(s) %s without "
            "credentials (auth.anonymous: read-only); see docs/security.md if that is not intended",
            where, ", ".join(readable),
        )
