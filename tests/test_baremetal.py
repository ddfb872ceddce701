"""Bare-metal restore without booting: refusals, --dry-run, --delta and --partition.

One small GPT disk (a 4 MiB partition, then an ext4 root to the end holding real files) is
backed up once per module. Outside judges: sgdisk, e2fsck, debugfs, sha256 of the target.
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
from pathlib import Path

import pytest
from tests.disks import ROOT_START, blank, build_root_disk, loop_device, mounted
from tests.support import cli, cli_json, need_root, need_tool, run, sha256_file

MIB = 1 << 20
SS = 512


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A repository holding one image of a 64 MiB disk with 3 MiB of random data in its root."""
    base = tmp_path_factory.mktemp("baremetal")
    repo = base / "repo"
    cli_json("init", repo=repo)
    disk = build_root_disk(base / "disk.img", 64, 3 * MIB)
    image = cli_json("backup", disk, "--name", "disk", repo=repo)["id"]
    return {"base": base, "repo": repo, "disk": disk, "image": image}


def root_range(disk: Path) -> tuple[int, int]:
    """(offset, length) in bytes of partition 2 as sgdisk's judge sfdisk sees it."""
    out = run("sfdisk", "-d", disk).stdout
    line = next(x for x in out.splitlines() if x.startswith(f"{disk}2"))
    fields = dict(f.strip().split("=", 1) for f in line.split(":", 1)[1].split(",") if "=" in f)
    return int(fields["start"]) * SS, int(fields["size"]) * SS


def test_smaller_disk_with_data_past_the_end_is_refused(env: dict, tmp_path: Path) -> None:
    big = build_root_disk(tmp_path / "full.img", 64, 40 * MIB, seed=9)
    image = cli_json("backup", big, "--name", "full", repo=env["repo"])["id"]
    target = blank(tmp_path / "t.img", 32 * MIB)
    before = sha256_file(target)
    proc = cli("restore", image, target, "--yes", repo=env["repo"])
    assert proc.returncode == 8, proc.stderr
    assert "bytes needed" in proc.stderr
    needed = int(proc.stderr.split("about ")[1].split(" bytes")[0])
    assert needed > 40 * MIB + ROOT_START
    assert sha256_file(target) == before


def test_shrink_refused_for_a_filesystem_that_cannot_shrink(env: dict, tmp_path: Path) -> None:
    """Partition 2 overwritten with random bytes: no ext there, a smaller disk is refused."""
    disk = tmp_path / "noext.img"
    shutil.copyfile(env["disk"], disk)
    start, length = root_range(disk)
    with open(disk, "r+b") as f:
        f.seek(start)
        f.write(random.Random(5).randbytes(2 * MIB))
    image = cli_json("backup", disk, "--name", "noext", repo=env["repo"])["id"]
    target = blank(tmp_path / "t.img", 48 * MIB)
    proc = cli("restore", image, target, "--yes", repo=env["repo"])
    assert proc.returncode == 8 and "only ext2/3/4 can be shrunk" in proc.stderr, proc.stderr
    assert target.read_bytes() == bytes(48 * MIB)


def test_dry_run_shows_the_plan_and_writes_nothing(env: dict, tmp_path: Path) -> None:
    target = blank(tmp_path / "t.img", 128 * MIB)
    plan = cli_json("restore", env["image"], target, "--grow", "--dry-run", repo=env["repo"])
    assert plan["disk_size"] == 128 * MIB and plan["table"] == "gpt"
    assert plan["target"]["path"] == str(target) and "existing file" in plan["target"]["description"]
    last = plan["partitions"][-1]
    assert last["start"] == ROOT_START and last["end"] == 127 * MIB  # grown to the last whole MiB
    assert any("grown" in w["what"] for w in plan["writes"])
    assert plan["bytes_to_write"] > 3 * MIB
    text = cli("restore", env["image"], target, "--grow", "--dry-run", repo=env["repo"])
    assert text.returncode == 0
    assert "partition 2: sectors 12288-260095" in text.stdout and "nothing written" in text.stdout
    assert target.read_bytes() == bytes(128 * MIB)


def test_mounted_target_is_refused(env: dict, tmp_path: Path) -> None:
    need_root()
    disk = blank(tmp_path / "m.img", 64 * MIB)
    run("mkfs.ext4", "-q", "-F", disk)
    with loop_device(disk) as dev, mounted(dev, tmp_path / "mnt", "ro"):
        before = sha256_file(dev)
        proc = cli("restore", env["image"], dev, "--yes", repo=env["repo"])
        assert proc.returncode == 8 and "mounted" in proc.stderr, proc.stderr
        assert sha256_file(dev) == before


