"""Check records: what a verify or a restore drill found, kept as sealed objects in the repository.

``status`` and the metrics read the last verify and the last drill (and its RTO) from here, so any
host that can open the repository sees the same truth, and nobody without the key can forge or
move a record (the envelope binds the record id, which is its object name).

Names: ``checks/<tag>/<id>``. ``tag`` = first 8 bytes (16 hex) of HMAC-SHA-256(mac key,
``"imgbackup-check" 0x00 kind 0x00 name``): one folder per kind and source name, so the newest
record of one is one listing and one read, and the listing does not reveal source names. ``id`` =
16 bytes (32 hex): the creation time in nanoseconds (u64 big-endian, so names sort by time) and 8
random bytes. Records are created, never replaced.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from imgbackup.errors import IntegrityError
from imgbackup.format import validate as v
from imgbackup.format.layout import OBJ_CHECK_RECORD
from imgbackup.repository.repo import Repository
from imgbackup.repository.storage import ObjectMissing

CHECKS = "checks"
KINDS = ("verify", "drill")
RECORD_VERSION = 1
MAX_RECORD = 1 << 20   # a record is a small JSON document; more is damage, not a record


@dataclass
class CheckRecord:
    """One verify or drill result: the common fields, and the kind's own in ``data``."""

    id: str
    kind: str
    name: str
    time: float
    ok: bool
    images: list[str]
    host: str = ""
    data: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {**self.data, "id": self.id, "kind": self.kind, "name": self.name, "time": self.time,
                "ok": self.ok, "images": self.images, "host": self.host}


def _tag(repo: Repository, kind: str, name: str) -> str:
    msg = b"imgbackup-check\0" + kind.encode() + b"\0" + name.encode()
    return hmac.new(repo.keys.mac_key, msg, hashlib.sha256).hexdigest()[:16]


def _folder(repo: Repository, kind: str, name: str) -> str:
    if kind not in KINDS:
        raise ValueError(f"unknown check kind {kind!r}")
    return f"{CHECKS}/{_tag(repo, kind, name)}"


def write_record(repo: Repository, kind: str, name: str, ok: bool, images: list[str], data: dict,
                 now: float | None = None) -> CheckRecord:
    """Seal and create one record (its time is ``now``, default the clock)."""
    when = time.time() if now is None else now
    rid = (int(when * 1e9).to_bytes(8, "big") + os.urandom(8)).hex()
    record = CheckRecord(rid, kind, name, when, ok, list(images), os.uname().nodename, dict(data))
    plain = json.dumps({"version": RECORD_VERSION, **record.to_dict()}, sort_keys=True).encode()
    sealed = repo.envelope.seal(OBJ_CHECK_RECORD, bytes.fromhex(rid), plain)
    if not repo.storage.create(f"{_folder(repo, kind, name)}/{rid}", sealed):
        raise IntegrityError(f"check record {rid} exists already")
    return record


def _parse(rid: str, kind: str, name: str, plain: bytes) -> CheckRecord:
    doc = v.parse_json(plain, f"check record {rid}")     # strict: UTF-8, no NaN, bounded nesting
    if not isinstance(doc, dict) or doc.get("version") != RECORD_VERSION:
        raise IntegrityError(f"check record {rid} has an unknown version")
    common = {"id": str, "kind": str, "name": str, "time": (int, float), "ok": bool, "images": list,
              "host": str}
    for key, typ in common.items():
        if not isinstance(doc.get(key), typ) or (key == "time" and isinstance(doc[key], bool)):
            raise IntegrityError(f"check record {rid}: field {key!r} is missing or of the wrong type")
    if doc["id"] != rid or doc["kind"] != kind or doc["name"] != name:
        raise IntegrityError(f"check record {rid} does not belong where it is stored")
    if not all(isinstance(i, str) for i in doc["images"]):
        raise IntegrityError(f"check record {rid}: images must be ids")
    _check_kind_fields(doc, kind, f"check record {rid}")
    data = {k: val for k, val in doc.items() if k not in common and k != "version"}
    return CheckRecord(rid, kind, name, float(doc["time"]), doc["ok"], doc["images"], doc["host"], data)


def _check_kind_fields(doc: dict, kind: str, what: str) -> None:
    """The kind's own fields (FORMAT.md section 12), where present: status and drill reports use them."""
    v.number(doc, "duration_s", what, optional=True)
    if kind == "verify":
        if doc.get("sample_percent") is not None:
            v.number(doc, "sample_percent", what)
        v.integer(doc, "chunks_checked", what, optional=True)
        v.integer(doc, "bad_chunks", what, optional=True)
        errors = v.child(doc, "errors", what, list, optional=True) or []
        if not all(isinstance(e, str) for e in errors):
            raise v.damaged(what, "field 'errors' is not a list of strings")
        v.child(doc, "filesystems", what, dict, optional=True, nullable=True)
    elif kind == "drill":
        if doc.get("rto_s") is not None:
            v.number(doc, "rto_s", what)
        for step in v.child(doc, "steps", what, list, optional=True) or []:
            step = v.obj(step, f"{what} step")
            v.text(step, "step", f"{what} step")
            v.boolean(step, "ok", f"{what} step")
            v.number(step, "duration_s", f"{what} step", optional=True)


def read_record(repo: Repository, kind: str, name: str, rid: str) -> CheckRecord:
    obj = f"{_folder(repo, kind, name)}/{rid}"
    try:
        raw = repo.storage.get(obj)
    except ObjectMissing:
        raise IntegrityError(f"check record {rid} disappeared while reading it") from None
    plain = repo.envelope.open(OBJ_CHECK_RECORD, bytes.fromhex(rid), raw, f"check record {rid}", MAX_RECORD)
    return _parse(rid, kind, name, plain)


def record_ids(repo: Repository, kind: str, name: str) -> list[str]:
    """Ids of the records of one kind and source name, oldest first (names that are not ids skipped)."""
    ids = []
    for obj in repo.storage.list(_folder(repo, kind, name)):
        rid = obj.rsplit("/", 1)[1]
        if len(rid) == 32 and all(c in "0123456789abcdef" for c in rid):
            ids.append(rid)
    return sorted(ids)


def latest_record(repo: Repository, kind: str, name: str, errors: list[str] | None = None,
                  where: Callable[[CheckRecord], bool] | None = None) -> CheckRecord | None:
    """The newest readable record (that ``where`` accepts); a damaged newer one is skipped, its
    error kept in ``errors``."""
    for rid in reversed(record_ids(repo, kind, name)):
        try:
            record = read_record(repo, kind, name, rid)
        except IntegrityError as exc:
            if errors is not None:
                errors.append(str(exc))
            continue
        if where is None or where(record):
            return record
    return None
