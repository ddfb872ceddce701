"""A backup confirms only the packs its own image uses (FORMAT.md section 9, Backup step 3).

In-process, on a memory repository behind a storage that records what it is asked: the work a backup
does to make sure its chunks still exist does not grow with other hosts' packs; a pack deleted outside
the protocol is noticed, its chunks stored again and recorded; a copy a compaction moved after the
backup loaded its index is found at its new place instead of being called missing.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np

from imgbackup.engine.backup.run import BackupRequest, run_backup
from imgbackup.engine.delete import delete_images
from imgbackup.engine.restore.plan import plan_disk_restore
from imgbackup.engine.restore.run import run_disk_restore
from imgbackup.engine.verify.chunks import run_verify
from imgbackup.format.layout import SLOT_DATA
from imgbackup.repository.backends.memory import MemoryStorage
from imgbackup.repository.damage import DamageLog
from imgbackup.repository.packcheck import PackCheck
from imgbackup.repository.packs import PackWriter, pack_name
from imgbackup.repository.repo import Repository

CHUNK = 64 << 10          # the smallest chunk size: a source of a few chunks is one pack
PASS = lambda: b"packcheck-pass"  # noqa: E731


class RecordingStorage:
    """Forwards to ``inner``; records the folders listed and the names whose existence was asked."""

    def __init__(self, inner: MemoryStorage) -> None:
        self.inner = inner
        self.listed: list[str] = []
        self.asked: list[str] = []

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    def list(self, prefix: str):
        self.listed.append(prefix)
        return self.inner.list(prefix)

    def exists(self, name: str) -> bool:
        self.asked.append(name)
        return self.inner.exists(name)


def _blocks(seed: int, n: int) -> list[bytes]:
    rng = random.Random(seed)
    return [rng.randbytes(CHUNK) for _ in range(n)]


def _write(path: Path, blocks: list[bytes]) -> Path:
    path.write_bytes(b"".join(blocks))
    return path


def _repo() -> MemoryStorage:
    storage = MemoryStorage()
    Repository.init(storage, PASS, chunk_size=CHUNK)
    return storage


def _backup(storage, source: Path, name: str):
    return run_backup(Repository.open(storage, PASS, for_writing=True), BackupRequest(source=str(source), name=name))


def _restores(storage, image_id: str, source: Path, tmp_path: Path) -> bool:
    repo = Repository.open(storage, PASS)
    target = tmp_path / f"restored-{image_id[:8]}.img"
    run_disk_restore(repo, plan_disk_restore(repo, image_id, str(target)))
    return target.read_bytes() == source.read_bytes()


def _own_packs(storage, image_id: str) -> set[bytes]:
    repo = Repository.open(storage, PASS)
    image = repo.images.load(image_id)
    index = repo.chunk_index()
    return {index.get(cid).pack_id for cid in image.unique_ids()}


def _fleet(tmp_path: Path, others: int) -> tuple[MemoryStorage, Path, str]:
    """One host's disk backed up once, beside ``others`` images of other disks (a pack each)."""
    storage = _repo()
    own = _write(tmp_path / "own.img", _blocks(1, 6))
    first = _backup(storage, own, "own").id
    for i in range(others):
        _backup(storage, _write(tmp_path / f"other-{i}.img", _blocks(100 + i, 3)), f"other-{i}")
    return storage, own, first


def test_a_backup_asks_only_about_the_packs_its_image_uses(tmp_path: Path) -> None:
    storage, own, first = _fleet(tmp_path, others=40)
    recording = RecordingStorage(storage)
    again = _backup(recording, own, "own")
    assert again.parent == first and again.chunks_new == 0
    assert not [p for p in recording.listed if p.startswith("packs")], recording.listed
    asked = [n for n in recording.asked if n.startswith("packs/")]
    assert sorted(asked) == sorted(pack_name(p) for p in _own_packs(storage, again.id)), asked
    assert _restores(storage, again.id, own, tmp_path)


def test_with_few_packs_beside_its_own_one_listing_answers(tmp_path: Path) -> None:
    storage, own, _first = _fleet(tmp_path, others=3)
    storage.put("packs/zz/not-a-pack.txt", b"left here by someone")     # a stray name: not a pack, no crash
    recording = RecordingStorage(storage)
    _backup(recording, own, "own")
    assert [p for p in recording.listed if p.startswith("packs")] == ["packs"], recording.listed
    assert not [n for n in recording.asked if n.startswith("packs/")], recording.asked


