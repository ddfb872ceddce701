"""device/: sizes, reads, sparse extents, mount/usage detection, identity and discovery.

Everything runs against real loop devices and real filesystems; outside judges are
``blockdev``, ``dumpe2fs`` and the file bytes themselves.
"""

from __future__ import annotations

import json
import os
import random
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tests.disks import loop_device, mounted
from tests.support import need, need_tool, run

from imgbackup.device.discovery import list_devices
from imgbackup.device.identity import human_size, identify
from imgbackup.device.mounts import is_system_disk, mounts_of, usage_of
from imgbackup.device.source import alloc_buffer, data_extents, open_source
from imgbackup.errors import SourceError

MiB = 1 << 20
ODD_SIZE = 3 * MiB + 1234  # not a multiple of any sector size: exercises the unaligned tail


@pytest.fixture(scope="module")
def random_image(tmp_path_factory) -> tuple[Path, bytes]:
    path = tmp_path_factory.mktemp("dev") / "random.img"
    data = random.Random(7).randbytes(ODD_SIZE)
    path.write_bytes(data)
    return path, data


@pytest.fixture
def ext4_image(tmp_path) -> Path:
    need_tool("mkfs.ext4")
    path = tmp_path / "ext4.img"
    with open(path, "wb") as f:
        f.truncate(32 * MiB)
    run("mkfs.ext4", "-q", "-F", "-L", "devtest", path)
    return path


@pytest.fixture
def gpt_image(tmp_path) -> Path:
    """64 MiB GPT disk: p1 16 MiB ext4 (made later on the loop partition), p2 the rest."""
    need_tool("sfdisk", "partx", "mkfs.ext4")
    path = tmp_path / "gpt.img"
    with open(path, "wb") as f:
        f.truncate(64 * MiB)
    run("sfdisk", "-q", path, input="label: gpt\n,16M\n,+\n")
    return path


def _read(src, offset: int, n: int, aligned: bool) -> bytes:
    if aligned:
        buf = alloc_buffer(n)
        view = memoryview(buf)[:n]
    else:
        buf = bytearray(n + 1)
        view = memoryview(buf)[1:]  # deliberately not page aligned
    got = src.read_into(offset, view)
    out = bytes(view[:got])
    view.release()
    return out


# --- Source: sizes and sector sizes -------------------------------------------------------

def test_file_source_size_and_sectors(random_image):
    path, _ = random_image
    with open_source(path) as src:
        assert (src.size, src.is_block_device, src.logical_sector_size) == (ODD_SIZE, False, 512)
        assert src.direct is False


@pytest.mark.root
@pytest.mark.parametrize("sector", [512, 4096])
def test_loop_source_sizes_match_blockdev(tmp_path, sector):
    need_tool("blockdev")
    image = tmp_path / "disk.img"
    image.write_bytes(b"\x01" * (8 * MiB))
    with loop_device(image, sector_size=sector) as dev, open_source(dev) as src:
        assert src.is_block_device
        assert src.size == 8 * MiB == int(run("blockdev", "--getsize64", dev).stdout)
        assert src.logical_sector_size == sector == int(run("blockdev", "--getss", dev).stdout)
        assert src.physical_sector_size == int(run("blockdev", "--getpbsz", dev).stdout)
        assert identify(dev).logical_sector_size == sector


# --- Source: reads against the file bytes -------------------------------------------------

CASES = [(0, 4096), (0, ODD_SIZE), (4096, ODD_SIZE), (8192, MiB), (123, 5000),
         (ODD_SIZE - 1234 - 4096, 20000), (ODD_SIZE - 10, 10), (ODD_SIZE, 10), (ODD_SIZE + 4096, 8)]


@pytest.mark.parametrize("direct", [False, True])
@pytest.mark.parametrize("aligned", [True, False])
def test_file_read_into_matches_bytes(random_image, direct, aligned):
    path, data = random_image
    with open_source(path, direct=direct) as src:
        for offset, n in CASES:
            assert _read(src, offset, n, aligned) == data[offset:offset + n], (offset, n)


@settings(max_examples=40)
@given(offset=st.integers(0, ODD_SIZE + 100), n=st.integers(1, 2 * MiB),
       direct=st.booleans(), page=st.booleans())
def test_file_read_into_any_range(random_image, offset, n, direct, page):
    path, data = random_image
    if page:
        offset -= offset % 4096
    with open_source(path, direct=direct) as src:
        assert _read(src, offset, n, aligned=page) == data[offset:offset + n]


