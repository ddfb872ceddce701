"""Bad input through the real CLI: each is one clear line on stderr, its documented exit code, no
traceback — and not one byte of the restore target changes (sha256 before == after).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tests.disks import loop_device, mounted, random_image, small_tmpfs
from tests.support import MIB, cli, cli_json, need, need_tool, run, sha256_file

from imgbackup.device.tools import wait_until
from imgbackup.format.layout import IMAGE_HEAD

IMAGE_SIZE = 8 * MIB


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> dict:
    """One repository per encryption mode holding one backup of a random 8 MiB image (built lazily)."""
    root = tmp_path_factory.mktemp("bad-input")
    image = random_image(root / "source.img", IMAGE_SIZE, seed=3, data_fraction=0.7)
    made: dict[str, dict] = {}

    def get(encryption: str = "aes-256-gcm") -> dict:
        if encryption not in made:
            repo = root / f"repo-{encryption}"
            cli_json("init", "--encryption", encryption, repo=repo)
            doc = cli_json("backup", image, repo=repo)
            made[encryption] = {"repo": repo, "image": image, "id": doc["id"]}
        return made[encryption]

    return {"get": get, "image": image}


@pytest.fixture
def repo(base, tmp_path: Path) -> Path:
    """A private copy of the encrypted repository, free to damage."""
    return Path(shutil.copytree(base["get"]()["repo"], tmp_path / "repo"))


@pytest.fixture
def target(tmp_path: Path) -> Path:
    """An existing target file full of other data: it must survive every refusal unchanged."""
    return random_image(tmp_path / "target.img", IMAGE_SIZE, seed=99)


def assert_refused(proc: subprocess.CompletedProcess, code: int, *targets: str | Path,
                   before: list[str] | None = None, words: tuple[str, ...] = ()) -> None:
    """The documented exit code, one 'imgbackup: error:' line, no traceback, targets unchanged."""
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("imgbackup: error: ")]
    assert proc.returncode == code, f"exit {proc.returncode}, wanted {code}: {proc.stderr}"
    assert "Traceback" not in proc.stderr
    # one error line, last; at most an informational "target: ..." line before it
    assert len(errors) == 1 and lines[-1] == errors[0] and len(lines) <= 2, proc.stderr
    for word in words:
        assert word in errors[0], f"{word!r} missing from: {errors[0]}"
    if before is not None:
        assert [sha256_file(t) for t in targets] == before, "the target was changed"


def _flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x01]))


def _only(repo: Path, folder: str) -> Path:
    files = [p for p in (repo / folder).rglob("*") if p.is_file()]
    assert len(files) == 1, files
    return files[0]


def test_wrong_passphrase_exit_4(repo: Path, target: Path) -> None:
    before = [sha256_file(target)]
    proc = cli("restore", "latest", target, "--yes", repo=repo, passphrase="not the passphrase")
    assert_refused(proc, 4, target, before=before, words=("passphrase",))


def test_missing_repository_exit_3(tmp_path: Path, target: Path) -> None:
    before = [sha256_file(target)]
    proc = cli("restore", "latest", target, "--yes", repo=tmp_path / "no-such-repo")
    assert_refused(proc, 3, target, before=before, words=("no-such-repo",))
    assert_refused(cli("list", repo=tmp_path / "no-such-repo"), 3)


def test_truncated_pack_exit_6(repo: Path, target: Path) -> None:
    pack = _only(repo, "packs")
    os.truncate(pack, pack.stat().st_size // 2)
    before = [sha256_file(target)]
    assert_refused(cli("restore", "latest", target, "--yes", repo=repo), 6, target, before=before)
    assert cli("verify", repo=repo).returncode == 11


@pytest.mark.parametrize("encryption", ["aes-256-gcm", "none"])
def test_flipped_byte_in_pack_restore_6_verify_11(base, tmp_path: Path, target: Path, encryption: str) -> None:
    repo = Path(shutil.copytree(base["get"](encryption)["repo"], tmp_path / "repo"))
    pack = _only(repo, "packs")
    _flip(pack, pack.stat().st_size // 2)          # inside a chunk blob, far from the trailer
    before = [sha256_file(target)]
    assert_refused(cli("restore", "latest", target, "--yes", repo=repo), 6, target, before=before)
    verify = cli("verify", repo=repo)
    assert verify.returncode == 11, verify.stderr
    assert "DAMAGED" in verify.stdout and "Traceback" not in verify.stderr
    # a new file target is checked chunk by chunk as it is written, and removed again on failure
    assert_refused(cli("restore", "latest", tmp_path / "new.img", "--yes", repo=repo), 6)
    assert not (tmp_path / "new.img").exists()


@pytest.mark.parametrize("part", ["header", "body"])
def test_flipped_byte_in_image_index_exit_6(base, repo: Path, target: Path, part: str) -> None:
    image_id = base["get"]()["id"]
    index = repo / "images" / image_id
    header_len = int.from_bytes(index.read_bytes()[12:16], "little")
    at = IMAGE_HEAD.size + 20 if part == "header" else IMAGE_HEAD.size + header_len + 40
    _flip(index, at)
    before = [sha256_file(target)]
    assert_refused(cli("restore", image_id[:8], target, "--yes", repo=repo), 6, target, before=before)
    assert cli("verify", repo=repo).returncode == 11


def test_target_device_too_small_exit_8(repo: Path, tmp_path: Path) -> None:
    small = random_image(tmp_path / "small.img", IMAGE_SIZE - MIB, seed=5)
    with loop_device(small) as dev:
        before = [sha256_file(dev)]
        proc = cli("restore", "latest", dev, "--yes", repo=repo)
        assert_refused(proc, 8, dev, before=before, words=(str(IMAGE_SIZE - MIB), str(IMAGE_SIZE)))


def test_mounted_target_exit_8(repo: Path, tmp_path: Path) -> None:
    need_tool("mkfs.ext4")
    backing = tmp_path / "fs.img"
    with open(backing, "wb") as f:
        f.truncate(IMAGE_SIZE)
    run("mkfs.ext4", "-q", "-E", "lazy_itable_init=0,lazy_journal_init=0", backing)
    with loop_device(backing) as dev, mounted(dev, tmp_path / "mnt", "rw,noatime"):
        run("sync")
        before = [sha256_file(dev)]
        proc = cli("restore", "latest", dev, "--yes", repo=repo)
        assert_refused(proc, 8, dev, before=before, words=("mounted",))


def test_target_with_a_mounted_partition_exit_8(repo: Path, tmp_path: Path) -> None:
    need_tool("sfdisk", "mkfs.ext4")
    backing = tmp_path / "disk.img"
    with open(backing, "wb") as f:
        f.truncate(2 * IMAGE_SIZE)
    run("sfdisk", "-q", backing, input="label: gpt\nstart=2048, size=12M\n")
    with loop_device(backing, partitions=True) as dev:
        run("mkfs.ext4", "-q", f"{dev}p1")
        with mounted(f"{dev}p1", tmp_path / "mnt", "rw,noatime"):
            run("sync")
            before = [sha256_file(dev)]
            proc = cli("restore", "latest", dev, "--yes", repo=repo)
            assert_refused(proc, 8, dev, before=before, words=("mounted",))


def test_device_without_yes_and_no_terminal_exit_2(repo: Path, target: Path) -> None:
    with loop_device(target) as dev:
        before = [sha256_file(dev)]
        assert_refused(cli("restore", "latest", dev, repo=repo), 2, dev, before=before, words=("--yes",))


HOLDER = """
import sys, time
from imgbackup.repository.lock import take_exclusive
from imgbackup.repository.backends.directory import DirectoryStorage
with take_exclusive(DirectoryStorage(sys.argv[1]), "test holder"):
    print("locked", flush=True)
    time.sleep(120)
