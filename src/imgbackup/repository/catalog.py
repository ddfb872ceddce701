"""The catalog log: an append-only, hash-chained record of what happened to the images and holds.

Entry ``n`` is the object ``catalog/<n as 16 hex>``, created only if absent — never replaced, never
deleted, so the log also lives under S3 Object Lock. It is sealed (envelope type 8, object id = n as
8 bytes big-endian) and names the SHA-256 of entry n-1's stored bytes (entry 0: 64 zeros), so an
entry cannot be moved, replaced, or dropped from the middle unnoticed. Writers on several hosts
append at once: whoever loses the create of entry n reads it and tries n+1 after it.

A client remembers the newest entry it has seen (its number and hash, and the state folded up to it)
in ``$XDG_STATE_HOME/imgbackup/<repo id>/catalog.json``; a repository whose log ends before that
entry, or holds another entry there, was rolled back (or forked), and ``verify`` says so. The
remembered state also spares reading the whole log: only entries after it are read.

The events and what verify concludes from them: docs/FORMAT.md, "The catalog log".
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import pwd
import re
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from imgbackup import audit
from imgbackup.crypto.envelope import Envelope
from imgbackup.errors import IntegrityError, RepositoryLocked
from imgbackup.format.layout import OBJ_CATALOG_ENTRY
from imgbackup.format.validate import obj, parse_json
from imgbackup.repository.storage import ObjectMissing, Storage, confirm_stored

CATALOG = "catalog"
ENTRY_VERSION = 1
STATE_VERSION = 1
ZERO_HASH = "0" * 64
MAX_ENTRY = 4 << 20       # an entry is a few events of JSON; more is damage (or a forged frame)
MAX_RACES = 1000          # entries other writers may slip in before this one gives up
READ_THREADS = 8          # entries read at once when catching up (a bucket answers each GET slowly)
MAX_TEXT = 1000           # characters kept of a reason or command
_NAME = re.compile(r"^catalog/([0-9a-f]{16})$")
_HEX32 = re.compile(r"^[0-9a-f]{32}$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
log = logging.getLogger("imgbackup.storage")

IMAGE_EVENTS = ("adding", "added", "withdrawn", "deleted", "pruned")
REMOVALS = ("withdrawn", "deleted", "pruned")
HOLD_EVENTS = ("held", "released")
OTHER_EVENTS = ("created", "lock_probe", "locks_extended", "append_only")
EVENTS = IMAGE_EVENTS + HOLD_EVENTS + OTHER_EVENTS



def command_line() -> str:
    """The command line entries name (``audit.set_command``'s; passphrases are never arguments, so it
    holds no secret); empty when no command line was set (imgbackup used as a library)."""
    argv = audit.command_argv()
    return "" if argv is None else " ".join(["imgbackup", *argv])[:MAX_TEXT]


def actor() -> dict[str, str]:
    """Who does this: the user (and the one sudo ran for), the host."""
    try:
        user = pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        user = str(os.getuid())
    sudo = os.environ.get("SUDO_USER")
    if sudo and sudo != user:
        user = f"{user} (sudo by {sudo})"
    return {"user": user, "host": socket.gethostname()}


def entry_name(seq: int) -> str:
    return f"{CATALOG}/{seq:016x}"


@dataclass(frozen=True)
class Entry:
    seq: int
    prev: str
    time: float
    host: str
    user: str
    command: str
    events: tuple[dict, ...]
    hash: str                    # SHA-256 of the stored (sealed) bytes: what entry seq+1 names


# --- encoding and checking one entry ----------------------------------------------------------

def _text(value: object, what: str) -> str:
    if not isinstance(value, str) or len(value) > MAX_TEXT * 4:
        raise IntegrityError(f"{what} is malformed")
    return value


def _number(value: object, what: str) -> float:
    if type(value) not in (int, float) or not 0 <= value < 2**40:   # type: ignore[operator]
        raise IntegrityError(f"{what} is malformed")
    return float(value)          # type: ignore[arg-type]


def check_event(event: object, what: str) -> dict:
    """One event's fields, or IntegrityError naming ``what``."""
    if not isinstance(event, dict) or event.get("event") not in EVENTS:
        raise IntegrityError(f"{what} has an unknown or malformed event")
    kind = event["event"]
    if (kind in IMAGE_EVENTS or kind in HOLD_EVENTS) and not (
            isinstance(event.get("image"), str) and _HEX32.match(event["image"])):
        raise IntegrityError(f"{what}: a {kind} event names no valid image id")
    if kind in ("adding", "added") or (kind in REMOVALS and "name" in event):
        _text(event.get("name"), f"{what}: the image name")
    if kind == "added":
        _number(event.get("created"), f"{what}: the creation time")
    if kind == "held":
        if not isinstance(event.get("hold"), str) or not _HEX32.match(event["hold"]):
            raise IntegrityError(f"{what}: a held event names no valid hold record")
        _text(event.get("reason"), f"{what}: the hold reason")
    if kind == "released":
        holds = event.get("holds")
        if not isinstance(holds, list) or not all(isinstance(h, str) and _HEX32.match(h) for h in holds):
            raise IntegrityError(f"{what}: a released event names no valid hold records")
    if kind == "lock_probe" and not isinstance(event.get("result"), dict):
        raise IntegrityError(f"{what}: a lock_probe event has no result")
    if kind == "locks_extended":
        _number(event.get("until"), f"{what}: the lock date")
    if kind == "append_only" and not isinstance(event.get("value"), bool):
        raise IntegrityError(f"{what}: an append_only event has no value")
    return event


