"""The repository config: format version, id, chunk size, algorithms; authenticated with the mac key."""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from dataclasses import asdict, dataclass

from imgbackup.errors import IntegrityError, UnsupportedFormat
from imgbackup.format import validate as v
from imgbackup.format.layout import FORMAT_VERSION

CONFIG_NAME = "config"
FORMAT_NAME = "imgbackup-repository"
MIN_CHUNK = 64 << 10   # below this the per-chunk index entry and envelope outweigh the dedup gained
MAX_CHUNK = 16 << 20   # above this one changed byte stores too much again, and restore buffers grow large
LOCK_MODES = ("compliance", "governance")


def _valid_lock(lock: object) -> bool:
    if lock is None:
        return True
    return (isinstance(lock, dict) and set(lock) == {"mode", "seconds"} and lock["mode"] in LOCK_MODES
            and type(lock["seconds"]) is int and 0 < lock["seconds"] <= 100 * 366 * 86400)


@dataclass
class RepoConfig:
    id: str
    chunk_size: int
    encryption: str            # "aes-256-gcm" or "none"
    zstd_level: int = 3
    created: float = 0.0
    version: int = FORMAT_VERSION
    format: str = FORMAT_NAME
    append_only: bool = False          # delete, prune and compact refuse (a guard against accidents)
    object_lock: dict | None = None    # {"mode": "compliance"|"governance", "seconds": N}: S3 Object Lock

    @classmethod
    def new(cls, repo_id: str, chunk_size: int, encryption: str, zstd_level: int) -> RepoConfig:
        return cls(id=repo_id, chunk_size=chunk_size, encryption=encryption,
                   zstd_level=zstd_level, created=time.time())

    def _canonical(self) -> bytes:
        return canonical_json(asdict(self))

    def to_bytes(self, mac_key: bytes) -> bytes:
        doc = asdict(self)
        doc["mac"] = hmac.new(mac_key, self._canonical(), hashlib.sha256).hexdigest()
        return json.dumps(doc, indent=1, sort_keys=True).encode() + b"\n"

    @classmethod
    def from_document(cls, doc: dict) -> RepoConfig:
        """The config from an authenticated document (``open_config``'s), every field checked."""
        chunk_size = v.integer(doc, "chunk_size", WHAT, MIN_CHUNK, MAX_CHUNK)
        if not v.power_of_two(chunk_size, MIN_CHUNK, MAX_CHUNK):
            raise v.damaged(WHAT, f"chunk size {chunk_size} is not a power of two")
        return cls(id=doc["id"], chunk_size=chunk_size,
                   encryption=v.text(doc, "encryption", WHAT, choices=ENCRYPTIONS),
                   zstd_level=v.integer(doc, "zstd_level", WHAT, 1, 22),
                   created=v.number(doc, "created", WHAT),
                   append_only=_append_only(doc), object_lock=_object_lock(doc))


def _append_only(doc: dict) -> bool:
    value = doc.get("append_only", False)
    if not isinstance(value, bool):
        raise v.damaged(WHAT, "append_only is not true or false")
    return value


def _object_lock(doc: dict) -> dict | None:
    value = doc.get("object_lock")
    if not _valid_lock(value):
        raise v.damaged(WHAT, "object_lock is not {\"mode\": compliance|governance, \"seconds\": 1..100 years}")
    return value


WHAT = "repository config"
ENCRYPTIONS = ("aes-256-gcm", "none")


def canonical_json(doc: dict) -> bytes:
    """What the config's MAC covers (FORMAT.md 2.2): sorted keys, no whitespace, ASCII escapes."""
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def peek_config(raw: bytes) -> tuple[dict, str]:
    """The config document and its MAC, before authentication: only what finding the key needs is
    checked (JSON object, format, version, a 32-hex id, a 64-hex mac); no other field is used yet."""
    doc = dict(v.obj(v.parse_json(raw, WHAT), WHAT))
    if doc.get("format") != FORMAT_NAME:
        raise UnsupportedFormat("this is not an imgbackup repository (its config names another format)")
    version = v.integer(doc, "version", WHAT, 0)
    if version != FORMAT_VERSION:
        raise UnsupportedFormat(f"repository format version {version} is not supported by this "
                                f"imgbackup (it reads version {FORMAT_VERSION})")
    v.hex_id(doc, "id", WHAT, 16)
    mac = v.hex_id(doc, "mac", WHAT, 32)
    del doc["mac"]
    return doc, mac


def check_config_mac(doc: dict, mac: str, mac_key: bytes) -> None:
    """The MAC over every field but ``mac`` itself, as stored (unknown fields included)."""
    want = hmac.new(mac_key, canonical_json(doc), hashlib.sha256).hexdigest()
    if not hmac.compare_digest(want, mac):
        raise IntegrityError("repository config failed authentication (damaged or tampered with)")
