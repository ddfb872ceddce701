"""Ctrl-C and SIGTERM (issue 9 §2): real signals to real ``imgbackup`` runs, at chosen moments.

Each run must exit 130 with one line saying what state it left, and that line must be true: the
repository, the target or the mount point is checked afterwards. Moments are found by waiting for
a marker (a progress bar moving, a pack committed, a prompt), never by sleeping.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from tests.disks import build_root_disk
from tests.support import MIB, cli, cli_env, cli_json, need, need_root
from tests.terminal import CTRL_C, Terminal

from imgbackup.device.tools import wait_until

SOURCE_MIB = 640   # big enough that a run is seconds long on 2 cores, so a signal lands mid-way


def _random_file(path: Path, mib: int) -> Path:
    rng = np.random.default_rng(5)
    with open(path, "wb") as f:
        for _ in range(mib):
            f.write(rng.bytes(MIB))
    return path


@pytest.fixture(scope="module")
def big(tmp_path_factory) -> dict:
    """A 640 MiB incompressible source and a repository holding one image of it."""
    root = tmp_path_factory.mktemp("interrupts")
    source = _random_file(root / "big.img", SOURCE_MIB)
    repo = root / "repo"
    cli_json("init", repo=repo)
    image = cli_json("backup", source, repo=repo)["id"]
    return {"root": root, "source": source, "repo": repo, "image": image}


def _error_line(text: str) -> str:
    """The one error line of a run's output (stderr, or a terminal's whole output)."""
    lines = [line.strip() for line in text.replace("\r", "\n").splitlines() if "imgbackup: error:" in line]
    assert len(lines) == 1, text
    return lines[0].split("imgbackup: error: ", 1)[1]


def _wait_for(condition, what: str, timeout: float = 60) -> None:
    assert wait_until(condition, timeout, interval=0.02), f"timed out waiting for {what}"


def _committed_packs(repo: Path) -> list[Path]:
    return [p for p in (repo / "packs").glob("*/*") if ".tmp-" not in p.name]


def _bar_moving(term: Terminal, label: str) -> None:
    """Wait until the progress bar shows between 1 and 99 %."""
    term.expect(rf"{label}:\s+([1-9]|[1-9]\d)%\|")


def test_sigterm_during_backup_adds_nothing_and_says_so_in_json(big, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    cli_json("init", repo=repo)
    proc = subprocess.Popen([sys.executable, "-m", "imgbackup", "backup", str(big["source"]), "--json"],
                            env=cli_env(repo), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(lambda: _committed_packs(repo) or proc.poll() is not None, "a committed pack")
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    line = _error_line(err)
    assert re.fullmatch(r"backup interrupted: nothing was added to the repository "
                        r"\(the backup removed the [\d.]+ [KMG]iB it had written\)", line), line
    assert _committed_packs(repo) == []                      # and true: the packs it wrote are gone
    assert json.loads(out) == {"error": {"kind": "interrupted", "exit_code": 130, "message": line, "hint": ""}}
    assert list((repo / "images").iterdir()) == []          # and true: no image, half or whole
    assert not [p.name for p in (repo / "locks").iterdir() if p.name != "reserve"]   # its lease was released
    assert cli_json("list", repo=repo)["images"] == []
    again = cli_json("backup", big["source"], repo=repo)     # the repository takes the next backup
    assert again["type"] == "full"
    assert cli("verify", repo=repo).returncode == 0


def test_ctrl_c_during_backup_at_a_terminal(big, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    cli_json("init", repo=repo)
    with Terminal("backup", big["source"], repo=repo) as term:
        _bar_moving(term, "backup")
        term.send(CTRL_C)
        assert term.wait() == 130
    assert _error_line(term.text).startswith("backup interrupted: nothing was added to the repository")
    assert list((repo / "images").iterdir()) == []


def test_ctrl_c_during_restore_onto_an_existing_file(big, tmp_path: Path) -> None:
    target = tmp_path / "target.img"
    with open(target, "wb") as f:      # a pre-allocated VM disk of the image's size
        f.write(b"old content" * 1000)
        f.truncate(SOURCE_MIB * MIB)
    with Terminal("restore", big["image"], target, "--yes", repo=big["repo"]) as term:
        _bar_moving(term, "restore")
        term.send(CTRL_C)
        assert term.wait() == 130
    assert _error_line(term.text) == f"restore interrupted: {target} is partly written and not usable"
    assert target.exists()


def test_sigterm_during_restore_onto_a_new_file_removes_it(big, tmp_path: Path) -> None:
    target = tmp_path / "new.img"
    with Terminal("restore", big["image"], target, repo=big["repo"]) as term:
        _bar_moving(term, "restore")
        term.signal(signal.SIGTERM)
        assert term.wait() == 130
    assert _error_line(term.text) == f"restore interrupted: {target}, the new file it was writing, was removed"
    assert not target.exists()


def test_interrupted_before_restore_writes_leaves_the_target_alone(big, tmp_path: Path) -> None:
    target = tmp_path / "keep.img"
    with open(target, "wb") as f:
        f.write(b"keep me")
        f.truncate(SOURCE_MIB * MIB)
    with Terminal("restore", big["image"], target, repo=big["repo"]) as term:
        term.expect(r"Type '.*' to continue: ")
        term.send(CTRL_C)
        assert term.wait() == 130
    assert _error_line(term.text) == "restore interrupted: nothing was written"
    with open(target, "rb") as f:
        assert f.read(7) == b"keep me" and os.fstat(f.fileno()).st_blocks <= 8


@pytest.mark.parametrize("how", ["ctrl-c", "sigterm"])
def test_interrupt_at_the_passphrase_prompt(big, tmp_path: Path, how: str) -> None:
    with Terminal("list", repo=big["repo"], passphrase=None) as term:
        term.expect(r"Repository passphrase: $")
        term.send(CTRL_C) if how == "ctrl-c" else term.signal(signal.SIGTERM)
        assert term.wait() == 130
    assert _error_line(term.text) == "list interrupted: nothing was changed (stopped at the passphrase prompt)"
    repo = tmp_path / "new-repo"
    with Terminal("init", repo=repo, passphrase=None) as term:
        term.expect(r"Repository passphrase: $")
        term.send("a good passphrase\r")
        term.expect(r"Repeat passphrase: $")
        term.send(CTRL_C) if how == "ctrl-c" else term.signal(signal.SIGTERM)
        assert term.wait() == 130
    assert _error_line(term.text) == "init interrupted: no repository was created (stopped at the passphrase prompt)"
    assert not (repo / "config").exists()


def test_interrupted_verify_says_how_far_it_got(big) -> None:
    with Terminal("verify", repo=big["repo"]) as term:
        _bar_moving(term, "verify")
        term.send(CTRL_C)
        assert term.wait() == 130
    line = _error_line(term.text)
    found = re.fullmatch(r"verify interrupted: (\d+) of (\d+) chunks checked, no problems so far", line)
    assert found, line
    assert 0 < int(found[1]) < int(found[2]) == SOURCE_MIB


def test_sigterm_during_verify(big) -> None:
    with Terminal("verify", repo=big["repo"]) as term:
        _bar_moving(term, "verify")
        term.signal(signal.SIGTERM)
        assert term.wait() == 130
    assert re.fullmatch(r"verify interrupted: \d+ of \d+ chunks checked, no problems so far", _error_line(term.text))


def test_interrupted_delete_deletes_nothing(big, tmp_path: Path) -> None:
    with Terminal("delete", big["image"], repo=big["repo"]) as term:
        term.expect(r"\[y/N\]: ")
        term.send(CTRL_C)
        assert term.wait() == 130
    assert _error_line(term.text) == "delete interrupted: nothing was deleted"
    assert [i["id"] for i in cli_json("list", repo=big["repo"])["images"]] == [big["image"]]


def test_interrupted_foreground_mount_unmounts(big, tmp_path: Path) -> None:
    need_root()
    need(Path("/dev/fuse").exists(), "needs /dev/fuse")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    try:
        with Terminal("mount", big["image"], mnt, "--foreground", repo=big["repo"]) as term:
            term.expect(r"Ctrl-C to unmount")
            assert (mnt / "disk.img").stat().st_size == SOURCE_MIB * MIB
            term.send(CTRL_C)
            assert term.wait() == 130
    finally:
        if str(mnt) in Path("/proc/mounts").read_text():
            cli("umount", mnt)
    assert _error_line(term.text) == f"mount interrupted: nothing is left mounted at {mnt}"
    assert str(mnt) not in Path("/proc/mounts").read_text()
    assert os.listdir(mnt) == []


def test_interrupted_repair_changes_nothing_and_says_so(big) -> None:
    """repair reads every chunk before it writes: a Ctrl-C in that phase leaves everything as it was."""
    index_files = sorted(p.name for p in (big["repo"] / "index").rglob("*") if p.is_file())
    with Terminal("repair", "--yes", repo=big["repo"]) as term:
        term.expect(r"repair: [1-9][\d.]*[kKMG]i?B \[")      # a pack checked; more to go
        term.send(CTRL_C)
        assert term.wait() == 130
    assert _error_line(term.text) == "repair interrupted: nothing was changed"
    assert sorted(p.name for p in (big["repo"] / "index").rglob("*") if p.is_file()) == index_files
    assert not (big["repo"] / "locks" / "exclusive").exists()
    assert [i["id"] for i in cli_json("list", repo=big["repo"])["images"]] == [big["image"]]


def test_interrupted_collection_leaves_a_consistent_repository_that_compact_finishes(big, tmp_path: Path) -> None:
    """Ctrl-C while delete rewrites half-dead packs: the line says what was deleted and freed, the
    other image still verifies, and compact frees the rest."""
    repo = tmp_path / "repo"
    subprocess.run(["cp", "-a", str(big["repo"]), str(repo)], check=True)
    half = tmp_path / "half.img"             # every other MiB of the big source, holes between
    with open(big["source"], "rb") as src, open(half, "wb") as out:
        for mib in range(0, SOURCE_MIB, 2):
            src.seek(mib * MIB)
            out.seek(mib * MIB)
            out.write(src.read(MIB))
        out.truncate(SOURCE_MIB * MIB)
    kept = cli_json("backup", half, "--name", "half", repo=repo)
    assert kept["chunks_new"] == 0             # all shared: every pack of the big image becomes half dead
    before = set(_committed_packs(repo))
    with Terminal("delete", big["image"], "--yes", repo=repo) as term:
        _wait_for(lambda: set(_committed_packs(repo)) - before, "a pack of copied chunks")
        term.send(CTRL_C)
        assert term.wait() == 130
    line = _error_line(term.text)
    assert re.fullmatch(rf"delete interrupted: 1 of 1 image\(s\) deleted \({big['image'][:12]}\); "
                        r"(no space freed yet|[\d.]+ [KMG]iB freed so far); the repository is consistent, "
                        r"'imgbackup compact' frees the rest", line), line
    assert [i["id"] for i in cli_json("list", repo=repo)["images"]] == [kept["id"]]
    assert cli("verify", repo=repo).returncode == 0
    freed = cli_json("compact", repo=repo)
    assert freed["bytes_freed"] > 0 and freed["packs_deleted"] > 0
    assert cli("verify", repo=repo).returncode == 0


def test_interrupted_verify_still_records_the_damage_it_found(big, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    subprocess.run(["cp", "-a", str(big["repo"]), str(repo)], check=True)
    for pack in sorted(_committed_packs(repo))[::2]:      # every chunk of every other pack gets a flipped bit
        data = bytearray(pack.read_bytes())
        for offset in range(4096, len(data), 256 * 1024):
            data[offset] ^= 0x10
        pack.write_bytes(bytes(data))
    with Terminal("verify", repo=repo) as term:
        term.expect(r"verify:\s+([1-9]\d)%\|")            # 10 % of the good half: damaged ones met too
        term.send(CTRL_C)
        assert term.wait() == 130
    line = _error_line(term.text)
    found = re.fullmatch(r"verify interrupted: (\d+) of 640 chunks checked, (\d+) damaged chunk\(s\) so far; "
                         r"recorded \((damage/\S+)\)", line)
    assert found, line
    assert 0 < int(found[2]) < int(found[1]) < SOURCE_MIB
    assert (repo / found[3]).is_file()
    listed = cli("list", repo=repo)                        # the record is used: the image shows DAMAGED
    assert listed.returncode == 6 and "DAMAGED" in listed.stdout


def test_sigterm_during_restore_files_says_what_was_copied(tmp_path: Path, no_leaks) -> None:
    need_root()
    need(Path("/dev/fuse").exists(), "needs /dev/fuse")
    disk = build_root_disk(tmp_path / "root.img", 200, 160 * MIB)   # payload.bin: 160 MiB, incompressible
    repo = tmp_path / "repo"
    cli_json("init", repo=repo)
    image = cli_json("backup", disk, repo=repo)["id"]
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "imgbackup", "restore-files", "-r", str(repo), image, "-p", "2",
                             "doc", "payload.bin", "--to", str(out)], env=cli_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(lambda: (out / "payload.bin").exists() or proc.poll() is not None, "the second copy to start")
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if proc.returncode == 0:
        pytest.fail(f"restore-files ended before the signal (a faster machine than this test assumes): {err}")
    assert proc.returncode == 130, err
    assert _error_line(err) == (f"restore-files interrupted: 1 of 2 copied to {out} (/doc); "
                                "/payload.bin, being copied, is incomplete there")
    assert (out / "doc" / "copyright").read_bytes() == Path("/usr/share/doc/python3/copyright").read_bytes()
