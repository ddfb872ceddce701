"""The local body cache (repository/localcache.py): bounded, least recently used evicted first, never
used across repository ids, and every entry authenticated again before use (through ImageStore)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

from imgbackup.format.imageindex import ImageIndex
from imgbackup.format.layout import SLOT_ZERO
from imgbackup.repository.localcache import BODY_HEAD, BodyCache, HeaderCache
from imgbackup.repository.repo import Repository


def _id(n: int) -> str:
    return f"{n:032x}"


def test_body_cache_is_bounded_and_evicts_the_least_recently_used(tmp_path: Path) -> None:
    entry = 1000
    cache = BodyCache(tmp_path / "bodies", "repo-a", max_bytes=3 * (BODY_HEAD.size + entry))
    for n in range(3):
        cache.put(_id(n), bytes([n]) * entry)
    assert cache.get(_id(0)) == bytes([0]) * entry       # used now: the newest
    cache.put(_id(3), b"\3" * entry)                       # one over the bound: the oldest unused (1) goes
    assert sorted(p.name for p in (tmp_path / "bodies").iterdir()) == [_id(0), _id(2), _id(3)]
    assert cache.get(_id(1)) is None
    cache.put(_id(4), b"x" * (4 * entry))                  # larger than the whole bound: not kept
    assert cache.get(_id(4)) is None
    fresh = BodyCache(tmp_path / "bodies", "repo-a", max_bytes=2 * (BODY_HEAD.size + entry))
    fresh.put(_id(5), b"\5" * entry)                       # a new process scans the folder, then evicts
    assert len(list((tmp_path / "bodies").iterdir())) == 2
    fresh.keep_only({_id(5)})
    assert [p.name for p in (tmp_path / "bodies").iterdir()] == [_id(5)]


def test_a_body_cached_for_another_repository_id_is_not_used(tmp_path: Path) -> None:
    BodyCache(tmp_path, "repo-a").put(_id(1), b"sealed")
    assert BodyCache(tmp_path, "repo-a").get(_id(1)) == b"sealed"
    assert BodyCache(tmp_path, "repo-b").get(_id(1)) is None   # the file names the repository it came from
    (tmp_path / _id(2)).write_bytes((tmp_path / _id(1)).read_bytes())
    assert BodyCache(tmp_path, "repo-a").get(_id(2)) is None   # nor another image's entry under this name


def test_a_flipped_bit_in_a_cached_body_is_detected_and_the_body_read_again(tmp_path: Path) -> None:
    repo = Repository.init(f"memory://cache-{os.getpid()}-{time.time_ns()}", lambda: b"a passphrase!", chunk_size=1 << 16)
    meta = repo.new_image_meta(type="full", parent=None, name="a", slots=1,
                               source={"path": "/dev/x", "size": 1 << 16, "kind": "block",
                                       "logical_sector_size": 512, "physical_sector_size": 4096},
                               used_map={"enabled": False, "regions": []}, changed_blocks=None)
    repo.images.write(ImageIndex(meta, np.array([SLOT_ZERO], np.uint8), np.zeros((0, 32), np.uint8),
                                 np.ones(1, np.uint8)))
    store = repo.images
    store.cache = HeaderCache(tmp_path / "headers")
    store.bodies = BodyCache(tmp_path / "bodies", repo.config.id)
    image_id = meta["id"]
    first, size = store.load_cached(image_id)             # from the repository, caches filled
    assert size == repo.storage.size(f"images/{image_id}")
    before = dict(repo.storage.counts)
    again, size2 = store.load_cached(image_id)            # from the caches: no request
    assert dict(repo.storage.counts) == before and size2 == size and again.meta == first.meta
    path = tmp_path / "bodies" / image_id
    data = bytearray(path.read_bytes())
    data[BODY_HEAD.size + 20] ^= 0x10
    path.write_bytes(bytes(data))
    third, _ = store.load_cached(image_id)                # the flipped bit fails authentication: read again
    assert repo.storage.counts["get"] == before.get("get", 0) + 1 and third.meta == first.meta
    assert path.read_bytes() != bytes(data)               # and the entry rewritten