def test_grow_onto_larger_loop_device(env: dict, tmp_path: Path) -> None:
    need_root()
    target = blank(tmp_path / "big.img", 128 * MIB)
    with loop_device(target) as dev:
        doc = cli_json("restore", env["image"], dev, "--grow", "--yes", repo=env["repo"])
    assert "resize2fs" in " ".join(doc["notes"])
    assert "No problems found" in run("sgdisk", "-v", target).stdout
    start, length = root_range(target)
    assert start + length == 127 * MIB
    with loop_device(target, offset=start, sizelimit=length) as dev:
        assert run("e2fsck", "-fn", dev, check=False).returncode == 0
        blocks = int(run("dumpe2fs", "-h", dev).stdout.split("Block count:")[1].split()[0])
        assert blocks * 4096 == length  # the filesystem was grown to fill the partition
    # everything before the root partition is byte-identical to the source
    assert target.read_bytes()[MIB:ROOT_START] == env["disk"].read_bytes()[MIB:ROOT_START]


def test_delta_writes_only_changed_chunks(env: dict, tmp_path: Path) -> None:
    newer = tmp_path / "newer.img"
    shutil.copyfile(env["disk"], newer)
    start, length = root_range(newer)
    part = tmp_path / "root.fs"
    with open(newer, "rb") as f:
        f.seek(start)
        part.write_bytes(f.read(length))
    extra = tmp_path / "extra.bin"
    extra.write_bytes(os.urandom(2 * MIB))
    run("debugfs", "-w", "-R", f"write {extra} extra.bin", part)
    with open(newer, "r+b") as f:
        f.seek(start)
        f.write(part.read_bytes())
    new_id = cli_json("backup", newer, "--name", "disk", repo=env["repo"])["id"]
    expected = tmp_path / "expected.img"
    cli_json("restore", new_id, expected, repo=env["repo"])
    target = tmp_path / "target.img"
    cli_json("restore", env["image"], target, repo=env["repo"])   # the older state
    doc = cli_json("restore", new_id, target, "--delta", "--yes", repo=env["repo"])
    assert doc["bytes_read"] == 64 * MIB
    assert 2 * MIB <= doc["bytes_written"] <= 8 * MIB      # the new file's chunks plus fs metadata
    assert sha256_file(target) == sha256_file(expected)
    again = cli_json("restore", new_id, target, "--delta", "--yes", repo=env["repo"])
    assert again["bytes_written"] == 0 and again["bytes_zeroed"] == 0


def test_partition_restore_to_file(env: dict, tmp_path: Path) -> None:
    out = tmp_path / "p2.img"
    doc = cli_json("restore", env["image"], out, "--partition", "2", repo=env["repo"])
    start, length = root_range(env["disk"])
    assert out.stat().st_size == length
    assert out.read_bytes() == env["disk"].read_bytes()[start:start + length]
    assert run("e2fsck", "-fn", out, check=False).returncode == 0
    assert doc["bytes_written"] >= 3 * MIB
    missing = cli("restore", env["image"], tmp_path / "p9.img", "--partition", "9", repo=env["repo"])
    assert missing.returncode == 8 and "no partition 9" in missing.stderr


def test_partition_restore_onto_smaller_file_shrinks_ext(env: dict, tmp_path: Path) -> None:
    out = blank(tmp_path / "p2small.img", 24 * MIB)
    cli_json("restore", env["image"], out, "--partition", "2", "--yes", repo=env["repo"])
    assert out.stat().st_size == 24 * MIB
    assert run("e2fsck", "-fn", out, check=False).returncode == 0
    dumped = tmp_path / "payload.bin"
    run("debugfs", "-R", f"dump /payload.bin {dumped}", out)
    assert dumped.stat().st_size == 3 * MIB
    assert dumped.read_bytes() == random_payload(env)


def random_payload(env: dict) -> bytes:
    """The payload as it is inside the source disk's root (read back by debugfs, the judge)."""
    start, length = root_range(env["disk"])
    fs = env["base"] / "source-root.fs"
    if not fs.exists():
        with open(env["disk"], "rb") as f:
            f.seek(start)
            fs.write_bytes(f.read(length))
    out = env["base"] / "source-payload.bin"
    run("debugfs", "-R", f"dump /payload.bin {out}", fs)
    return out.read_bytes()


