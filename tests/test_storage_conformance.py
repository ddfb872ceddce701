"""One conformance suite for every storage backend: directory, memory, and S3 (a real SeaweedFS).

Each test gets a fresh, empty store. The S3 store lists in pages of 7 keys and switches to multipart
above 5 MiB, so pagination and multipart uploads are exercised with small objects.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from tests.support import need_tool

from imgbackup.errors import ObjectMissing
from imgbackup.repository.backends.memory import MemoryStorage
from imgbackup.repository.storage import Storage, open_storage

MiB = 1 << 20
BACKENDS = ["directory", "memory", "s3"]
CROSS_PROCESS = ["directory", "s3"]  # a memory store lives in one process only
ROOT = Path(__file__).resolve().parents[1]


def _s3(url: str) -> Storage:
    from imgbackup.repository.backends.s3 import S3Storage

    return S3Storage.from_url(url, list_page=7, multipart_threshold=5 * MiB, part_size=5 * MiB)


@pytest.fixture
def location(request, tmp_path) -> str:
    """A URL for a fresh, empty store of the backend named by the test's parameter."""
    kind = request.param
    if kind == "directory":
        return str(tmp_path / "store")
    if kind == "memory":
        name = f"conformance-{os.urandom(4).hex()}"
        request.addfinalizer(lambda: MemoryStorage.forget(name))
        return f"memory://{name}"
    return request.getfixturevalue("s3_repo_url")


def _open(url: str) -> Storage:
    return _s3(url) if url.startswith("s3://") else open_storage(url)


@pytest.fixture
def store(location) -> Storage:
    return _open(location)


def backends(kinds=BACKENDS):
    return pytest.mark.parametrize("location", kinds, indirect=True)


REPOSITORY_NAMES = ["config", "keys/0123456789abcdef", f"packs/ab/ab{'0' * 62}", f"packs/cd/cd{'1' * 62}",
                    f"index/{'2' * 64}", f"images/{'3' * 32}", "locks/exclusive", f"locks/takeover-{'4' * 32}"]


@backends()
def test_names_of_the_repository_shapes_round_trip(store: Storage) -> None:
    for i, name in enumerate(REPOSITORY_NAMES):
        store.put(name, f"object {i}".encode())
    assert list(store.list("")) == sorted(REPOSITORY_NAMES)
    for i, name in enumerate(REPOSITORY_NAMES):
        assert store.get(name) == f"object {i}".encode()
        assert store.size(name) == len(f"object {i}")
        assert store.exists(name)


@backends()
@pytest.mark.parametrize("bad", ["../outside", "/absolute", "a//b", "a/", "", "a/./b"])
def test_bad_names_are_refused(store: Storage, bad: str) -> None:
    with pytest.raises(ValueError):
        store.put(bad, b"x")


@backends()
def test_put_replaces_whole_and_readers_never_see_a_mix(store: Storage) -> None:
    one, two = os.urandom(3 * MiB), os.urandom(3 * MiB)
    store.put("images/a", one)
    seen: list[bytes] = []
    stop = threading.Event()

    def reader() -> None:
        while not stop.is_set():
            seen.append(store.get("images/a"))

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for i in range(6):
            store.put("images/a", memoryview(two if i % 2 == 0 else one))
    finally:
        stop.set()
        thread.join()
    assert seen and all(s in (one, two) for s in seen)
    assert store.get("images/a") == one


@backends()
def test_create_if_absent_does_not_replace(store: Storage) -> None:
    assert store.create("locks/x", b"first") is True
    assert store.create("locks/x", b"second") is False
    assert store.get("locks/x") == b"first"
    store.delete("locks/x")
    assert store.create("locks/x", b"third") is True


RACER = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {root!r})
    from tests.test_storage_conformance import _open
    store = _open(sys.argv[1])
    while time.time() < float(sys.argv[2]):
        time.sleep(0.001)
    print(store.create("locks/exclusive", sys.argv[3].encode()))
