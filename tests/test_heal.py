"""Damaged data heals instead of spreading (issue 9 §3), through the real CLI on real files.

Damage is real: a bit flipped in a pack file, a pack deleted or truncated, a trailer or an index
file flipped. After it: verify records it, the next backup of the same source stores the damaged
chunks again (never references them), and ``repair`` rebuilds the index from the packs, reports
which byte ranges of which images are lost and whether a backup heals them.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tests.disks import random_image
from tests.support import MIB, cli, cli_env, cli_json, sha256_file

from imgbackup.format.layout import PACK_FOOTER
from imgbackup.repository.packs import pack_name
from imgbackup.repository.repo import Repository


def flip(path: Path, offset: int, mask: int = 0x01) -> None:
    """XOR one byte in place: always a change, whatever was there."""
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ mask]))


def opened(repo: Path) -> Repository:
    return Repository.open(repo, lambda: b"test-pass")


def chunk_locations(repo: Path) -> dict[bytes, tuple[Path, int, int]]:
    """chunk id -> (pack file, offset, length), from the index as it stands."""
    r = opened(repo)
    return {cid: (repo / pack_name(loc.pack_id), loc.offset, loc.length)
            for cid, loc in r.chunk_index().locations.items()}


def slots_of(repo: Path, image_id: str, chunk_id: bytes) -> list[int]:
    index = opened(repo).images.load(image_id)
    data = index.data_slot_numbers()
    return [int(data[i]) for i, row in enumerate(index.ids) if bytes(row) == chunk_id]


def restore_matches(repo: Path, image_id: str, source: Path, tmp: Path) -> bool:
    out = tmp / f"restore-{image_id[:8]}.img"
    out.unlink(missing_ok=True)
    proc = cli("restore", image_id, out, "--json", repo=repo)
    return proc.returncode == 0 and sha256_file(out) == sha256_file(source)


def verify_states(repo: Path) -> dict[str, bool]:
    doc = json.loads(cli("verify", "--json", repo=repo).stdout)
    return {i["id"]: i["ok"] for i in doc["images"]}


@pytest.fixture
def two_sources(tmp_path: Path) -> dict:
    """A repository with one image of each of two random sources (24 MiB: two packs each)."""
    repo = tmp_path / "repo"
    cli_json("init", repo=repo)
    a = random_image(tmp_path / "a.img", 24 * MIB, seed=31)
    b = random_image(tmp_path / "b.img", 24 * MIB, seed=32)
    ia = cli_json("backup", a, "--name", "a", repo=repo)["id"]
    ib = cli_json("backup", b, "--name", "b", repo=repo)["id"]
    return {"repo": repo, "a": a, "b": b, "ia": ia, "ib": ib}


def _a_chunk_only_a_has(s: dict) -> tuple[bytes, tuple[Path, int, int]]:
    locs = chunk_locations(s["repo"])
    b_ids = opened(s["repo"]).images.load(s["ib"]).unique_ids()
    a_ids = sorted(opened(s["repo"]).images.load(s["ia"]).unique_ids() - b_ids)
    return a_ids[len(a_ids) // 2], locs[a_ids[len(a_ids) // 2]]


def test_verify_records_damage_and_the_next_backup_stores_the_chunk_again(two_sources, tmp_path: Path) -> None:
    s = two_sources
    repo = s["repo"]
    cid, (pack, offset, length) = _a_chunk_only_a_has(s)
    flip(pack, offset + length // 2)
    first = json.loads(cli("verify", "--json", repo=repo).stdout)
    assert not first["ok"] and first["copies_recorded"] == 1 and first["damage_record"]
    assert (repo / first["damage_record"]).is_file()
    # the same source again, as a full backup: the damaged chunk is stored anew, never referenced
    again = cli_json("backup", s["a"], "--name", "a", "--type", "full", repo=repo)
    assert again["chunks_new"] == 1, again
    assert cli("verify", again["id"], repo=repo).returncode == 0
    assert restore_matches(repo, again["id"], s["a"], tmp_path)
    # the chunk is found by its content: the old image names it too and reads whole again
    assert verify_states(repo) == {s["ia"]: True, s["ib"]: True, again["id"]: True}
    assert restore_matches(repo, s["ia"], s["a"], tmp_path)
    # an incremental (the default) heals just the same
    inc = cli_json("backup", s["a"], "--name", "a", repo=repo)
    assert inc["type"] == "incremental" and inc["chunks_new"] == 0


def test_an_incremental_from_a_change_list_rereads_a_slot_whose_parent_chunk_is_damaged(two_sources,
                                                                                         tmp_path: Path) -> None:
    """A change list says nothing changed, so the backup would take every slot from its parent
    unread — but one parent chunk is known damaged: that slot is read from the source again."""
    s = two_sources
    repo = s["repo"]
    cid, (pack, offset, length) = _a_chunk_only_a_has(s)
    flip(pack, offset + 20)
    assert cli("verify", repo=repo).returncode == 11
    empty = tmp_path / "nothing-changed.txt"
    empty.write_text("# no extents\n")
    inc = cli_json("backup", s["a"], "--name", "a", "--changed-blocks", empty, repo=repo)
    assert inc["type"] == "incremental" and inc["chunks_new"] == 1
    assert inc["bytes_read"] == MIB * len(slots_of(repo, inc["id"], cid))
    assert cli("verify", inc["id"], repo=repo).returncode == 0
    assert restore_matches(repo, inc["id"], s["a"], tmp_path)


def test_a_backup_drops_chunks_of_a_deleted_pack_without_a_verify(two_sources, tmp_path: Path) -> None:
    s = two_sources
    repo = s["repo"]
    _cid, (pack, _offset, _length) = _a_chunk_only_a_has(s)
    pack.unlink()
    doc = cli_json("backup", s["a"], "--name", "a", repo=repo)
    assert doc["chunks_new"] >= 1 and any("no longer exist" in w for w in doc["warnings"]), doc
    assert cli("verify", doc["id"], repo=repo).returncode == 0
    assert restore_matches(repo, doc["id"], s["a"], tmp_path)
    assert list((repo / "damage").iterdir()), "the backup recorded the missing copies"
    states = verify_states(repo)
    assert states[doc["id"]] and states[s["ia"]]        # same content stored again: the old one heals too


def test_repair_reports_affected_ranges_and_verify_is_clean_for_whole_images(two_sources, tmp_path: Path) -> None:
    s = two_sources
    repo = s["repo"]
    cid, (pack, offset, length) = _a_chunk_only_a_has(s)
    flip(pack, offset + length - 40)
    index_before = sorted(p.name for p in (repo / "index").iterdir())
    dry = cli("repair", "--json", repo=repo)
    assert dry.returncode == 11, dry.stderr
    plan = json.loads(dry.stdout)
    assert plan["dry_run"] and plan["changes"] and plan["mode"] == "full" and plan["written"] is None
    assert plan["bad_copies"] == {"total": 1, "damaged": 1}
    assert sorted(p.name for p in (repo / "index").iterdir()) == index_before, "a dry run wrote"
    (hit,) = plan["images_affected"]
    slots = slots_of(repo, s["ia"], cid)
    assert hit["id"] == s["ia"] and hit["chunks"] == 1 and hit["latest_of_source"] and hit["chunk_ids"] == [cid.hex()]
    assert hit["ranges"] == [[slot * MIB, MIB] for slot in slots] and "next backup" in hit["heal"]
    assert plan["images_ok"] == 1
    done = cli("repair", "--yes", "--json", repo=repo)
    assert done.returncode == 11
    assert json.loads(done.stdout)["written"]["index_files_written"]
    assert sorted(p.name for p in (repo / "index").iterdir()) != index_before
    assert verify_states(repo) == {s["ia"]: False, s["ib"]: True}
    assert restore_matches(repo, s["ib"], s["b"], tmp_path)
    assert cli("restore", s["ia"], tmp_path / "a-out.img", repo=repo).returncode == 6
    # the next backup of a's source heals a; then repair and verify are clean
    cli_json("backup", s["a"], "--name", "a", repo=repo)
    assert all(verify_states(repo).values())
    again = cli("repair", "--json", repo=repo)
    assert again.returncode == 0 and json.loads(again.stdout)["images_affected"] == []
    assert restore_matches(repo, s["ia"], s["a"], tmp_path)


def _break(repo: Path, pack: Path, how: str) -> None:
    if how == "deleted":
        pack.unlink()
    elif how == "truncated":
        os.truncate(pack, pack.stat().st_size // 2)
    elif how == "trailer":
        size = pack.stat().st_size
        with open(pack, "rb") as f:
            f.seek(size - PACK_FOOTER.size)
            t_off, t_len, _ = PACK_FOOTER.unpack(f.read(PACK_FOOTER.size))
        flip(pack, t_off + t_len // 2)


@pytest.mark.parametrize("how", ["deleted", "truncated", "trailer"])
def test_repair_after_a_pack_is_deleted_truncated_or_has_a_damaged_trailer(two_sources, tmp_path: Path,
                                                                         how: str) -> None:
    s = two_sources
    repo = s["repo"]
    _cid, (pack, _o, _l) = _a_chunk_only_a_has(s)
    on_pack = {c for c, (p, _, _) in chunk_locations(repo).items() if p == pack}
    _break(repo, pack, how)
    proc = cli("repair", "--yes", "--json", repo=repo)
    doc = json.loads(proc.stdout)
    if how == "trailer":       # every chunk is intact: taken from the old index and checked one by one
        assert proc.returncode == 0, proc.stderr
        assert [p["name"] for p in doc["packs_without_trailer"]] == [str(pack.relative_to(repo))]
        assert doc["images_affected"] == [] and doc["bad_copies"]["total"] == 0
        assert doc["written"]["packs_written"] >= 1, "its chunks were not copied into a pack with a trailer"
        assert not {c for c, (p, _, _) in chunk_locations(repo).items() if p == pack}, "the index still uses it"
        assert all(verify_states(repo).values())
        assert restore_matches(repo, s["ia"], s["a"], tmp_path)
        compact = cli_json("compact", repo=repo)      # the old pack is unreferenced now
        assert compact["packs_deleted"] == 1 and not pack.exists()
        assert all(verify_states(repo).values()) and restore_matches(repo, s["ia"], s["a"], tmp_path)
        assert cli("repair", "--json", repo=repo).returncode == 0
        assert json.loads(cli("repair", "--json", repo=repo).stdout)["changes"] is False
        return
    assert proc.returncode == 11
    (hit,) = doc["images_affected"]
    reason = "missing" if how == "deleted" else "truncated"
    assert hit["id"] == s["ia"] and set(hit["reasons"]) == {reason}
    assert 1 <= hit["chunks"] <= len(on_pack)
    assert verify_states(repo) == {s["ia"]: False, s["ib"]: True}
    assert restore_matches(repo, s["ib"], s["b"], tmp_path)
    healed = cli_json("backup", s["a"], "--name", "a", repo=repo)
    assert healed["chunks_new"] == hit["chunks"]
    assert all(verify_states(repo).values())
    assert cli("repair", repo=repo).returncode == 0
    compact = cli_json("compact", repo=repo)
    assert compact["bytes_freed"] > 0 if how == "truncated" else True
    assert all(verify_states(repo).values())
    assert restore_matches(repo, s["ia"], s["a"], tmp_path) and restore_matches(repo, s["ib"], s["b"], tmp_path)


def test_a_damaged_index_file_stops_backups_until_repair_rebuilds_it(two_sources, tmp_path: Path) -> None:
    s = two_sources
    repo = s["repo"]
    index_file = sorted((repo / "index").iterdir())[0]
    flip(index_file, index_file.stat().st_size // 2)
    # a host without a local copy of the index (this one's cache holds the file as it was authenticated)
    proc = cli("backup", s["a"], "--name", "a", repo=repo, IMGBACKUP_INDEX_CACHE="0")
    assert proc.returncode == 6 and "repair" in proc.stderr and "Traceback" not in proc.stderr
    doc = json.loads(cli("repair", "--yes", "--json", repo=repo).stdout)
    assert [f["name"] for f in doc["unreadable_index_files"]] == [f"index/{index_file.name}"]
    assert doc["recovered_chunks"] > 0 and doc["images_affected"] == []
    assert not index_file.exists()
    assert all(verify_states(repo).values())
    assert cli_json("backup", s["a"], "--name", "a", repo=repo)["chunks_new"] == 0
    assert restore_matches(repo, s["ia"], s["a"], tmp_path)


def test_a_damaged_damage_record_stops_backups_until_repair_rewrites_it(two_sources) -> None:
    s = two_sources
    repo = s["repo"]
    _cid, (pack, offset, length) = _a_chunk_only_a_has(s)
    flip(pack, offset + length // 3)
    record = json.loads(cli("verify", "--json", repo=repo).stdout)["damage_record"]
    flip(repo / record, 20)
    proc = cli("backup", s["b"], "--name", "b", repo=repo)
    assert proc.returncode == 6 and "damage record" in proc.stderr and "repair" in proc.stderr
    assert cli("verify", s["ib"], repo=repo).returncode == 0, "readers are not stopped by it"
    doc = json.loads(cli("repair", "--quick", "--yes", "--json", repo=repo).stdout)
    assert doc["mode"] == "full" and doc["unreadable_damage_records"] and doc["bad_copies"]["total"] == 1
    assert not (repo / record).exists() and len(list((repo / "damage").iterdir())) == 1
    assert cli("backup", s["b"], "--name", "b", repo=repo).returncode == 0


def test_repair_clears_a_record_whose_copy_reads_intact_again(two_sources) -> None:
    """A record is trusted until repair re-reads the copy: one that authenticates now is used again."""
    s = two_sources
    repo = s["repo"]
    _cid, (pack, offset, length) = _a_chunk_only_a_has(s)
    flip(pack, offset + 7)
    assert cli("verify", repo=repo).returncode == 11
    flip(pack, offset + 7)                      # the same bit back: the copy is intact again
    assert cli("verify", s["ia"], repo=repo).returncode == 11, "recorded copies are not used"
    doc = json.loads(cli("repair", "--quick", "--yes", "--json", repo=repo).stdout)
    assert doc["mode"] == "quick" and doc["cleared_copies"] == 1 and doc["images_affected"] == []
    assert all(verify_states(repo).values())
    assert not list((repo / "damage").iterdir())


SOURCE = 80 * MIB   # five packs per image: a full repair takes long enough to kill it at chosen points


def test_kill_9_of_repair_anywhere_leaves_a_repository_that_verifies(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    cli_json("init", repo=repo)
    sources = [random_image(tmp_path / f"s{i}.img", SOURCE, seed=40 + i) for i in range(2)]
    ids = [cli_json("backup", src, "--name", f"s{i}", repo=repo)["id"] for i, src in enumerate(sources)]
    flip(*next((p, o + ln // 2) for _c, (p, o, ln) in sorted(chunk_locations(repo).items())
               if _c in opened(repo).images.load(ids[0]).unique_ids()))
    # three index files (and a spare orphan), so repair has several to replace
    cli_json("backup", random_image(tmp_path / "small.img", 3 * MIB, seed=9), "--name", "small", repo=repo)
    expected = verify_states(repo)           # also records the damage: what verifies now must keep verifying
    assert [expected[i] for i in ids] == [False, True]

    def start() -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "imgbackup", "repair", "--yes"], env=cli_env(repo),
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    index_names = {p.name for p in (repo / "index").iterdir()}
    points = {
        "checking": lambda: time.monotonic() - t0 > 0.3,
        "index written": lambda: {p.name for p in (repo / "index").iterdir() if ".tmp-" not in p.name}
        - index_names != set(),
        "old removed": lambda: not index_names & {p.name for p in (repo / "index").iterdir()},
    }
    landed = []
    for what, ready in points.items():
        proc = start()
        t0 = time.monotonic()
        deadline = t0 + 120
        while proc.poll() is None and time.monotonic() < deadline and not ready():
            time.sleep(0.0005)
        if proc.poll() is None:
            proc.kill()
            landed.append(what)
        proc.wait(30)
        assert verify_states(repo) == expected, f"kill at {what!r} changed what verifies"
        index_names = {p.name for p in (repo / "index").iterdir()}
    assert "checking" in landed, landed
    final = cli("repair", "--yes", "--json", repo=repo)
    assert final.returncode == 11
    doc = json.loads(final.stdout)
    assert [i["id"] for i in doc["images_affected"]] == [ids[0]]
    assert cli("repair", "--json", repo=repo).returncode == 11
    assert not json.loads(cli("repair", "--json", repo=repo).stdout)["changes"], "a second repair had work left"
    assert verify_states(repo) == expected
    assert restore_matches(repo, ids[1], sources[1], tmp_path)
    cli_json("backup", sources[0], "--name", "s0", repo=repo)
    assert all(verify_states(repo).values())
    assert restore_matches(repo, ids[0], sources[0], tmp_path)


def test_damage_record_round_trip_and_every_malformed_field_is_damage() -> None:
    from imgbackup.errors import IntegrityError
    from imgbackup.repository.damage import DamagedCopy, decode_record, encode_record

    copy = DamagedCopy(b"\x01" * 32, b"\x02" * 32, 16, 1000, "damaged", "failed authentication")
    (back,) = decode_record(encode_record([copy], "verify", created=1000.5), "damage/x")
    assert (back.key, back.length, back.reason, back.found, back.command) == (copy.key, 1000, "damaged", 1000.5, "verify")
    carried = DamagedCopy(*copy.key, 1000, "truncated", "", found=900.0, command="backup")
    (again,) = decode_record(encode_record([carried], "compact", created=2000.0), "damage/x")
    assert (again.found, again.command) == (900.0, "backup"), "consolidation keeps when and who"
    good = json.loads(encode_record([copy], "verify", created=1.0))
    entry = good["entries"][0]
    bad_docs = [[], "x", {**good, "version": 2}, {**good, "created": "now"}, {**good, "created": 2**41},
                {**good, "entries": {}}, {**good, "entries": [1]}, {**good, "command": 5}]
    for key, value in [("chunk", "ab"), ("chunk", 7), ("pack", "z" * 64), ("offset", -1), ("offset", 1.5),
                       ("offset", True), ("length", 2**32), ("reason", "gone"), ("detail", None), ("found", "x")]:
        bad_docs.append({**good, "entries": [{**entry, key: value}]})
    for doc in bad_docs:
        with pytest.raises(IntegrityError, match="damage record"):
            decode_record(json.dumps(doc).encode(), "damage/x")
    with pytest.raises(IntegrityError):
        decode_record(b"\xff{", "damage/x")


def test_index_files_may_list_copies_of_one_chunk_and_a_damaged_copy_is_never_handed_out(tmp_path: Path) -> None:
    from imgbackup.repository.chunkindex import ChunkIndex
    from imgbackup.repository.damage import DamagedCopy, DamageLog, write_record
    from imgbackup.repository.indexfile import write_index_files
    from imgbackup.repository.packs import BlobLocation

    r = Repository.init(tmp_path / "repo", lambda: b"test-pass")
    cid = b"\x07" * 32
    first, second = BlobLocation(b"\x01" * 32, 16, 100, 90), BlobLocation(b"\x02" * 32, 16, 100, 90)
    write_index_files(r.storage, r.envelope, [(cid, first), (cid, second)])
    index = ChunkIndex.load(r.storage, r.envelope, DamageLog())
    assert index.get(cid) == first and index.spare == [(cid, second)]
    write_record(r.storage, r.envelope, [DamagedCopy(cid, first.pack_id, 16, 100, "damaged")], "verify")
    index = ChunkIndex.load(r.storage, r.envelope, DamageLog.load(r.storage, r.envelope))
    assert index.get(cid) == second and not index.spare
    write_record(r.storage, r.envelope, [DamagedCopy(cid, second.pack_id, 16, 100, "missing")], "backup")
    index = ChunkIndex.load(r.storage, r.envelope, DamageLog.load(r.storage, r.envelope))
    assert cid not in index and index.excluded[cid].reason in ("damaged", "missing")
    packs_present = {f"packs/{first.pack_id.hex()[:2]}/{first.pack_id.hex()}"}
    index = ChunkIndex.load(r.storage, r.envelope, DamageLog(), packs_present)
    assert index.get(cid) == first and [b.pack_id for b in index.unrecorded()] == [second.pack_id]


def test_with_two_copies_of_a_chunk_readers_and_compact_use_the_one_that_exists(tmp_path: Path) -> None:
    """A killed backup leaves a pack that repair then indexes: its chunks have two copies. When the
    pack holding the copy that would be handed out first disappears, verify reads the other copy (and
    records the missing one), and compact keeps the pack holding the only real copy."""
    repo = tmp_path / "repo"
    cli_json("init", repo=repo)
    src = random_image(tmp_path / "src.img", 40 * MIB, seed=90)
    proc = subprocess.Popen([sys.executable, "-m", "imgbackup", "backup", str(src), "--name", "s"], env=cli_env(repo),
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while proc.poll() is None and time.monotonic() < deadline and not [
            p for p in (repo / "packs").rglob("*") if p.is_file() and ".tmp-" not in p.name]:
        time.sleep(0.001)
    proc.kill()
    proc.wait(30)
    orphan = next(p for p in (repo / "packs").rglob("*") if p.is_file() and ".tmp-" not in p.name)
    image = cli_json("backup", src, "--name", "s", repo=repo)["id"]
    assert cli("repair", "--yes", repo=repo).returncode == 0
    r = opened(repo)
    index = r.chunk_index()
    twice = [cid for cid, loc in index.spare]
    assert twice, "repair did not index both copies"
    first = index.get(twice[0]).pack_id          # the copy handed out first
    doomed = repo / pack_name(first)
    doomed.unlink()
    kept = tmp_path / "kept"
    shutil.copytree(repo, kept)
    states = json.loads(cli("verify", "--json", repo=kept).stdout)
    assert states["ok"] and states["copies_recorded"] >= 1, json.dumps(states)[:3000]
    assert restore_matches(kept, image, src, tmp_path)
    done = cli_json("compact", repo=repo)        # no verify first: nothing recorded the missing copies
    assert not any("no usable copy" in w for w in done["warnings"]), done["warnings"]
    assert orphan.exists() or doomed == orphan
    assert all(verify_states(repo).values())
    assert restore_matches(repo, image, src, tmp_path)


def test_heal_repair_and_compact_in_a_bucket(s3_server, s3_bucket, tmp_path: Path) -> None:
    """The same mechanisms over S3 (SeaweedFS): a pack deleted from the bucket is noticed by the next
    backup, repair rebuilds the index from the packs, compact removes what no image needs."""
    env = s3_server.env(IMGBACKUP_S3_PROBE_CACHE="0")
    url = f"s3://{s3_bucket}/heal"
    src = random_image(tmp_path / "disk.img", 24 * MIB, seed=95)
    assert cli("init", repo=url, **env).returncode == 0
    first = cli_json("backup", src, "--name", "d", repo=url, **env)
    client = s3_server.client()
    packs = sorted(o["Key"] for o in client.list_objects_v2(Bucket=s3_bucket, Prefix="heal/packs/")["Contents"])
    client.delete_object(Bucket=s3_bucket, Key=packs[0])
    repaired = json.loads(cli("repair", "--json", repo=url, **env).stdout)
    assert [i["id"] for i in repaired["images_affected"]] == [first["id"]]
    again = cli_json("backup", src, "--name", "d", repo=url, **env)
    assert again["chunks_new"] >= 1 and any("no longer exist" in w for w in again["warnings"])
    assert cli("repair", "--yes", repo=url, **env).returncode == 0
    assert cli_json("delete", first["id"], "--yes", repo=url, **env)["deleted"] == [first["id"]]
    assert cli_json("compact", repo=url, **env)["bytes_freed"] >= 0
    verify = cli("verify", "--json", repo=url, **env)
    assert verify.returncode == 0 and "Traceback" not in verify.stderr, verify.stderr
    out = tmp_path / "out.img"
    assert cli("restore", again["id"], out, "--yes", repo=url, **env).returncode == 0
    assert sha256_file(out) == sha256_file(src)
    keys = sorted(o["Key"] for o in client.list_objects_v2(Bucket=s3_bucket, Prefix="heal/")["Contents"])
    assert not [k for k in keys if k.startswith("heal/locks/")], keys
