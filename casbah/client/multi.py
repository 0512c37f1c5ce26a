"""Several remotes for the local cache, as BuildStream 1's CASCache had them: a pull is
served by the first remote that has the ref, a push goes to every push remote.

A remote that is down, lacks the ref or fails otherwise does not end a pull: the
next is tried and the reasons are kept to report.  A push failure on one remote is
reported and makes the whole push fail, but only after every other remote was pushed,
so one bad mirror does not leave the rest stale.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from casbah.client.remote import RemoteClient
from casbah.client.sync import DEFAULT_URI_TEMPLATE, SyncSummary, pull, push
from casbah.errors import CasbahError, NotFound
from casbah.reapi.channel import RemoteSpec

if TYPE_CHECKING:  # sync's own import, so this module follows the local cache wherever it lives
    from casbah.client.sync import LocalCache

log = logging.getLogger(__name__)

#: Opens a client for a remote (tests may pass a factory with a shorter retry policy).
ClientFactory = Callable[[RemoteSpec], RemoteClient]


def describe(spec: RemoteSpec) -> str:
    return spec.url + (f" (instance {spec.instance!r})" if spec.instance else "")


@dataclass
class PushResult:
    spec: RemoteSpec
    summary: SyncSummary | None = None
    error: str = ""


@dataclass
class PullResult:
    spec: RemoteSpec | None = None
    summary: SyncSummary | None = None
    #: (remote, why it did not serve), for the remotes tried before the one that did.
    skipped: list[tuple[RemoteSpec, str]] = field(default_factory=list)


class NoRemoteServed(NotFound):
    """No remote had the ref (or every one failed)."""


def push_all(cache: LocalCache, specs: list[RemoteSpec], name: str, publish: str = "asset",
             uri_template: str = DEFAULT_URI_TEMPLATE, show_progress: bool = False,
             open_client: ClientFactory = RemoteClient) -> list[PushResult]:
    """Push `name` to every remote in `specs`, in order; one result each."""
    results = []
    for spec in specs:
        result = PushResult(spec)
        try:
            with open_client(spec) as client:
                result.summary = push(cache, client, name, publish, uri_template, show_progress)
        except (CasbahError, OSError) as exc:
            result.error = _reason(exc)
            log.debug("push of %s to %s failed: %s", name, spec.url, result.error)
        results.append(result)
    return results


def pull_first(cache: LocalCache, specs: list[RemoteSpec], name: str, publish: str = "asset",
               uri_template: str = DEFAULT_URI_TEMPLATE, show_progress: bool = False,
               open_client: ClientFactory = RemoteClient) -> PullResult:
    """Pull `name` from the first remote of `specs` that serves it; NoRemoteServed (one
    line per remote tried) when none does.  A local miss of a ref found on a later
    remote is fine: pulls only fetch what the cache lacks, so a partial earlier attempt
    only saves work."""
    result = PullResult()
    for spec in specs:
        try:
            with open_client(spec) as client:
                result.summary = pull(cache, client, name, publish, uri_template, show_progress)
        except (CasbahError, OSError) as exc:
            result.skipped.append((spec, _reason(exc)))
            log.debug("pull of %s from %s: %s; trying the next remote", name, spec.url, _reason(exc))
            continue
        result.spec = spec
        return result
    tried = "; ".join(f"{describe(spec)}: {why}" for spec, why in result.skipped)
    raise NoRemoteServed(f"no remote served {name!r} ({tried})")


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.strerror}: {exc.filename}" if exc.filename else exc.strerror
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
