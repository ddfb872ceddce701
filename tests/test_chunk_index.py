"""The chunk index at scale: the native table (copies, spares, whole-before-delta), loading from many
index files, and the local cache (used while the listing matches, authenticated, rebuilt when not)."""

from __future__ import annotations

import logging
import os
import random

import numpy as np
import pytest

from imgbackup.crypto.envelope import Envelope
from imgbackup.repository.backends.faults import FaultyStorage
from imgbackup.repository.backends.memory import MemoryStorage
from imgbackup.repository.chunkindex import ChunkIndex
from imgbackup.repository.chunktable import INFO_DELTA, ROW_DTYPE, ChunkTable, empty_rows
from imgbackup.repository.indexcache import IndexCache
from imgbackup.repository.indexfile import write_index_files
from imgbackup.repository.packs import MIN_SEALED, BlobLocation

KEY = bytes(range(32))
MAC_KEY = bytes(range(32, 64))
REPO_ID = "ab" * 16


def _loc(rng: random.Random, packs: list[bytes]) -> BlobLocation:
    return BlobLocation(rng.choice(packs), rng.randrange(16, 1 << 24), rng.randrange(MIN_SEALED, 1 << 21),
                        rng.randrange(1, 1 << 20))   # a valid entry (decoders check the ranges)


def _rows(entries: list[tuple[bytes, int, int, int, int, bool]]) -> np.ndarray:
    rows = empty_rows(len(entries))
    view = rows.view(ROW_DTYPE)[:, 0]
    for i, (cid, pack, offset, length, raw, delta) in enumerate(entries):
        view[i] = (cid, pack, offset, length, raw | (INFO_DELTA if delta else 0))
    return rows


def test_the_table_hands_out_one_copy_keeps_the_others_and_finds_a_segment_at_once() -> None:
    rng = np.random.default_rng(3)
    ids = [rng.bytes(32) for _ in range(5000)]
    entries = [(cid, i % 7, 100 + i, 50, 40, False) for i, cid in enumerate(ids)]
    entries += [(ids[i], 9, 5, 50, 40, False) for i in range(0, 5000, 10)]        # second copies
    random.Random(1).shuffle(entries)
    packs = np.frombuffer(b"".join(bytes([p]) * 32 for p in range(10)), np.uint8).reshape(10, 32)
    table = ChunkTable(_rows(entries), packs=packs)
    assert len(table) == 5000 and len(table.spare) == 500
    queries = np.frombuffer(b"".join(ids[:100]) + os.urandom(32 * 50), np.uint8).reshape(150, 32)
    found = table.find(queries)
    assert (found[:100] >= 0).all() and (found[100:] == -1).all()
    for i in (0, 10, 17):
        copies = [table.get(ids[i]), *table.spares_of(ids[i])]
        assert len(copies) == (2 if i % 10 == 0 else 1)
        assert copies[0].pack_id == packs[i % 7].tobytes() and copies[0].offset == 100 + i


@pytest.mark.parametrize("ids", ["uniform", "skewed", "more than expected"])
def test_rows_gathered_in_buckets_come_out_as_one_sort_would_give_them(ids: str) -> None:
    """Uniform ids fit their buckets; skewed ids, or more rows than announced, spill and are still
    sorted whole (with pack offsets applied either way)."""
    from imgbackup.repository.chunktable import BucketRows, field, sort_rows

    rng = np.random.default_rng(11)
    pieces = [rng.integers(0, 256, (3000, 48), np.uint8) for _ in range(6)]
    for piece in pieces:
        piece[:, 44:48] = 0
        field(piece, "pack")[:] = rng.integers(0, 50, len(piece))
        if ids == "skewed":
            piece[: 2000, 0] = 7            # most ids in one bucket
        piece[:5, :32] = pieces[0][:5, :32]  # copies of one chunk in several pieces
    buckets = BucketRows(3000 * 6 if ids != "more than expected" else 300)
    want = []
    for i, piece in enumerate(pieces):
        buckets.add(piece, 100 * i)
        shifted = piece.copy()
        field(shifted, "pack")[:] += 100 * i
        want.append(shifted)
    spilled = buckets.spill.used
    got, expected = buckets.take(), np.concatenate(want)
    sort_rows(expected)
    assert np.array_equal(got, expected)
    assert (spilled > 0) == (ids != "uniform")


