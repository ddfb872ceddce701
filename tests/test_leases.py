"""Leases: shared backup sessions, the exclusive lease of removers, expiry by the storage's clock,
heartbeats, lost leases, takeover races between real processes, --lock-wait.

Unit tests move a memory store's clock (``ManualClock``) instead of sleeping; the process tests use
a real directory repository and real pids.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from imgbackup.errors import RepositoryLocked
from imgbackup.repository.backends.directory import DirectoryStorage
from imgbackup.repository.backends.memory import MemoryStorage
from imgbackup.repository.lease import CLOCK_TOLERANCE, LeaseInfo, LeaseLost, judge, parse_lease
from imgbackup.repository.lock import (
    CLAIM_PREFIX,
    EXCLUSIVE_NAME,
    SESSION_PREFIX,
    break_lock,
    clear_dead,
    leases,
    open_session,
    take_exclusive,
)

TTL = 60.0


class ManualClock:
    """A storage clock that moves only when told to."""

    def __init__(self, start: float | None = None) -> None:
        self.t = time.time() if start is None else start

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def store(clock) -> MemoryStorage:
    return MemoryStorage(clock=clock)


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _plant(storage, name: str, started: float, **fields) -> bytes:
    info = LeaseInfo.mine("exclusive" if name == EXCLUSIVE_NAME else "backup", "planted", started, TTL)
    doc = {**info.__dict__, **fields}
    raw = json.dumps(doc).encode()
    storage.put(name, raw)
    return raw


def test_the_exclusive_lease_is_exclusive_and_names_its_holder(store) -> None:
    with take_exclusive(store, "compact", ttl=TTL) as held:
        with pytest.raises(RepositoryLocked) as err:
            take_exclusive(store, "delete", ttl=TTL)
        text = str(err.value)
        assert f"pid {os.getpid()}" in text and "compact" in text and "--lock-wait" in text
        assert "clears itself 60 s from now" in text
        assert store.get(EXCLUSIVE_NAME) == held.body
    assert not store.exists(EXCLUSIVE_NAME)


def test_backups_share_the_repository_and_never_wait_for_a_remover(store) -> None:
    with take_exclusive(store, "compact", ttl=TTL):
        sessions = [open_session(store, f"backup {i}", ttl=TTL) for i in range(4)]
        assert len(leases(store)) == 4 and all(s.alive for s in leases(store))
        for s in sessions:
            s.release()
    assert list(store.list("locks")) == []
    with open_session(store, "backup", ttl=TTL), take_exclusive(store, "delete", ttl=TTL):
        pass                                         # a remover does not wait for backups either


@pytest.mark.parametrize("case", ["dead pid", "reused pid", "rebooted"])
def test_a_lease_of_a_process_gone_from_this_host_is_dead_at_once(store, clock, case: str) -> None:
    fields = {"dead pid": {"pid": _dead_pid(), "start_time": "1"},
              "reused pid": {"start_time": "1"},                       # our pid, another process start
              "rebooted": {"boot_id": "00000000-0000-0000-0000-000000000000"}}[case]
    _plant(store, EXCLUSIVE_NAME, clock(), **fields)
    assert not judge(store, EXCLUSIVE_NAME).alive
    with take_exclusive(store, "taker", ttl=TTL):
        assert judge(store, EXCLUSIVE_NAME).info.command == "taker"


def test_another_hosts_lease_lives_until_it_expires_by_the_storage_clock(store, clock) -> None:
    _plant(store, EXCLUSIVE_NAME, clock(), host="elsewhere.example", pid=_dead_pid())
    clock.advance(TTL)                        # exactly its lifetime, and the clocks' resolution: alive
    with pytest.raises(RepositoryLocked, match="elsewhere.example"):
        take_exclusive(store, "taker", ttl=TTL)
    clock.advance(CLOCK_TOLERANCE + 0.5)      # past it: dead, whoever held it; no break-lock needed
    with take_exclusive(store, "taker", ttl=TTL):
        assert judge(store, EXCLUSIVE_NAME).info.command == "taker"


def test_an_unreadable_lease_is_judged_by_its_age_alone(store, clock) -> None:
    store.put(EXCLUSIVE_NAME, b"{not json")
    with pytest.raises(RepositoryLocked, match="unreadable lease"):
        take_exclusive(store, "taker", ttl=TTL)
    clock.advance(10 * 86400)                 # the default lifetime applies to it
    with take_exclusive(store, "taker", ttl=TTL):
        pass


@pytest.mark.parametrize("forged", [{"pid": "1"}, {"ttl": True}, {"kind": "reader"}, {"host": None}, {"ttl": 1e400}])
def test_a_lease_with_a_field_of_the_wrong_type_is_unreadable(forged) -> None:
    """Leases are not sealed: each field's type is checked (format/validate), and a lease failing the
    check is judged by its age alone rather than trusted (a forged ttl cannot keep it alive)."""
    good = json.loads(LeaseInfo.mine("exclusive", "x", 1000.0, 60.0).to_bytes())
    assert parse_lease(json.dumps(good).encode()) is not None
    assert parse_lease(json.dumps({**good, **forged}).encode()) is None


def test_a_lease_claiming_to_live_for_years_is_judged_by_the_cap(store, clock) -> None:
    _plant(store, SESSION_PREFIX + "f" * 32, clock(), host="elsewhere.example", ttl=1e12)
    clock.advance(8 * 86400)
    assert [s.name for s in clear_dead(store)] == [SESSION_PREFIX + "f" * 32]


def test_the_next_writer_clears_dead_sessions_and_keeps_live_ones(store, clock) -> None:
    _plant(store, SESSION_PREFIX + "a" * 32, clock(), host="crashed.example")
    clock.advance(TTL / 2)
    _plant(store, SESSION_PREFIX + "b" * 32, clock(), host="busy.example")
    clock.advance(TTL / 2 + CLOCK_TOLERANCE + 1)   # a's lease is dead, b's is not
    with open_session(store, "backup", ttl=TTL) as mine:
        names = sorted(s.name for s in leases(store))
        assert names == sorted([SESSION_PREFIX + "b" * 32, mine.name])


def test_a_heartbeat_keeps_a_lease_alive_past_its_lifetime() -> None:
    store = MemoryStorage()                        # the real clock: the heartbeat thread really runs
    with open_session(store, "backup", ttl=6.0) as lease:
        first = store.modified(lease.name)
        time.sleep(9.0)
        assert store.modified(lease.name) > first + 3  # refreshed about every 0.6 s
        assert judge(store, lease.name).alive
        lease.check()
        lease.confirm()


def test_a_lease_paused_longer_than_its_lifetime_is_lost(store, clock) -> None:
    lease = open_session(store, "backup", ttl=TTL)
    lease._stop.set()                              # no heartbeat: this test moves time itself
    clock.advance(TTL / 3)
    lease.confirm()                                # a gap well inside the lifetime: fine
    clock.advance(TTL)                             # stopped for a lifetime: someone may have judged it dead
    with pytest.raises(LeaseLost, match="without a refresh"):
        lease.confirm()
    with pytest.raises(LeaseLost):
        lease.check()
    lease.release()


def test_a_lease_cleared_or_replaced_by_another_process_is_lost(store, clock) -> None:
    lease = open_session(store, "backup", ttl=TTL)
    lease._stop.set()
    store.delete(lease.name)
    with pytest.raises(LeaseLost, match="cleared"):
        lease.confirm()
    other = take_exclusive(store, "compact", ttl=TTL)
    other._stop.set()
    store.put(EXCLUSIVE_NAME, b'{"kind": "exclusive", "host": "thief"}')
    with pytest.raises(LeaseLost, match="replaced"):
        other.confirm()
    other.release()
    assert store.get(EXCLUSIVE_NAME) == b'{"kind": "exclusive", "host": "thief"}'  # not its own: kept


def test_lock_wait_waits_for_the_holder_and_gives_up_after_the_time(tmp_path: Path) -> None:
    storage = DirectoryStorage(tmp_path)
    holder = take_exclusive(storage, "compact", ttl=TTL)
    started = time.monotonic()
    with pytest.raises(RepositoryLocked):
        take_exclusive(storage, "delete", wait=1.5, ttl=TTL)
    assert 1.4 < time.monotonic() - started < 10
    threading.Timer(1.0, holder.release).start()
    with take_exclusive(storage, "delete", wait=30, ttl=TTL) as mine:
        assert judge(storage, EXCLUSIVE_NAME).info.id == mine.info.id


def test_a_takeover_claim_left_by_a_dead_taker_clears_itself(store, clock) -> None:
    stale = _plant(store, EXCLUSIVE_NAME, clock(), pid=_dead_pid(), start_time="1")
    claim = CLAIM_PREFIX + hashlib.sha256(stale).hexdigest()[:32]
    _plant(store, claim, clock(), host="elsewhere.example")     # a taker that died after its claim
    with pytest.raises(RepositoryLocked, match="changes hands too fast"):
        take_exclusive(store, "taker", ttl=TTL)                 # the claim is young: not touched
    assert store.exists(claim)
    clock.advance(TTL + CLOCK_TOLERANCE + 1)
    with take_exclusive(store, "taker", ttl=TTL):
        assert not store.exists(claim)


def test_break_lock_removes_the_exclusive_lease_and_claims_and_with_sessions_those_too(store, clock) -> None:
    _plant(store, EXCLUSIVE_NAME, clock(), host="elsewhere.example")
    _plant(store, CLAIM_PREFIX + "c" * 32, clock(), host="elsewhere.example")
    session = _plant(store, SESSION_PREFIX + "d" * 32, clock(), host="elsewhere.example")
    assert sorted(s.name for s in break_lock(store)) == [EXCLUSIVE_NAME, CLAIM_PREFIX + "c" * 32]
    assert store.get(SESSION_PREFIX + "d" * 32) == session
    assert [s.name for s in break_lock(store, sessions=True)] == [SESSION_PREFIX + "d" * 32]
    assert list(store.list("locks")) == []


def test_a_clock_far_from_the_storages_is_reported() -> None:
    store = MemoryStorage(clock=lambda: time.time() - 7200)
    with open_session(store, "backup", ttl=TTL) as lease:
        assert lease.warnings and "7200 s ahead of the clock of memory://" in lease.warnings[0]
    with open_session(MemoryStorage(), "backup", ttl=TTL) as lease:
        assert lease.warnings == []


# --- real processes ----------------------------------------------------------------------------

def _hold_once(root: str, log: str, barrier) -> None:
    """Child: take the exclusive lease (waiting while a live process holds it), log the hold, release."""
    storage = DirectoryStorage(root)
    barrier.wait()
    try:
        lease = take_exclusive(storage, "racer", wait=60, ttl=TTL)
    except RepositoryLocked:
        os._exit(3)
    with open(log, "a") as f:
        f.write(f"{time.monotonic()} +1\n")
        f.flush()
        time.sleep(0.05)
        f.write(f"{time.monotonic()} -1\n")
    lease.release()
    os._exit(0)


def test_many_processes_taking_over_one_dead_lease_never_hold_it_together(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("fork")
    for round_ in range(4):
        storage = DirectoryStorage(tmp_path / f"r{round_}")
        _plant(storage, EXCLUSIVE_NAME, storage.now(), pid=_dead_pid(), start_time="1")
        log = tmp_path / f"holds{round_}.log"
        barrier = ctx.Barrier(8)
        procs = [ctx.Process(target=_hold_once, args=(str(storage.root), str(log), barrier)) for _ in range(8)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(120)
        assert [p.exitcode for p in procs] == [0] * 8
        events = sorted((float(t), int(d)) for t, d in (line.split() for line in log.read_text().splitlines()))
        depth = 0
        for _, step in events:
            depth += step
            assert depth <= 1, "two processes held the lease at once"
        assert len(events) == 16
        assert list(storage.list("locks")) == []  # no lease, no takeover claim left behind


FAKED_TAKER = """
import sys, time
sys.path.insert(0, sys.argv[2])
from imgbackup.errors import RepositoryLocked
from imgbackup.repository.lock import take_exclusive
from imgbackup.repository.storage import open_storage
try:
    take_exclusive(open_storage(sys.argv[1]), "faked clock", ttl=60).release()
    print("took it")
except RepositoryLocked as exc:
    print("refused:", exc)
"""


def test_a_process_with_a_clock_two_hours_ahead_cannot_take_a_live_lease(tmp_path: Path) -> None:
    """The lease's age is the storage's business: a faked clock in the taker changes nothing."""
    from tests.support import need_tool

    need_tool("faketime")
    storage = DirectoryStorage(tmp_path / "repo")
    root = str(Path(__file__).resolve().parents[1] / "src")
    with take_exclusive(storage, "holder", ttl=60):
        out = subprocess.run(["faketime", "-f", "+2h", sys.executable, "-c", FAKED_TAKER, str(storage.root), root],
                             capture_output=True, text=True, timeout=120, check=True).stdout
        assert out.startswith("refused:") and "holder" in out, out
