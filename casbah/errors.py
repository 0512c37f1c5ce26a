"""The one exception hierarchy of casbah and its one mapping to gRPC status codes.

Storage, indexes and services raise these; the servicer wrapper in
`casbah.server.base` turns them into a gRPC status by `status_code()`.  Keeping the
table here means a backend never imports grpc to report a miss.
"""

from __future__ import annotations

import errno
import sqlite3

import grpc


class CasbahError(Exception):
    """Base class: every error casbah reports to a client on purpose."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL


class InvalidArgument(CasbahError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class DigestMismatch(InvalidArgument):
    """Uploaded data does not hash to (or is not the size of) its digest.
    Clients must not retry this: the data is wrong, not the server."""


class InvalidTree(InvalidArgument):
    """A tree breaks the REAPI's rules for Directory messages (a bad or misplaced name,
    or a blob that is not a Directory).

    INVALID_ARGUMENT where a client hands the tree in (push, update); a service that
    *serves* a stored tree answers FAILED_PRECONDITION instead (`tree_rules.served`),
    because there the request is fine and the stored content is what is wrong.
    """


class NotFound(CasbahError):
    code = grpc.StatusCode.NOT_FOUND


class BlobNotFound(NotFound):
    """Raised by a storage read before any data is produced."""

    def __init__(self, digest: object, detail: str = "") -> None:
        self.digest = digest
        super().__init__(f"blob {digest} not found{': ' + detail if detail else ''}")


class ActionResultNotFound(NotFound):
    """An ActionCache backend has no entry for the action (raised by `get`, never a None)."""

    def __init__(self, action: object, detail: str = "") -> None:
        self.action = action
        super().__init__(f"no ActionResult for action {action}{': ' + detail if detail else ''}")


class AssetNotFound(NotFound):
    """No asset (or BuildStream reference) matches: a client's Remote Asset or reference lookup missed."""


class OutOfRange(CasbahError):
    code = grpc.StatusCode.OUT_OF_RANGE


class FailedPrecondition(CasbahError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class PermissionDenied(CasbahError):
    code = grpc.StatusCode.PERMISSION_DENIED


class Unauthenticated(CasbahError):
    code = grpc.StatusCode.UNAUTHENTICATED


class ResourceExhausted(CasbahError):
    """Quota or limits: the server is healthy but cannot take this now."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(CasbahError):
    """A backend (remote server, database) cannot be reached; retrying may help."""

    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(CasbahError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Aborted(CasbahError):
    code = grpc.StatusCode.ABORTED


class DataLoss(CasbahError):
    """Bytes read from a store casbah does not control (an upstream, S3, Redis) do not
    hash to (or are not the size of) the digest they were asked for.  Never served,
    never cached: the copy is corrupt or the store lies, and the client may try again
    (another replica, a later repair) but must not receive the bytes."""

    code = grpc.StatusCode.DATA_LOSS


class AlreadyExists(CasbahError):
    """The thing to create exists in another form (SpliceBlob of a blob the server
    keeps with a different chunking)."""

    code = grpc.StatusCode.ALREADY_EXISTS


class Unsupported(CasbahError):
    """The backend cannot do this operation at all (e.g. delete on a remote)."""

    code = grpc.StatusCode.UNIMPLEMENTED


class StartupError(FailedPrecondition):
    """Something an operator must fix before a server can start (an address that cannot
    be bound, unusable TLS material): reported as one line by the CLI, exit 1."""


#: Every status by its wire number (`google.rpc.Status.code`, `set_code(int)`).
_BY_INT: dict[int, grpc.StatusCode] = {code.value[0]: code for code in grpc.StatusCode}


def code_from_int(value: int) -> grpc.StatusCode:
    """The status a wire number stands for (a per-blob `google.rpc.Status`, or an int
    a foreign handler passed to `set_code`); a number gRPC does not define is UNKNOWN."""
    return _BY_INT.get(value, grpc.StatusCode.UNKNOWN)


def code_to_int(code: grpc.StatusCode) -> int:
    """The wire number of a status, for `google.rpc.Status.code` in per-blob answers."""
    return code.value[0]


def status_code(exc: BaseException) -> grpc.StatusCode:
    """The gRPC status for any exception: ours by class, anything else INTERNAL."""
    if isinstance(exc, CasbahError):
        return exc.code
    if isinstance(exc, TimeoutError):
        return grpc.StatusCode.DEADLINE_EXCEEDED
    if is_no_space(exc):  # a store that did not name itself (see `from_os_error`): still no INTERNAL
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    return grpc.StatusCode.INTERNAL


_BY_CODE: dict[grpc.StatusCode, type[CasbahError]] = {
    cls.code: cls
    for cls in (
        InvalidArgument,
        NotFound,
        OutOfRange,
        FailedPrecondition,
        PermissionDenied,
        Unauthenticated,
        ResourceExhausted,
        Unavailable,
        DeadlineExceeded,
        Aborted,
        AlreadyExists,
        DataLoss,
        Unsupported,
    )
}


def from_status(code: grpc.StatusCode, message: str) -> CasbahError:
    """The reverse table, for clients and the remote backend: a remote's status
    becomes the same exception a local backend would raise."""
    cls = _BY_CODE.get(code, CasbahError)
    err = cls(message)
    if cls is CasbahError:
        err.code = code
    return err


#: Longest piece of client input an error message repeats (a resource name, an instance name, a URI).
ECHO_LIMIT = 160


def echo(value: object, limit: int = ECHO_LIMIT) -> str:
    """`repr(value)` cut to `limit` characters, for repeating client input in an error.

    A status message travels in a header: a 100 KB instance name echoed whole would
    push the answer over a client's metadata limit (16 KiB by default) and turn a
    precise INVALID_ARGUMENT into the client's own RESOURCE_EXHAUSTED.
    """
    text = repr(value)
    if len(text) <= limit:
        return text
    return f"{text[:limit]}…({len(text)} characters)"


#: `errno` values that mean "the store is full", whatever the filesystem.
_NO_SPACE = {errno.ENOSPC, errno.EDQUOT}
#: SQLite's result code for "database or disk is full".
_SQLITE_FULL = 13


def is_no_space(exc: BaseException) -> bool:
    """Whether `exc` says a store ran out of space: ENOSPC/EDQUOT, or SQLite's FULL."""
    if isinstance(exc, OSError):
        return exc.errno in _NO_SPACE
    if isinstance(exc, sqlite3.Error):
        return getattr(exc, "sqlite_errorcode", None) == _SQLITE_FULL or "database or disk is full" in str(exc)
    return False


def from_os_error(exc: BaseException, what: str) -> BaseException:
    """The error a store reports for `exc`, raised while doing `what` (naming the store).

    No space (ENOSPC, EDQUOT, SQLite FULL) is RESOURCE_EXHAUSTED: the server is healthy,
    reads go on, and a write succeeds again once space returns (eviction, an operator),
    so clients retry it with backoff.  Anything else is returned as it is.
    """
    if is_no_space(exc):
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        err = ResourceExhausted(f"{what}: no space left ({reason}); retry later")
        err.__cause__ = exc
        return err
    return exc