@pytest.mark.root
@pytest.mark.parametrize("sector", [512, 4096])
def test_loop_read_into_direct_and_buffered(random_image, sector):
    path, data = random_image
    with loop_device(path, read_only=True, sector_size=sector) as dev:
        # the loop drops the file's tail beyond a 512-byte multiple (even with 4 KiB sectors,
        # where the partial last sector gives EIO): Source counts whole sectors only
        size = int(run("blockdev", "--getsize64", dev).stdout)
        assert size == len(data) - len(data) % 512
        size -= size % sector
        for direct in (False, True):
            with open_source(dev, direct=direct) as src:
                assert src.direct is direct and src.size == size
                fdinfo = Path(f"/proc/self/fdinfo/{src._fd}").read_text()
                flags = int(fdinfo.split("flags:")[1].split()[0], 8)
                assert bool(flags & os.O_DIRECT) is direct  # the kernel really got O_DIRECT
                for offset, n in [(0, size), (4096, MiB), (512, 4096), (size - 8192, 10000),
                                  (size - 4096, 9000)]:
                    for aligned in (True, False):
                        assert _read(src, offset, n, aligned) == data[offset:min(offset + n, size)]


def test_read_into_rejects_closed_and_negative(random_image):
    src = open_source(random_image[0])
    with pytest.raises(ValueError):
        src.read_into(-1, bytearray(1))
    src.close()
    with pytest.raises(ValueError):
        src.read_into(0, bytearray(1))


# --- Source: errors -------------------------------------------------------------------------

@pytest.mark.parametrize("path, words", [
    ("/nonexistent/disk", "no such file"),
    ("/tmp", "a directory"),
    ("/dev/null", "not a regular file or block device"),
])
def test_open_errors_are_source_errors(path, words):
    with pytest.raises(SourceError) as info:
        open_source(path)
    assert words in str(info.value) and path in str(info.value)
    assert "\n" not in str(info.value)


def test_permission_denied_is_source_error(tmp_path):
    path = tmp_path / "secret.img"
    path.write_bytes(b"x" * 4096)
    path.chmod(0)
    if os.geteuid() == 0:
        pid = os.fork()
        if pid == 0:  # child: drop root, then try; exit code says what happened
            os.setuid(65534)
            try:
                open_source(path)
            except SourceError as err:
                os._exit(0 if "permission denied" in str(err) else 2)
            os._exit(1)
        assert os.waitpid(pid, 0)[1] == 0
    else:
        with pytest.raises(SourceError, match="permission denied"):
            open_source(path)


def test_eio_names_the_offset():
    # /proc/self/mem is a real file that answers EIO for unmapped addresses such as 0x1000
    with open_source("/proc/self/mem") as src, pytest.raises(SourceError) as info:
        src.read_into(4096, bytearray(16))
    assert "offset 4096" in str(info.value) and "EIO" in str(info.value)


# --- data_extents ---------------------------------------------------------------------------

def test_data_extents_of_sparse_file(tmp_path):
    path = tmp_path / "sparse.img"
    with open(path, "wb") as f:
        f.truncate(16 * MiB)
        for offset, blob in [(0, b"a" * 4096), (5 * MiB, b"b" * 8192), (16 * MiB - 4096, b"c" * 4096)]:
            f.seek(offset)
            f.write(blob)
    extents = data_extents(path)
    assert extents is not None
    covered = sum(n for _, n in extents)
    assert covered < 1 * MiB  # the holes are reported as holes
    data = path.read_bytes()
    for offset in (0, 5 * MiB, 5 * MiB + 8191, 16 * MiB - 1):
        assert any(s <= offset < s + n for s, n in extents), offset
    outside = bytearray(data)
    for s, n in extents:
        outside[s:s + n] = bytes(n)
    assert not any(outside)  # nothing non-zero lies outside the extents
    assert extents == sorted(extents) and all(n > 0 for _, n in extents)


def test_data_extents_of_hole_only_file_and_device(tmp_path):
    path = tmp_path / "empty.img"
    with open(path, "wb") as f:
        f.truncate(4 * MiB)
    assert data_extents(path) == []
    (tmp_path / "zero").touch()
    assert data_extents(tmp_path / "zero") == []
    assert data_extents("/dev/null") is None
    with pytest.raises(SourceError):
        data_extents(tmp_path / "missing")


# --- mounts and usage -----------------------------------------------------------------------

@pytest.mark.root
def test_unmounted_loop_is_not_in_use(ext4_image):
    with loop_device(ext4_image) as dev:
        state = usage_of(dev)
        assert mounts_of(dev) == [] and state.holders == [] and state.partition_mounts == {}
        assert not state.in_use and not state.mounted_read_write
        assert state.describe() == f"{dev} is not in use"
        assert not usage_of(ext4_image).in_use  # attached but unmounted: still free


