"""One catalog entry and the state the log describes: the entry codec (every field checked before
use), and the fold of events into per-image status, holds and settings (docs/FORMAT.md section 13).
The log itself — appending, reading, the client's memory — is catalog.py."""

from __future__ import annotations

import json
import os
import pwd
import re
import socket
import time
from dataclasses import dataclass, field

from imgbackup import audit
from imgbackup.errors import IntegrityError
from imgbackup.format.validate import obj, parse_json

CATALOG = "catalog"
ENTRY_VERSION = 1
ZERO_HASH = "0" * 64
MAX_TEXT = 1000           # characters kept of a reason or command
_HEX32 = re.compile(r"^[0-9a-f]{32}$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")

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
