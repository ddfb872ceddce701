"""A restore onto a disk that held another table and other filesystems leaves none of them behind.

The target is a real loop device over a 96 MiB GPT disk with ext4 at partitions 1 and 2 and swap
at partition 3; the images are of a 32 MiB disk (MBR, GPT, or a bare ext4 without a table), so
the old backup GPT and the old partitions 2 and 3 lie past the image's end, where the restore
writes no data. Judges: sgdisk -v, sfdisk -d, wipefs -n, blkid -p at the old partitions' starts,
e2fsck on the restored filesystem, and the bytes of the image range.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from tests.disks import loop_device
from tests.support import MIB, cli, cli_json, need_tool, run

SS = 512
TARGET_MIB = 96
IMAGE_MIB = 32
OLD_STARTS = {2: 65536 * SS, 3: 122880 * SS}     # old partitions past the image's end


def _old_gpt_disk(path: Path) -> Path:
    with open(path, "wb") as f:
        f.truncate(TARGET_MIB * MIB)
    run("sgdisk", "-n1:2048:+30M", "-n2:65536:+24M", "-n3:122880:+16M", path)
    run("mkfs.ext4", "-q", "-F", "-E", f"offset={2048 * SS}", path, "30M")
    run("mkfs.ext4", "-q", "-F", "-E", f"offset={OLD_STARTS[2]}", path, "24M")
    swap = path.parent / "swap.part"
    swap.write_bytes(bytes(16 * MIB))
    swap.chmod(0o600)
    run("mkswap", swap)
    with open(path, "r+b") as f:
        f.seek(OLD_STARTS[3])
        f.write(swap.read_bytes())
    assert {"gpt", "PMBR"} <= _signatures(path)
    return path


def _image_disk(path: Path, kind: str) -> int:
    """A 32 MiB source disk; returns the byte offset of its ext4 filesystem."""
    with open(path, "wb") as f:
        f.truncate(IMAGE_MIB * MIB)
    if kind == "none":
        run("mkfs.ext4", "-q", "-F", path)
        return 0
    if kind == "mbr":
        run("sfdisk", "-q", path, input="label: dos\n2048,,83\n")
    else:
        run("sgdisk", "-n1:2048:0", path)
    run("mkfs.ext4", "-q", "-F", "-E", f"offset={2048 * SS}", path, f"{(IMAGE_MIB - 2) * 1024}k")
    return 2048 * SS


def _signatures(dev: str | Path) -> set[str]:
    out = run("wipefs", "-n", "-p", dev).stdout.splitlines()
    return {line.split(",")[3] for line in out if line and not line.startswith("#")}


def _sha(path: str | Path, length: int) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read(length)).hexdigest()


@pytest.mark.root
@pytest.mark.parametrize("kind", ["mbr", "gpt", "none"])
def test_restore_onto_a_gpt_disk_leaves_no_stale_table_or_filesystem(tmp_path: Path, kind: str) -> None:
    need_tool("sgdisk", "sfdisk", "wipefs", "blkid", "mkfs.ext4", "mkswap", "e2fsck")
    repo = tmp_path / "repo"
    cli_json("init", repo=repo)
    source = tmp_path / "source.img"
    fs_offset = _image_disk(source, kind)
    image = cli_json("backup", source, repo=repo)["id"]
    target = _old_gpt_disk(tmp_path / "target.img")
    with loop_device(target) as dev:
        plan = cli_json("restore", image, dev, "--dry-run", repo=repo)
        cleared = [w for w in plan["writes"] if w["what"].startswith("stale signatures")]
        assert any(w["offset"] == OLD_STARTS[2] for w in cleared), plan["writes"]
        assert any(w["offset"] == OLD_STARTS[3] for w in cleared), plan["writes"]
        assert any(w["offset"] + w["length"] == TARGET_MIB * MIB for w in cleared) == (kind != "gpt")
        text = cli("restore", image, dev, "--dry-run", repo=repo).stdout
        assert "stale signatures cleared (start of old partition 2)" in text
        assert "gpt" in _signatures(dev)                       # the dry run wrote nothing

        proc = cli("restore", image, dev, "--yes", repo=repo)
        assert proc.returncode == 0, proc.stderr
        verify = run("sgdisk", "-v", dev, check=False)
        said = verify.stdout + verify.stderr
        assert "No problems found" in said and "backup" not in said and "regenerating" not in said, said
        found = _signatures(dev)
        assert found == {"mbr": {"dos"}, "gpt": {"PMBR", "gpt"}, "none": {"ext4"}}[kind], found
        if kind != "gpt":
            label = run("sfdisk", "-d", dev, check=False).stdout
            assert ("label: dos" in label) == (kind == "mbr") and "label: gpt" not in label
            assert _sha(dev, IMAGE_MIB * MIB) == _sha(source, IMAGE_MIB * MIB)
        for start in OLD_STARTS.values():
            probe = run("blkid", "-p", "-O", str(start), dev, check=False)
            assert probe.returncode == 2, f"stale signature at {start}: {probe.stdout}"
        with open(dev, "rb") as f:
            f.seek(TARGET_MIB * MIB - 33 * SS)
            tail = f.read(33 * SS)
        assert (tail.count(0) == len(tail)) == (kind != "gpt")
    fs = tmp_path / "restored.fs"
    with open(target, "rb") as f, open(fs, "wb") as out:
        f.seek(fs_offset)
        out.write(f.read(IMAGE_MIB * MIB - fs_offset - (MIB if kind == "gpt" else 0)))
    assert run("e2fsck", "-fn", fs, check=False).returncode == 0


@pytest.mark.root
def test_grown_partition_end_and_an_existing_file_target(tmp_path: Path) -> None:
    """--grow moves the last partition's end into old space; a regular file target is emptied."""
    need_tool("sgdisk", "wipefs", "blkid", "mkfs.ext4", "mkswap", "resize2fs", "e2fsck")
    repo = tmp_path / "repo"
    cli_json("init", repo=repo)
    source = tmp_path / "source.img"
    _image_disk(source, "mbr")
    image = cli_json("backup", source, repo=repo)["id"]
    target = _old_gpt_disk(tmp_path / "target.img")
    plan = cli_json("restore", image, target, "--grow", "--dry-run", repo=repo)
    assert not [w for w in plan["writes"] if w["what"].startswith("stale")]   # a file is emptied first
    with loop_device(target) as dev:
        plan = cli_json("restore", image, dev, "--grow", "--dry-run", repo=repo)
        ends = [w for w in plan["writes"] if "end of partition 1" in w["what"]]
        assert ends and ends[0]["offset"] + ends[0]["length"] == plan["partitions"][0]["end"]
        assert cli("restore", image, dev, "--grow", "--yes", repo=repo).returncode == 0
        assert _signatures(dev) == {"dos"}
        for start in OLD_STARTS.values():
            assert run("blkid", "-p", "-O", str(start), dev, check=False).returncode == 2
    with loop_device(target, offset=2048 * SS, sizelimit=plan["partitions"][0]["size"]) as part:
        assert run("e2fsck", "-fn", part, check=False).returncode == 0
