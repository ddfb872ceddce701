"""Legal holds: records that keep an image (and every chunk it needs) from being removed.

A hold is its own sealed object, ``holds/<image id>/<record id>``, created once and never changed, so
placing or releasing one never rewrites the image. A release is another record naming the holds it
ends. An image is held while some hold record of it is not named by a release record — and, since
the catalog log records every hold (repository/catalog.py), while the log says it is held and no
release record says otherwise: deleting a hold record does not release the hold.

Record ids are 16 bytes: the creation time in nanoseconds (u64 big-endian, so names sort by time)
and 8 random bytes; the envelope (type 9) binds the id, and the record names its image.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass

from imgbackup.crypto.envelope import Envelope
from imgbackup.errors import IntegrityError
from imgbackup.format.layout import OBJ_HOLD_RECORD
from imgbackup.format.validate import obj, parse_json
from imgbackup.repository.catalog import actor
from imgbackup.repository.storage import ObjectMissing, Storage, confirm_stored

HOLDS = "holds"
RECORD_VERSION = 1
MAX_RECORD = 1 << 20      # a record is a short JSON document
MAX_REASON = 1000         # characters of a reason
_HEX32 = re.compile(r"^[0-9a-f]{32}$")


@dataclass(frozen=True)
class HoldRecord:
    id: str
    image: str
    action: str              # "hold" or "release"
    reason: str
    user: str
    host: str
    time: float
    releases: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        doc = {"id": self.id, "image": self.image, "action": self.action, "reason": self.reason,
               "user": self.user, "host": self.host, "time": self.time}
        if self.action == "release":
            doc["releases"] = list(self.releases)
        return doc


def record_name(image_id: str, record_id: str) -> str:
    return f"{HOLDS}/{image_id}/{record_id}"


def _parse(plain: bytes, image_id: str, record_id: str) -> HoldRecord:
    what = f"hold record {record_id}"
    doc = obj(parse_json(plain, what), what)
    if doc.get("version") != RECORD_VERSION:
        raise IntegrityError(f"{what} has an unknown version")
    if doc.get("id") != record_id or doc.get("image") != image_id:
        raise IntegrityError(f"{what} does not belong where it is stored")
    action, releases = doc.get("action"), doc.get("releases", [])
    texts = [doc.get(k) for k in ("reason", "user", "host")]
    stamp = doc.get("time")
    if (action not in ("hold", "release") or not all(isinstance(t, str) for t in texts)
            or type(stamp) not in (int, float) or not 0 <= stamp < 2**40
            or not isinstance(releases, list) or not all(isinstance(r, str) and _HEX32.match(r) for r in releases)
            or (action == "release") != bool(releases)):
        raise IntegrityError(f"{what} is malformed")
    return HoldRecord(record_id, image_id, action, texts[0][:MAX_REASON], texts[1], texts[2], float(stamp),
                      tuple(releases))


class HoldStore:
    def __init__(self, storage: Storage, envelope: Envelope) -> None:
        self.storage = storage
        self.envelope = envelope

    def _write(self, image_id: str, action: str, reason: str, releases: list[str]) -> HoldRecord:
        now = time.time()
        rid = (int(now * 1e9).to_bytes(8, "big") + os.urandom(8)).hex()
        who = actor()
        record = HoldRecord(rid, image_id, action, reason[:MAX_REASON], who["user"], who["host"], now, tuple(releases))
        plain = json.dumps({"version": RECORD_VERSION, **record.to_dict()}, sort_keys=True).encode()
        sealed = self.envelope.seal(OBJ_HOLD_RECORD, bytes.fromhex(rid), plain)
        name = record_name(image_id, rid)
        if not self.storage.create(name, sealed):
            raise IntegrityError(f"hold record {rid} exists already")
        confirm_stored(self.storage, name, len(sealed))
        return record

    def place(self, image_id: str, reason: str) -> HoldRecord:
        return self._write(image_id, "hold", reason, [])

    def release(self, image_id: str, hold_ids: list[str], reason: str) -> HoldRecord:
        return self._write(image_id, "release", reason, sorted(hold_ids))

    def read(self, image_id: str, record_id: str) -> HoldRecord:
        try:
            raw = self.storage.get(record_name(image_id, record_id))
        except ObjectMissing:
            raise IntegrityError(f"hold record {record_id} disappeared while reading it") from None
        plain = self.envelope.open(OBJ_HOLD_RECORD, bytes.fromhex(record_id), raw, f"hold record {record_id}",
                                   MAX_RECORD)
        return _parse(plain, image_id, record_id)

    def records(self, image_id: str | None = None) -> tuple[list[HoldRecord], list[tuple[str, str, str]]]:
        """Every readable record (of one image, or all), oldest first, and (image, record id, error)
        of each unreadable one."""
        folder = f"{HOLDS}/{image_id}" if image_id else HOLDS
        out, unreadable = [], []
        for name in self.storage.list(folder):
            parts = name.split("/")
            if len(parts) != 3 or not _HEX32.match(parts[1]) or not _HEX32.match(parts[2]):
                continue
            try:
                out.append(self.read(parts[1], parts[2]))
            except IntegrityError as exc:
                unreadable.append((parts[1], parts[2], str(exc.args[0])))
        return sorted(out, key=lambda r: r.id), unreadable


def active_holds(records: list[HoldRecord]) -> dict[str, list[HoldRecord]]:
    """image id -> its hold records that no release names."""
    released = {rid for r in records if r.action == "release" for rid in r.releases}
    out: dict[str, list[HoldRecord]] = {}
    for r in records:
        if r.action == "hold" and r.id not in released:
            out.setdefault(r.image, []).append(r)
    return out


def released_ids(records: list[HoldRecord]) -> set[str]:
    return {rid for r in records if r.action == "release" for rid in r.releases}


@dataclass(frozen=True)
class Hold:
    """One hold in force on an image, and where it is known from."""

    id: str
    reason: str
    user: str = ""
    host: str = ""
    time: float = 0.0
    source: str = "record"     # "record"; "catalog" (its record is gone); "unreadable" (its record is damaged)

    def to_dict(self) -> dict:
        return {"id": self.id, "reason": self.reason, "user": self.user, "host": self.host, "time": self.time,
                "source": self.source}


def holds_in_force(store: HoldStore, logged: dict[str, dict[str, str]]) -> dict[str, list[Hold]]:
    """image id -> its holds: records no release names; holds the log records whose record is gone
    and that no release record names; and, failing safe, every unreadable record's image."""
    records, unreadable = store.records()
    released = released_ids(records)
    out: dict[str, list[Hold]] = {
        image: [Hold(r.id, r.reason, r.user, r.host, r.time) for r in recs]
        for image, recs in active_holds(records).items()}
    known = {r.id for r in records}
    for image, holds in logged.items():
        for rid, reason in holds.items():
            if rid not in released and rid not in known:
                out.setdefault(image, []).append(Hold(rid, reason, source="catalog"))
    for image, rid, error in unreadable:
        out.setdefault(image, []).append(Hold(rid, f"(the hold record cannot be read: {error})", source="unreadable"))
    return out
