"""The transport-failure rule shared by every client of an upstream."""

from __future__ import annotations

import grpc

from casbah.reapi.retry import RetryPolicy, transport_code


def test_broken_connections_are_unavailable_whatever_code_grpc_gave() -> None:
    # What grpc-core says when the peer is SIGKILLed in the middle of a stream (seen in CI).
    assert transport_code(grpc.StatusCode.INTERNAL, "Internal error from Core") == grpc.StatusCode.UNAVAILABLE
    assert transport_code(grpc.StatusCode.UNKNOWN, "Stream removed") == grpc.StatusCode.UNAVAILABLE
    # A real server-side INTERNAL stays INTERNAL: retrying a bug only repeats it.
    assert transport_code(grpc.StatusCode.INTERNAL, "FindMissingBlobs: internal error: KeyError") \
        == grpc.StatusCode.INTERNAL
    assert transport_code(grpc.StatusCode.INVALID_ARGUMENT, "Socket closed") == grpc.StatusCode.INVALID_ARGUMENT


def test_only_transient_codes_are_retried() -> None:
    policy = RetryPolicy()
    assert policy.retryable(grpc.StatusCode.UNAVAILABLE, idempotent=False)
    assert policy.retryable(grpc.StatusCode.DEADLINE_EXCEEDED, idempotent=True)
    assert not policy.retryable(grpc.StatusCode.DEADLINE_EXCEEDED, idempotent=False)
    assert not policy.retryable(grpc.StatusCode.INVALID_ARGUMENT, idempotent=True)
    delays = [policy.delay(n) for n in range(10)]
    assert all(0 <= d <= policy.max_backoff for d in delays)