def encode_entry(repo_id: str, seq: int, prev: str, events: list[dict], now: float | None = None) -> bytes:
    who = actor()
    doc = {"version": ENTRY_VERSION, "repository": repo_id, "seq": seq, "prev": prev,
           "time": time.time() if now is None else now, "host": who["host"], "user": who["user"],
           "command": command_line(), "events": events}
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def decode_entry(plain: bytes, repo_id: str, seq: int, digest: str) -> Entry:
    what = f"catalog entry {seq}"
    doc = obj(parse_json(plain, what), what)
    if doc.get("version") != ENTRY_VERSION:
        raise IntegrityError(f"{what} has an unknown version or layout")
    if doc.get("repository") != repo_id or doc.get("seq") != seq:
        raise IntegrityError(f"{what} belongs to another repository or place in the log")
    prev, events = doc.get("prev"), doc.get("events")
    if not isinstance(prev, str) or not _HEX64.match(prev) or not isinstance(events, list) or not events:
        raise IntegrityError(f"{what} has a malformed header")
    return Entry(seq, prev, _number(doc.get("time"), what), _text(doc.get("host"), what), _text(doc.get("user"), what),
                 _text(doc.get("command"), what), tuple(check_event(e, what) for e in events), digest)


# --- the state the log describes --------------------------------------------------------------

@dataclass
class CatalogState:
    """The log folded up to entry ``seq``: each image's standing, the holds, the lock settings."""

    seq: int = -1
    hash: str = ZERO_HASH
    images: dict[str, dict] = field(default_factory=dict)     # id -> status, name, seqs
    holds: dict[str, dict[str, str]] = field(default_factory=dict)   # image -> hold record id -> reason
    lock_probe: dict | None = None
    locks_extended: float | None = None
    append_only: bool = False
    interrupted: int = 0          # backups that announced an image and never wrote it (counted by verify)

    def apply(self, entry: Entry) -> None:
        for event in entry.events:
            kind, image = event["event"], event.get("image")
            if image is not None:
                record = self.images.setdefault(image, {"status": "adding", "name": event.get("name"), "seqs": []})
                if entry.seq not in record["seqs"]:
                    record["seqs"].append(entry.seq)
            if kind == "adding" and record["status"] == "removed":    # the same id stored anew (a copy sent again)
                record.update(status="adding", name=event.get("name"))
                record.pop("removed", None)
                record.pop("removed_seq", None)
            elif kind == "added":
                record.update(status="added", name=event["name"], created=event["created"])
            elif kind in REMOVALS:
                record.update(status="removed", removed=kind, removed_seq=entry.seq, seqs=[])
                self.holds.pop(image, None)
            elif kind == "held":
                self.holds.setdefault(image, {})[event["hold"]] = event["reason"]
            elif kind == "released":
                left = self.holds.get(image, {})
                for rid in event["holds"]:
                    left.pop(rid, None)
                if not left:
                    self.holds.pop(image, None)
            elif kind == "lock_probe":
                self.lock_probe = dict(event["result"], time=entry.time, host=entry.host)
            elif kind == "locks_extended":
                self.locks_extended = event["until"]
            elif kind == "append_only":
                self.append_only = event["value"]
        self.seq, self.hash = entry.seq, entry.hash

    def live(self) -> set[str]:
        """Images the log says exist (announced or confirmed, not removed)."""
        return {i for i, r in self.images.items() if r["status"] != "removed"}

    def to_dict(self) -> dict:
        return {"seq": self.seq, "hash": self.hash, "images": self.images, "holds": self.holds,
                "lock_probe": self.lock_probe, "locks_extended": self.locks_extended,
                "append_only": self.append_only}

    @classmethod
    def from_dict(cls, doc: dict) -> CatalogState:
        state = cls(int(doc["seq"]), str(doc["hash"]), dict(doc["images"]), dict(doc["holds"]),
                    doc.get("lock_probe"), doc.get("locks_extended"), bool(doc.get("append_only")))
        if not _HEX64.match(state.hash) or state.seq < 0:
            raise ValueError("bad remembered head")
        return state


