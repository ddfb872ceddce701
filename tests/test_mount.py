"""Mount, verify --filesystems and restore-files on a real GPT disk (ext4 + FAT32), via the CLI.

Judges from outside: the ext4 filesystem as built (file hashes), debugfs (where a file's blocks
are), e2fsck/fsck.vfat (through verify), mtools. Every test checks that no loop device, mount or
process is left behind.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from tests.disks import MOUNT_PART1_START as PART1_START
from tests.disks import loop_device, mounted
from tests.support import MIB, need_root
from tests.test_mount_helpers import ENV, build_disk, cli, file_block, tree_hashes

from imgbackup.device.tools import wait_until
from imgbackup.engine.imageview import ImageView
from imgbackup.engine.mount.state import log_path
from imgbackup.repository.chunkreader import ChunkReader
from imgbackup.repository.packs import pack_name
from imgbackup.repository.repo import Repository


@pytest.fixture(scope="module")
def disk(tmp_path_factory):
    need_root()
    root = tmp_path_factory.mktemp("mountdisk")
    d = build_disk(root)
    with loop_device(d.part1, read_only=True) as dev, mounted(dev, root / "orig", "ro,noload"):
        d.original = tree_hashes(root / "orig")
    return d



def _repo_copy(d, tmp_path: Path) -> Path:
    copy = tmp_path / "repo"
    shutil.copytree(d.repo, copy)
    return copy


def _corrupt_chunk_at(repo_path: Path, image_id: str, disk_offset: int) -> str:
    """Flip a byte inside the stored chunk that holds ``disk_offset``; returns the chunk id (hex)."""
    repo = Repository.open(repo_path, lambda: ENV["IMGBACKUP_PASSPHRASE"].encode())
    view = ImageView(repo, image_id)
    cid = view.chunk_id_at(disk_offset)
    assert cid is not None, "the chosen offset is not in a stored chunk"
    loc = ChunkReader(repo).locate(cid)
    pack = repo_path / pack_name(loc.pack_id)
    with open(pack, "r+b") as f:
        f.seek(loc.offset + loc.length // 2)
        byte = f.read(1)
        f.seek(loc.offset + loc.length // 2)
        f.write(bytes([byte[0] ^ 0x5A]))
    return cid.hex()


def _pids_of_mount(d_mnt: Path) -> list[int]:
    """The mount's processes, from its state file (others' mounts on this machine have theirs there too)."""
    run_dir = Path(os.environ.get("IMGBACKUP_RUN_DIR", "/run/imgbackup"))
    states = [json.loads(p.read_text()) for p in run_dir.glob("mount-*.json")]
    (state,) = [s for s in states if s["mountpoint"] == str(d_mnt.resolve())]
    return [state["supervisor"]["pid"], state["server"]["pid"]]


def test_mount_serves_disk_partitions_and_files(disk, tmp_path, no_leaks):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    cli("mount", "-r", disk.repo, disk.image_id[:8], mnt, "--filesystems")
    try:
        pids = _pids_of_mount(mnt)
        assert sorted(os.listdir(mnt)) == ["disk.img", "fs", "part1.img", "part2.img"]
        with open(mnt / "disk.img", "rb") as a, open(disk.disk, "rb") as b:
            assert a.read() == b.read()
        assert (mnt / "part1.img").read_bytes() == disk.part1.read_bytes()
        with pytest.raises(OSError) as exc:
            os.open(mnt / "disk.img", os.O_RDWR)
        assert exc.value.errno in (errno.EROFS, errno.EACCES)
        assert tree_hashes(mnt / "fs" / "part1") == disk.original
        assert len(disk.original) > 100
        assert os.readlink(mnt / "fs" / "part1" / "tree" / "link") == "sub/data.txt"
        assert os.listdir(mnt / "fs" / "part2") == []          # FAT: not mountable by this kernel
    finally:
        cli("umount", mnt)
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists() or Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
    assert os.listdir(mnt) == []
    assert not log_path(str(mnt.resolve())).exists()  # a clean session leaves no log behind


def test_foreground_mount_tears_down_on_sigterm(disk, tmp_path, no_leaks):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "imgbackup", "mount", "-r", str(disk.repo), "latest", str(mnt),
                             "--filesystems", "--foreground"], env=dict(os.environ, **ENV),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert wait_until(lambda: (mnt / "fs" / "part1" / "big.bin").exists(), 15, 0.1), "never mounted"
        assert (mnt / "fs" / "part1" / "tree" / "sub" / "data.txt").read_text() == "data\n" * 1000
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
            cli("umount", mnt, check=False)
    assert proc.returncode == 130, err   # a signal ends every command with 130 and its state
    assert err.splitlines()[-1] == f"imgbackup: error: mount interrupted: nothing is left mounted at {mnt}"
    assert os.listdir(mnt) == []


def _gone(pid: int) -> bool:
    """The process no longer runs (exited, or a zombie waiting for its parent)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except OSError:
        return True


