"""The varint codec the hand-encoded messages share (casbah/reapi/wire.py): every length
round-trips, and a varint cut short or over ten bytes is a ValueError, never a loop
past the end or a silently wrong value (the server's FindMissingBlobs parse relies on
that to hand a malformed request to protobuf)."""

from __future__ import annotations

import pytest

from casbah.reapi.wire import read_varint, varint


@pytest.mark.parametrize("value", [0, 1, 127, 128, 300, 16_383, 16_384, 1 << 35, (1 << 63) - 1, (1 << 64) - 1])
def test_varints_round_trip_and_say_where_they_end(value: int) -> None:
    encoded = varint(value)
    assert read_varint(b"\x01" + encoded + b"\x02", 1) == (value, 1 + len(encoded))


@pytest.mark.parametrize("bad", [b"", b"\x80", b"\xff\xff", b"\xff" * 11])
def test_a_varint_cut_short_or_too_long_is_a_value_error(bad: bytes) -> None:
    with pytest.raises(ValueError):
        read_varint(bad, 0)
