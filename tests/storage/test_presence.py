"""The presence table (casbah/storage/engine/presence.py): FindMissingBlobs answered by a
shared hash table must say exactly what `meta` says, through writes, deletes, evictions,
growth, a rebuild, another boot and another process."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from space_helpers import fill_up

from casbah.digest import Digest
from casbah.storage.engine import Engine, hashtable
from casbah.storage.engine import presence as presence_mod
from casbah.storage.engine.hashtable import COMPLETE, Table

ROOT = Path(__file__).resolve().parents[2]


def blobs(n: int, size: int = 64, tag: bytes = b"") -> list[tuple[Digest, bytes]]:
    out = []
    for i in range(n):
        data = tag + i.to_bytes(8, "big") + os.urandom(size)
        out.append((Digest.of(data), data))
    return out


def wait_complete(engine: Engine, timeout: float = 60.0) -> Table:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        table = engine.presence.check()
        if table is not None and engine.presence.next is None:
            return table
        time.sleep(0.05)
    raise AssertionError("the presence table never completed")


def agree(engine: Engine, digests: list[Digest]) -> list[Digest]:
    """missing() through the table, checked against `meta` itself."""
    by_table = engine.missing(digests)
    assert by_table == engine._missing_in_meta(digests)
    return by_table


def test_the_table_answers_like_meta_through_writes_deletes_evictions_and_growth(tmp_path: Path) -> None:
    engine = Engine(tmp_path, max_bytes=15_000_000)  # ~311 B charged a blob: evictions start past ~48k
    table = engine.presence.check()
    assert table is not None and table.slots == hashtable.MIN_SLOTS  # a new store: complete at once
    stored: list[tuple[Digest, bytes]] = []
    for n in range(60):
        batch = blobs(1000, tag=b"%d" % n)
        assert engine.put_many(batch) == [None] * len(batch)
        stored += batch
        if n % 10 == 9:
            engine.drop([d for d, _ in stored[-500:-400]])
    table = wait_complete(engine)
    assert table.slots > hashtable.MIN_SLOTS  # it passed 75 % and was swapped for a larger one
    assert engine.evictions > 0
    digests = [d for d, _ in stored] + [d for d, _ in blobs(3000, tag=b"absent")]
    missing = agree(engine, digests)
    assert 3000 < len(missing) < len(digests)  # absent, dropped and evicted ones; the newest present
    assert stored[-1][0] not in missing and stored[-450][0] in missing
    engine.close()


def test_a_store_without_its_table_answers_from_meta_then_rebuilds_it(tmp_path: Path) -> None:
    engine = Engine(tmp_path)
    stored = blobs(12000)
    engine.put_many(stored)
    engine.close()
    (tmp_path / "meta" / "presence").unlink()
    presence_mod.FILL_CHUNK, chunk = 1000, presence_mod.FILL_CHUNK
    try:
        engine = Engine(tmp_path)
        digests = [d for d, _ in stored[::7]] + [d for d, _ in blobs(100, tag=b"absent")]
        assert len(agree(engine, digests)) == 100  # while the table fills: from meta
        table = wait_complete(engine)
        assert table.get(hashtable.USED) == 12000
        more = blobs(50, tag=b"late")
        engine.put_many(more)
        assert agree(engine, digests + [d for d, _ in more]) == digests[-100:]
        engine.close()
    finally:
        presence_mod.FILL_CHUNK = chunk


def test_a_table_written_before_this_boot_is_rebuilt(tmp_path: Path) -> None:
    """After a power failure `meta` may have lost its last commits while the table kept
    them: a table from another boot is never trusted."""
    engine = Engine(tmp_path)
    stored = blobs(200)
    engine.put_many(stored)
    engine.close()
    path = tmp_path / "meta" / "presence"
    with open(path, "r+b") as f:
        f.seek(32)
        f.write(b"\xff" * 16)  # another boot id
    before = path.stat().st_ino
    engine = Engine(tmp_path)
    assert path.stat().st_ino != before
    wait_complete(engine)
    assert agree(engine, [d for d, _ in stored]) == []
    engine.close()


def test_writes_and_deletes_of_another_process_are_seen_at_once(tmp_path: Path) -> None:
    """The table is shared: what another process commits is answered by this one's
    table (no journal, no reload), and what it deletes is missing here."""
    engine = Engine(tmp_path)
    wait_complete(engine)
    theirs = blobs(300, tag=b"child")
    script = (
        "import sys\n"
        "from casbah.digest import Digest\n"
        "from casbah.storage.engine import Engine\n"
        "e = Engine(sys.argv[1])\n"
        "items = [bytes.fromhex(h) for h in sys.argv[2].split(',')]\n"
        "assert e.put_many([(Digest.of(b), b) for b in items]) == [None] * len(items)\n"
        "e.drop([Digest.of(b) for b in items[:100]])\n"
        "e.close()\n"
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    subprocess.run([sys.executable, "-c", script, str(tmp_path), ",".join(b.hex() for _, b in theirs)],
                   check=True, env=env, cwd=ROOT, timeout=60)
    digests = [d for d, _ in theirs]
    assert engine.presence.check() is not None
    assert agree(engine, digests) == digests[:100]
    engine.close()


def test_a_key_the_table_lost_reads_missing_and_a_reupload_restores_it(tmp_path: Path) -> None:
    """What a crash between `meta`'s commit and the table's update leaves (made here by
    removing the key from the table alone): the safe side — reported missing, never
    present when absent — and the client's re-upload puts it back."""
    engine = Engine(tmp_path)
    stored = blobs(40)
    engine.put_many(stored)
    from casbah.storage.engine.index import key_of

    victim = stored[5]
    with engine.presence.locked() as presence:
        presence.removed([key_of(victim[0])])
    digests = [d for d, _ in stored]
    assert engine.missing(digests) == [victim[0]]
    assert engine._missing_in_meta(digests) == []
    engine.put_many([victim])
    assert agree(engine, digests) == []
    table = engine.presence.check()
    assert table is not None and table.get(hashtable.STATE) == COMPLETE
    engine.close()