""")


@backends(CROSS_PROCESS)
def test_create_race_between_processes_has_exactly_one_winner(location: str) -> None:
    racers = 6
    start = time.time() + 3.0  # every racer is up and waiting by then
    procs = [subprocess.Popen([sys.executable, "-c", RACER.format(root=str(ROOT)), location, str(start),
                               f"racer-{i}"], stdout=subprocess.PIPE, text=True) for i in range(racers)]
    outs = [p.communicate(timeout=120)[0].strip() for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert sorted(outs) == ["False"] * (racers - 1) + ["True"]
    winner = outs.index("True")
    assert _open(location).get("locks/exclusive") == f"racer-{winner}".encode()


@backends(["memory"])
def test_create_race_between_threads_has_exactly_one_winner(store: Storage) -> None:
    barrier = threading.Barrier(8)
    results: list[bool] = []

    def racer(i: int) -> None:
        barrier.wait()
        results.append(store.create("locks/exclusive", str(i).encode()))

    threads = [threading.Thread(target=racer, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [False] * 7 + [True]


@backends()
@pytest.mark.parametrize("size", [1000, 12 * MiB + 3], ids=["small", "multipart"])
def test_streamed_writer_is_invisible_until_commit_and_gone_on_abort(store: Storage, size: int) -> None:
    data = os.urandom(size)
    out = store.open_writer("packs/cd/cd01")
    for start in range(0, size, 1 << 20):
        out.write(data[start : start + (1 << 20)])
        assert not store.exists("packs/cd/cd01")
    assert list(store.list("packs")) == []
    out.commit()
    assert store.get("packs/cd/cd01") == data
    gone = store.open_writer("packs/cd/cd02")
    gone.write(data)
    gone.abort()
    assert list(store.list("packs")) == ["packs/cd/cd01"]
    assert not store.exists("packs/cd/cd02")
    if hasattr(store, "pending_uploads"):
        assert store.pending_uploads() == []  # the multipart upload is aborted on the server


@backends()
def test_range_reads_at_the_edges(store: Storage) -> None:
    data = bytes(range(100))
    store.put("packs/ab/ab01", data)
    assert store.get_range("packs/ab/ab01", 0, 10) == data[:10]
    assert store.get_range("packs/ab/ab01", 90, 10) == data[90:]
    assert store.get_range("packs/ab/ab01", 95, 10) == data[95:]  # short at the end
    assert store.get_range("packs/ab/ab01", 99, 1) == data[99:]
    assert store.get_range("packs/ab/ab01", 100, 10) == b""  # at the end
    assert store.get_range("packs/ab/ab01", 250, 5) == b""  # past the end
    assert store.get_range("packs/ab/ab01", 40, 0) == b""
    assert store.get_range("packs/ab/ab01", 0, 100) == data
    with pytest.raises(ObjectMissing):
        store.get_range("packs/ab/missing", 0, 10)
    with pytest.raises(ObjectMissing):
        store.get_range("packs/ab/missing", 0, 0)


@backends()
def test_list_by_folder_with_pagination(store: Storage) -> None:
    packs = sorted(f"packs/{i % 5:02x}/{i:064x}" for i in range(23))
    others = [f"index/{'a' * 64}", f"images/{'b' * 32}", "config", "packsfile"]
    for name in packs + others:
        store.put(name, b"x")
    assert list(store.list("packs")) == packs  # 23 keys: 4 pages of 7 on S3
    assert list(store.list("packs/")) == packs
    assert list(store.list("packs/03")) == [p for p in packs if p.startswith("packs/03/")]
    assert list(store.list("index")) == [f"index/{'a' * 64}"]
    assert list(store.list("pack")) == []  # a folder, not a string prefix
    assert list(store.list("nothing")) == []
    assert list(store.list("")) == sorted(packs + others)


@backends()
def test_delete_of_a_missing_object_is_fine(store: Storage) -> None:
    store.delete("images/never")
    store.put("images/a", b"x")
    store.delete("images/a")
    store.delete("images/a")
    assert not store.exists("images/a")
    with pytest.raises(ObjectMissing):
        store.get("images/a")
    with pytest.raises(ObjectMissing):
        store.size("images/a")


KILLED_WRITER = textwrap.dedent("""
    import os, sys
    sys.path.insert(0, {root!r})
    from tests.test_storage_conformance import _open
    out = _open(sys.argv[1]).open_writer("packs/ef/ef01")
    out.write(os.urandom(12 << 20))
    os._exit(9)  # killed mid-write: never committed, never aborted