@pytest.mark.root
@pytest.mark.parametrize("options, read_only", [("rw", False), ("ro", True)])
def test_mounted_disk_detected_by_device_number(ext4_image, tmp_path, options, read_only):
    # a space in the mount point: mountinfo writes it as \040
    with loop_device(ext4_image) as dev, mounted(dev, tmp_path / "mnt point", options) as mnt:
        found = mounts_of(dev)
        assert [(m.mountpoint, m.fstype, m.read_only) for m in found] == [(str(mnt), "ext4", read_only)]
        state = usage_of(dev)
        assert state.in_use and state.mounted_read_write is (not read_only)
        mode = "read-only" if read_only else "read-write"
        assert state.describe() == f"{dev} is mounted {mode} at {mnt}"
        # the image file reaches the same mount through its loop device
        assert usage_of(ext4_image).mounted_read_write is (not read_only)
        assert [m.mountpoint for m in mounts_of(ext4_image)] == [str(mnt)]
        # a symlink to the node (like /dev/disk/by-id) finds it too: matching is by major:minor
        link = tmp_path / "by-id-link"
        link.symlink_to(dev)
        assert [m.mountpoint for m in mounts_of(link)] == [str(mnt)]
    assert not usage_of(ext4_image).in_use  # and it is gone after umount


@pytest.mark.root
def test_mounted_partition_marks_its_disk(gpt_image, tmp_path):
    with loop_device(gpt_image, partitions=True) as dev:
        part1, part2 = f"{dev}p1", f"{dev}p2"
        need(Path(part1).exists(), "partx made no partition nodes")
        run("mkfs.ext4", "-q", "-F", part1)
        with mounted(part1, tmp_path / "mnt", "rw") as mnt:
            state = usage_of(dev)
            assert state.mounts == [] and list(state.partition_mounts) == [part1]
            assert state.in_use and state.mounted_read_write
            assert state.describe() == f"{part1} is mounted read-write at {mnt}"
            assert usage_of(part1).mounted_read_write
            assert not usage_of(part2).in_use  # the sibling partition is free
            assert usage_of(gpt_image).describe() == f"{part1} is mounted read-write at {mnt}"
        with mounted(part1, tmp_path / "mnt", "ro"):
            state = usage_of(dev)
            assert state.in_use and not state.mounted_read_write
        assert not usage_of(dev).in_use


@pytest.mark.root
def test_loop_stacked_on_device_is_a_holder(ext4_image):
    with loop_device(ext4_image) as dev:
        with loop_device(Path(dev), read_only=True) as upper:
            state = usage_of(dev)
            assert state.holders == [Path(upper).name] and state.in_use
            assert not state.mounted_read_write  # held, but nothing mounted
            assert state.describe() == f"{dev} is in use by {upper}"
            assert not usage_of(upper).in_use
        assert not usage_of(dev).in_use


def test_system_disk_is_the_root_filesystems_disk(tmp_path):
    root = os.stat("/").st_dev
    node = tmp_path / "root-node"
    if os.major(root) == 0 or os.geteuid() != 0:
        pytest.skip("root filesystem has no block device here (overlay, tmpfs) or not root")
    os.mknod(node, 0o600 | 0o060000, root)  # a device node for /, wherever it is named
    assert is_system_disk(node)
    assert not is_system_disk(tmp_path)  # a directory
    (tmp_path / "f.img").write_bytes(b"x")
    assert not is_system_disk(tmp_path / "f.img")  # image files are never system disks


@pytest.mark.root
def test_loop_device_is_not_a_system_disk(ext4_image):
    with loop_device(ext4_image) as dev:
        assert not is_system_disk(dev)


CHROOT_PROBE = r"""
import encodings.unicode_escape, json, os, subprocess, sys
from imgbackup.device import mounts
root, dev = sys.argv[1], sys.argv[2]
for src, sub, opts in (("proc", "proc", ["-t", "proc"]), ("/sys", "sys", ["--rbind"]), ("/dev", "dev", ["--rbind"])):
    subprocess.run(["mount", *opts, src, os.path.join(root, sub)], check=True)
os.chroot(root)
os.chdir("/")
listed = [line.info.mountpoint for line in mounts.read_mount_table()]
print(json.dumps({"root_listed": "/" in listed, "system": mounts.is_system_disk(dev)}))
"""


@pytest.mark.root
def test_system_disk_found_through_root_st_dev_when_the_mount_table_lacks_it(ext4_image, tmp_path):
    """A chroot into a directory of a loop-backed ext4 (as in a rescue shell): the kernel hides the
    mount that holds / from the chroot's mount table, yet / lives on that loop device."""
    need_tool("unshare", "mount", "umount")
    with loop_device(ext4_image) as dev, mounted(dev, tmp_path / "mnt", "rw"):
        root = tmp_path / "mnt" / "sub"
        for sub in ("proc", "sys", "dev"):
            (root / sub).mkdir(parents=True)
        assert not is_system_disk(dev)
        proc = run("unshare", "--mount", "--propagation", "private", sys.executable, "-c", CHROOT_PROBE,
                   root, dev, check=False)
        assert proc.returncode == 0, proc.stderr
        seen = json.loads(proc.stdout)
        assert seen == {"root_listed": False, "system": True}
        assert not is_system_disk(dev)      # outside the chroot it is just a loop device again


