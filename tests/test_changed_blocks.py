"""Changed-block tracking end to end: used-block images, incremental chains, change lists, delete, diff.

The judge of "byte-exact in used blocks" is dumpe2fs: the expected restore is the source with every
block that dumpe2fs lists as free set to zero (4 KiB filesystem blocks, so map and judge agree in
granularity).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from pathlib import Path

import pytest
from tests.disks import loop_device, mounted
from tests.support import MIB, cli, cli_json, need_root, need_tool, run, sha256_file

FS_SIZE = 96 * MIB
BLOCK = 4096
ZERO_RUN = 4 * MIB  # the largest single write when zeroing a free range


def _free_ranges(image: Path) -> list[tuple[int, int]]:
    """(first block, last block) of every free range dumpe2fs reports."""
    out = run("dumpe2fs", image).stdout
    ranges = []
    for line in out.splitlines():
        line = line.strip()
        if line.startswith("Free blocks:"):
            for part in filter(None, (p.strip() for p in line[len("Free blocks:"):].split(","))):
                a, _, b = part.partition("-")
                ranges.append((int(a), int(b or a)))
    return ranges


def _zero_free_blocks(image: Path) -> str:
    """Zero every block dumpe2fs calls free, in place; the sha256 of what is left (the used blocks)."""
    zeros = memoryview(bytes(ZERO_RUN))
    with open(image, "r+b") as f:
        for a, b in _free_ranges(image):
            pos, end = a * BLOCK, (b + 1) * BLOCK
            while pos < end:                       # one write per run, not one per 4 KiB block
                pos += os.pwrite(f.fileno(), zeros[:min(ZERO_RUN, end - pos)], pos)
    return sha256_file(image)


def _used_blocks_image(image: Path, out: Path) -> str:
    """sha256 of ``image`` with every free block (per dumpe2fs) zeroed: the content a restore must hold."""
    shutil.copyfile(image, out)
    return _zero_free_blocks(out)


def _make_fs(path: Path, tree: Path) -> None:
    tree.mkdir()
    rng = __import__("random").Random(5)
    for i in range(12):
        (tree / f"f{i}.bin").write_bytes(rng.randbytes(rng.randint(50_000, 2_000_000)))
    shutil.copytree(next(Path("/usr/lib").glob("python3.*[0-9]")) / "json", tree / "json",
                    ignore=shutil.ignore_patterns("__pycache__"))
    with open(path, "wb") as f:
        f.truncate(FS_SIZE)
    run("mkfs.ext4", "-q", "-F", "-b", str(BLOCK), "-E", "lazy_itable_init=0,lazy_journal_init=0",
        "-d", tree, path)


def _change(path: Path, mnt: Path, step: int) -> None:
    """A real change set through the kernel: add, edit and delete files."""
    rng = __import__("random").Random(100 + step)
    with loop_device(path) as dev, mounted(dev, mnt, "rw"):
        (mnt / f"new{step}.bin").write_bytes(rng.randbytes(300_000))
        victim = mnt / f"f{step}.bin"
        if victim.exists():
            victim.unlink()
        with open(mnt / "f11.bin", "r+b") as f:
            f.seek(step * 40_000)
            f.write(rng.randbytes(8_000))


@pytest.fixture
def fs_image(tmp_path: Path) -> Path:
    need_root()
    need_tool("mkfs.ext4", "dumpe2fs", "e2fsck")
    image = tmp_path / "fs.img"
    _make_fs(image, tmp_path / "tree")
    return image


def test_five_image_chain_restores_each_image_and_survives_deletes(fs_image: Path, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    cli_json("init", repo=repo)
    images = []
    for step in range(5):
        if step:
            _change(fs_image, tmp_path / "mnt", step)
        expected = _used_blocks_image(fs_image, tmp_path / f"expected{step}.img")
        doc = cli_json("backup", fs_image, "--name", "fs", repo=repo)
        assert doc["bytes_read"] < FS_SIZE  # free space is not read
        assert doc["type"] == ("full" if step == 0 else "incremental")
        if step:
            # a ~0.6 MB change set: a small multiple of it, far from the disk size
            assert doc["bytes_stored"] < 8 * MIB, doc
            assert doc["parent"] == images[-1][0]
        images.append((doc["id"], expected))

    def check_all(present):
        for image_id, expected in present:
            out = tmp_path / "out.img"
            cli_json("restore", image_id, out, "--yes", repo=repo)
            fsck = run("e2fsck", "-fn", out, check=False)
            assert fsck.returncode == 0, fsck.stdout
            # free blocks may hold a parent's old bytes (a reused chunk): compare the used blocks
            assert _zero_free_blocks(out) == expected
            out.unlink()

    check_all(images)
    for victim in (2, 0):  # a middle image, then the first full one
        doc = cli_json("delete", images[victim][0], "--yes", repo=repo)
        assert doc["deleted"] == [images[victim][0]]
        images.pop(victim)
        assert cli("verify", repo=repo).returncode == 0
        check_all(images)


def test_unchanged_second_backup_stores_almost_nothing(fs_image: Path, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    cli_json("init", repo=repo)
    first = cli_json("backup", fs_image, repo=repo)
    second = cli_json("backup", fs_image, repo=repo)
    assert second["bytes_read"] == first["bytes_read"] < FS_SIZE
    assert second["chunks_new"] == 0 and second["chunks_changed"] == 0
    assert second["bytes_stored"] < 64 * 1024  # only the index


def _write_at(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        os.pwrite(f.fileno(), data, offset)


def test_change_list_reads_only_listed_ranges_and_verify_unchanged_catches_a_wrong_one(tmp_path: Path) -> None:
    disk = tmp_path / "raw.img"
    rng = __import__("random").Random(9)
    disk.write_bytes(rng.randbytes(32 * MIB))
    repo = tmp_path / "repo"
    cli_json("init", repo=repo)
    base = cli_json("backup", disk, "--all-blocks", repo=repo)
    _write_at(disk, 3 * MIB + 100, b"A" * 5000)
    _write_at(disk, 20 * MIB, b"B" * 3000)
    state = sha256_file(disk)

    good = tmp_path / "good.txt"
    good.write_text(f"# imgbackup-extents v1\n{3 * MIB + 100} 5000\n{20 * MIB:#x} 3000\n")
    doc = cli_json("backup", disk, "--all-blocks", "--changed-blocks", good, repo=repo)
    assert doc["bytes_read"] == 2 * MIB and doc["parent"] == base["id"]
    out = tmp_path / "out.img"
    cli_json("restore", doc["id"], out, "--yes", repo=repo)
    assert sha256_file(out) == state

    _write_at(disk, 7 * MIB, b"C" * 4096)
    _write_at(disk, 11 * MIB, b"D" * 4096)
    state = sha256_file(disk)
    wrong = tmp_path / "wrong.txt"
    wrong.write_text(f"{7 * MIB} 4096\n")  # omits the change at 11 MiB
    trusting = cli_json("backup", disk, "--all-blocks", "--changed-blocks", wrong, repo=repo)
    cli_json("restore", trusting["id"], out, "--yes", repo=repo)
    assert sha256_file(out) != state  # a wrong list, trusted, misses the change: the reason for the check
    checked = cli_json("backup", disk, "--all-blocks", "--changed-blocks", wrong, "--verify-unchanged", "100",
                       repo=repo)
    assert any("change list is wrong" in w for w in checked["warnings"]), checked["warnings"]
    cli_json("restore", checked["id"], out, "--yes", repo=repo)
    assert sha256_file(out) == state


def test_diff_lists_the_changed_extents(tmp_path: Path) -> None:
    disk = tmp_path / "raw.img"
    disk.write_bytes(__import__("random").Random(3).randbytes(16 * MIB))
    repo = tmp_path / "repo"
    cli_json("init", "--chunk-size", str(256 * 1024), repo=repo)
    a = cli_json("backup", disk, repo=repo)
    _write_at(disk, 5 * MIB + 10, b"x" * 10)
    _write_at(disk, 9 * MIB, b"y" * (600 * 1024))
    b = cli_json("backup", disk, repo=repo)
    diff = cli_json("diff", a["id"], b["id"], repo=repo)
    assert [(e["offset"], e["length"]) for e in diff["extents"]] == [(5 * MIB, 256 * 1024), (9 * MIB, 768 * 1024)]
    text = cli("diff", a["id"], b["id"], repo=repo)
    assert text.returncode == 0
    # the text form is itself a valid change list
    listed = tmp_path / "changes.txt"
    listed.write_text(text.stdout)
    assert re.fullmatch(r"(\d+ \d+\n)+", text.stdout)


def test_sparse_file_holes_are_not_read(tmp_path: Path) -> None:
    disk = tmp_path / "sparse.img"
    with open(disk, "wb") as f:
        f.truncate(1 << 30)
        os.pwrite(f.fileno(), b"data" * 100_000, 100 * MIB)
    repo = tmp_path / "repo"
    cli_json("init", repo=repo)
    doc = cli_json("backup", disk, repo=repo)
    assert doc["bytes_read"] <= 2 * MIB
    out = tmp_path / "out.img"
    cli_json("restore", doc["id"], out, "--yes", repo=repo)
    assert hashlib.sha256(out.read_bytes()).hexdigest() == sha256_file(disk)
    assert out.stat().st_blocks * 512 < 8 * MIB  # the restore stays sparse


def test_deleting_files_adds_almost_nothing_to_the_next_image(fs_image: Path, tmp_path: Path) -> None:
    """Freed blocks read as zeros now; chunks that differ only there reuse the parent's chunk."""
    repo = tmp_path / "repo"
    cli_json("init", repo=repo)
    first = cli_json("backup", fs_image, repo=repo)
    with loop_device(fs_image) as dev, mounted(dev, tmp_path / "mnt", "rw"):
        for name in ("f1.bin", "f3.bin", "f5.bin", "f7.bin"):
            (tmp_path / "mnt" / name).unlink()
    expected = _used_blocks_image(fs_image, tmp_path / "expected.img")
    second = cli_json("backup", fs_image, repo=repo)
    assert second["parent"] == first["id"]
    # only metadata chunks (bitmaps, inode table, directory) are new: far less than the deleted data
    assert second["chunks_new"] <= 4, second
    assert second["bytes_stored"] < 512 * 1024, second
    out = tmp_path / "out.img"
    cli_json("restore", second["id"], out, "--yes", repo=repo)
    assert run("e2fsck", "-fn", out, check=False).returncode == 0
    assert _zero_free_blocks(out) == expected


