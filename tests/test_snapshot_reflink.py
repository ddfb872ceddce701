"""``backup --snapshot reflink``: an image file on XFS or btrfs imaged through a reflink clone.

A writer keeps rewriting the file while it is backed up; the image must equal the clone's content
at the moment it was taken (a hook records the clone's hash), and the clone must be gone afterwards
however the backup ends: success, failure (repository disk full), SIGINT, SIGTERM; one left by a
SIGKILLed backup is removed by the next.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from disks import loop_device, mounted, small_tmpfs
from support import cli, cli_env, cli_json, need_root, need_tool, run, sha256_file

MIB = 1 << 20
SIZE = 24 * MIB


@pytest.fixture(params=["xfs", "btrfs"])
def cowfs(request: pytest.FixtureRequest, tmp_path: Path):
    """A loop-mounted XFS (reflink=1) or btrfs holding a random 24 MiB image file."""
    need_root()
    fs = request.param
    need_tool(f"mkfs.{fs}")
    img = tmp_path / f"{fs}.img"
    with open(img, "wb") as f:
        f.truncate(320 * MIB)
    run(f"mkfs.{fs}", *(["-m", "reflink=1"] if fs == "xfs" else []), "-q" if fs == "xfs" else "-q", img)
    with loop_device(img) as dev, mounted(dev, tmp_path / "mnt", "rw") as mnt:
        src = mnt / "vm.img"
        src.write_bytes(os.urandom(SIZE))
        yield mnt, src


def _hook(tmp_path: Path, body: str) -> Path:
    hook = tmp_path / "hook.sh"
    hook.write_text(f"#!/bin/sh\n{body}\n")
    hook.chmod(0o755)
    return hook


def _clones(src: Path) -> list[Path]:
    return sorted(src.parent.glob(f".{src.name}.imgbsnap_*"))


class Writer:
    """Rewrites random 64 KiB blocks of the file until stopped (a VM writing its disk)."""

    def __init__(self, path: Path) -> None:
        self.path, self.stop, self.writes = path, threading.Event(), 0
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        fd = os.open(self.path, os.O_WRONLY)
        try:
            while not self.stop.is_set():
                os.pwrite(fd, os.urandom(65536), int.from_bytes(os.urandom(4)) % (SIZE // 65536) * 65536)
                self.writes += 1
        finally:
            os.close(fd)

    def __enter__(self) -> Writer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()


def test_image_equals_the_clone_while_a_writer_runs(cowfs, tmp_path: Path) -> None:
    mnt, src = cowfs
    repo = tmp_path / "repo"
    cli_json("init", repo=repo)
    hook = _hook(tmp_path, f'sha256sum "$1" > {tmp_path}/clone.sha; echo "$1" > {tmp_path}/clone.path')
    with Writer(src) as writer:
        time.sleep(0.2)
        doc = cli_json("backup", src, "--snapshot", "reflink", "--all-blocks", repo=repo,
                       IMGBACKUP_SNAPSHOT_HOOK=str(hook))
        time.sleep(0.2)
    assert writer.writes > 10
    assert _clones(src) == []                                     # the clone is gone
    clone_sha = (tmp_path / "clone.sha").read_text().split()[0]
    assert (tmp_path / "clone.path").read_text().strip().startswith(str(mnt / ".vm.img.imgbsnap_"))
    out = tmp_path / "restored.img"
    cli_json("restore", doc["id"], out, repo=repo)
    assert sha256_file(out) == clone_sha                          # the image is the clone, byte for byte
    assert sha256_file(src) != clone_sha                          # and the writer went on changing the file
    info = cli_json("info", doc["id"], repo=repo)
    assert info["source"]["snapshot"]["kind"] == "reflink" and doc["name"] == "vm.img"


def test_failed_backup_removes_the_clone(cowfs, tmp_path: Path) -> None:
    mnt, src = cowfs
    with small_tmpfs(tmp_path / "full", "2m") as full:
        cli_json("init", repo=full / "repo", IMGBACKUP_TEST_CHEAP_KDF="1")
        proc = cli("backup", src, "--snapshot", "reflink", repo=full / "repo")
    assert proc.returncode == 10, proc.stderr
    assert _clones(src) == []


def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


# "inherited": started as a shell script's background job is, with SIGINT ignored (SIG_IGN)
@pytest.mark.parametrize("sig,inherited", [(signal.SIGINT, "default"), (signal.SIGINT, "ignored"),
                                           (signal.SIGTERM, "ignored")])
def test_interrupted_backup_removes_the_clone(cowfs, tmp_path: Path, sig: int, inherited: str) -> None:
    mnt, src = cowfs
    repo = tmp_path / "repo"
    cli_json("init", repo=repo)
    # the hook's own child (not exec'd) must die with the backup too
    hook = _hook(tmp_path, f"touch {tmp_path}/hook.started; sleep 60 & echo $! > {tmp_path}/hook.child; wait")
    proc = subprocess.Popen([sys.executable, "-m", "imgbackup", "backup", str(src), "--snapshot", "reflink"],
                            env=cli_env(repo, IMGBACKUP_SNAPSHOT_HOOK=str(hook)), stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_ignore_sigint if inherited == "ignored" else None)
    try:
        deadline = time.monotonic() + 30
        while not (tmp_path / "hook.child").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _clones(src), "the clone never appeared"
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    assert _clones(src) == []
    assert "Traceback" not in err
    child = int((tmp_path / "hook.child").read_text())
    assert not _alive(child), "the hook's child outlived the interrupted backup"


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def test_clone_left_by_a_killed_backup_is_removed_next_time(cowfs, tmp_path: Path) -> None:
    mnt, src = cowfs
    repo = tmp_path / "repo"
    cli_json("init", repo=repo)
    hook = _hook(tmp_path, f"touch {tmp_path}/hook.started; sleep 60")
    proc = subprocess.Popen([sys.executable, "-m", "imgbackup", "backup", str(src), "--snapshot", "reflink"],
                            env=cli_env(repo, IMGBACKUP_SNAPSHOT_HOOK=str(hook)), start_new_session=True,
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while not (tmp_path / "hook.started").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert len(_clones(src)) == 1                                 # SIGKILL leaves it behind
    doc = cli_json("backup", src, "--snapshot", "reflink", repo=repo)
    assert _clones(src) == []
    assert any("left by a process that died" in w for w in doc["warnings"])


def test_reflink_on_ext4_is_refused_clearly(tmp_path: Path) -> None:
    need_root()
    img = tmp_path / "ext4.img"
    with open(img, "wb") as f:
        f.truncate(64 * MIB)
    run("mkfs.ext4", "-q", "-F", img)
    with loop_device(img) as dev, mounted(dev, tmp_path / "mnt", "rw") as mnt:
        src = mnt / "vm.img"
        src.write_bytes(hashlib.sha256(b"x").digest() * 1024)
        repo = tmp_path / "repo"
        cli_json("init", repo=repo)
        proc = cli("backup", src, "--snapshot", "reflink", repo=repo)
        assert proc.returncode == 7, proc.stderr
        assert "reflink" in proc.stderr and "XFS" in proc.stderr and "Traceback" not in proc.stderr
        assert _clones(src) == []
