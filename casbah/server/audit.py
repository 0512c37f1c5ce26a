"""The audit log (`casbah.audit`) of writes, written when the write's call ends, with its outcome.

`Authorizer.check` allows a write before it happens; an audit log that said "WRITE"
then would name content that a full disk or a lost connection kept out of the store.
So the line waits in the call's context (grpc.aio runs each call in its own
contextvars Context) until the `rpc` wrapper (`casbah.server.base`) ends the call
and writes it with `: OK` or the status.
"""

from __future__ import annotations

import contextvars
import logging

audit = logging.getLogger("casbah.audit")

#: The audit line of the write the current call was allowed to make, written with its
#: outcome when the call ends (`finish_write_audit`): an audit log that said "WRITE" for
#: pushes that then failed would name content that is not there.
_PENDING: contextvars.ContextVar[list | None] = contextvars.ContextVar("casbah_pending_audit", default=None)
#: Set by the `rpc` wrapper: the current call writes its pending audit line when it ends.
_IN_CALL: contextvars.ContextVar[bool] = contextvars.ContextVar("casbah_in_call", default=False)


def begin_call() -> None:
    """A call starts: no write audited yet (each grpc.aio call has its own context)."""
    _PENDING.set(None)
    _IN_CALL.set(True)


def note_write_outcome(outcome: str) -> None:
    """The outcome a handler reports for its write when the call's status says too little
    (BatchUpdateBlobs answers OK with a status per blob)."""
    pending = _PENDING.get()
    if pending is not None:
        pending[2] = outcome


def finish_write_audit(outcome: str) -> None:
    """Write the call's pending `WRITE …` audit line, ending `: <outcome>` (OK, or the status)."""
    pending = _PENDING.get()
    if pending is None:
        return
    _PENDING.set(None)
    fmt, args, override = pending
    audit.info(fmt + ": %s", *args, override or outcome)


def audit_write_when_done(fmt: str, args: tuple) -> None:
    """Hold the audit line of an allowed write until the call's outcome is known; outside a
    call wrapped by `casbah.server.base.rpc` (nothing will finish it) write it at once."""
    if not _IN_CALL.get():
        audit.info(fmt + ": %s", *args, "allowed")
        return
    if _PENDING.get() is not None:  # a second write in one call: the first one's line is not lost
        finish_write_audit("OK")
    _PENDING.set([fmt, args, None])
