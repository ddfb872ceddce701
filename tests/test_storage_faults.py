"""Engines on misbehaving storage, in-process and without root: image files as sources, a memory
repository behind the fault-injecting and bit-flipping wrappers.

The fast counterpart of the kill -9 tests (test_crash.py): a backup that fails at the Nth storage
call, for every N of one run, leaves a repository that verifies and takes the next backup, which
restores byte-exact; a bit flipped in any read is detected, and no wrong byte is ever restored.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from imgbackup.engine.backup.run import BackupRequest, run_backup
from imgbackup.engine.restore.plan import plan_disk_restore
from imgbackup.engine.restore.run import run_disk_restore
from imgbackup.engine.verify.chunks import run_verify
from imgbackup.errors import ImgBackupError, IntegrityError, StorageError
from imgbackup.repository.backends.faults import BitFlipStorage, FaultyStorage
from imgbackup.repository.backends.memory import MemoryStorage
from imgbackup.repository.lock import leases
from imgbackup.repository.packs import pack_name
from imgbackup.repository.repo import Repository
from imgbackup.repository.storage import Storage

CHUNK = 64 << 10  # the smallest chunk size: many chunks from a small source
BLOCKS = 24  # source size in chunks
PASS = lambda: b"fault-pass"  # noqa: E731


def _source(path: Path, seed: int, changed: tuple[int, ...] = ()) -> Path:
    """Random chunks with zero and repeated ones among them; ``changed`` chunks rewritten."""
    rng = random.Random(seed)
    blocks = [rng.randbytes(CHUNK) for _ in range(BLOCKS)]
    blocks[3] = blocks[9] = bytes(CHUNK)
    blocks[5] = blocks[17] = blocks[2]
    for i in changed:
        blocks[i] = random.Random(seed * 1000 + i).randbytes(CHUNK)
    path.write_bytes(b"".join(blocks)[: BLOCKS * CHUNK - 1234])  # a short last chunk too
    return path


def _snapshot(storage: MemoryStorage) -> MemoryStorage:
    copy = MemoryStorage()
    copy.objects = dict(storage.objects)
    copy.times = dict(storage.times)
    return copy


def _backup(storage: Storage, source: Path) -> str:
    repo = Repository.open(storage, PASS, for_writing=True)
    return run_backup(repo, BackupRequest(source=str(source), name="disk")).id


def _restored(storage: Storage, image_id: str, target: Path) -> bytes:
    repo = Repository.open(storage, PASS)
    run_disk_restore(repo, plan_disk_restore(repo, image_id, str(target)))
    return target.read_bytes()


def _release_own_lock(storage: Storage) -> None:
    """A failed backup may leave its lease (its release was the failing call). A real process then
    exits and its lease is dead; this one lives on, so check the lease is its own and clear it."""
    for state in leases(storage):
        assert state.info.pid == os.getpid() and state.info.command.startswith("backup"), state
        storage.delete(state.name)


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("sources")
    return {"first": _source(d / "disk-v1.img", 1), "second": _source(d / "disk-v2.img", 1, changed=(0, 7, 23)),
            "third": _source(d / "disk-v3.img", 1, changed=(1, 12))}


@pytest.fixture(scope="module")
def empty_repo() -> MemoryStorage:
    storage = MemoryStorage()
    Repository.init(storage, PASS, chunk_size=CHUNK)
    return storage


@pytest.fixture(scope="module")
def repo_with_full(empty_repo, sources) -> tuple[MemoryStorage, str]:
    storage = _snapshot(empty_repo)
    return storage, _backup(storage, sources["first"])


def _count_calls(base: MemoryStorage, fault: str, source: Path) -> int:
    counter = FaultyStorage(_snapshot(base), fault, at=None)
    _backup(counter, source)
    return counter.count


@pytest.mark.parametrize("fault", ["eio", "enospc", "timeout", "drop", "short"])
@pytest.mark.parametrize("phase", ["full", "incremental"])
def test_backup_failing_at_every_storage_call_leaves_a_usable_repository(
        fault, phase, empty_repo, repo_with_full, sources, tmp_path) -> None:
    base = empty_repo if phase == "full" else repo_with_full[0]
    source = sources["first"] if phase == "full" else sources["second"]
    calls = _count_calls(base, fault, source)
    assert calls >= (2 if fault == "short" else 4)
    failed = 0
    for n in range(1, calls + 1):
        inner = _snapshot(base)
        faulty = FaultyStorage(inner, fault, at=n)
        try:
            _backup(faulty, source)
        except ImgBackupError as exc:  # never a raw OSError or a traceback-worthy error
            failed += 1
            if fault in ("eio", "enospc", "timeout", "drop"):
                assert isinstance(exc, StorageError | IntegrityError), (n, faulty.calls[-1], exc)
        assert faulty.fired == 1, (n, faulty.calls)
        _release_own_lock(inner)
        report = run_verify(Repository.open(inner, PASS))
        assert report.ok, (fault, n, faulty.calls[-1], report.to_dict())
        image_id = _backup(inner, sources["third"])
        target = tmp_path / f"restored-{n}.img"
        assert _restored(inner, image_id, target) == sources["third"].read_bytes(), (fault, n)
        target.unlink()
    assert failed >= (1 if fault == "short" else calls // 2), (fault, failed, calls)


def _read_again(calls: list[str], flipped: str, byte: tuple[str, int], storage) -> bool:
    """Whether a later read covered the flipped byte again — or the byte lies in no chunk's blob (a
    grouped read spans small gaps between the blobs it needs: a flip there harms nothing)."""
    def span(call: str) -> tuple[str, int, int] | None:
        parts = call.split()
        if len(parts) != 3 or parts[0] != "get_range":
            return None
        offset, length = map(int, parts[2].split("+"))
        return parts[1], offset, offset + length

    name, at = byte
    later = calls[calls.index(flipped) + 1:]
    if any(s is not None and s[0] == name and s[1] <= at < s[2] for s in map(span, later)):
        return True
    blobs = Repository.open(storage, PASS).chunk_index().locations.values()
    return not any(pack_name(loc.pack_id) == name and loc.offset <= at < loc.offset + loc.length for loc in blobs)


def _no_wrong_bytes(target: Path, expected: bytes) -> None:
    """Whatever a failed restore wrote: each chunk is the right one or still all zero."""
    if not target.exists():
        return
    got = target.read_bytes()
    for off in range(0, len(got), CHUNK):
        piece = got[off : off + CHUNK]
        assert piece == expected[off : off + CHUNK] or not any(piece), f"wrong bytes at {off}"


@pytest.mark.parametrize("seed", [0, 1])
def test_a_bit_flipped_in_any_read_of_a_restore_is_detected(seed, repo_with_full, sources, tmp_path) -> None:
    storage, image_id = repo_with_full
    expected = sources["first"].read_bytes()
    counter = BitFlipStorage(storage)
    _restored(counter, image_id, tmp_path / "count.img")
    assert counter.count >= 5
    detected = 0
    for n in range(1, counter.count + 1):
        target = tmp_path / f"flip-{n}.img"
        flips = BitFlipStorage(storage, at=n, seed=seed * 7919 + n)
        try:
            restored = _restored(flips, image_id, target)
        except ImgBackupError as exc:
            assert flips.fired == 1 and (exc.exit_code in (4, 6) or _version_flip(flips, exc)), \
                (n, flips.flipped, exc)                                        # damaged / key unusable
            _no_wrong_bytes(target, expected)
            detected += 1
            continue
        assert restored == expected, (n, flips.flipped)
        # No error: this run read less ahead (fewer reads than n), or the flipped answer failed
        # authentication and its bytes were read again (a grouped read-ahead chunk by chunk; a copy
        # is called damaged only when a fresh read of it fails too), so the flip was detected.
        assert not flips.flipped or _read_again(flips.calls, flips.flipped[0], flips.flipped_bytes[0], storage), \
            (n, flips.flipped)
        detected += bool(flips.flipped)
        target.unlink()
    assert detected >= counter.count // 2


def _version_flip(flips: BitFlipStorage, exc: ImgBackupError) -> bool:
    """A flip in the config's version number reads as a version this build does not know (exit 3):
    before its signature can be checked, a newer format and a damaged digit look the same."""
    return exc.exit_code == 3 and "format version" in str(exc) and flips.flipped == ["get config"]


def test_a_bit_flipped_in_any_read_of_verify_is_reported(repo_with_full) -> None:
    storage, _ = repo_with_full
    counter = BitFlipStorage(storage)
    assert run_verify(Repository.open(counter, PASS)).ok
    for n in range(1, counter.count + 1):
        flips = BitFlipStorage(storage, at=n, seed=n)
        try:
            report = run_verify(Repository.open(flips, PASS))
        except ImgBackupError as exc:
            assert exc.exit_code in (4, 6) or _version_flip(flips, exc), (n, exc)
            continue
        # a flip is either reported damage, or a read that was wrong once and right when read again
        assert not report.ok or (flips.flipped and any("read again" in w for w in report.warnings)), (n, flips.calls)


def test_the_memory_repository_works_through_its_url(sources, tmp_path) -> None:
    url = f"memory://faults-{os.urandom(4).hex()}"
    try:
        Repository.init(url, PASS, chunk_size=CHUNK)
        image_id = _backup(MemoryStorage.named(url.removeprefix("memory://")), sources["first"])
        repo = Repository.open(url, PASS)
        assert repo.location == url and repo.images.ids() == [image_id]
        assert _restored(repo.storage, image_id, tmp_path / "r.img") == sources["first"].read_bytes()
    finally:
        MemoryStorage.forget(url.removeprefix("memory://"))