def test_umount_cleans_up_after_a_killed_supervisor(disk, tmp_path, no_leaks):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    cli("mount", "-r", disk.repo, "latest", mnt, "--filesystems")
    supervisor, server = _pids_of_mount(mnt)
    os.kill(supervisor, signal.SIGKILL)
    assert wait_until(lambda: _gone(supervisor), 10), "the killed supervisor is still there"
    assert (mnt / "fs" / "part1" / "big.bin").exists()      # everything still mounted, owner gone
    cli("umount", mnt)
    assert os.listdir(mnt) == []
    assert not log_path(str(mnt.resolve())).exists()


def test_restore_files_keeps_metadata(disk, tmp_path, no_leaks):
    out = tmp_path / "out"
    cli("restore-files", "-r", disk.repo, "latest", "--partition", "1", "/tree", "email/__init__.py", "big.bin",
        "--to", out)
    with loop_device(disk.part1, read_only=True) as dev, mounted(dev, tmp_path / "orig", "ro,noload"):
        orig = tmp_path / "orig"
        for rel in ("tree/sub/data.txt", "tree/sub", "tree", "email"):
            a, b = os.lstat(orig / rel), os.lstat(out / Path(rel))
            assert (a.st_mode, a.st_uid, a.st_gid, a.st_mtime_ns) == (b.st_mode, b.st_uid, b.st_gid, b.st_mtime_ns)
        assert (out / "big.bin").read_bytes() == (orig / "big.bin").read_bytes()
        assert (out / "email" / "__init__.py").read_bytes() == (orig / "email" / "__init__.py").read_bytes()
    data = out / "tree" / "sub" / "data.txt"
    assert stat.S_IMODE(data.stat().st_mode) == 0o640 and data.stat().st_uid == 1234
    assert os.getxattr(data, "user.origin") == b"imgbackup-test"
    assert os.readlink(out / "tree" / "link") == "sub/data.txt"
    assert os.readlink(out / "tree" / "dangling") == "/nonexistent/target"
    # FAT through mtools
    cli("restore-files", "-r", disk.repo, "latest", "--partition", "2", "/docs/hello.txt", "--to", out / "fat")
    assert (out / "fat" / "docs" / "hello.txt").read_text() == "hello from FAT\n"
    # refusals: existing target, path escaping the filesystem, missing partition
    assert cli("restore-files", "-r", disk.repo, "latest", "-p", "1", "big.bin", "--to", out, check=False) \
        .returncode == 8
    assert cli("restore-files", "-r", disk.repo, "latest", "-p", "1", "../etc", "--to", out, check=False) \
        .returncode == 2
    assert cli("restore-files", "-r", disk.repo, "latest", "-p", "7", "big.bin", "--to", out / "x", check=False) \
        .returncode == 2


def test_restore_files_same_names_keep_their_paths_and_nothing_is_overwritten(disk, tmp_path, no_leaks):
    out = tmp_path / "out"
    res = cli("restore-files", "-r", disk.repo, "latest", "/email/__init__.py", "json/__init__.py", "--to", out,
              "--json")
    doc = json.loads(res.stdout)
    assert doc["partition"] == 1 and doc["written"] == [str(out / "email" / "__init__.py"),
                                                        str(out / "json" / "__init__.py")]
    with loop_device(disk.part1, read_only=True) as dev, mounted(dev, tmp_path / "orig", "ro,noload"):
        for pkg in ("email", "json"):
            assert (out / pkg / "__init__.py").read_bytes() == (tmp_path / "orig" / pkg / "__init__.py").read_bytes()
    mine = out / "json" / "__init__.py"
    mine.write_text("my edits")
    refused = cli("restore-files", "-r", disk.repo, "latest", "json", "--to", out, check=False)
    assert refused.returncode == 8 and "already exists" in refused.stderr and "--overwrite" in refused.stderr
    assert mine.read_text() == "my edits"
    cli("restore-files", "-r", disk.repo, "latest", "json", "--to", out, "--overwrite")
    assert mine.read_text() != "my edits" and (out / "json" / "decoder.py").is_file()
    fat = out / "fat"
    (fat / "docs").mkdir(parents=True)
    (fat / "docs" / "hello.txt").write_text("mine")
    assert cli("restore-files", "-r", disk.repo, "latest", "-p", "2", "/docs", "--to", fat,
               check=False).returncode == 8
    assert (fat / "docs" / "hello.txt").read_text() == "mine"
    cli("restore-files", "-r", disk.repo, "latest", "-p", "2", "/docs", "--to", fat, "--overwrite")
    assert (fat / "docs" / "hello.txt").read_text() == "hello from FAT\n"
    assert sorted(os.listdir(fat / "docs")) == ["hello.txt"]              # merged, not nested
    overlap = cli("restore-files", "-r", disk.repo, "latest", "/tree", "/tree/sub", "--to", tmp_path / "o2",
                  check=False)
    assert overlap.returncode == 2 and "overlap" in overlap.stderr


