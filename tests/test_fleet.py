"""Many writers, one repository: two-phase garbage collection beside running backups (issue 13).

Real repositories, real processes: backups and compacts run as CLI subprocesses, hosts in their own
UTS namespaces (``unshare --uts``) on a real SeaweedFS. Short settings come from the environment:
IMGBACKUP_LEASE_SECONDS (a killed host's lease expires in seconds) and IMGBACKUP_GC_GRACE_SECONDS
(0 unless a test checks the grace period itself).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from tests.disks import MIB, random_image
from tests.support import cli, cli_env, cli_json, need_tool, sha256_file

from imgbackup.repository.marks import MARKS_FOLDER, load_marks, write_marks
from imgbackup.repository.repo import Repository

GRACE = {"IMGBACKUP_GC_GRACE_SECONDS": "3600"}


def _opened(repo) -> Repository:
    return Repository.open(repo, lambda: b"test-pass")


def _files(repo: Path, folder: str) -> set[str]:
    root = repo / folder
    return {str(p.relative_to(repo)) for p in root.rglob("*") if p.is_file() and ".tmp-" not in p.name}


def _restores(repo, image_id: str, source: Path, tmp: Path, **env: str) -> bool:
    out = tmp / f"restore-{image_id[:8]}.img"
    out.unlink(missing_ok=True)
    proc = cli("restore", image_id, out, "--json", repo=repo, **env)
    ok = proc.returncode == 0 and sha256_file(out) == sha256_file(source)
    out.unlink(missing_ok=True)
    return ok


def _age_marks(repo: Path, seconds: float) -> None:
    """Rewrite the marks as if they had been written ``seconds`` earlier (what waiting would do)."""
    r = _opened(repo)
    marks = load_marks(r.storage, r.envelope)
    copies = [(c.tobytes(), p.tobytes(), int(o), float(t) - seconds) for c, p, o, t in
              zip(marks.copy_ids, marks.copy_packs, marks.copy_offsets, marks.copy_times, strict=True)]
    write_marks(r.storage, r.envelope, copies, {pid: at - seconds for pid, at in marks.packs.items()})
    for name in marks.names:
        r.storage.delete(name)


@pytest.fixture
def two_images(tmp_path: Path) -> dict:
    repo = tmp_path / "repo"
    cli_json("init", repo=repo)
    a = random_image(tmp_path / "a.img", 6 * MIB, seed=131)
    b = random_image(tmp_path / "b.img", 6 * MIB, seed=132)
    return {"repo": repo, "a": a, "b": b,
            "ia": cli_json("backup", a, "--name", "a", repo=repo),
            "ib": cli_json("backup", b, "--name", "b", repo=repo)}


def test_a_collection_marks_what_it_finds_unneeded_and_deletes_it_only_after_the_grace_period(
        two_images, tmp_path: Path) -> None:
    s = two_images
    repo = s["repo"]
    packs = _files(repo, "packs")
    done = cli_json("delete", s["ia"]["id"], "--yes", repo=repo, **GRACE)
    assert done["packs_deleted"] == 0 and _files(repo, "packs") == packs, "deleted at first sight"
    assert len(_files(repo, MARKS_FOLDER)) == 1
    again = cli_json("compact", repo=repo, **GRACE)
    assert again["packs_deleted"] == 0 and _files(repo, "packs") == packs, "deleted within the grace period"
    assert len(_files(repo, MARKS_FOLDER)) == 1       # consolidated: still one mark object
    _age_marks(repo, 7200)
    ripe = cli_json("compact", repo=repo, **GRACE)
    assert ripe["packs_deleted"] >= 1 and ripe["bytes_freed"] >= 5 * MIB
    assert not _files(repo, MARKS_FOLDER)
    assert cli("verify", repo=repo).returncode == 0
    assert _restores(repo, s["ib"]["id"], s["b"], tmp_path)


def test_a_backup_stores_marked_chunks_again_and_a_session_older_than_the_mark_blocks_deletion(
        two_images, tmp_path: Path) -> None:
    s = two_images
    repo = s["repo"]
    cli_json("delete", s["ia"]["id"], "--yes", repo=repo, **GRACE)
    redo = cli_json("backup", s["a"], "--name", "a", repo=repo)
    assert redo["chunks_new"] == s["ia"]["chunks_new"] == 6, "a backup deduplicated against marked copies"
    assert _restores(repo, redo["id"], s["a"], tmp_path)
    _age_marks(repo, 5)   # the session below begins more than the 2 s clock tolerance after the marks,
                          # however fast the backup and restore above ran (what waiting would do)

    r = _opened(repo)
    with r.session("backup (a test's session, older than the marks to come)"):
        # The first copies of a were marked before this session began: they go. The second copies are
        # found unneeded now, after the session began: marked and kept while it lives, even with no grace.
        gone = cli_json("delete", redo["id"], "--yes", repo=repo, IMGBACKUP_GC_GRACE_SECONDS="0")
        assert gone["packs_deleted"] >= 1 and 5 * MIB < gone["bytes_freed"] < 7 * MIB
        packs = _files(repo, "packs")
        blocked = cli_json("compact", repo=repo, IMGBACKUP_GC_GRACE_SECONDS="0")
        assert blocked["packs_deleted"] == 0 and _files(repo, "packs") == packs
        assert blocked["candidates_held"] >= 6
    freed = cli_json("compact", repo=repo, IMGBACKUP_GC_GRACE_SECONDS="0")
    assert freed["packs_deleted"] >= 1 and 5 * MIB < freed["bytes_freed"] < 7 * MIB
    assert freed["candidates_held"] == 0 and not _files(repo, MARKS_FOLDER)
    assert cli("verify", repo=repo).returncode == 0
    assert _restores(repo, s["ib"]["id"], s["b"], tmp_path)


@pytest.mark.slow
def test_a_compact_started_while_a_backup_uploads_never_deletes_what_its_image_references(tmp_path: Path) -> None:
    """20 rounds: a backup of new data (two packs) and a compact started at a random moment of it."""
    repo = tmp_path / "repo"
    cli_json("init", repo=repo)
    rng = random.Random(1313)
    env = cli_env(repo, IMGBACKUP_GC_GRACE_SECONDS="0")
    images = []
    for round_ in range(20):
        src = random_image(tmp_path / "src.img", 20 * MIB, seed=2000 + round_)
        backup = subprocess.Popen([sys.executable, "-m", "imgbackup", "backup", str(src), "--name", "loop", "--json"],
                                  env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True)
        time.sleep(rng.uniform(0.0, 1.0))
        compact = subprocess.run([sys.executable, "-m", "imgbackup", "compact", "--json"], env=env,
                                 stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120)
        out, err = backup.communicate(timeout=120)
        assert backup.returncode == 0, err
        assert compact.returncode == 0, compact.stderr
        doc = json.loads(out)
        images.append((doc["id"], sha256_file(src)))
        if round_ % 5 == 4:          # old images go, so compacts have real work beside the uploads
            cli_json("delete", images.pop(0)[0], "--yes", repo=repo, IMGBACKUP_GC_GRACE_SECONDS="0")
    assert cli("verify", repo=repo).returncode == 0
    for image_id, digest in images[-3:]:
        out = tmp_path / "out.img"
        assert cli("restore", image_id, out, repo=repo).returncode == 0
        assert sha256_file(out) == digest
        out.unlink()


# --- many hosts, one bucket ---------------------------------------------------------------------

HOSTS = ("web1", "web2", "db1", "mail1")
BASE = 16 * MIB


def _host_image(folder: Path, base: Path, host: int, round_: int, blocks: set[str]) -> Path:
    """The shared base plus this host's own changes (two MiB per round, at the host's own offsets);
    adds the digest of each MiB of the result to ``blocks``."""
    folder.mkdir(exist_ok=True)
    path = folder / f"host{host}.img"
    if round_ == 0:
        shutil.copyfile(base, path)
    rng = random.Random(host * 100 + round_)
    with open(path, "r+b") as f:
        for k in range(2):
            f.seek((2 * host + k + 4 * round_) % (BASE // MIB) * MIB)
            f.write(rng.randbytes(MIB))
        f.seek(0)
        while block := f.read(MIB):
            blocks.add(hashlib.sha256(block).hexdigest())
    return path


def _as_host(host: str, *args: str, env: dict) -> subprocess.Popen:
    script = 'hostname "$0" && exec "$@"'
    return subprocess.Popen(["unshare", "--uts", "sh", "-c", script, host, sys.executable, "-m", "imgbackup", *args],
                            env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def _pack_bytes(server, bucket: str, prefix: str) -> int:
    pages = server.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=f"{prefix}/packs/")
    return sum(item["Size"] for page in pages for item in page.get("Contents", ()))


def _pack_names(server, bucket: str, prefix: str) -> set[str]:
    pages = server.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=f"{prefix}/packs/")
    return {item["Key"] for page in pages for item in page.get("Contents", ())}


@pytest.mark.slow
def test_four_hosts_back_up_into_one_bucket_at_once_while_compact_runs(s3_server, s3_bucket, tmp_path: Path) -> None:
    need_tool("unshare")
    # Leases of 30 s: four backups and a compact on two cores can starve a heartbeat for seconds (a lease
    # not refreshed for its lifetime is lost, and its backup stops). The host killed below has 60 s.
    extra = {**s3_server.env(), "IMGBACKUP_S3_PROBE_CACHE": "0", "IMGBACKUP_LEASE_SECONDS": "30",
             "IMGBACKUP_GC_GRACE_SECONDS": "0"}
    url = f"s3://{s3_bucket}/fleet"
    env = cli_env(url, **extra)
    cli_json("init", repo=url, **extra)
    base = random_image(tmp_path / "base.img", BASE, seed=4242)
    results: dict[str, list[tuple[str, str]]] = {h: [] for h in HOSTS}
    fleet_blocks: set[str] = set()
    compacts: list[subprocess.CompletedProcess] = []

    def compact_loop(stop: threading.Event) -> None:
        while not stop.is_set():
            compacts.append(subprocess.run([sys.executable, "-m", "imgbackup", "compact", "--json"], env=env,
                                           stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300))

    for round_ in range(2):
        sources = [_host_image(tmp_path / "fleet", base, i, round_, fleet_blocks) for i in range(len(HOSTS))]
        digests = [sha256_file(p) for p in sources]
        stop = threading.Event()
        gc = threading.Thread(target=compact_loop, args=(stop,))
        gc.start()
        procs = [_as_host(h, "backup", str(p), "--name", "disk", "--json", env=env) for h, p in zip(HOSTS, sources, strict=True)]
        outs = [p.communicate(timeout=600) for p in procs]
        stop.set()
        gc.join()
        for host, proc, (out, err), digest in zip(HOSTS, procs, outs, digests, strict=True):
            assert proc.returncode == 0, f"{host}: {err}"
            results[host].append((json.loads(out)["id"], digest))
    assert compacts and all(c.returncode == 0 for c in compacts), [c.stderr for c in compacts if c.returncode]

    listed = cli_json("list", repo=url, **extra)["images"]
    assert sorted(i["hostname"] for i in listed) == sorted(HOSTS * 2)
    assert all(i["type"] == "incremental" for i in listed if i["id"] in {r[1][0] for r in results.values()})
    assert cli("verify", repo=url, **extra).returncode == 0
    for host, images in results.items():
        for image_id, digest in images:
            out = tmp_path / "out.img"
            assert cli("restore", image_id, out, repo=url, **extra).returncode == 0, host
            assert sha256_file(out) == digest, f"{host}'s image {image_id} does not restore byte-exact"
            out.unlink()

    # The shared base is stored once: after a compact, the bucket holds as many bytes per distinct MiB as
    # one host alone stores per distinct MiB of its own images — not four copies of the base.
    cli_json("compact", repo=url, **extra)
    alone_url, alone_blocks = f"s3://{s3_bucket}/alone", set()
    cli_json("init", repo=alone_url, **extra)
    for round_ in range(2):
        cli_json("backup", _host_image(tmp_path / "alone", base, 0, round_, alone_blocks), "--name", "disk",
                 repo=alone_url, **extra)
    alone = _pack_bytes(s3_server, s3_bucket, "alone") / len(alone_blocks)
    fleet = _pack_bytes(s3_server, s3_bucket, "fleet") / len(fleet_blocks)
    assert len(fleet_blocks) == 16 + 2 * 2 * len(HOSTS) and len(alone_blocks) == 16 + 2
    assert abs(fleet / alone - 1) < 0.02, (fleet, alone)

    # kill -9 one host mid-backup: the others finish; its lease expires by itself; its orphaned packs go
    # only after the grace period, never before.
    big = random_image(tmp_path / "big.img", 48 * MIB, seed=77)
    before = _pack_names(s3_server, s3_bucket, "fleet")
    # its lease must outlive the other two backups after the kill (under load they took more than its
    # former 6 s, and a compact then rightly found the lease dead and freed its packs at once)
    victim = _as_host("crash1", "backup", str(big), "--name", "big", env={**env, "IMGBACKUP_LEASE_SECONDS": "60"})
    others_ = [_as_host(h, "backup", str(tmp_path / "fleet" / f"host{i}.img"), "--name", "disk", "--json", env=env)
               for i, h in enumerate(HOSTS[:2])]
    deadline = time.monotonic() + 120
    while victim.poll() is None and time.monotonic() < deadline and not (_pack_names(s3_server, s3_bucket, "fleet")
                                                                          - before):
        time.sleep(0.01)
    assert victim.poll() is None, "the victim finished before it could be killed"
    os.kill(victim.pid, signal.SIGKILL)
    killed = time.monotonic()                                   # its lease was last refreshed before this
    victim.communicate(timeout=30)
    for proc in others_:
        _out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
    orphans = _pack_names(s3_server, s3_bucket, "fleet") - before
    assert orphans
    while_alive = cli_json("compact", repo=url, **extra)        # no grace, but the killed host's lease lives
    marked = time.monotonic()
    assert time.monotonic() - killed < 58, "the other backups outlasted the victim's lease: the case is void"
    assert orphans <= _pack_names(s3_server, s3_bucket, "fleet"), while_alive
    time.sleep(max(killed + 63 - time.monotonic(), 0))          # its lease (60 s + 2 s tolerance) is dead
    grace_s = int(time.monotonic() - marked) + 30               # the mark stays younger than this for 30 s more
    grace = {**extra, "IMGBACKUP_GC_GRACE_SECONDS": str(grace_s)}
    within_grace = cli_json("compact", repo=url, **grace)       # no break-lock needed; still kept
    assert orphans <= _pack_names(s3_server, s3_bucket, "fleet"), within_grace
    time.sleep(max(marked + grace_s + 0.5 - time.monotonic(), 0))   # past the grace period of the mark
    collected = cli_json("compact", repo=url, **grace)
    assert not orphans & _pack_names(s3_server, s3_bucket, "fleet"), collected
    assert cli("verify", repo=url, **extra).returncode == 0
