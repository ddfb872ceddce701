"""Space that is reclaimed (issue 9 §4): a failed or interrupted backup removes what it wrote, compact
removes what killed runs left, and a full repository disk never leaves the user stuck.

Real parts: a tmpfs that really fills up (ENOSPC from the kernel), real SIGINT/SIGTERM/SIGKILL sent
to real backup processes.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.disks import random_image, small_tmpfs
from tests.support import MIB, cli, cli_env, cli_json, sha256_file


def objects(repo: Path, folder: str) -> set[str]:
    return {str(p.relative_to(repo)) for p in (repo / folder).rglob("*") if p.is_file() and ".tmp-" not in p.name}


def temp_files(repo: Path) -> list[Path]:
    return [p for p in repo.rglob("*") if ".tmp-" in p.name]


def restores(repo: Path, image_id: str, source: Path, tmp: Path) -> bool:
    out = tmp / f"out-{image_id[:8]}.img"
    out.unlink(missing_ok=True)
    return cli("restore", image_id, out, repo=repo).returncode == 0 and sha256_file(out) == sha256_file(source)


def fill(directory: Path) -> Path:
    """Fill the filesystem holding ``directory`` to the last byte with a file outside the repository."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for size in (1 << 20, 65536, 4096, 1):
            with contextlib.suppress(OSError):
                while True:
                    os.write(fd, b"\xa5" * size)
    finally:
        os.close(fd)
    assert os.statvfs(directory).f_bavail == 0
    return filler


def test_backup_on_a_full_disk_exits_10_and_leaves_nothing_then_delete_and_compact_work(tmp_path: Path) -> None:
    with small_tmpfs(tmp_path / "disk", "26m") as disk:
        repo = disk / "repo"
        cli_json("init", repo=repo)
        small = random_image(tmp_path / "small.img", 3 * MIB, seed=51)
        first = cli_json("backup", small, repo=repo)
        before = {f: objects(repo, f) for f in ("packs", "index", "images", "damage")}
        big = random_image(tmp_path / "big.img", 40 * MIB, seed=52)  # one 16 MiB pack commits, the next cannot
        proc = cli("backup", big, repo=repo)
        assert proc.returncode == 10, proc.stderr
        (line,) = [ln for ln in proc.stderr.splitlines() if ln.strip()]
        assert line.startswith("imgbackup: error: repository disk is full") and "Traceback" not in proc.stderr
        assert "removed the 16.0 MiB" in line and "imgbackup compact" in line and "delete old images" in line
        assert {f: objects(repo, f) for f in before} == before, "the failed backup left objects behind"
        assert not temp_files(repo) and not (repo / "locks" / "exclusive").exists()
        assert cli("verify", repo=repo).returncode == 0

        # the disk filled to the last byte by something else: delete and compact still run
        filler = fill(disk)
        assert cli("backup", small, "--name", "again", repo=repo).returncode == 10
        compact = cli("compact", "--json", repo=repo)
        assert compact.returncode == 0, compact.stderr
        deleted = cli("delete", first["id"], "--yes", "--json", repo=repo)
        assert deleted.returncode == 0, deleted.stderr
        assert json.loads(deleted.stdout)["bytes_freed"] > 3 * MIB
        assert objects(repo, "packs") == set() and objects(repo, "images") == set()
        doc = cli_json("backup", random_image(tmp_path / "one.img", 2 * MIB, seed=53), repo=repo)
        assert cli("verify", repo=repo).returncode == 0
        assert restores(repo, doc["id"], tmp_path / "one.img", tmp_path)
        filler.unlink()
        medium = random_image(tmp_path / "medium.img", 18 * MIB, seed=54)
        assert cli_json("backup", medium, repo=repo)["bytes_stored"] > 18 * MIB
        assert cli("verify", repo=repo).returncode == 0 and (repo / "locks" / "reserve").exists()


def _start(repo: Path, source: Path, name: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "imgbackup", "backup", str(source), "--name", name],
                            env=cli_env(repo), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _signal_after_a_pack(proc: subprocess.Popen, repo: Path, packs_before: set[str], sig: int) -> bool:
    """Send ``sig`` once the run has committed a pack of its own; True if it was still running."""
    deadline = time.monotonic() + 600          # a loaded machine: the first pack may take minutes
    while proc.poll() is None and time.monotonic() < deadline and not objects(repo, "packs") - packs_before:
        time.sleep(0.002)
    if not objects(repo, "packs") - packs_before and proc.poll() is None:
        proc.kill()
        proc.wait()
        raise AssertionError("the backup stored no pack within 600 s")
    running = proc.poll() is None
    proc.send_signal(sig)
    return running