@dataclass
class CatalogView:
    """The log as read now: its state, and what is wrong with it."""

    state: CatalogState
    rollback: str | None = None             # the log ends before, or differs from, what this client saw
    problems: list[str] = field(default_factory=list)
    entries_read: int = 0


# --- the log ----------------------------------------------------------------------------------

def state_dir(repo_id: str) -> Path:
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(base) / "imgbackup" / repo_id


class Catalog:
    """Appending to and reading one repository's log; remembers the newest entry seen."""

    def __init__(self, storage: Storage, envelope: Envelope, repo_id: str, remember: bool = True) -> None:
        self.storage = storage
        self.envelope = envelope
        self.repo_id = repo_id
        self.remember = remember
        self._known: tuple[int, str] | None = None      # newest entry this process saw or wrote
        self._warned = False
        self._appending = threading.Lock()   # threads of one process append in turn (no race among them)

    # -- local memory

    @property
    def state_file(self) -> Path:
        return state_dir(self.repo_id) / "catalog.json"

    def remembered(self) -> CatalogState | None:
        """The newest state this client saw (None without one, or when the file is unreadable)."""
        if not self.remember:
            return None
        try:
            doc = json.loads(self.state_file.read_text())
            if doc.get("version") != STATE_VERSION or doc.get("repository") != self.repo_id:
                return None
            return CatalogState.from_dict(doc["state"])
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return None

    def _store_memory(self, state: CatalogState) -> None:
        if not self.remember:
            return
        path = self.state_file
        tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps({"version": STATE_VERSION, "repository": self.repo_id,
                                       "state": state.to_dict()}))
            os.replace(tmp, path)
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink()
            if not self._warned:
                self._warned = True
                log.warning("cannot remember the catalog head in %s (%s): rollbacks of this repository "
                            "go unnoticed on this machine", path, exc.strerror or exc)

    def forget(self) -> None:
        """Drop what this client remembers (after an intended restore of the repository from an older copy)."""
        with contextlib.suppress(FileNotFoundError):
            self.state_file.unlink()

    # -- reading

    def read(self, seq: int) -> Entry:
        name = entry_name(seq)
        try:
            raw = self.storage.get(name)
        except ObjectMissing:
            raise IntegrityError(f"catalog entry {seq} is missing") from None
        obj_id = seq.to_bytes(8, "big")
        plain = self.envelope.open(OBJ_CATALOG_ENTRY, obj_id, raw, f"catalog entry {seq}", MAX_ENTRY)
        return decode_entry(plain, self.repo_id, seq, hashlib.sha256(raw).hexdigest())

    def _exists(self, seq: int) -> bool:
        return self.storage.exists(entry_name(seq))

    def head_seq(self, hint: int = -1) -> int:
        """The number of the newest entry (-1: none), by galloping then bisecting from ``hint``; the
        log is written in order, so the entries present are 0..head."""
        low = hint if hint >= 0 and self._exists(hint) else -1
        step = 1
        high = low + step
        while self._exists(high):
            low, step = high, step * 2
            high = low + step
        while high - low > 1:
            mid = (low + high) // 2
            if self._exists(mid):
                low = mid
            else:
                high = mid
        return low

    def _entries(self, seqs: list[int]) -> Iterator[Entry]:
        """Entries ``seqs`` in order, several read at once (a bucket answers each GET slowly)."""
        if len(seqs) <= 2:
            yield from (self.read(s) for s in seqs)
            return
        workers = min(READ_THREADS, max(1, int(getattr(self.storage, "read_parallelism", READ_THREADS))))
        pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="imgbackup-catalog")
        try:
            yield from pool.map(self.read, seqs)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def _check_anchor(self, anchor: CatalogState | None, head: int) -> str | None:
        """Why the log is not a continuation of what this client saw, or None."""
        if anchor is None:
            return None
        if head < anchor.seq:
            return (f"the catalog ends at entry {head}, but this client saw entry {anchor.seq}: the repository "
                    "was rolled back to an older state (or entries were deleted)")
        try:
            seen = self.read(anchor.seq)
        except IntegrityError as exc:
            return f"catalog entry {anchor.seq}, which this client saw, cannot be read now ({exc.args[0]})"
        if seen.hash != anchor.hash:
            return (f"catalog entry {anchor.seq} differs from the one this client saw: the repository was "
                    "rolled back and written again (a forked history)")
        return None

    def view(self) -> CatalogView:
        """The log's state now: from the remembered state on (or from entry 0), every link checked."""
        anchor = self.remembered()
        head = self.head_seq(anchor.seq if anchor else -1)
        rollback = self._check_anchor(anchor, head)
        state = anchor if anchor is not None and rollback is None else CatalogState()
        out = CatalogView(CatalogState(), rollback)
        todo = list(range(state.seq + 1, head + 1))
        try:
            for entry in self._entries(todo):
                if entry.prev != state.hash:
                    raise IntegrityError(f"catalog entry {entry.seq} does not follow entry {entry.seq - 1} "
                                         "(its hash link is wrong): entries were replaced")
                state.apply(entry)
                out.entries_read += 1
        except IntegrityError as exc:
            out.problems.append(str(exc.args[0]))
        out.state = state
        if rollback is None and not out.problems:
            self._known = (state.seq, state.hash)
            if anchor is None or state.seq != anchor.seq:
                self._store_memory(state)
        return out

    def accept_head(self) -> CatalogView:
        """Forget the remembered head and take the repository's log as it is now."""
        self.forget()
        return self.view()

    # -- appending

    def _start(self) -> tuple[int, str]:
        """The entry to append after: the one this process knows, else the remembered one if the
        repository still has it, else the newest found by searching."""
        if self._known is not None:
            return self._known
        anchor = self.remembered()
        if anchor is not None:
            try:
                seen = self.read(anchor.seq)
                if seen.hash == anchor.hash:
                    return anchor.seq, anchor.hash
            except IntegrityError:
                pass
            log.warning("the catalog of this repository is not the one this client saw (rolled back?): "
                        "'imgbackup verify' reports it")
            self.remember = False          # keep the remembered head, so verify keeps reporting
        head = self.head_seq(-1)
        return (head, self.read(head).hash) if head >= 0 else (-1, ZERO_HASH)

    def append(self, events: list[dict]) -> Entry:
        """Add one entry holding ``events``, after whatever other writers appended meanwhile."""
        events = [check_event(dict(e), "a new catalog entry") for e in events]
        with self._appending:
            return self._append(events)

    def _append(self, events: list[dict]) -> Entry:
        seq, prev = self._start()
        for _ in range(MAX_RACES):
            seq += 1
            plain = encode_entry(self.repo_id, seq, prev, events)
            sealed = self.envelope.seal(OBJ_CATALOG_ENTRY, seq.to_bytes(8, "big"), plain)
            if self.storage.create(entry_name(seq), sealed):
                confirm_stored(self.storage, entry_name(seq), len(sealed))
                entry = decode_entry(plain, self.repo_id, seq, hashlib.sha256(sealed).hexdigest())
                self._known = (seq, entry.hash)
                self._advance_memory(entry)
                return entry
            other = self.read(seq)               # another writer's entry: append after it
            if other.prev != prev:
                raise IntegrityError(f"catalog entry {seq} does not follow entry {seq - 1}: entries were replaced")
            prev = other.hash
        raise RepositoryLocked("could not append to the catalog: other writers keep appending first")

    def _advance_memory(self, entry: Entry) -> None:
        """Fold our own entry into the remembered state when it directly follows it."""
        anchor = self.remembered()
        if anchor is None and entry.seq == 0:
            anchor = CatalogState()
        if anchor is not None and anchor.seq == entry.seq - 1 and anchor.hash == entry.prev:
            anchor.apply(entry)
            self._store_memory(anchor)