def test_grow_xfs_with_xfs_growfs(env: dict, tmp_path: Path) -> None:
    """XFS grows only while mounted: the restore mounts it on a temp dir, grows it, unmounts it."""
    need_root()
    need_tool("mkfs.xfs", "xfs_repair", "xfs_db")
    disk = blank(tmp_path / "xfs.img", 322 * MIB)        # mkfs.xfs wants at least 300 MiB
    run("sgdisk", "-o", "-n1:2048:0", disk)
    start, length = root_range_n(disk, 1)
    with loop_device(disk, offset=start, sizelimit=length) as dev:
        run("mkfs.xfs", "-q", "-f", "-L", "bmxfs", dev)
    image = cli_json("backup", disk, "--name", "xfs", repo=env["repo"])["id"]
    target = blank(tmp_path / "big.img", 400 * MIB)
    doc = cli_json("restore", image, target, "--grow", "--yes", repo=env["repo"])
    assert any("xfs_growfs" in n for n in doc["notes"]), doc["notes"]
    new_start, new_length = root_range_n(target, 1)
    assert new_start == start and new_start + new_length == 399 * MIB
    with loop_device(target, offset=new_start, sizelimit=new_length) as dev:
        assert run("xfs_repair", "-n", dev, check=False).returncode == 0
        dblocks = int(run("xfs_db", "-r", "-c", "sb 0", "-c", "p dblocks", dev).stdout.split("=")[1])
        assert dblocks * 4096 == new_length
    assert f"{tempfile.gettempdir()}/imgbackup-grow-" not in Path("/proc/mounts").read_text()  # ours (TMPDIR)


def root_range_n(disk: Path, number: int) -> tuple[int, int]:
    out = run("sfdisk", "-d", disk).stdout
    line = next(x for x in out.splitlines() if x.startswith(f"{disk}{number} "))
    fields = dict(f.strip().split("=", 1) for f in line.split(":", 1)[1].split(",") if "=" in f)
    return int(fields["start"]) * SS, int(fields["size"]) * SS


def test_shrink_refusal_names_resize2fs_minimum(tmp_path: Path) -> None:
    """When the used-map estimate passes but resize2fs -P says no, the refusal names its minimum."""
    from imgbackup.engine.restore.resize import shrink_ext_file
    from imgbackup.errors import TargetRefused

    need_tool("mkfs.ext4", "resize2fs", "e2fsck")
    fs = tmp_path / "fs.img"
    stage = tmp_path / "stage"
    stage.mkdir()
    (stage / "payload.bin").write_bytes(random.Random(1).randbytes(12 * MIB))
    run("mkfs.ext4", "-q", "-F", "-b", "4096", "-d", stage, fs, "32M")
    with pytest.raises(TargetRefused) as err:
        shrink_ext_file(str(fs), 8 * MIB, 1000)
    estimate = int(run("resize2fs", "-P", fs).stdout.split(":")[-1]) * 4096
    assert f"at least {estimate} bytes" in str(err.value)
    assert f"needs {1000 + estimate} bytes" in str(err.value)
    assert fs.stat().st_size == 32 * MIB                   # refused before resize2fs touched it
    shrink_ext_file(str(fs), 24 * MIB, 0)                 # room enough: shrunk, clean, cut
    assert fs.stat().st_size == 24 * MIB
    blocks = int(run("dumpe2fs", "-h", fs).stdout.split("Block count:")[1].split()[0])
    assert blocks * 4096 == 24 * MIB
    assert run("e2fsck", "-fn", fs, check=False).returncode == 0


def test_dry_run_on_a_device_names_it_and_4kn_is_refused(env: dict, tmp_path: Path) -> None:
    need_root()
    target = blank(tmp_path / "dev.img", 96 * MIB)
    with loop_device(target) as dev:
        plan = cli_json("restore", env["image"], dev, "--dry-run", repo=env["repo"])
        assert plan["identity"]["kind"] == "loop" and plan["identity"]["size"] == 96 * MIB
        assert plan["identity"]["backing_file"] == str(target)
        assert plan["partitions"][-1]["end"] == sum(root_range(env["disk"]))   # not grown without --grow
    with loop_device(target, sector_size=4096) as dev:
        proc = cli("restore", env["image"], dev, "--yes", repo=env["repo"])
        assert proc.returncode == 8 and "4096-byte sectors" in proc.stderr, proc.stderr
    assert target.read_bytes() == bytes(96 * MIB)
