"""Delta chunks: a changed chunk stored against the parent's chunk, depth one, each image on its own.

Real repositories through the CLI; the bases are checked in the chunk index and in the pack
trailers (so the index could be rebuilt from packs alone); corruption flips a real byte of the
base's blob in its pack file.
"""

from __future__ import annotations

import filecmp
import random
import shutil
from pathlib import Path

import pytest
from tests.support import MIB, cli, cli_json, need_tool, run

from imgbackup.format.layout import ENVELOPE_HEADER, OBJ_CHUNK
from imgbackup.repository.chunkindex import ChunkIndex
from imgbackup.repository.packs import pack_name, read_pack_trailer
from imgbackup.repository.repo import Repository

SLOTS = 8
CHANGED = (1, 3, 4, 6, 7)


def _text(rng: random.Random, n: int) -> bytes:
    words = [rng.randbytes(rng.randrange(2, 9)).hex() for _ in range(400)]
    out = bytearray()
    while len(out) < n:
        out += (" ".join(rng.choice(words) for _ in range(12)) + "\n").encode()
    return bytes(out[:n])


def _edit(src: Path, copy_to: Path, seed: int) -> int:
    """Overwrite two scattered 4 KiB blocks in each CHANGED slot with random bytes; bytes changed."""
    rng = random.Random(seed)
    with open(src, "r+b") as f:
        for slot in CHANGED:
            for _ in range(2):
                f.seek(slot * MIB + rng.randrange(256) * 4096)
                f.write(rng.randbytes(4096))
    shutil.copyfile(src, copy_to)
    return len(CHANGED) * 2 * 4096


def _open(repo: Path) -> Repository:
    return Repository.open(repo, lambda: b"test-pass")


@pytest.fixture
def history(tmp_path: Path) -> dict:
    """A repository with a full image and two incrementals of an 8 MiB compressible file."""
    rng = random.Random(3)
    src = tmp_path / "src.img"
    src.write_bytes(_text(rng, SLOTS * MIB))
    repo = tmp_path / "repo"
    cli_json("init", repo=repo)
    states, docs = [], []
    for step in range(3):
        if step:
            _edit(src, tmp_path / f"state{step}.img", seed=step)
        else:
            shutil.copyfile(src, tmp_path / "state0.img")
        states.append(tmp_path / f"state{step}.img")
        docs.append(cli_json("backup", "--name", "d", src, repo=repo))
    return {"repo": repo, "states": states, "docs": docs, "tmp": tmp_path}


def test_changed_chunks_are_deltas_near_the_true_change_and_every_image_restores(history: dict) -> None:
    repo, states, docs = history["repo"], history["states"], history["docs"]
    full, first, second = docs
    assert full["chunks_delta"] == 0 and full["chunks_new"] == SLOTS
    changed = len(CHANGED) * 2 * 4096        # random 4 KiB blocks: their compressed size is their size
    for doc in (first, second):
        assert doc["chunks_new"] == len(CHANGED) and doc["chunks_delta"] == len(CHANGED)
    # Whole 1 MiB chunks would be ~5 x 220 KB here. The first incremental's deltas hold the edits;
    # the second's are against the same whole bases (depth one), so they carry both edits.
    assert first["bytes_stored"] < 1.3 * changed + 4096, first["bytes_stored"]
    assert second["bytes_stored"] < 2 * 1.3 * changed + 4096, second["bytes_stored"]
    index = ChunkIndex.load(_open(repo).storage, _open(repo).envelope)
    deltas = {cid: loc for cid, loc in index.locations.items() if loc.base is not None}
    assert len(deltas) == 2 * len(CHANGED)
    assert all(index.get(loc.base).base is None for loc in deltas.values())   # depth one
    for state, doc in zip(states, docs, strict=True):
        out = history["tmp"] / f"out-{doc['id'][:8]}.img"
        cli_json("restore", "--yes", doc["id"], out, repo=repo)
        assert filecmp.cmp(state, out, shallow=False)
    assert cli_json("verify", repo=repo)["ok"]