def test_a_damaged_parent_chunk_does_not_stop_the_next_backup(fs_image: Path, tmp_path: Path) -> None:
    """Proving a slot differs only in freed blocks reads the parent's chunk; damage there is no match."""
    from imgbackup.repository.chunkindex import ChunkIndex
    from imgbackup.repository.packs import pack_name
    from imgbackup.repository.repo import Repository

    repo = tmp_path / "repo"
    cli_json("init", repo=repo)
    first = cli_json("backup", fs_image, repo=repo)
    opened = Repository.open(repo, lambda: b"test-pass")
    for loc in ChunkIndex.load(opened.storage, opened.envelope).locations.values():
        with open(repo / pack_name(loc.pack_id), "r+b") as f:  # one flipped byte inside every chunk
            f.seek(loc.offset + loc.length // 2)
            byte = f.read(1)[0]
            f.seek(loc.offset + loc.length // 2)
            f.write(bytes([byte ^ 0x40]))
    with loop_device(fs_image) as dev, mounted(dev, tmp_path / "mnt", "rw"):
        for name in ("f1.bin", "f3.bin"):
            (tmp_path / "mnt" / name).unlink()
    second = cli_json("backup", fs_image, repo=repo)
    assert second["parent"] == first["id"]
    (warning,) = [w for w in second["warnings"] if "damaged" in w and "verify" in w]
    damaged = int(warning.split()[0])
    assert damaged >= 1 and second["chunks_new"] >= damaged  # not proven equal: stored anew
    assert list((repo / "damage").iterdir()), "the backup recorded the damaged parent chunks"
    assert cli("verify", repo=repo).returncode == 11