def test_a_rebuild_its_builder_died_in_is_done_again(tmp_path: Path) -> None:
    """A process killed while it built the next table leaves it half filled and the
    table marked growing: the next process builds it anew and swaps it in."""
    engine = Engine(tmp_path)
    stored = blobs(3000)
    engine.put_many(stored)
    engine.close()
    meta = tmp_path / "meta"
    Table.create(meta / "presence.next", 10_000, hashtable.BUILDING)  # empty: its builder died at once
    table = Table(meta / "presence")
    table.set(hashtable.GROWING, 1)
    table.close()
    engine = Engine(tmp_path)
    more = blobs(20, tag=b"more")
    engine.put_many(more)  # written to both tables while the new one is built
    table = wait_complete(engine)
    assert not table.get(hashtable.GROWING) and table.get(hashtable.USED) == 3020
    assert not (meta / "presence.next").exists()
    absent = [d for d, _ in blobs(30, tag=b"absent")]
    assert agree(engine, [d for d, _ in stored + more] + absent) == absent
    engine.close()


def test_sigkill_mid_write_never_leaves_the_table_claiming_an_absent_blob(tmp_path: Path) -> None:
    """A writer killed at random points of its commits (and deletes): afterwards every
    digest the table reports present is in `meta` — a crash may only leave a present
    key out of the table, and the writes acknowledged before the kill are all there."""
    import random
    import signal

    script = (
        "import os, sys\n"
        "from casbah.digest import Digest\n"
        "from casbah.storage.engine import Engine\n"
        "e = Engine(sys.argv[1])\n"
        "n = 0\n"
        "while True:\n"
        "    batch = [(Digest.of(b), b) for b in (b'%s-%d-%d' % (sys.argv[2].encode(), n, i) for i in range(64))]\n"
        "    e.put_many(batch)\n"
        "    e.drop([d for d, _ in batch[:8]])\n"
        "    print(n, flush=True)\n"
        "    n += 1\n"
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    rng = random.Random(7)
    for round_ in range(4):
        child = subprocess.Popen([sys.executable, "-c", script, str(tmp_path), str(round_)], env=env, cwd=ROOT,
                                 stdout=subprocess.PIPE, text=True)
        assert child.stdout is not None
        done = [child.stdout.readline()]  # it is writing: kill it somewhere in the next batches
        time.sleep(rng.uniform(0.01, 0.3))
        child.send_signal(signal.SIGKILL)
        child.wait()
        done += child.stdout.read().split()
        acked = int(done[-1]) + 1  # batches whose put_many and drop returned
        assert acked >= 1
        engine = Engine(tmp_path)
        wait_complete(engine)
        candidates = [Digest.of(b"%d-%d-%d" % (round_, n, i)) for n in range(acked + 200) for i in range(64)]
        by_table = set(engine.missing(candidates))
        by_meta = set(engine._missing_in_meta(candidates))
        assert by_table >= by_meta  # never present in the table and absent in meta
        assert not {Digest.of(b"%d-%d-%d" % (round_, n, i)) for n in range(acked) for i in range(8, 64)} & by_meta
        engine.close()


def test_a_full_filesystem_leaves_the_store_without_a_table_not_crashed(small_tmpfs: Path) -> None:
    """The table's blocks are allocated when it is made: on a full filesystem making it
    fails cleanly (a write into a hole of a mapped file would be SIGBUS), and the store
    answers from `meta`."""
    root = small_tmpfs / "cas"
    engine = Engine(root)
    stored = blobs(300)
    engine.put_many(stored)
    engine.close()
    (root / "meta" / "presence").unlink()
    fill_up(small_tmpfs)
    engine = Engine(root)
    assert engine.presence.check() is None
    absent = [d for d, _ in blobs(20, tag=b"absent")]
    assert engine.missing([d for d, _ in stored] + absent) == absent
    engine.close()
    (small_tmpfs / "filler").unlink()
    engine = Engine(root)
    assert wait_complete(engine) is not None
    assert agree(engine, [d for d, _ in stored] + absent) == absent
    engine.close()