def test_pack_trailers_alone_name_every_delta_and_its_base(history: dict) -> None:
    opened = _open(history["repo"])
    index = ChunkIndex.load(opened.storage, opened.envelope)
    rebuilt = {}
    for name in opened.storage.list("packs"):
        rebuilt.update(read_pack_trailer(opened.storage, opened.envelope, bytes.fromhex(name.rsplit("/", 1)[1])))
    assert {c: loc.base for c, loc in rebuilt.items()} == {c: loc.base for c, loc in index.locations.items()}
    for cid, loc in rebuilt.items():
        blob = opened.storage.get_range(pack_name(loc.pack_id), loc.offset, ENVELOPE_HEADER.size)
        _version, otype, _alg, comp, key_id, _nonce = ENVELOPE_HEADER.unpack(blob)
        # a chunk is sealed with its session's data key: a key id with the top bit set (FORMAT.md 2.3)
        assert otype == OBJ_CHUNK and key_id >> 63 == 1 and (comp == 2) == (loc.base is not None), cid.hex()


def test_deleting_older_images_keeps_the_bases_a_remaining_delta_needs(history: dict) -> None:
    repo, states, docs = history["repo"], history["states"], history["docs"]
    cli_json("delete", "--yes", docs[0]["id"], docs[1]["id"], repo=repo)
    out = history["tmp"] / "out.img"
    cli_json("restore", "--yes", docs[2]["id"], out, repo=repo)
    assert filecmp.cmp(states[2], out, shallow=False)
    opened = _open(repo)
    index = ChunkIndex.load(opened.storage, opened.envelope)
    live = opened.images.load(docs[2]["id"]).unique_ids()
    assert set(index.locations) == live | index.bases_of(live)   # the first image's chunks stay as bases
    assert cli_json("verify", repo=repo)["ok"]
    cli_json("delete", "--yes", docs[2]["id"], repo=repo)
    opened = _open(repo)
    assert not ChunkIndex.load(opened.storage, opened.envelope).locations
    assert not list(opened.storage.list("packs"))


def test_a_damaged_base_fails_the_delta_in_verify_and_restore(history: dict) -> None:
    repo, docs = history["repo"], history["docs"]
    opened = _open(repo)
    index = ChunkIndex.load(opened.storage, opened.envelope)
    base = next(loc.base for loc in index.locations.values() if loc.base is not None)
    loc = index.get(base)
    with open(repo / pack_name(loc.pack_id), "r+b") as f:
        f.seek(loc.offset + loc.length // 2)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0x10]))
    proc = cli("verify", docs[2]["id"], "--json", repo=repo)
    assert proc.returncode == 11 and base.hex()[:16] in proc.stdout
    target = history["tmp"] / "never.img"
    proc = cli("restore", "--yes", docs[2]["id"], target, repo=repo)
    assert proc.returncode == 6 and not target.exists(), proc.stderr


def test_a_stranger_decodes_a_delta_with_the_zstd_tool(tmp_path: Path) -> None:
    """FORMAT.md: the payload of compression 2 is what `zstd -d --patch-from=BASE` decodes."""
    need_tool("zstd")
    rng = random.Random(5)
    src = tmp_path / "src.img"
    src.write_bytes(_text(rng, 2 * MIB))
    repo = tmp_path / "repo"
    cli_json("init", "--encryption", "none", repo=repo)
    cli_json("backup", "--name", "d", src, repo=repo)
    base_plain = src.read_bytes()[:MIB]
    with open(src, "r+b") as f:
        f.seek(12345)
        f.write(b"changed!" * 100)
    cli_json("backup", "--name", "d", src, repo=repo)
    opened = _open(repo)
    index = ChunkIndex.load(opened.storage, opened.envelope)
    ((cid, loc),) = [(c, loc) for c, loc in index.locations.items() if loc.base is not None]
    blob = opened.storage.get_range(pack_name(loc.pack_id), loc.offset, loc.length)
    (tmp_path / "frame.zst").write_bytes(blob[ENVELOPE_HEADER.size : -32])   # algorithm 0: SHA-256 trailer
    (tmp_path / "base.bin").write_bytes(base_plain)
    run("zstd", "-q", "-d", "--patch-from", tmp_path / "base.bin", tmp_path / "frame.zst", "-o", tmp_path / "out")
    assert (tmp_path / "out").read_bytes() == src.read_bytes()[:MIB]
