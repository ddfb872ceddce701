"""``imgbackup copy`` between directory repositories, through the CLI (the bucket cases: test_s3_copy.py).

Raw into a related repository (sealed bytes verbatim), re-encrypting into an unrelated one (new ids),
idempotent, selection, refusals, damaged sources, never deleting at the destination.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from tests.disks import random_image
from tests.support import MIB, cli, cli_json

from imgbackup.engine.copy.run import copy_images
from imgbackup.errors import StorageError
from imgbackup.repository.backends.faults import BitFlipStorage
from imgbackup.repository.packs import read_pack_trailer
from imgbackup.repository.repo import Repository
from imgbackup.repository.storage import open_storage

PASS1, PASS2 = "source-pass", "destination-pass"


def _two(**extra: str) -> dict:
    """The environment of a command naming two repositories: -r's passphrase and the other's."""
    return {"passphrase": PASS1, "IMGBACKUP_PASSPHRASE2": PASS2, **extra}


def _objects(repo: Path) -> dict[str, bytes]:
    return {str(p.relative_to(repo)): p.read_bytes() for p in repo.rglob("*") if p.is_file()}


def stored_chunk_copies(repo: Repository) -> tuple[int, int]:
    """(chunk entries over every pack's trailer, distinct chunk ids): equal when no chunk was stored twice."""
    entries: list[bytes] = []
    for name in repo.storage.list("packs"):
        entries += [cid for cid, _ in read_pack_trailer(repo.storage, repo.envelope, bytes.fromhex(name[-64:]))]
    return len(entries), len(set(entries))


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> dict:
    """A repository with three images of two sources: disk a (full, incremental) and disk b. Shared
    by the module's tests, which only read it (the damage test damages a copy of its own)."""
    tmp_path = tmp_path_factory.mktemp("source")
    repo = tmp_path / "src"
    cli_json("init", repo=repo, passphrase=PASS1)
    a = random_image(tmp_path / "a.img", 24 * MIB, seed=1, data_fraction=0.7)
    b = random_image(tmp_path / "b.img", 8 * MIB, seed=2)
    first = cli_json("backup", a, "--name", "a", repo=repo, passphrase=PASS1)
    kept = a.read_bytes()
    with open(a, "r+b") as f:
        f.seek(5 * MIB)
        f.write(b"changed" * 300_000)
    second = cli_json("backup", a, "--name", "a", repo=repo, passphrase=PASS1)
    third = cli_json("backup", b, "--name", "b", repo=repo, passphrase=PASS1)
    return {"repo": repo, "ids": [first["id"], second["id"], third["id"]],
            "content": {first["id"]: kept, second["id"]: a.read_bytes(), third["id"]: b.read_bytes()}}


def _restores_all(repo: Path, content: dict[str, bytes], tmp_path: Path, passphrase: str = PASS2) -> None:
    for image_id, want in content.items():
        out = tmp_path / f"restored-{image_id}.img"
        proc = cli("restore", image_id, out, "--yes", repo=repo, passphrase=passphrase)
        assert proc.returncode == 0, proc.stderr
        assert out.read_bytes() == want, image_id
        out.unlink()


def test_raw_copy_into_a_related_repository_moves_sealed_bytes(source, tmp_path: Path) -> None:
    dst = tmp_path / "dst"
    init = cli_json("init", "--related-to", source["repo"], repo=dst, passphrase=PASS2,
                    IMGBACKUP_PASSPHRASE2=PASS1)
    assert init["related_to"] == str(source["repo"])
    log = tmp_path / "audit.jsonl"
    doc = cli_json("copy", "--all", "--to", dst, "--verify", repo=source["repo"], **_two(IMGBACKUP_AUDIT=f"file:{log}"))
    assert doc["mode"] == "raw" and doc["verified"] is True
    events = [json.loads(line) for line in log.read_text().splitlines()]
    assert [(e["event"], e["result"]) for e in events] == [("copy", "ok")]
    assert events[0]["bytes"] == doc["bytes_sent"] and events[0]["images_copied"] == 3
    assert events[0]["destination_location"] == str(dst) and PASS1 not in log.read_text() and PASS2 not in log.read_text()
    assert sorted(doc["images_copied"]) == sorted(source["ids"]) and doc["images_skipped"] == []
    assert doc["chunks_sent"] > 0 and doc["bytes_sent"] > 0 and doc["duration_s"] >= 0
    assert doc["requests"]["total"] == doc["source_requests"]["total"] + doc["destination_requests"]["total"]
    # verbatim: the image objects are the source's bytes, and every copied blob sits in the packs as is
    src_objects, dst_objects = _objects(source["repo"]), _objects(dst)
    for image_id in source["ids"]:
        assert dst_objects[f"images/{image_id}"] == src_objects[f"images/{image_id}"]
    src_repo = Repository.open(str(source["repo"]), lambda: PASS1.encode())
    dst_repo = Repository.open(str(dst), lambda: PASS2.encode())
    for cid, loc in list(src_repo.chunk_index().locations.items())[:20]:
        there = dst_repo.chunk_index().get(cid)
        blob = src_objects[f"packs/{loc.pack_id.hex()[:2]}/{loc.pack_id.hex()}"][loc.offset:loc.offset + loc.length]
        assert dst_objects[f"packs/{there.pack_id.hex()[:2]}/{there.pack_id.hex()}"][
            there.offset:there.offset + there.length] == blob
    assert stored_chunk_copies(dst_repo)[0] == stored_chunk_copies(dst_repo)[1] == len(src_repo.chunk_index())
    _restores_all(dst, source["content"], tmp_path)
    again = cli_json("copy", "--all", "--to", dst, repo=source["repo"], **_two())
    assert again["images_copied"] == [] and sorted(again["images_skipped"]) == sorted(source["ids"])
    assert again["chunks_sent"] == 0 and _objects(dst).keys() == dst_objects.keys()


def test_re_encrypting_copy_recomputes_ids_and_an_incremental_reads_only_its_changes(source, tmp_path: Path) -> None:
    dst = tmp_path / "dst"
    cli_json("init", repo=dst, passphrase=PASS2)
    first_id, second_id, _ = source["ids"]
    one = cli_json("copy", first_id, "--to", dst, repo=source["repo"], **_two())
    assert one["mode"] == "re-encrypt" and one["images_copied"] == [first_id]
    src_repo = Repository.open(str(source["repo"]), lambda: PASS1.encode())
    dst_repo = Repository.open(str(dst), lambda: PASS2.encode())
    mine, theirs = dst_repo.images.load(first_id), src_repo.images.load(first_id)
    assert (mine.kinds == theirs.kinds).all() and mine.ids.shape == theirs.ids.shape
    assert not set(mine.unique_ids()) & set(theirs.unique_ids())   # ids under another key
    # the incremental, in-process over a recording storage: the parent's destination ids come from
    # the parent already copied, so only the changed chunks (and the bases of those stored as
    # deltas: re-sealing needs their plaintext) are read from the source's packs
    recorder = BitFlipStorage(open_storage(str(source["repo"])))
    two = copy_images(Repository.open(recorder, lambda: PASS1.encode()), Repository.open(str(dst), lambda: PASS2.encode()),
                      [src_repo.images.read_meta(second_id)])
    changed = src_repo.images.load(second_id).unique_ids() - theirs.unique_ids()
    assert two.chunks_sent == len(changed) and two.images_copied == [second_id]
    read = sum(int(c.split()[2].split("+")[1]) for c in recorder.calls if c.startswith("get_range packs/"))
    src_index = src_repo.chunk_index()
    sealed = sum(src_index.get(cid).length for cid in changed | src_index.bases_of(changed))
    assert sealed <= read < sealed + 2 * MIB, (read, sealed)
    cli_json("copy", "--all", "--to", dst, "--verify", repo=source["repo"], **_two())
    _restores_all(dst, source["content"], tmp_path)
    assert cli("verify", repo=dst, passphrase=PASS2).returncode == 0


def test_selection_by_name_last_and_latest(source, tmp_path: Path) -> None:
    first_id, second_id, third_id = source["ids"]
    picks = {
        ("--name", "a"): {first_id, second_id},
        ("--last", "1"): {second_id, third_id},
        ("--name", "a", "--last", "1"): {second_id},
        ("latest", "--name", "b"): {third_id},
        (first_id[:10],): {first_id},
    }
    for n, (args, want) in enumerate(picks.items()):
        dst = tmp_path / f"dst{n}"
        cli_json("init", repo=dst, passphrase=PASS2)
        doc = cli_json("copy", *args, "--to", dst, repo=source["repo"], **_two())
        assert set(doc["images_copied"]) == want, args
    proc = cli("copy", "--to", tmp_path / "dst0", repo=source["repo"], **_two())
    assert proc.returncode == 2 and "name the images to copy" in proc.stderr


def test_refusals_write_nothing(source, tmp_path: Path) -> None:
    dst = tmp_path / "dst"
    cli_json("init", "--chunk-size", str(256 << 10), repo=dst, passphrase=PASS2)
    before = _objects(dst)
    proc = cli("copy", "--all", "--to", dst, repo=source["repo"], **_two())
    assert proc.returncode == 8 and "chunk size" in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr
    assert _objects(dst) == before
    proc = cli("copy", "--all", "--to", dst, repo=source["repo"], passphrase=PASS1)   # no IMGBACKUP_PASSPHRASE2
    assert proc.returncode == 4 and "IMGBACKUP_PASSPHRASE2" in proc.stderr, proc.stderr
    proc = cli("copy", "--all", "--to", dst, repo=source["repo"], **_two(IMGBACKUP_PASSPHRASE2="wrong-one"))
    assert proc.returncode == 4 and "wrong passphrase" in proc.stderr
    assert PASS1 not in proc.stderr and "wrong-one" not in proc.stderr
    proc = cli("copy", "--all", "--to", source["repo"], repo=source["repo"], **_two(IMGBACKUP_PASSPHRASE2=PASS1))
    assert proc.returncode == 8 and "source repository itself" in proc.stderr
    proc = cli("init", "--related-to", source["repo"], "--chunk-size", str(256 << 10), repo=tmp_path / "rel",
               passphrase=PASS2, IMGBACKUP_PASSPHRASE2=PASS1)
    assert proc.returncode == 2 and "chunk size" in proc.stderr
    assert _objects(dst) == before


def test_a_damaged_source_chunk_stops_the_copy_and_the_destination_stays_valid(source, tmp_path: Path) -> None:
    shutil.copytree(source["repo"], tmp_path / "src")
    source = {**source, "repo": tmp_path / "src"}   # a copy of the shared source, damaged below
    dst = tmp_path / "dst"
    cli_json("init", "--related-to", source["repo"], repo=dst, passphrase=PASS2, IMGBACKUP_PASSPHRASE2=PASS1)
    src_repo = Repository.open(str(source["repo"]), lambda: PASS1.encode())
    victim = next(iter(src_repo.images.load(source["ids"][2]).unique_ids()))
    loc = src_repo.chunk_index().get(victim)
    pack = source["repo"] / "packs" / loc.pack_id.hex()[:2] / loc.pack_id.hex()
    data = bytearray(pack.read_bytes())
    data[loc.offset + loc.length // 2] ^= 0x10
    pack.write_bytes(bytes(data))
    proc = cli("copy", "--all", "--to", dst, repo=source["repo"], **_two())
    assert proc.returncode == 6 and victim.hex()[:16] in proc.stderr, proc.stderr
    listed = cli_json("list", repo=dst, passphrase=PASS2)["images"]
    assert source["ids"][2] not in {i["id"] for i in listed}   # the damaged image was not copied
    assert cli("verify", repo=dst, passphrase=PASS2).returncode == 0


def test_every_json_has_requests(source, tmp_path: Path) -> None:
    for args in (("list",), ("info", "latest", "--name", "a"), ("verify",), ("diff", source["ids"][0], source["ids"][1])):
        doc = json.loads(cli(*args, "--json", repo=source["repo"], passphrase=PASS1).stdout)
        assert doc["requests"]["total"] >= 2 and doc["requests"]["get"] >= 2, args   # config and key file


class _NoIndexFiles:
    """A destination that dies when the first chunk-index file is written: packs landed, none indexed."""

    def __init__(self, inner) -> None:
        self.inner = inner

    def put(self, name: str, data) -> None:
        if name.startswith("index/"):
            raise StorageError(f"storage died writing {name} (injected)")
        self.inner.put(name, data)

    def __getattr__(self, name: str):
        return getattr(self.inner, name)


@pytest.mark.parametrize("related", [True, False], ids=["raw", "re-encrypt"])
def test_packs_a_killed_copy_left_unindexed_are_adopted_not_sent_again(source, tmp_path: Path, related) -> None:
    dst = tmp_path / "dst"
    if related:
        cli_json("init", "--related-to", source["repo"], repo=dst, passphrase=PASS2, IMGBACKUP_PASSPHRASE2=PASS1)
    else:
        cli_json("init", repo=dst, passphrase=PASS2)
    src_repo = Repository.open(str(source["repo"]), lambda: PASS1.encode())
    metas = [src_repo.images.read_meta(i) for i in source["ids"]]
    dying = Repository.open(_NoIndexFiles(open_storage(str(dst))), lambda: PASS2.encode())
    with pytest.raises(StorageError, match="injected"):
        copy_images(src_repo, dying, metas)
    assert list((dst / "packs").rglob("*")) and not list((dst / "index").iterdir())
    done = copy_images(src_repo, Repository.open(str(dst), lambda: PASS2.encode()), metas, verify=True)
    assert done.chunks_sent == 0 and done.chunks_adopted == done.chunks_reused > 0 and done.verified
    assert sorted(done.images_copied) == sorted(source["ids"])
    copies, distinct = stored_chunk_copies(Repository.open(str(dst), lambda: PASS2.encode()))
    assert copies == distinct
    _restores_all(dst, source["content"], tmp_path)


def test_unindexed_packs_of_a_backup_still_running_are_not_adopted(source, tmp_path: Path) -> None:
    """Packs no index names but written after a live backup session began may be that backup's: it
    indexes them when it finishes, or deletes them if it fails — then an index naming them would name
    nothing. So they are sent again."""
    dst = tmp_path / "dst"
    cli_json("init", "--related-to", source["repo"], repo=dst, passphrase=PASS2, IMGBACKUP_PASSPHRASE2=PASS1)
    src_repo = Repository.open(str(source["repo"]), lambda: PASS1.encode())
    metas = [src_repo.images.read_meta(i) for i in source["ids"]]
    running = Repository.open(str(dst), lambda: PASS2.encode())
    with running.session("backup /dev/sdz"):        # a backup on another host, begun before the packs
        dying = Repository.open(_NoIndexFiles(open_storage(str(dst))), lambda: PASS2.encode())
        with pytest.raises(StorageError, match="injected"):
            copy_images(src_repo, dying, metas[:1])
        left = {p for p in (dst / "packs").rglob("*") if p.is_file()}
        assert left and not list((dst / "index").iterdir())
        done = copy_images(src_repo, Repository.open(str(dst), lambda: PASS2.encode()), metas[:1], verify=True)
        assert done.chunks_adopted == 0 and done.chunks_sent > 0 and done.verified
        assert all(p.exists() for p in left)           # nothing at the destination is deleted
    first = metas[0]["id"]
    _restores_all(dst, {first: source["content"][first]}, tmp_path)


def test_a_copy_runs_beside_a_remover_and_leaves_a_marked_pack_alone(source, tmp_path: Path, monkeypatch) -> None:
    """A copy holds a session lease like a backup's, so it runs while a collection holds the exclusive
    lease (two hosts' copies into one bucket, a prune there). A pack a collection has marked as a
    candidate is not adopted: a later collection may delete it once its mark is ripe."""
    from imgbackup.engine.compact import run_compact

    dst = tmp_path / "dst"
    cli_json("init", "--related-to", source["repo"], repo=dst, passphrase=PASS2, IMGBACKUP_PASSPHRASE2=PASS1)
    src_repo = Repository.open(str(source["repo"]), lambda: PASS1.encode())
    metas = [src_repo.images.read_meta(i) for i in source["ids"]]
    dying = Repository.open(_NoIndexFiles(open_storage(str(dst))), lambda: PASS2.encode())
    with pytest.raises(StorageError, match="injected"):
        copy_images(src_repo, dying, metas[:1])
    monkeypatch.setenv("IMGBACKUP_GC_GRACE_SECONDS", "3600")      # marked now, deleted only after an hour
    compacted = run_compact(Repository.open(str(dst), lambda: PASS2.encode()))
    assert compacted.candidates_held > 0 and list((dst / "gc").iterdir())
    remover = Repository.open(str(dst), lambda: PASS2.encode())
    with remover.lock("prune"):                                   # a remover at work meanwhile
        done = copy_images(src_repo, Repository.open(str(dst), lambda: PASS2.encode()), metas, verify=True)
    assert done.chunks_adopted == 0 and done.chunks_sent > 0 and done.verified
    assert sorted(done.images_copied) == sorted(source["ids"])
    _restores_all(dst, source["content"], tmp_path)


class _SessionClearedAtImageWrite(_NoIndexFiles):
    """A destination where, as the first image object is stored, another host clears the copy's
    session (as a writer that judged it dead would)."""

    def put(self, name: str, data) -> None:
        if name.startswith("images/"):
            for lease in [n for n in self.inner.list("locks") if n.startswith("locks/session-")]:
                self.inner.delete(lease)
        self.inner.put(name, data)


def test_a_copy_whose_lease_was_lost_withdraws_the_image_it_wrote(source, tmp_path: Path) -> None:
    from imgbackup.errors import RepositoryLocked

    dst = tmp_path / "dst"
    cli_json("init", "--related-to", source["repo"], repo=dst, passphrase=PASS2, IMGBACKUP_PASSPHRASE2=PASS1)
    src_repo = Repository.open(str(source["repo"]), lambda: PASS1.encode())
    metas = [src_repo.images.read_meta(i) for i in source["ids"]]
    losing = Repository.open(_SessionClearedAtImageWrite(open_storage(str(dst))), lambda: PASS2.encode())
    with pytest.raises(RepositoryLocked):
        copy_images(src_repo, losing, metas[:1])
    assert not list((dst / "images").iterdir())
    assert metas[0]["id"] not in Repository.open(str(dst), lambda: PASS2.encode()).catalog.view().state.live()
    done = copy_images(src_repo, Repository.open(str(dst), lambda: PASS2.encode()), metas[:1], verify=True)
    assert done.images_copied == [metas[0]["id"]] and done.verified
