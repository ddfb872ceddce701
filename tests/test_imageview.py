"""ImageView: random reads equal the source byte for byte; zero slots cost no I/O; damage is named."""

from __future__ import annotations

import os
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from imgbackup.engine.backup.run import BackupRequest, run_backup
from imgbackup.engine.imageview import ImageView
from imgbackup.errors import IntegrityError
from imgbackup.repository.chunkreader import ChunkReader
from imgbackup.repository.packs import pack_name
from imgbackup.repository.repo import Repository

CHUNK = 64 << 10


@pytest.fixture(scope="module")
def backed_up(tmp_path_factory):
    root = tmp_path_factory.mktemp("view")
    rng = random.Random(5)
    data = bytearray(rng.randbytes(40 * CHUNK + 12345))      # a short last chunk
    data[8 * CHUNK : 12 * CHUNK] = bytes(4 * CHUNK)           # zero slots
    source = root / "src.img"
    source.write_bytes(data)
    repo = Repository.init(root / "repo", lambda: b"test-passphrase", chunk_size=CHUNK)
    result = run_backup(repo, BackupRequest(str(source)))
    return root, bytes(data), result.id


def _open(root):
    return Repository.open(root / "repo", lambda: b"test-passphrase")


@given(st.integers(0, 40 * CHUNK + 20000), st.integers(0, 5 * CHUNK))
def test_random_reads_equal_source(backed_up, offset, length):
    root, data, image_id = backed_up
    view = ImageView(_open(root), image_id, cache_bytes=4 * CHUNK)
    try:
        assert view.size == len(data)
        assert view.read(offset, length) == data[offset : offset + length]
    finally:
        view.close()


def test_zero_slots_do_no_io_and_cache_is_bounded(backed_up):
    root, data, image_id = backed_up
    with ImageView(_open(root), image_id, cache_bytes=4 * CHUNK, readahead_chunks=0) as view:
        assert view.read(8 * CHUNK, 4 * CHUNK) == bytes(4 * CHUNK)
        assert view.chunk_reads == 0
        for _ in range(3):
            assert view.read(0, 2 * CHUNK) == data[: 2 * CHUNK]
        assert view.chunk_reads == 2                              # cached after the first pass
        assert view.read(20 * CHUNK, 10 * CHUNK) == data[20 * CHUNK : 30 * CHUNK]
        assert len(view._cache) <= 4
        assert view.read(len(data) - 10, 100) == data[-10:]


def test_sequential_reads_trigger_read_ahead(backed_up):
    root, data, image_id = backed_up
    with ImageView(_open(root), image_id, readahead_chunks=6) as view:
        pos = 0
        while pos < 4 * CHUNK:
            assert view.read(pos, 16384) == data[pos : pos + 16384]
            pos += 16384
        view._pool.shutdown(wait=True)
        view._pool = None
        assert len(view._cache) >= 8          # chunks beyond what was asked for were fetched ahead


def test_damaged_chunk_raises_naming_chunk_and_offset(backed_up, tmp_path):
    root, data, image_id = backed_up
    import shutil

    shutil.copytree(root / "repo", tmp_path / "repo")
    repo = _open(tmp_path)
    with ImageView(repo, image_id, readahead_chunks=0) as view:
        cid = view.chunk_id_at(30 * CHUNK + 5)
        loc = ChunkReader(repo).locate(cid)
        path = tmp_path / "repo" / pack_name(loc.pack_id)
        with open(path, "r+b") as f:
            f.seek(loc.offset + 40)
            b = f.read(1)
            f.seek(loc.offset + 40)
            f.write(bytes([b[0] ^ 1]))
        with pytest.raises(IntegrityError) as exc:
            view.read(30 * CHUNK + 100, 10)
        assert cid.hex()[:16] in str(exc.value) and str(30 * CHUNK) in str(exc.value)
        assert view.read(29 * CHUNK, CHUNK) == data[29 * CHUNK : 30 * CHUNK]   # neighbours unaffected
        assert view.read(31 * CHUNK, CHUNK) == data[31 * CHUNK : 32 * CHUNK]


def test_view_survives_fork(backed_up):
    root, data, image_id = backed_up
    view = ImageView(_open(root), image_id, readahead_chunks=4)
    view.read(0, 4096)
    view.read(4096, 4096)                      # starts the read-ahead pool in the parent
    pid = os.fork()
    if pid == 0:
        ok = view.read(0, 20 * CHUNK) == data[: 20 * CHUNK]
        os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    view.close()
    assert os.waitstatus_to_exitcode(status) == 0
