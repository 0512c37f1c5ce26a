"""HTTP(S) downloads for origin fetch, kept inside the allow-list and a size cap.

urllib's default opener follows up to ten redirects to any http, https or ftp URL
and opens file: and ftp: URLs given to it directly.  A server that downloads on
behalf of (possibly anonymous) callers must not become a proxy to whatever an
allowed origin points at: an allowed host answering `302 Location: http://intranet/`
would otherwise have the server fetch, store and serve the intranet's answer.
So the opener here has only the http and https handlers, and a redirect handler
that checks every hop (scheme http(s), the allow-list, at most MAX_REDIRECTS hops)
before a single byte is requested from the new location.

The download runs in a thread (urllib blocks); it spools to a file while hashing,
stops at the size cap (announced by Content-Length or reached while reading) and
at the deadline, and checks `stop` between chunks so the event loop can end it.
"""

from __future__ import annotations

import http.client
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path

from casbah.digest import Digest, DigestFunction
from casbah.errors import DeadlineExceeded, NotFound, PermissionDenied, ResourceExhausted, Unavailable
from casbah.storage.base import CHUNK_SIZE
from casbah.tree import hash_file

#: Redirect hops followed per download; each must pass the allow-list.
MAX_REDIRECTS = 5
HTTP_SCHEMES = ("http", "https")


class RedirectRefused(PermissionDenied):
    """The origin redirected outside the allow-list (or to a scheme other than http(s)).

    PERMISSION_DENIED is what the Remote Asset spec names for "requested an asset
    from a disallowed origin"; it goes in the response's `status`."""


class _CheckedRedirects(urllib.request.HTTPRedirectHandler):
    """Follows a redirect only when its target is an allowed http(s) URL."""

    max_redirections = MAX_REDIRECTS

    def __init__(self, allowed: Callable[[str], bool]) -> None:
        self.allowed = allowed

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # urllib's signature
        # urllib has already resolved a relative Location against the request URL.
        scheme = urllib.parse.urlsplit(newurl).scheme.lower()
        if scheme not in HTTP_SCHEMES:
            reason = "only http and https are fetched"
        elif not self.allowed(newurl):
            reason = "not in the origin allow-list"
        else:
            return super().redirect_request(req, fp, code, msg, headers, newurl)
        fp.close()  # the redirect's own body: nothing of it is read
        raise RedirectRefused(f"{req.full_url}: redirect to {newurl!r} refused ({reason})")


def make_opener(allowed: Callable[[str], bool]) -> urllib.request.OpenerDirector:
    """An opener that speaks only http(s) and checks every redirect with `allowed`.

    Built by hand rather than with `build_opener`, which would add the ftp, file
    and data handlers.  Proxies from the environment are still honoured.
    """
    opener = urllib.request.OpenerDirector()
    for handler in (urllib.request.ProxyHandler(), urllib.request.HTTPHandler(), urllib.request.HTTPSHandler(),
                    urllib.request.HTTPDefaultErrorHandler(), _CheckedRedirects(allowed),
                    urllib.request.HTTPErrorProcessor()):
        opener.add_handler(handler)
    return opener


def download(opener: urllib.request.OpenerDirector, uri: str, path: Path, function: DigestFunction,
             sri_hasher, max_size: int, deadline: float, stop: threading.Event) -> Digest:
    """Spool `uri` to `path`, hashing as it goes; `sri_hasher` (or None) is fed the same bytes.

    Raises ResourceExhausted past `max_size` bytes (the partial file is the caller's
    to remove), DeadlineExceeded past `deadline`, RedirectRefused, NotFound on 404.
    """
    # The length is not known before the body ends; gitsha1 hashes it first, so it
    # re-reads the spooled file instead (`hash_file`).
    needs_size = function is DigestFunction.GITSHA1
    hasher = None if needs_size else function.hasher()
    size = 0
    remaining = max(0.1, deadline - time.monotonic())
    try:
        with opener.open(uri, timeout=remaining) as response, open(path, "wb") as out:
            announced = (response.headers.get("Content-Length") or "").strip()
            if announced.isascii() and announced.isdigit() and int(announced) > max_size:
                raise ResourceExhausted(f"{uri}: the origin announces {announced} bytes, more than the "
                                        f"origin-fetch size cap of {max_size} bytes")
            # read1: whatever has arrived, so a slow trickle still reaches the deadline check.
            while chunk := response.read1(CHUNK_SIZE):
                if stop.is_set() or time.monotonic() > deadline:
                    raise DeadlineExceeded(f"{uri}: origin fetch exceeded its timeout")
                size += len(chunk)
                if size > max_size:
                    raise ResourceExhausted(f"{uri}: the origin sent more than the origin-fetch size cap of "
                                            f"{max_size} bytes")
                if hasher is not None:
                    hasher.update(chunk)
                if sri_hasher is not None:
                    sri_hasher.update(chunk)
                out.write(chunk)
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            raise NotFound(f"{uri}: origin answered 404") from None
        if exc.code in (301, 302, 303, 307, 308):  # a loop, too many hops, or no Location
            raise RedirectRefused(f"{uri}: redirect not followed (HTTP {exc.code}: a loop, no Location, or more "
                                  f"than {MAX_REDIRECTS} hops)") from None
        raise Unavailable(f"{uri}: origin answered HTTP {exc.code}") from None
    except urllib.error.URLError as exc:
        if isinstance(exc.reason, TimeoutError) or "timed out" in str(exc):
            raise DeadlineExceeded(f"{uri}: origin fetch timed out") from None
        raise Unavailable(f"{uri}: {exc.reason}") from None
    except OSError as exc:
        if isinstance(exc, TimeoutError) or "timed out" in str(exc):
            raise DeadlineExceeded(f"{uri}: origin fetch timed out") from None
        raise Unavailable(f"{uri}: {exc}") from None
    except http.client.HTTPException as exc:  # e.g. IncompleteRead: the origin hung up mid-body
        raise Unavailable(f"{uri}: {type(exc).__name__}: {exc}") from None
    if hasher is None:
        return hash_file(path, function)
    return Digest(hasher.hexdigest(), size, function)