def test_interrupted_backups_clean_up_and_compact_removes_what_killed_ones_leave(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    cli_json("init", repo=repo)
    kept = {}
    for i in range(2):
        src = random_image(tmp_path / f"kept{i}.img", 6 * MIB, seed=60 + i)
        kept[cli_json("backup", src, "--name", f"kept{i}", repo=repo)["id"]] = src
    big = random_image(tmp_path / "big.img", 112 * MIB, seed=62, data_fraction=0.95)
    baseline = {f: objects(repo, f) for f in ("packs", "index", "images")}

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGINT):
        proc = _start(repo, big, "big")
        assert _signal_after_a_pack(proc, repo, baseline["packs"], sig), "backup ended before the signal"
        _out, err = proc.communicate(timeout=60)
        assert proc.returncode == 130, err
        assert "backup interrupted: nothing was added to the repository" in err and "removed the" in err
        assert {f: objects(repo, f) for f in baseline} == baseline, f"{sig!r} left objects behind"
        assert not temp_files(repo) and not (repo / "locks" / "exclusive").exists()

    leftovers = 0
    for _ in range(2):             # kill -9 cannot clean up: packs and temp files stay behind
        proc = _start(repo, big, "big")
        assert _signal_after_a_pack(proc, repo, baseline["packs"] | objects(repo, "packs"), signal.SIGKILL)
        proc.communicate(timeout=60)
        leftovers += 1
    orphans = objects(repo, "packs") - baseline["packs"]
    assert len(orphans) >= leftovers and list((repo / "locks").glob("session-*"))   # their leases stay
    orphan_bytes = sum((repo / p).stat().st_size for p in orphans) + sum(p.stat().st_size for p in temp_files(repo))

    stats = cli_json("info", repo=repo)
    assert stats["reclaimable_bytes"] == orphan_bytes
    assert stats["repository_bytes"] > stats["unique_bytes"] + orphan_bytes
    assert set(stats["image_stats"]) == set(kept)
    dry = cli_json("compact", "--dry-run", repo=repo)
    assert dry["dry_run"] and dry["bytes_freed"] == orphan_bytes and dry["packs_deleted"] == len(orphans)
    assert objects(repo, "packs") - baseline["packs"] == orphans, "a dry run deleted something"
    done = cli_json("compact", repo=repo)     # also takes over the dead process's lock
    assert 0 <= done["bytes_freed"] - orphan_bytes < 64 * 1024 and done["packs_rewritten"] == 0  # + merged index
    assert objects(repo, "packs") == baseline["packs"] and not temp_files(repo)
    assert cli_json("info", repo=repo)["reclaimable_bytes"] == 0
    assert cli("verify", repo=repo).returncode == 0
    for image_id, src in kept.items():
        assert restores(repo, image_id, src, tmp_path)
    whole = cli_json("backup", big, "--name", "big", repo=repo)
    assert restores(repo, whole["id"], big, tmp_path)


def test_compact_rewrites_partly_dead_packs_after_a_delete_and_dry_run_matches(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    cli_json("init", repo=repo)
    a = random_image(tmp_path / "a.img", 12 * MIB, seed=70)
    b = tmp_path / "b.img"
    b.write_bytes(a.read_bytes()[: 6 * MIB] + random_image(tmp_path / "x", 6 * MIB, seed=71).read_bytes())
    ia = cli_json("backup", a, "--name", "a", repo=repo)["id"]
    ib = cli_json("backup", b, "--name", "b", repo=repo)["id"]
    # leave a's image as a 'delete' killed after its catalog entry leaves it (the removal recorded, the
    # index gone): its packs are now partly dead
    from imgbackup.repository.repo import Repository

    Repository.open(repo, lambda: b"test-pass").catalog.append([{"event": "deleted", "image": ia, "name": "a"}])
    (repo / "images" / ia).unlink()
    dry = cli_json("compact", "--dry-run", repo=repo)
    assert dry["packs_rewritten"] >= 1 and dry["bytes_freed"] >= 5 * MIB
    done = cli_json("compact", repo=repo)
    assert (done["packs_rewritten"], done["chunks_removed"]) == (dry["packs_rewritten"], dry["chunks_removed"])
    assert abs(done["bytes_freed"] - dry["bytes_freed"]) < 64 * 1024      # index sizes aside
    assert done["index_files_after"] == 1
    assert cli("verify", repo=repo).returncode == 0 and restores(repo, ib, b, tmp_path)
    assert cli_json("compact", repo=repo)["bytes_freed"] == 0


def test_a_reader_that_loaded_the_index_before_a_delete_reads_the_moved_chunks(tmp_path: Path) -> None:
    """A restore or verify takes no lock: when a delete moves its chunks, it finds them again."""
    from imgbackup.repository.chunkreader import ChunkReader
    from imgbackup.repository.repo import Repository

    repo = tmp_path / "repo"
    cli_json("init", repo=repo)
    a = random_image(tmp_path / "a.img", 10 * MIB, seed=80)
    b = tmp_path / "b.img"
    b.write_bytes(a.read_bytes()[: 5 * MIB] + random_image(tmp_path / "x", 5 * MIB, seed=81).read_bytes())
    ia = cli_json("backup", a, "--name", "a", repo=repo)["id"]
    ib = cli_json("backup", b, "--name", "b", repo=repo)["id"]
    opened = Repository.open(repo, lambda: b"test-pass")
    reader = ChunkReader(opened)
    before = reader.index
    shared = opened.images.load(ib).unique_ids() & opened.images.load(ia).unique_ids()
    assert len(shared) == 5
    assert cli_json("delete", ia, "--yes", repo=repo)["packs_rewritten"] >= 1
    for cid in shared:
        assert len(reader.read(cid)) == MIB
    assert reader.index is not before, "the reader did not reload the index"
