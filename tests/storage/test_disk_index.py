"""DiskIndex alone: LRU order, uses, reservations, pins and the eviction order.

The index is pure (no files, no clock, no event loop), so its quota rules are
checked here directly, each in microseconds; test_disk.py checks that the disk
backend applies them to real files.  Digests are made up: the index never hashes.
"""

from __future__ import annotations

import pytest

from casbah.digest import Digest
from casbah.errors import ResourceExhausted
from casbah.storage.disk_index import DiskIndex


def d(n: int, size: int = 100) -> Digest:
    return Digest(f"{n:064x}", size)


def filled(max_bytes: int, *sizes: int) -> tuple[DiskIndex, list[Digest]]:
    """An index holding one blob per size, the first the least recently used."""
    index = DiskIndex(max_bytes)
    blobs = [d(i, size) for i, size in enumerate(sizes)]
    for blob in blobs:
        assert index.reserve(blob.size) == []
        index.release(blob.size)
        assert index.add(blob, blob.size) == []
    return index, blobs


def order(index: DiskIndex) -> list[Digest]:
    return list(index.entries)


def test_load_keeps_scan_order_and_counts_bytes() -> None:
    index = DiskIndex()
    a, b, c = d(1, 10), d(2, 20), d(3, 30)
    index.load([(a, 10), (b, 20), (c, 30)])
    assert order(index) == [a, b, c]
    assert (index.used, len(index), index.reserved) == (60, 3, 0)
    assert b in index and d(4) not in index
    assert index.size(b) == 20 and index.size(d(4)) is None


def test_touch_makes_most_recently_used_and_records_the_time() -> None:
    index, (a, b, c) = filled(0, 100, 100, 100)
    assert index.touch(a, 5.0) == 100
    assert order(index) == [b, c, a]
    assert index.touch(d(9), 6.0) is None  # absent: nothing changes
    assert order(index) == [b, c, a]
    assert index.take_touched() == {a: 5.0}
    assert index.take_touched() == {}
    assert not index.has_touched


def test_size_is_not_a_use() -> None:
    index, (a, b) = filled(0, 100, 100)
    assert index.size(a) == 100
    assert order(index) == [a, b] and not index.has_touched


def test_find_missing_answers_in_order_and_uses_the_present() -> None:
    index, (a, b, c) = filled(0, 100, 100, 100)
    x, y = d(10), d(11)
    assert index.find_missing([y, a, x, b], 7.0) == [y, x]
    assert order(index) == [c, a, b]
    assert index.take_touched() == {a: 7.0, b: 7.0}


def test_least_recently_used_is_evicted_first_and_exactly_enough() -> None:
    index, (a, b, c, e) = filled(400, 100, 100, 100, 100)
    index.touch(a, 1.0)  # order: b, c, e, a
    victims = index.reserve(150)  # 400 + 150 - 400 = 150 over: b and c, not e
    assert victims == [b, c]
    assert order(index) == [e, a]
    assert (index.used, index.reserved, index.evictions) == (200, 150, 2)
    index.release(150)
    assert index.reserved == 0


def test_no_eviction_while_there_is_room() -> None:
    index, blobs = filled(1000, 100, 100)
    assert index.reserve(800) == []
    assert order(index) == blobs and index.reserved == 800


def test_reservations_count_against_the_quota() -> None:
    index, (a, b) = filled(1000, 100, 100)
    assert index.reserve(700) == []  # 900 promised
    assert index.reserve(200) == [a]  # 1100: a must go
    assert (index.used, index.reserved) == (100, 900)
    index.release(700)
    index.release(200)
    assert index.reserve(900) == []  # released reservations give the room back
    assert order(index) == [b]


def test_a_reservation_larger_than_the_quota_is_refused_and_changes_nothing() -> None:
    index, blobs = filled(1000, 100, 100)
    with pytest.raises(ResourceExhausted, match="larger than the disk quota"):
        index.reserve(1001)
    assert order(index) == blobs
    assert (index.used, index.reserved, index.evictions) == (200, 0, 0)


def test_without_a_quota_nothing_is_evicted() -> None:
    index, blobs = filled(0, 100, 100)
    assert index.reserve(10**15) == []
    assert order(index) == blobs


