"""kill -9 at chosen points of real backups: the repository stays usable every time.

Kill points are picked by watching the repository from outside (a pack temp file appears, the
chunk-index file appears, the packs reach a fraction of a whole backup's bytes). After each kill: ``list`` shows only whole images,
``verify`` exits 0, the dead process's lock is taken over, and a new backup restores byte-exact.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from tests.disks import random_image
from tests.support import MIB, cli, cli_env, cli_json, sha256_file

SOURCE_SIZE = 160 * MIB      # mostly random: five packs of 32 MiB, a few seconds of work


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    return random_image(tmp_path_factory.mktemp("crash") / "source.img", SOURCE_SIZE, seed=21, data_fraction=0.9)


def _temp_files(repo: Path, folder: str) -> list[Path]:
    return [p for p in (repo / folder).rglob("*") if ".tmp-" in p.name]


def _files(repo: Path, folder: str) -> list[Path]:
    return [p for p in (repo / folder).rglob("*") if p.is_file() and ".tmp-" not in p.name]


def _start_backup(repo: Path, source: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "imgbackup", "backup", str(source), "--name", "src"],
                            env=cli_env(repo), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)


def _kill_when(proc: subprocess.Popen, ready: Callable[[], bool], timeout: float = 120) -> bool:
    """SIGKILL ``proc`` as soon as ``ready()``; True if it was still running when killed."""
    deadline = time.monotonic() + timeout
    try:
        while proc.poll() is None and time.monotonic() < deadline and not ready():
            time.sleep(0.0005)
        running = proc.poll() is None
        proc.kill()
        return running
    finally:
        proc.wait(timeout=30)
        proc.stderr.close()


def _assert_usable(repo: Path) -> list[str]:
    """Only whole images are listed and the repository verifies; returns the listed ids."""
    rows = cli_json("list", repo=repo)["images"]
    assert all("error" not in r for r in rows), rows
    verify = cli("verify", repo=repo)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    return [r["id"] for r in rows]


def test_kill_9_at_chosen_points_leaves_repository_usable(source: Path, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    cli_json("init", repo=repo)
    def leased() -> bool:               # a backup holds a session lease (locks/session-*), not the exclusive one
        return any(".tmp-" not in p.name for p in (repo / "locks").glob("session-*"))

    packs_before = 0

    def pack_in_progress() -> bool:     # the second pack is being written (temp name, before rename)
        return len(_files(repo, "packs")) > packs_before and bool(_temp_files(repo, "packs"))

    points: list[tuple[str, Callable[[], bool]]] = [
        ("early", leased),
        ("mid-pack", pack_in_progress),
        ("index", lambda: bool(list((repo / "index").glob("*")))),
    ]
    for what, ready in points:
        packs_before = len(_files(repo, "packs"))
        proc = _start_backup(repo, source)
        assert _kill_when(proc, ready), f"{what}: the backup ended before the kill point"
        assert leased(), f"{what}: a killed backup leaves its lease behind"
        images = _assert_usable(repo)
        if what != "index":
            assert images == [], f"{what}: an image appeared although the backup was killed"
        if what == "mid-pack":
            assert _temp_files(repo, "packs"), "kill did not land while a pack was written"

    # The dead leases of the killed processes are cleared by the next writer; the new backup restores
    # exactly; compact (not a backup: others may be writing) removes the temp leftovers.
    doc = cli_json("backup", source, "--name", "src", repo=repo)
    assert not leased()
    cli_json("compact", repo=repo)
    assert not _temp_files(repo, "packs")
    out = tmp_path / "out.img"
    cli_json("restore", doc["id"], out, repo=repo)
    assert sha256_file(out) == sha256_file(source)
    assert doc["id"] in _assert_usable(repo)


def _pack_bytes(repo: Path, ignore: frozenset[Path] = frozenset()) -> int:
    """Bytes in the repository's packs, committed or still being written (a temp name), but for ``ignore``."""
    total = 0
    for p in (repo / "packs").rglob("*"):
        with contextlib.suppress(FileNotFoundError):   # a temp pack renamed while we looked
            total += p.stat().st_size if p.is_file() and p not in ignore else 0
    return total


def test_kill_9_at_growing_progress(source: Path, tmp_path: Path) -> None:
    """Kills at fractions of a whole backup's pack bytes, watched from outside, so some land late.

    Chunks in packs no chunk-index file names are stored again, so every run writes the same
    amount and a fraction of it is a point in that run, whatever the machine's speed.
    """
    whole = tmp_path / "whole"
    cli_json("init", repo=whole)
    cli_json("backup", source, repo=whole)
    full = _pack_bytes(whole)
    repo = tmp_path / "repo"
    cli_json("init", repo=repo)
    killed = 0
    for fraction in (0.4, 0.7, 0.9, 0.98):
        earlier = frozenset((repo / "packs").rglob("*"))   # other runs' packs (a new run may sweep some)
        proc = _start_backup(repo, source)
        killed += _kill_when(proc, lambda f=fraction, e=earlier: _pack_bytes(repo, e) >= f * full)
        _assert_usable(repo)
    assert killed >= 3, "the backups ended before most kill points"
    doc = cli_json("backup", source, "--name", "src", repo=repo)
    out = tmp_path / "out.img"
    cli_json("restore", doc["id"], out, repo=repo)
    assert sha256_file(out) == sha256_file(source)


def test_leftover_temp_files_are_invisible_and_cleaned(source: Path, tmp_path: Path) -> None:
    """The atomic-write guarantee directly: a half image and a half pack under temp names."""
    small = random_image(tmp_path / "small.img", 4 * MIB, seed=8)
    repo = tmp_path / "repo"
    cli_json("init", repo=repo)
    first = cli_json("backup", small, repo=repo)
    image = repo / "images" / first["id"]
    half_image = image.with_name(f"{'ab' * 16}.tmp-999999-deadbeef")
    half_image.write_bytes(image.read_bytes()[: image.stat().st_size // 2])
    pack = _files(repo, "packs")[0]
    half_pack = pack.with_name(f"{'cd' * 32}.tmp-999999-deadbeef")
    half_pack.write_bytes(pack.read_bytes()[: pack.stat().st_size // 3])
    os.makedirs(repo / "locks", exist_ok=True)
    assert _assert_usable(repo) == [first["id"]]
    out = tmp_path / "out.img"
    cli_json("restore", "latest", out, repo=repo)
    assert sha256_file(out) == sha256_file(small)
    cli_json("backup", small, repo=repo)          # a backup leaves them (another writer may own them)
    assert half_image.exists() and half_pack.exists()
    cli_json("compact", repo=repo)                # the exclusive lease's holder sweeps the leftovers
    assert not half_image.exists() and not half_pack.exists()
    assert len(_assert_usable(repo)) == 2
