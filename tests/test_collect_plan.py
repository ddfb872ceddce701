"""The array collection planner (engine/collectplan.py) against the object-based one it replaced
(tests/collect_reference.py): random small repositories — copies of one chunk in several packs,
the same entry in two index files, deltas, damage records, packs that are gone or unreadable, chunks
no index names, marks old and new — must give the same plan from both."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from collect_reference import reference_plan
from imgbackup.engine.collectplan import plan_collection
from imgbackup.repository.chunkids import ChunkIds
from imgbackup.repository.chunkindex import ChunkIndex
from imgbackup.repository.damage import DamagedCopy, DamageLog, write_record
from imgbackup.repository.indexfile import write_index_files
from imgbackup.repository.marks import Safety, write_marks
from imgbackup.repository.packs import PackWriter, pack_name, read_pack_trailer
from imgbackup.repository.repo import Repository
from imgbackup.repository.storage import object_sizes

NOW = 2_000_000_000.0
FOLDERS = ("index", "packs", "damage", "gc")


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Repository:
    return Repository.init(tmp_path_factory.mktemp("plan") / "repo", lambda: b"test-pass")


def _clear(repo: Repository) -> None:
    for folder in FOLDERS:
        shutil.rmtree(Path(repo.storage.root) / folder, ignore_errors=True)
        (Path(repo.storage.root) / folder).mkdir()


def _cid(i: int) -> bytes:
    return hashlib.sha256(b"chunk %d" % i).digest()


entry = st.tuples(st.integers(0, 7), st.integers(40, 90), st.integers(-1, 7))   # chunk, sealed length, base (-1 whole)
pack = st.tuples(st.lists(entry, min_size=1, max_size=5), st.sampled_from(["ok", "ok", "ok", "gone", "garbled"]))
times = st.sampled_from([NOW - 10_000, NOW - 100, NOW])


def _build(repo: Repository, data) -> list:
    """Packs, index files, damage records and marks as ``data`` draws them; every copy stored."""
    copies, unreadable = [], []
    for entries, kind in data.draw(st.lists(pack, min_size=1, max_size=5), "packs"):
        writer = PackWriter(repo.storage, repo.envelope, target_size=1 << 30)
        for chunk, length, base in entries:
            writer.add(_cid(chunk), os.urandom(length), length, _cid(base) if base >= 0 and base != chunk else None)
        writer.flush()
        pack_id = next(iter(writer.written.values())).pack_id
        copies += [(cid, loc, kind) for cid, loc in read_pack_trailer(repo.storage, repo.envelope, pack_id)]
        if kind == "garbled":
            unreadable.append(pack_name(pack_id))
    files = data.draw(st.integers(1, 3), "files")
    listed = [data.draw(st.lists(st.integers(0, files - 1), max_size=2), "in files") for _ in copies]
    for f in range(files):
        rows = [(cid, loc) for (cid, loc, _), where in zip(copies, listed, strict=True) if f in where]
        write_index_files(repo.storage, repo.envelope, rows)
    for name in unreadable:
        size = repo.storage.size(name)
        repo.storage.put(name, os.urandom(size))
    for _, loc, kind in copies:
        if kind == "gone":
            repo.storage.delete(pack_name(loc.pack_id))
    bad = [c for c in copies if data.draw(st.integers(0, 5), "damaged") == 0]
    write_record(repo.storage, repo.envelope, [DamagedCopy(cid, loc.pack_id, loc.offset, loc.length, "damaged")
                                               for cid, loc, _ in bad], "test")
    marked = [(cid, loc.pack_id, loc.offset, data.draw(times, "mark")) for cid, loc, _ in copies
              if data.draw(st.integers(0, 2), "marked") == 0]
    packs = {loc.pack_id: data.draw(times, "pack mark") for _, loc, _ in copies if data.draw(st.booleans())}
    if marked or packs:
        write_marks(repo.storage, repo.envelope, marked, packs)
    return copies


def _live(entries) -> list:
    return sorted((cid, loc.pack_id, loc.offset, loc.length, loc.raw_length, loc.base or b"") for cid, loc in entries)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_array_plan_is_the_reference_plan(repo: Repository, data) -> None:
    _clear(repo)
    _build(repo, data)
    needed = {_cid(i) for i in data.draw(st.sets(st.integers(0, 9)), "needed")}   # 8, 9: no copy anywhere
    safety = Safety(NOW, data.draw(st.sampled_from([0.0, 3600.0]), "grace"),
                    data.draw(st.lists(st.sampled_from([NOW - 20_000, NOW - 50, float("-inf")]), max_size=2)))
    provisional = data.draw(st.booleans(), "provisional")
    ref = reference_plan(repo, set(needed), safety=safety, provisional=provisional, strict=False)
    new = plan_collection(repo, ChunkIds.of(needed), safety=safety, provisional=provisional, strict=False)
    for what, happened in (("rewritten", new.rewrite), ("freed", new.free), ("held", new.held),
                           ("held packs", new.held_packs), ("kept as is", new.rows), ("warnings", new.warnings),
                           ("spare copies", len(new.rows.source.table.spare) if new.needed is not None else 0),
                           ("adopted", any(u.extra for u in new.rewrite) or new.rows.extra)):
        event(f"{what}: {bool(happened)}")
    assert new.needed == ref.needed
    assert [(u.name, u.size) for u in new.free] == [(u.name, u.size) for u in ref.free]
    assert [(u.name, u.size, u.dead_bytes, _live(u.live)) for u in new.rewrite] == \
        [(u.name, u.size, u.dead_bytes, _live(u.live)) for u in ref.rewrite]
    assert dict(new.rows.items()) == ref.rows
    assert dict(new.held.items()) == ref.held and len(new.held) == len(ref.held)
    assert new.held_packs == ref.held_packs
    assert (new.new_candidates, new.ripe_new) == (ref.new_candidates, ref.ripe_new)
    assert new.warnings == ref.warnings
    assert sorted(c.key for c in new.found) == sorted(c.key for c in ref.found)
    assert (new.entries_before, new.entries_after, new.rewrite_index, new.index_files_after) == \
        (ref.entries_before, ref.entries_after, ref.rewrite_index, ref.index_files_after)
    assert (new.bytes_to_copy, new.bytes_reclaimable) == (ref.bytes_to_copy, ref.bytes_reclaimable)
    index = ChunkIndex.load(repo.storage, repo.envelope, DamageLog.load(repo.storage, repo.envelope, strict=False),
                            set(object_sizes(repo.storage, "packs")))
    kept = set(new.rows) | {cid for use in new.rewrite for cid, _ in use.live}
    assert all(cid in kept for cid in needed if cid in index)   # a needed chunk with a usable copy stays indexed


def test_chunk_ids_union_of_image_arrays_is_the_set_union() -> None:
    import numpy as np

    rng = np.random.default_rng(5)
    pool = rng.integers(0, 256, (300, 32), np.uint8)
    arrays = [pool[rng.integers(0, 300, 120)] for _ in range(9)]
    ids = ChunkIds.union_of(iter(arrays))
    expected = {row.tobytes() for a in arrays for row in a}
    assert ids == expected and list(ids) == sorted(expected)
    assert all(cid in ids for cid in expected) and bytes(32) not in ids
    assert (ids | [bytes(32)]) == expected | {bytes(32)}


def test_marks_from_arrays_are_the_marks_from_a_list() -> None:
    from imgbackup.repository.marks import copy_arrays, decode_marks, encode_marks

    copies = [(_cid(i), _cid(100 + i % 3), 16 + 40 * i, float(i + 1)) for i in range(12)]   # 0: "when written"
    packs = {_cid(100): 5.0, _cid(200): 6.0}
    plain = encode_marks(copies, packs)
    assert encode_marks(copy_arrays(copies), packs) == plain
    ids, pack_ids, offsets, times, whole = decode_marks(plain, "gc/x", 1.0)
    assert sorted(zip([i.tobytes() for i in ids], [p.tobytes() for p in pack_ids], offsets.tolist(),
                      times.tolist(), strict=True)) == sorted(copies)
    assert whole == packs


@pytest.mark.parametrize("planner", ["array", "reference"])
def test_a_pack_kept_for_an_unreadable_trailer_keeps_its_needed_chunks_indexed(repo: Repository, planner) -> None:
    _clear(repo)
    writer = PackWriter(repo.storage, repo.envelope, target_size=1 << 30)
    writer.add(_cid(0), os.urandom(60), 60)
    writer.add(_cid(1), os.urandom(60), 60)
    writer.flush()
    write_index_files(repo.storage, repo.envelope, list(writer.written.items()))
    name = pack_name(writer.written[_cid(0)].pack_id)
    repo.storage.put(name, os.urandom(repo.storage.size(name)))      # its trailer no longer reads
    needed = {_cid(0), _cid(9)}            # chunk 9 has no copy: the plan reads trailers to look for one
    plan = (plan_collection(repo, ChunkIds.of(needed), safety=Safety(NOW, 0.0, []), provisional=True)
            if planner == "array" else reference_plan(repo, needed, safety=Safety(NOW, 0.0, []), provisional=True))
    assert any(name in w for w in plan.warnings) and not plan.free and not plan.rewrite
    assert _cid(0) in plan.rows           # the pack stays, and so does the index entry of its needed chunk