def test_a_pack_deleted_outside_the_protocol_is_noticed_among_many(tmp_path: Path) -> None:
    storage, own, first = _fleet(tmp_path, others=40)
    (lost,) = _own_packs(storage, first)
    storage.delete(pack_name(lost))
    again = _backup(storage, own, "own")
    assert again.chunks_new == 6, again
    assert any("no longer exist" in w for w in again.warnings), again.warnings
    repo = Repository.open(storage, PASS)
    recorded = DamageLog.load(repo.storage, repo.envelope).copies.values()
    assert {c.pack_id for c in recorded} == {lost} and {c.reason for c in recorded} == {"missing"}
    assert _restores(storage, again.id, own, tmp_path)
    assert _restores(storage, first, own, tmp_path)        # same chunks, stored again: the old image heals
    assert run_verify(Repository.open(storage, PASS)).ok


def test_a_copy_a_compaction_moved_is_found_at_its_new_place(tmp_path: Path) -> None:
    """The index a backup loaded names pack P; a delete then rewrites P (its other chunks are no longer
    needed) and deletes it. The check finds P gone, sees the index changed, and hands out the chunks'
    new copies — none is called missing, nothing is put on record."""
    shared, dead, new = _blocks(7, 2), _blocks(8, 2), _blocks(9, 2)
    storage = _repo()
    one = _backup(storage, _write(tmp_path / "one.img", shared + dead), "one").id
    two = _backup(storage, _write(tmp_path / "two.img", shared + new), "two").id
    (old_pack,) = _own_packs(storage, one)
    backup_side = Repository.open(storage, PASS)
    index = backup_side.chunk_index(for_backup=True)           # loaded before the delete
    assert delete_images(Repository.open(storage, PASS), [one]).packs_rewritten == 1
    assert not storage.exists(pack_name(old_pack))
    image = backup_side.images.load(two)
    ids = image.ids_by_slot()[image.kinds == SLOT_DATA]
    check = PackCheck(backup_side.storage, index, backup_side.fresh_chunk_index)
    check.confirm(ids)
    assert check.gone == {old_pack} and check.moved == 2 and check.missing == 0
    assert not index.unrecorded()
    assert all(index.get(row.tobytes()).pack_id != old_pack for row in ids)
    assert all(storage.exists(pack_name(index.get(row.tobytes()).pack_id)) for row in np.unique(ids, axis=0))


def test_without_a_changed_index_a_gone_pack_is_missing_and_a_spare_copy_takes_over(tmp_path: Path) -> None:
    """A chunk stored twice (two packs): when the pack of the copy handed out is gone, the other copy
    is handed out — and its pack is checked too."""
    storage = _repo()
    blocks = _blocks(11, 3)
    source = _write(tmp_path / "a.img", blocks)
    first = _backup(storage, source, "a").id
    repo = Repository.open(storage, PASS)
    ids = repo.images.load(first).unique_ids()
    # a second copy of every chunk, in a pack of its own (what two hosts storing one chunk at once leave)
    writer = PackWriter(repo.storage, repo.envelope)
    for cid in ids:
        loc = repo.chunk_index().get(cid)
        writer.add(cid, repo.storage.get_range(pack_name(loc.pack_id), loc.offset, loc.length), loc.raw_length)
    writer.flush()
    repo.store_chunk_index(writer.written)
    (original,) = {repo.chunk_index().get(cid).pack_id for cid in ids}
    (added,) = {loc.pack_id for loc in writer.written.values()}
    (handed_out,) = _own_packs(storage, first)          # whichever of the two sorts first
    spare = added if handed_out == original else original
    storage.delete(pack_name(handed_out))
    backup_side = Repository.open(storage, PASS)
    index = backup_side.chunk_index(for_backup=True)
    check = PackCheck(backup_side.storage, index, backup_side.fresh_chunk_index)
    check.confirm(np.frombuffer(b"".join(ids), np.uint8).reshape(-1, 32))
    assert check.missing == 3 and check.moved == 0 and check.present == {spare}
    assert {index.get(cid).pack_id for cid in ids} == {spare}
    assert {c.reason for c in index.unrecorded()} == {"missing"}