"""


def test_repository_locked_by_live_process_exit_5(base, repo: Path) -> None:
    image = cli_json("backup", base["image"], repo=repo)["id"]
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(repo)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        proc = cli("delete", image, "--yes", repo=repo)
        assert_refused(proc, 5, words=(f"pid {holder.pid}", socket.gethostname(), "--lock-wait"))
        assert cli_json("backup", base["image"], repo=repo)["type"] == "incremental"  # backups never wait
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=10)
    # The killed holder's lease is dead at once (same host, dead pid): taken over without break-lock.
    assert (repo / "locks" / "exclusive").exists()
    assert cli_json("delete", image, "--yes", repo=repo)["deleted"] == [image]
    assert not (repo / "locks" / "exclusive").exists()
    assert [p.name for p in (repo / "locks").iterdir()] == ["reserve"]   # no lease left behind


def test_repository_disk_full_exit_10_and_still_verifies(tmp_path: Path) -> None:
    with small_tmpfs(tmp_path / "small", "3m") as mnt:
        repo = mnt / "repo"
        cli_json("init", repo=repo)
        small = random_image(tmp_path / "small.img", MIB, seed=11)
        first = cli_json("backup", small, repo=repo)
        big = random_image(tmp_path / "big.img", IMAGE_SIZE, seed=12)
        assert_refused(cli("backup", big, repo=repo), 10, words=("full",))
        assert [i["id"] for i in cli_json("list", repo=repo)["images"]] == [first["id"]]
        assert cli("verify", repo=repo).returncode == 0
        assert not [p for p in repo.rglob("*") if ".tmp-" in p.name], "temp files left behind"
        assert [p.name for p in (repo / "locks").iterdir()] == ["reserve"]   # no lease left behind, "lease not released"
        out = tmp_path / "out.img"
        cli_json("restore", first["id"], out, repo=repo)
        assert sha256_file(out) == sha256_file(small)


EIO_SERVER = """
import errno, sys, mfusepy
SIZE, BAD = int(sys.argv[2]), int(sys.argv[3])
class Disk(mfusepy.Operations):
    def getattr(self, path, fh=None):
        if path == "/":
            return {"st_mode": 0o40555, "st_nlink": 2}
        if path == "/disk.img":
            return {"st_mode": 0o100444, "st_nlink": 1, "st_size": SIZE}
        raise mfusepy.FuseOSError(errno.ENOENT)
    def readdir(self, path, fh):
        return [".", "..", "disk.img"]
    def read(self, path, size, offset, fh):
        if offset <= BAD < offset + size:
            raise mfusepy.FuseOSError(errno.EIO)
        return bytes([offset // 4096 % 251 + 1]) * min(size, max(SIZE - offset, 0))
mfusepy.FUSE(Disk(), sys.argv[1], foreground=True, ro=True, direct_io=True)
"""


def test_source_read_error_exit_7_and_nothing_committed(base, repo: Path, tmp_path: Path) -> None:
    """A source that returns EIO at one offset (a FUSE file): a clear source error, no image."""
    need_tool("fusermount3")
    try:
        import mfusepy  # noqa: F401
    except ImportError:
        need(False, "needs mfusepy (pip extra 'mount')")
    mnt = tmp_path / "fuse"
    mnt.mkdir()
    server = subprocess.Popen([sys.executable, "-c", EIO_SERVER, str(mnt), str(IMAGE_SIZE), str(5 * MIB + 7)])
    try:
        for _ in range(100):
            if (mnt / "disk.img").exists() or server.poll() is not None:
                break
            time.sleep(0.05)
        need((mnt / "disk.img").exists(), "FUSE mount did not come up")
        before = cli_json("list", repo=repo)["images"]
        proc = cli("backup", mnt / "disk.img", repo=repo)
        assert_refused(proc, 7, words=("disk.img", "read error"))
        assert cli_json("list", repo=repo)["images"] == before
        assert cli("verify", repo=repo).returncode == 0
        assert not (repo / "locks" / "exclusive").exists()
    finally:
        run("fusermount3", "-u", mnt, check=False)
        server.kill()
        server.wait(timeout=10)


def test_empty_source_file_exit_7_and_nothing_stored(repo: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty.img"
    empty.write_bytes(b"")
    before = cli_json("list", repo=repo)["images"]
    proc = cli("backup", empty, repo=repo)
    assert_refused(proc, 7, words=("empty.img", "0 bytes"))
    assert cli_json("list", repo=repo)["images"] == before


def test_loop_device_with_nothing_attached_exit_7(repo: Path) -> None:
    """A loop node of our own (made through /dev/loop-control) that has no backing file: size 0."""
    import fcntl

    need(os.geteuid() == 0 and Path("/dev/loop-control").exists(), "needs root and /dev/loop-control")
    loop_ctl_add, loop_ctl_remove = 0x4C80, 0x4C81
    ctl = os.open("/dev/loop-control", os.O_RDWR)
    try:
        number = next(n for n in range(4000 + os.getpid() % 1000, 6000)
                      if not Path(f"/dev/loop{n}").exists() and _try_add(ctl, loop_ctl_add, n))
        try:
            before = cli_json("list", repo=repo)["images"]
            proc = cli("backup", f"/dev/loop{number}", repo=repo)
            assert_refused(proc, 7, words=(f"/dev/loop{number}", "0 bytes"))
            assert cli_json("list", repo=repo)["images"] == before
        finally:
            fcntl.ioctl(ctl, loop_ctl_remove, number)
    finally:
        os.close(ctl)


def _try_add(ctl: int, request: int, number: int) -> bool:
    import fcntl

    try:
        fcntl.ioctl(ctl, request, number)
    except OSError:
        return False
    wait_until(Path(f"/dev/loop{number}").exists, 1.0)  # devtmpfs makes the node asynchronously
    return True