def test_a_whole_copy_is_handed_out_before_a_delta() -> None:
    cid = os.urandom(32)
    packs = np.zeros((3, 32), np.uint8)
    table = ChunkTable(_rows([(cid, 2, 10, 5, 7, True)]), packs=packs)
    assert table.get(cid).offset == 10
    table.add(_rows([(cid, 1, 20, 5, 7, False)]))
    assert table.get(cid).offset == 20 and [loc.offset for loc in table.spares_of(cid)] == [10]


def test_removing_a_handed_out_copy_hands_out_a_spare() -> None:
    a, b = os.urandom(32), os.urandom(32)
    table = ChunkTable(_rows([(a, 0, 10, 5, 7, False), (a, 1, 30, 5, 7, False), (b, 0, 50, 5, 7, False)]),
                       packs=np.zeros((2, 32), np.uint8))
    keep = np.array([table.rows[i, :32].tobytes() != a for i in range(len(table))])
    table.remove(keep)
    assert table.get(a).offset == 30 and table.spares_of(a) == [] and table.get(b).offset == 50
    table.remove(np.array([table.rows[i, :32].tobytes() != a for i in range(len(table))]))
    assert table.get(a) is None and len(table) == 1


def _repository(files: int, per_file: int, seed: int = 0) -> tuple[MemoryStorage, Envelope, dict]:
    rng = random.Random(seed)
    storage, envelope = MemoryStorage(), Envelope(KEY)
    union: dict[bytes, set[BlobLocation]] = {}
    for _ in range(files):
        packs = [rng.randbytes(32) for _ in range(3)]
        rows = [(rng.randbytes(32), _loc(rng, packs)) for _ in range(per_file)]
        write_index_files(storage, envelope, rows)
        for cid, loc in rows:
            union.setdefault(cid, set()).add(loc)
    return storage, envelope, union


def _check(index: ChunkIndex, union: dict) -> None:
    assert len(index) == len(union)
    for cid, copies in union.items():
        assert {index.get(cid), *index.table.spares_of(cid)} == copies


def test_an_index_of_many_files_loads_whole_and_then_from_the_cache(tmp_path) -> None:
    storage, envelope, union = _repository(files=40, per_file=200)
    cache = IndexCache(REPO_ID, MAC_KEY, tmp_path)
    _check(ChunkIndex.load(storage, envelope, cache=cache), union)
    assert cache.path.exists()
    counting = FaultyStorage(storage, at=None)
    index = ChunkIndex.load(counting, envelope, cache=IndexCache(REPO_ID, MAC_KEY, tmp_path))
    _check(index, union)
    assert not [c for c in counting.calls if c.startswith("get ")], "the cache was not used"


def test_files_added_since_the_cache_are_merged_and_a_removed_one_means_a_rebuild(tmp_path) -> None:
    storage, envelope, union = _repository(files=30, per_file=50, seed=1)
    ChunkIndex.load(storage, envelope, cache=IndexCache(REPO_ID, MAC_KEY, tmp_path))
    rng = random.Random(9)
    more = [(rng.randbytes(32), _loc(rng, [rng.randbytes(32)])) for _ in range(20)]
    [added] = write_index_files(storage, envelope, more)[0]
    union.update({cid: {loc} for cid, loc in more})
    counting = FaultyStorage(storage, at=None)
    _check(ChunkIndex.load(counting, envelope, cache=IndexCache(REPO_ID, MAC_KEY, tmp_path)), union)
    assert [c for c in counting.calls if c.startswith("get ")] == [f"get {added}"]
    gone = sorted(storage.list("index"))[0]
    removed = {cid for cid, _ in _decoded(storage, envelope, gone)}
    storage.delete(gone)
    counting = FaultyStorage(storage, at=None)
    index = ChunkIndex.load(counting, envelope, cache=IndexCache(REPO_ID, MAC_KEY, tmp_path))
    assert len([c for c in counting.calls if c.startswith("get index/")]) == 30   # every file read again
    assert all(index.get(cid) is None for cid in removed)