def test_pinned_blobs_are_skipped_and_kept_as_most_recently_used() -> None:
    index, (a, b, c) = filled(300, 100, 100, 100)
    index.pin(a)
    assert index.reserve(100) == [b]
    assert order(index) == [c, a]  # a stays, moved behind the others
    index.unpin(a)
    index.release(100)
    assert index.reserve(200) == [c]  # 200 + 200 - 300: one blob; c is now the oldest
    assert order(index) == [a]


def test_pins_are_counted() -> None:
    index, (a, b) = filled(200, 100, 100)
    index.pin(a)
    index.pin(a)
    index.unpin(a)
    assert index.is_pinned(a) and index.reserve(100) == [b]
    index.unpin(a)
    assert not index.is_pinned(a)


def test_only_busy_blobs_could_make_room_refuses_and_changes_nothing() -> None:
    index, (a, b) = filled(300, 100, 100)
    index.pin(a)
    index.begin_commit([b])
    with pytest.raises(ResourceExhausted, match="full of blobs in use"):
        index.reserve(200)
    assert order(index) == [a, b]
    assert (index.used, index.reserved, index.evictions) == (200, 0, 0)
    index.end_commit([b])
    assert index.reserve(200) == [b]  # b is free again; a still pinned


def test_committing_blobs_are_never_evicted() -> None:
    index, (a, b) = filled(200, 100, 100)
    index.begin_commit([a])
    index.begin_commit([a])
    index.end_commit([a])
    assert index.is_committing(a) and index.is_busy(a)
    assert index.reserve(100) == [b]
    index.end_commit([a])
    assert not index.is_busy(a)


def test_use_and_pin_a_batch() -> None:
    index, (a, b, c) = filled(300, 100, 100, 100)
    index.use_and_pin([a, b], 3.0)
    assert order(index) == [c, a, b]
    assert index.take_touched() == {a: 3.0, b: 3.0}
    assert index.reserve(100) == [c]  # a and b are pinned


def test_refused_when_pinned_bytes_leave_too_little() -> None:
    index, (a, b, c) = filled(300, 100, 100, 100)
    index.use_and_pin([a, b], 3.0)
    with pytest.raises(ResourceExhausted):
        index.reserve(201)  # needs 201 free, only c (100) is evictable
    index.unpin_all([a, b])
    assert index.reserve(201) == [c, a, b]


def test_add_replaces_an_entry_and_evicts_when_its_size_was_not_reserved() -> None:
    index, (a, b) = filled(300, 100, 100)
    assert index.add(a, 150) == []  # replaced: used counts the new size once
    assert (index.used, order(index)) == (250, [b, a])
    late = d(20, 0)
    assert index.add(late, 120) == [b]  # 370 > 300: back under quota
    assert (index.used, order(index)) == (270, [a, late])


def test_add_over_quota_with_only_busy_blobs_stays_over() -> None:
    index, (a,) = filled(100, 100)
    late = d(20, 0)
    index.pin(a)
    index.begin_commit([late])
    assert index.add(late, 50) == []  # nothing is evictable
    assert (index.used, order(index)) == (150, [a, late])


def test_adopt_and_remove() -> None:
    index, _ = filled(0, 100)
    b = d(2, 40)
    assert index.adopt(b, 40) and not index.adopt(b, 40)
    assert index.used == 140
    index.touch(b, 1.0)
    assert index.remove(b) == 40 and index.remove(b) is None
    assert index.used == 100
    assert index.take_touched() == {}  # a removed blob's last use is not written back


def test_apply_changes_keeps_blobs_in_use() -> None:
    index, (a, b, c) = filled(0, 100, 100, 100)
    new = d(9, 10)
    index.pin(a)
    index.begin_commit([b])
    index.apply_changes([("-", a, 0), ("-", b, 0), ("-", c, 0), ("+", new, 10), ("+", a, 999)])
    assert order(index) == [a, b, new]
    assert index.used == 210


def test_snapshot_gives_last_uses() -> None:
    index, (a, b) = filled(0, 100, 50)
    index.touch(a, 2.0)
    assert index.snapshot(9.0) == [(b, 50, 9.0), (a, 100, 2.0)]
