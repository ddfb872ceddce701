"""The backup pipeline's parallel ingest: segments digested concurrently still store each chunk once."""

from __future__ import annotations

import filecmp
import random
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tests.support import MIB, cli_json

from imgbackup.engine.backup.ingest import ChunkStore
from imgbackup.repository.chunkindex import ChunkIndex
from imgbackup.repository.repo import Repository


def _repeating_image(path: Path, blocks: list[bytes], slots: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    order = [rng.randrange(len(blocks)) for _ in range(slots)]
    with open(path, "wb") as f:
        for i in order:
            f.write(blocks[i])
    return order


def test_chunks_repeated_across_concurrent_segments_are_stored_once(tmp_path: Path) -> None:
    rng = random.Random(11)
    blocks = [rng.randbytes(MIB), b"imgbackup " * (MIB // 10) + b"x" * (MIB % 10), rng.randbytes(MIB)]
    src = tmp_path / "src.img"
    order = _repeating_image(src, blocks, 48, seed=5)  # six 8 MiB segments, every block in several
    repo = tmp_path / "repo"
    cli_json("init", repo=repo)
    doc = cli_json("backup", src, repo=repo)
    assert doc["chunks_data"] == 48 and doc["chunks_new"] == len(set(order)) == 3
    opened = Repository.open(repo, lambda: b"test-pass")
    assert len(ChunkIndex.load(opened.storage, opened.envelope).locations) == 3
    stored = sum(opened.storage.size(n) for n in opened.storage.list("packs"))
    assert stored < 2 * MIB + 64 * 1024  # two random blocks raw, the text block compressed
    out = tmp_path / "out.img"
    cli_json("restore", "--yes", "latest", out, repo=repo)
    assert filecmp.cmp(src, out, shallow=False)


def test_chunk_store_gives_each_new_chunk_to_exactly_one_claimer(tmp_path: Path) -> None:
    store = ChunkStore(Repository.init(tmp_path / "repo", lambda: b"test-passphrase"))
    ids = [bytes([i]) * 32 for i in range(200)]
    barrier = threading.Barrier(4)

    def claim_all(seed: int) -> list[bytes]:
        barrier.wait()
        return [cid for cid in random.Random(seed).sample(ids, len(ids)) if store.claim(cid)]

    with ThreadPoolExecutor(4) as pool:
        won = [cid for got in pool.map(claim_all, range(4)) for cid in got]
    assert sorted(won) == sorted(ids)
    assert not any(store.is_new(cid) for cid in ids)