@pytest.mark.root
def test_disk_holding_an_active_swap_file_is_a_system_disk(ext4_image, tmp_path):
    need_tool("mkswap", "swapon", "swapoff")
    with loop_device(ext4_image) as dev, mounted(dev, tmp_path / "mnt", "rw"):
        swapfile = tmp_path / "mnt" / "swapfile"
        swapfile.write_bytes(bytes(8 * MiB))   # written out: a swap file must have no holes
        swapfile.chmod(0o600)
        run("mkswap", swapfile)
        assert not is_system_disk(dev)
        run("swapon", swapfile)
        try:
            assert is_system_disk(dev)
        finally:
            run("swapoff", swapfile)
        assert not is_system_disk(dev)


# --- identity and discovery -----------------------------------------------------------------

def _dumpe2fs_uuid(device: str | Path) -> str:
    for line in run("dumpe2fs", "-h", device).stdout.splitlines():
        if line.startswith("Filesystem UUID:"):
            return line.split(":", 1)[1].strip()
    raise AssertionError("dumpe2fs printed no UUID")


@pytest.mark.root
def test_identity_of_loop_device(ext4_image):
    need_tool("blkid", "dumpe2fs")
    with loop_device(ext4_image, sector_size=4096) as dev:
        ident = identify(dev)
        assert (ident.path, ident.name, ident.kind) == (dev, Path(dev).name, "loop")
        assert ident.backing_file == str(ext4_image)
        assert (ident.size, ident.logical_sector_size) == (32 * MiB, 4096)
        assert (ident.model, ident.serial, ident.parent) == (None, None, None)
        assert (ident.fstype, ident.label) == ("ext4", "devtest")
        assert ident.uuid == _dumpe2fs_uuid(dev)
        assert ident.describe() == (f"{dev}: 33.6 MB (32.0 MiB), loop device backed by "
                                    f"'{ext4_image}', ext4 filesystem 'devtest'")


def test_identity_of_image_file(ext4_image):
    ident = identify(ext4_image)
    assert (ident.kind, ident.size, ident.fstype, ident.backing_file) == ("file", 32 * MiB, "ext4", None)
    assert ident.uuid == _dumpe2fs_uuid(ext4_image)
    with pytest.raises(SourceError):
        identify("/nonexistent/disk")
    with pytest.raises(SourceError):
        identify("/dev/null")


@pytest.mark.parametrize("n, text", [(0, "0 B (0 B)"), (999, "999 B (999 B)"),
                                     (500107862016, "500.1 GB (465.8 GiB)"),
                                     (4 << 40, "4.4 TB (4.0 TiB)")])
def test_human_size(n, text):
    assert human_size(n) == text


@pytest.mark.root
def test_list_devices_shows_loop_partitions_and_mounts(gpt_image, tmp_path):
    with loop_device(gpt_image, partitions=True) as dev:
        part1 = f"{dev}p1"
        need(Path(part1).exists(), "partx made no partition nodes")
        run("mkfs.ext4", "-q", "-F", "-L", "listed", part1)
        with mounted(part1, tmp_path / "mnt", "ro") as mnt:
            for use_udev in (True, False):
                listed = {d.path: d for d in list_devices(use_udev=use_udev)}
                mine = [p for p in listed if p.startswith(dev + "p") or p == dev]
                assert mine == [dev, part1, f"{dev}p2"]  # disk first, then its partitions
                assert listed[dev].kind == "loop" and listed[dev].backing_file == str(gpt_image)
                p1 = listed[part1]
                assert (p1.kind, p1.parent, p1.fstype, p1.label) == ("part", dev, "ext4", "listed")
                assert p1.size == 16 * MiB and p1.mountpoints == [str(mnt)]
                assert listed[f"{dev}p2"].mountpoints == [] and listed[dev].mountpoints == []
                assert not any(Path(p).name.startswith(("ram", "zram")) for p in listed)
                for d in listed.values():  # no unattached loops
                    assert not d.name.startswith("loop") or d.backing_file
                data = json.loads(json.dumps([d.to_dict() for d in listed.values()]))
                row = next(r for r in data if r["path"] == part1)
                assert row["mountpoints"] == [str(mnt)] and row["mounts"][0]["read_only"] is True
