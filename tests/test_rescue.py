"""``backup --rescue`` on a disk that really fails: nbdkit's ddrescue filter behind nbdfuse.

Judges: the filter's own map (the bad ranges must be exactly those), the source file (every
other byte must be stored exactly; restore gives zeros at the bad ranges), debugfs for where a
file's blocks are, and the CLI's exit codes and JSON.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from tests.failingdisk import failing_disk
from tests.support import MIB, cli, cli_json, need_tool, run

from imgbackup.errors import IntegrityError
from imgbackup.format.imageindex import bad_ranges

SIZE = 24 * MIB
BAD = [(MIB + 512, 512), (5 * MIB, 12288), (8 * MIB - 1024, 2048), (10 * MIB + 2560, 1024), (SIZE - 512, 512)]


def _expected(data: bytes, bad: list[tuple[int, int]]) -> bytes:
    out = bytearray(data)
    for off, length in bad:
        out[off:off + length] = bytes(length)
    return bytes(out)


@pytest.fixture
def source(tmp_path: Path) -> tuple[Path, bytes]:
    data = random.Random(11).randbytes(SIZE)
    path = tmp_path / "healthy.img"
    path.write_bytes(data)
    return path, data


@pytest.mark.root
def test_rescue_stores_every_readable_byte_and_maps_exactly_the_bad_sectors(tmp_path, source) -> None:
    path, data = source
    repo = tmp_path / "repo"
    cli_json("init", repo=repo)
    with failing_disk(path, BAD, tmp_path / "nbd") as disk:
        plain = cli("backup", disk, "--name", "dying", repo=repo)
        assert plain.returncode == 7 and "Traceback" not in plain.stderr
        assert "read error (EIO) at offset" in plain.stderr and "--rescue" in plain.stderr
        assert cli_json("list", repo=repo)["images"] == []
        assert cli("backup", disk, "--retries", "1", repo=repo).returncode == 2
        proc = cli("backup", disk, "--name", "dying", "--rescue", "--json", repo=repo)
    assert str(disk.parent) not in Path("/proc/mounts").read_text()          # unmounted, servers gone
    assert proc.returncode == 13, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["bad_ranges"] == [list(r) for r in BAD]
    unreadable = sum(n for _, n in BAD)
    assert doc["unreadable_bytes"] == unreadable
    assert f"backup stored, but {unreadable} bytes of the source were unreadable" in proc.stderr
    assert cli_json("info", doc["id"], repo=repo)["bad_ranges"] == [list(r) for r in BAD]
    assert "bad_ranges" in cli("info", doc["id"], repo=repo).stdout

    restored = tmp_path / "restored.img"
    done = cli("restore", doc["id"], restored, "--json", repo=repo)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["bad_ranges"] == [list(r) for r in BAD]
    assert "unreadable" in done.stderr
    assert restored.read_bytes() == _expected(data, BAD)
    plan = cli_json("restore", doc["id"], tmp_path / "new.img", "--dry-run", repo=repo)
    assert plan["bad_ranges"] == [list(r) for r in BAD]

    check = cli("verify", doc["id"], "--json", repo=repo)
    assert check.returncode == 0, check.stderr
    image = json.loads(check.stdout)["images"][0]
    assert image["ok"] and image["bad_ranges"] == [list(r) for r in BAD]
    assert image["unreadable_bytes"] == unreadable
    text = cli("verify", doc["id"], repo=repo).stdout
    assert f"{unreadable} bytes of the source were unreadable" in text


@pytest.mark.root
def test_incremental_of_a_rescued_image_reads_the_bad_ranges_again(tmp_path, source) -> None:
    """A change list says nothing changed, yet the parent's bad ranges are read again: the one
    that reads now leaves the map and gets its real bytes, the others stay."""
    path, data = source
    repo = tmp_path / "repo"
    cli_json("init", repo=repo)
    with failing_disk(path, BAD, tmp_path / "nbd") as disk:
        full = cli("backup", disk, "--name", "dying", "--rescue", "--json", repo=repo)
        assert full.returncode == 13, full.stderr
    nothing = tmp_path / "nothing.extents"
    nothing.write_text("# imgbackup-extents v1\n")
    healed, still = BAD[1], [r for r in BAD if r != BAD[1]]
    with failing_disk(path, still, tmp_path / "nbd") as disk:
        strict = cli("backup", disk, "--name", "dying", "--changed-blocks", nothing, repo=repo)
        assert strict.returncode == 7 and "--rescue" in strict.stderr, strict.stderr
        proc = cli("backup", disk, "--name", "dying", "--rescue", "--retries", "0", "--changed-blocks", nothing,
                   "--json", repo=repo)
    assert proc.returncode == 13, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["type"] == "incremental" and doc["bad_ranges"] == [list(r) for r in still]
    slots_with_bad = {off // MIB for off, n in BAD} | {(off + n - 1) // MIB for off, n in BAD}
    assert doc["bytes_read"] == len(slots_with_bad) * MIB     # only the slots with bad sectors
    restored = tmp_path / "restored.img"
    assert cli("restore", doc["id"], restored, repo=repo).returncode == 0
    assert restored.read_bytes() == _expected(data, still)
    assert restored.read_bytes()[healed[0]:healed[0] + healed[1]] == data[healed[0]:healed[0] + healed[1]]


def _ext4_with_file(path: Path, tmp_path: Path) -> tuple[int, int]:
    """A bare 32 MiB ext4 with a 1.5 MiB file; byte offsets of one of its blocks and of a free block
    in the same 1 MiB chunk as some of the file (so the chunk is read, but that block is not needed)."""
    need_tool("mkfs.ext4", "debugfs")
    stage = tmp_path / "stage"
    stage.mkdir()
    (stage / "file.bin").write_bytes(random.Random(5).randbytes(MIB + MIB // 2))
    with open(path, "wb") as f:
        f.truncate(32 * MIB)
    run("mkfs.ext4", "-q", "-F", "-b", "4096", "-d", stage, path)
    used = int(run("debugfs", "-R", "bmap /file.bin 100", path).stdout.split()[-1]) * 4096
    last = int(run("debugfs", "-R", "bmap /file.bin 383", path).stdout.split()[-1])
    per_chunk = MIB // 4096
    first = last // per_chunk * per_chunk
    out = run("debugfs", "-R", f"testb {first} {per_chunk}", path).stdout.splitlines()
    free = next(int(line.split()[1]) for line in out if "not in use" in line)
    return used, free * 4096


@pytest.mark.root
def test_bad_sectors_in_free_blocks_are_not_needed_and_unreadable_metadata_images_in_full(tmp_path) -> None:
    path = tmp_path / "fs.img"
    used, free = _ext4_with_file(path, tmp_path)
    data = path.read_bytes()
    repo = tmp_path / "repo"
    cli_json("init", repo=repo)
    with failing_disk(path, [(used + 1024, 512), (free, 4096)], tmp_path / "nbd") as disk:
        proc = cli("backup", disk, "--name", "fs", "--rescue", "--json", repo=repo)
    assert proc.returncode == 13, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["bad_ranges"] == [[used + 1024, 512]]
    assert any("4096 unreadable bytes lie in blocks no filesystem uses" in w for w in doc["warnings"])
    with failing_disk(path, [(1024, 512)], tmp_path / "nbd") as disk:    # the ext4 superblock
        proc = cli("backup", disk, "--name", "fs2", "--rescue", "--json", repo=repo)
    assert proc.returncode == 13, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["bad_ranges"] == [[1024, 512]]
    assert doc["bytes_read"] == len(data)                        # no usable map: every block read
    restored = tmp_path / "restored.img"
    assert cli("restore", doc["id"], restored, repo=repo).returncode == 0
    assert restored.read_bytes() == _expected(data, [(1024, 512)])


def test_bad_ranges_field_is_validated() -> None:
    meta = {"id": "x", "source": {"size": 4096, "logical_sector_size": 512}}
    assert bad_ranges(meta) == []
    assert bad_ranges(dict(meta, bad_ranges=[[0, 512], [1024, 1024]])) == [(0, 512), (1024, 1024)]
    for wrong in ("x", [[0]], [[0, 512, 1]], [[512, 512], [0, 512]], [[0, 512], [512, 512]], [[0, 0]],
                  [[-512, 512]], [[0, 100]], [[4096, 512]], [[0, True]], [[0.0, 512]]):
        with pytest.raises(IntegrityError):
            bad_ranges(dict(meta, bad_ranges=wrong))
