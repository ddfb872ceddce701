"""Damage records: stored copies of chunks known to be damaged or missing, and why.

A run that reads a copy of a chunk and finds it wrong (verify, backup, repair) writes one record:
a write-once object ``damage/<32 hex>``. Every command loads the records and treats the copies
they name as absent, so the chunk index never hands out a copy known to be bad and a backup that
needs such a chunk stores it again from its source. A record names a *copy* — chunk id, pack id,
offset — never a chunk id alone: a good copy of the same chunk stored later is unaffected, and a
record naming a pack that no longer exists (compacted away) is merely stale.

Only bytes that fail authentication and packs that are missing or too short are recorded, never an
I/O error or a timeout: those may pass, and a copy once recorded is never used again.
"""

from __future__ import annotations

import json
import os
import re
import socket
import time
from collections.abc import Iterable
from dataclasses import dataclass

from imgbackup.crypto.envelope import Envelope
from imgbackup.errors import IntegrityError
from imgbackup.format.layout import OBJ_DAMAGE_RECORD
from imgbackup.format.validate import parse_json
from imgbackup.repository.storage import ObjectMissing, Storage

DAMAGE_FOLDER = "damage"
RECORD_VERSION = 1
REASONS = ("damaged", "missing", "truncated")
MAX_RECORD_BYTES = 256 << 20   # a record of a million copies is ~200 MiB of JSON; bounds a forged frame
MAX_DETAIL = 500               # characters of the error text kept per copy
_NAME = re.compile(r"^damage/[0-9a-f]{32}$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class DamagedCopy:
    """One stored copy of a chunk that must not be used: where it is, why, and who found it when."""

    chunk_id: bytes
    pack_id: bytes
    offset: int
    length: int
    reason: str           # one of REASONS
    detail: str = ""      # the error as the finder saw it
    found: float = 0.0    # Unix time of the record naming it (0 while not yet recorded)
    command: str = ""     # the command that recorded it

    @property
    def key(self) -> tuple[bytes, bytes, int]:
        return (self.chunk_id, self.pack_id, self.offset)

    def describe(self) -> str:
        where = f"pack {self.pack_id.hex()[:16]} at offset {self.offset}"
        if not self.found:
            return f"{self.reason}: {where}"
        when = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(self.found))
        return f"{self.reason}: {where} (recorded by {self.command or '?'} on {when})"

    def to_dict(self) -> dict:
        doc = {"chunk": self.chunk_id.hex(), "pack": self.pack_id.hex(), "offset": self.offset,
               "length": self.length, "reason": self.reason, "detail": self.detail[:MAX_DETAIL]}
        if self.found:      # carried over from an older record: keep when and by whom it was found
            doc.update(found=self.found, by=self.command)
        return doc


class ChunkDamaged(IntegrityError):
    """A chunk could not be read intact. ``copy`` names the bad copy (None: the chunk is in no
    pack the index knows); ``known`` says a damage record already named it."""

    def __init__(self, message: str, copy: DamagedCopy | None, known: bool = False) -> None:
        super().__init__(message)
        self.copy = copy
        self.known = known


def encode_record(copies: Iterable[DamagedCopy], command: str, created: float | None = None) -> bytes:
    doc = {"version": RECORD_VERSION, "created": time.time() if created is None else created,
           "host": socket.gethostname(), "command": command, "entries": [c.to_dict() for c in copies]}
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def _int(value, what: str, low: int, high: int) -> int:
    if type(value) is not int or not low <= value <= high:
        raise IntegrityError(f"{what} is out of range")
    return value


def decode_record(plain: bytes, name: str) -> list[DamagedCopy]:
    """Parse and check one record's plaintext; any violation is damage naming the object."""
    what = f"damage record {name}"
    doc = parse_json(plain, what)     # strict: UTF-8, no NaN, bounded nesting
    if not isinstance(doc, dict) or doc.get("version") != RECORD_VERSION:
        raise IntegrityError(f"{what} has an unknown version or layout")
    created, command, entries = doc.get("created"), doc.get("command"), doc.get("entries")
    if (type(created) not in (int, float) or not 0 <= created < 2**40 or not isinstance(command, str)
            or not isinstance(entries, list)):
        raise IntegrityError(f"{what} has a malformed header")
    out = []
    for entry in entries:
        if not isinstance(entry, dict):
            raise IntegrityError(f"{what} has a malformed entry")
        chunk, pack, reason, detail = (entry.get(k) for k in ("chunk", "pack", "reason", "detail"))
        found, by = entry.get("found", created), entry.get("by", command)
        if (not isinstance(chunk, str) or not _HEX64.match(chunk) or not isinstance(pack, str)
                or not _HEX64.match(pack) or reason not in REASONS or not isinstance(detail, str)
                or type(found) not in (int, float) or not 0 <= found < 2**40 or not isinstance(by, str)):
            raise IntegrityError(f"{what} has a malformed entry")
        out.append(DamagedCopy(bytes.fromhex(chunk), bytes.fromhex(pack), _int(entry.get("offset"), what, 0, 2**63),
                               _int(entry.get("length"), what, 0, 2**32 - 1), reason, detail[:MAX_DETAIL],
                               float(found), by[:100]))
    return out


def read_record(storage: Storage, envelope: Envelope, name: str) -> list[DamagedCopy]:
    if not _NAME.match(name):
        raise IntegrityError(f"damage record {name} has a malformed name")
    record_id = bytes.fromhex(name.rsplit("/", 1)[1])
    try:
        sealed = storage.get(name)
    except ObjectMissing:
        return []   # removed by a repair or compact since the listing: it named nothing still needed
    plain = envelope.open(OBJ_DAMAGE_RECORD, record_id, sealed, f"damage record {name}", max_size=MAX_RECORD_BYTES)
    return decode_record(plain, name)


def write_record(storage: Storage, envelope: Envelope, copies: list[DamagedCopy], command: str) -> str | None:
    """Store one new record naming ``copies`` (none: nothing written); returns its name."""
    if not copies:
        return None
    record_id = os.urandom(16)
    name = f"{DAMAGE_FOLDER}/{record_id.hex()}"
    storage.put(name, envelope.seal(OBJ_DAMAGE_RECORD, record_id, encode_record(copies, command)))
    return name


class DamageLog:
    """Every damaged copy the records name; ``lookup`` tells whether one location is among them."""

    def __init__(self) -> None:
        self.copies: dict[tuple[bytes, bytes, int], DamagedCopy] = {}
        self.records: list[str] = []
        self.unreadable: list[tuple[str, str]] = []   # (record name, why) when loaded with strict=False

    @classmethod
    def load(cls, storage: Storage, envelope: Envelope, strict: bool = True) -> DamageLog:
        """All records; an unreadable one raises (``strict``: a backup must know every bad copy)
        or is listed in ``unreadable`` (readers authenticate every chunk anyway; repair rewrites it)."""
        log = cls()
        for name in storage.list(DAMAGE_FOLDER):
            try:
                copies = read_record(storage, envelope, name)
            except IntegrityError as exc:
                if strict:
                    raise IntegrityError(exc.args[0], "run 'imgbackup repair': it checks every chunk and "
                                         "rewrites the damage records") from None
                log.unreadable.append((name, exc.args[0]))
                continue
            log.records.append(name)
            for copy in copies:
                log.copies.setdefault(copy.key, copy)
        return log

    def __len__(self) -> int:
        return len(self.copies)

    def lookup(self, chunk_id: bytes, pack_id: bytes, offset: int) -> DamagedCopy | None:
        return self.copies.get((chunk_id, pack_id, offset)) if self.copies else None