def test_restore_files_finds_the_partition_or_says_why_not(disk, tmp_path, no_leaks):
    out = tmp_path / "out"
    doc = json.loads(cli("restore-files", "-r", disk.repo, "latest", "/docs/hello.txt", "--to", out,
                         "--json").stdout)
    assert (doc["partition"], doc["fstype"]) == (2, "vfat")
    assert (out / "docs" / "hello.txt").read_text() == "hello from FAT\n"
    text = cli("restore-files", "-r", disk.repo, "latest", "/tree/sub/data.txt", "--to", out).stdout
    assert "from partition 1 (ext4)" in text and (out / "tree" / "sub" / "data.txt").is_file()
    ambiguous = cli("restore-files", "-r", disk.repo, "latest", "/docs", "--to", tmp_path / "a", check=False)
    assert ambiguous.returncode == 2 and "--partition" in ambiguous.stderr
    assert "partition 1 and partition 2" in ambiguous.stderr
    split = cli("restore-files", "-r", disk.repo, "latest", "/big.bin", "/docs/hello.txt", "--to", tmp_path / "s",
                check=False)
    assert split.returncode == 2 and "different partitions" in split.stderr
    for args in ((), ("-p", "1"), ("-p", "2")):
        missing = cli("restore-files", "-r", disk.repo, "latest", *args, "/no/such/file", "--to", tmp_path / "m",
                      check=False)
        assert missing.returncode == 9, (args, missing.stderr)
        assert "/no/such/file" in missing.stderr and "Traceback" not in missing.stderr
    assert not (tmp_path / "a").exists() and not (tmp_path / "m").exists()


def test_damaged_data_chunk_reads_as_eio_only_there(disk, tmp_path, no_leaks):
    repo = _repo_copy(disk, tmp_path)
    block = file_block(disk.part1, "/big.bin", 600)            # 2.4 MiB into the 5 MiB file
    offset = PART1_START + block * 4096
    cid = _corrupt_chunk_at(repo, disk.image_id, offset)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    cli("mount", "-r", repo, "latest", mnt, "--filesystems")
    try:
        with pytest.raises(OSError) as exc:
            (mnt / "fs" / "part1" / "big.bin").read_bytes()
        assert exc.value.errno == errno.EIO
        with open(mnt / "disk.img", "rb") as f:
            f.seek(offset)
            with pytest.raises(OSError) as exc:
                f.read(4096)
            assert exc.value.errno == errno.EIO
            f.seek(offset - MIB - offset % MIB)                     # the chunk before reads fine
            assert f.read(4096) == disk.disk.read_bytes()[offset - MIB - offset % MIB:][:4096]
        for rel, digest in disk.original.items():
            if rel != "big.bin":
                assert hashlib.sha256((mnt / "fs" / "part1" / rel).read_bytes()).hexdigest() == digest, rel
    finally:
        cli("umount", mnt)
    kept = log_path(str(mnt.resolve()))  # a log with errors outlives the mount, for the sysadmin
    log_text = kept.read_text()
    kept.unlink()
    assert cid[:16] in log_text and "EIO" in log_text


def test_verify_filesystems_clean_and_json(disk, no_leaks):
    res = cli("verify", "-r", disk.repo, "latest", "--filesystems", "--json")
    doc = json.loads(res.stdout)
    parts = {p["name"]: p for p in doc["filesystems"]["partitions"]}
    assert parts["part1"]["fstype"] == "ext4" and parts["part1"]["ok"] and parts["part1"]["checker_exit"] == 0
    assert parts["part1"]["files"] == len(disk.original) + 2          # + the two symlinks
    assert parts["part2"]["fstype"] == "vfat" and parts["part2"]["ok"] and parts["part2"]["checker"]
    text = cli("verify", "-r", disk.repo, "latest", "--filesystems").stdout
    assert "part1: ext4" in text and "ok" in text


def test_verify_filesystems_fails_on_damaged_metadata(disk, tmp_path, no_leaks):
    repo = _repo_copy(disk, tmp_path)
    _corrupt_chunk_at(repo, disk.image_id, PART1_START + 4096)       # superblock + group descriptors
    res = cli("verify", "-r", repo, "latest", "--filesystems", "--json", check=False)
    assert res.returncode == 11, res.stderr
    parts = {p["name"]: p for p in json.loads(res.stdout)["filesystems"]["partitions"]}
    assert not parts["part1"]["ok"] and parts["part1"]["errors"]
    assert parts["part2"]["ok"]