def _decoded(storage, envelope, name):
    from imgbackup.repository.indexfile import read_index_file

    rows, packs, _ = read_index_file(storage, envelope, name)
    return list(ChunkTable(rows, packs=packs).iter_rows())


@pytest.mark.parametrize("damage", ["flip", "truncate", "other key", "garbage"])
def test_a_damaged_or_foreign_cache_is_never_used(tmp_path, caplog, damage: str) -> None:
    storage, envelope, union = _repository(files=8, per_file=300, seed=2)
    cache = IndexCache(REPO_ID, MAC_KEY, tmp_path)
    ChunkIndex.load(storage, envelope, cache=cache)
    raw = bytearray(cache.path.read_bytes())
    if damage == "flip":
        bit = random.Random(4).randrange(8 * 100, 8 * (len(raw) - 40))   # a row, not the header
        raw[bit // 8] ^= 1 << (bit % 8)
        cache.path.write_bytes(raw)
    elif damage == "truncate":
        cache.path.write_bytes(raw[: len(raw) // 2])
    elif damage == "garbage":
        cache.path.write_bytes(os.urandom(len(raw)))
    reader = IndexCache(REPO_ID, b"\x01" * 32 if damage == "other key" else MAC_KEY, tmp_path)
    counting = FaultyStorage(storage, at=None)
    with caplog.at_level(logging.WARNING, "imgbackup.storage"):
        _check(ChunkIndex.load(counting, envelope, cache=reader), union)
    assert len([c for c in counting.calls if c.startswith("get index/")]) == 8
    assert "chunk-index cache" in caplog.text and "rebuilding" in caplog.text
    assert IndexCache(REPO_ID, b"\x01" * 32 if damage == "other key" else MAC_KEY, tmp_path).load(
        sorted(storage.list("index"))) is not None     # rewritten, and good again


@pytest.mark.parametrize("damage", ["directory end", "directory order", "pack number"])
def test_an_authentic_cache_that_does_not_add_up_is_never_used(tmp_path, caplog, damage: str) -> None:
    """Made with the right key (so the MAC holds) but inconsistent inside: still discarded."""
    from blake3 import blake3

    from imgbackup.repository.indexcache import CACHE_HEAD, MAC_SIZE, PACK_FIELD

    storage, envelope, union = _repository(files=8, per_file=300, seed=3)
    cache = IndexCache(REPO_ID, MAC_KEY, tmp_path)
    table = ChunkIndex.load(storage, envelope, cache=cache).table
    raw = bytearray(cache.path.read_bytes()[:-MAC_SIZE])
    directory_at = len(raw) - 4 * len(table.directory)
    if damage == "directory end":
        raw[-4:] = (len(table) + 1).to_bytes(4, "little")
    elif damage == "directory order":
        raw[directory_at + 8 : directory_at + 12] = (len(table)).to_bytes(4, "little")
    else:
        first_row = CACHE_HEAD.size + 32 * 8
        raw[first_row + 4 * PACK_FIELD : first_row + 4 * PACK_FIELD + 4] = len(table.packs).to_bytes(4, "little")
    cache.path.write_bytes(bytes(raw) + blake3(bytes(raw), key=cache.key).digest())
    counting = FaultyStorage(storage, at=None)
    with caplog.at_level(logging.WARNING, "imgbackup.storage"):
        _check(ChunkIndex.load(counting, envelope, cache=IndexCache(REPO_ID, MAC_KEY, tmp_path)), union)
    assert "is inconsistent" in caplog.text
    assert len([c for c in counting.calls if c.startswith("get index/")]) == 8


def test_the_cache_can_be_switched_off_and_a_read_only_home_is_no_error(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("IMGBACKUP_INDEX_CACHE", "0")
    assert not IndexCache.enabled()
    monkeypatch.delenv("IMGBACKUP_INDEX_CACHE")
    assert IndexCache.enabled()
    storage, envelope, union = _repository(files=3, per_file=10, seed=5)
    blocked = tmp_path / "file"
    blocked.write_text("a file where the cache directory would go")
    _check(ChunkIndex.load(storage, envelope, cache=IndexCache(REPO_ID, MAC_KEY, blocked)), union)