""")


@backends(CROSS_PROCESS)
def test_a_killed_writer_leaves_nothing_visible_and_cleanup_removes_its_leftovers(location: str) -> None:
    subprocess.run([sys.executable, "-c", KILLED_WRITER.format(root=str(ROOT)), location], timeout=120)
    store = _open(location)
    assert list(store.list("")) == []
    if hasattr(store, "pending_uploads"):
        assert len(store.pending_uploads()) == 1  # the upload is on the server, invisible
    assert store.remove_incomplete_writes() == 1
    assert store.remove_incomplete_writes() == 0
    if hasattr(store, "pending_uploads"):
        assert store.pending_uploads() == []


# --- the storage's clock: what leases and garbage collection judge age by -----------------------

CLOCK_RESOLUTION = 1.0  # S3 Date and Last-Modified are whole seconds; a directory's mtimes are finer


@backends()
def test_modified_and_now_come_from_one_clock(store: Storage) -> None:
    before = store.now()
    store.put("locks/session-a", b"one")
    first = store.modified("locks/session-a")
    after = store.now()
    assert before - CLOCK_RESOLUTION <= first <= after + CLOCK_RESOLUTION
    assert abs(after - time.time()) < 60  # tests run with a sane clock on one machine
    time.sleep(CLOCK_RESOLUTION + 0.2)
    store.put("locks/session-a", b"two")  # a refresh moves the time forward
    assert store.modified("locks/session-a") >= first + CLOCK_RESOLUTION
    assert store.now() >= after
    streamed = store.open_writer("packs/ab/ab03")
    streamed.write(b"x" * 100)
    streamed.commit()
    assert store.modified("packs/ab/ab03") >= first
    with pytest.raises(ObjectMissing):
        store.modified("locks/never")
    assert list(store.list("")) == ["locks/session-a", "packs/ab/ab03"]  # the clock probe leaves nothing


OLD_WRITER = textwrap.dedent("""
    import os, sys
    sys.path.insert(0, {root!r})
    from tests.test_storage_conformance import _open
    out = _open(sys.argv[1]).open_writer("packs/ef/ef02")
    out.write(os.urandom(12 << 20))
    os._exit(9)
""")


@backends(CROSS_PROCESS)
def test_only_leftovers_older_than_asked_are_removed(location: str) -> None:
    subprocess.run([sys.executable, "-c", OLD_WRITER.format(root=str(ROOT)), location], timeout=120)
    store = _open(location)
    assert store.remove_incomplete_writes(older_than=3600) == 0  # as young as a live writer's upload
    time.sleep(CLOCK_RESOLUTION + 1.2)
    assert store.remove_incomplete_writes(older_than=1) == 1
    assert store.remove_incomplete_writes() == 0


def test_a_faked_process_clock_does_not_move_the_directory_clock(tmp_path) -> None:
    """faketime moves what the process reads, not the mtimes the kernel sets: a directory's clock
    stays the storage's own."""
    need_tool("faketime")
    code = ("import sys, time; sys.path.insert(0, sys.argv[2]); from imgbackup.repository.storage import "
            "open_storage; s = open_storage(sys.argv[1]); print(s.now() - time.time())")
    out = subprocess.run(["faketime", "-f", "+2h", sys.executable, "-c", code, str(tmp_path), str(ROOT / "src")],
                         capture_output=True, text=True, timeout=120, check=True).stdout
    assert abs(float(out) + 7200) < 60, out
