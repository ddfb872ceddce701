"""The repository config (FORMAT.md 2.2): format version, id, chunk size, algorithms, public keys.

Signed with Ed25519 by the full key's current generation and verified by every key holder: a
backup-only host holds only the verify keys, so it can neither forge nor roll back the config
(an HMAC would have had a key every key holder knew).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field

from imgbackup.crypto.keys import KeyBundle
from imgbackup.errors import ForeignKey, IntegrityError, UnsupportedFormat
from imgbackup.format import validate as v
from imgbackup.format.layout import FORMAT_VERSION, MAX_GENERATIONS

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
    keys: list[dict] = field(default_factory=list)   # per generation: data_public, verify_key, check

    @classmethod
    def new(cls, repo_id: str, chunk_size: int, encryption: str, zstd_level: int) -> RepoConfig:
        return cls(id=repo_id, chunk_size=chunk_size, encryption=encryption,
                   zstd_level=zstd_level, created=time.time())

    def to_bytes(self, bundle: KeyBundle) -> bytes:
        """The signed config document; ``bundle`` must be a full key (only it can sign)."""
        if not bundle.full:
            raise IntegrityError("a backup-only key cannot sign the repository config")
        self.keys = describe_keys(bundle)
        doc = asdict(self)
        doc["signature"] = bundle.current.sign(SIGNATURE_CONTEXT + canonical_json(doc)).hex()
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
                   append_only=_append_only(doc), object_lock=_object_lock(doc), keys=list(doc["keys"]))


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


SIGNATURE_CONTEXT = b"imgbackup-config\0"


def describe_keys(bundle: KeyBundle) -> list[dict]:
    """The config's ``keys``: each generation's public keys and check, nothing secret."""
    return [{"generation": g.number, "data_public": g.data_public.hex(), "verify_key": g.verify_key.hex(),
             "check": bundle.key_check(g.number)} for g in bundle.generations]


def canonical_json(doc: dict) -> bytes:
    """What the config's signature covers (FORMAT.md 2.2): sorted keys, no whitespace, ASCII escapes."""
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def peek_config(raw: bytes) -> tuple[dict, str]:
    """The config document and its signature, before authentication: only what finding and checking
    the key needs is checked (JSON object, format, version, a 32-hex id, the keys list, a 128-hex
    signature); no other field is used yet."""
    doc = dict(v.obj(v.parse_json(raw, WHAT), WHAT))
    if doc.get("format") != FORMAT_NAME:
        if {"id", "keys", "signature"} <= doc.keys():   # our config's shape: its format field was damaged
            raise v.damaged(WHAT, "its format field does not read 'imgbackup-repository'")
        raise UnsupportedFormat("this is not an imgbackup repository (its config names another format)")
    version = v.integer(doc, "version", WHAT, 0)
    if version != FORMAT_VERSION:
        raise UnsupportedFormat(f"repository format version {version} is not supported by this "
                                f"imgbackup (it reads version {FORMAT_VERSION})")
    v.hex_id(doc, "id", WHAT, 16)
    signature = v.hex_id(doc, "signature", WHAT, 64)
    generations = v.child(doc, "keys", WHAT, list)
    if not 1 <= len(generations) <= MAX_GENERATIONS:
        raise v.damaged(WHAT, f"it lists {len(generations)} key generations")
    for number, gen in enumerate(generations, 1):
        where = f"{WHAT} (key generation {number})"
        v.obj(gen, where)
        if v.integer(gen, "generation", where, 1) != number or set(gen) != GENERATION_FIELDS:
            raise v.damaged(where, "its fields or its number are wrong")
        v.hex_id(gen, "data_public", where, 32)
        v.hex_id(gen, "verify_key", where, 32)
        v.hex_id(gen, "check", where, 16)
    del doc["signature"]
    return doc, signature


GENERATION_FIELDS = {"generation", "data_public", "verify_key", "check"}


def check_config(doc: dict, signature: str, bundle: KeyBundle) -> None:
    """The key fits this config (same repository, the same generations, public keys and checks) and
    the config is signed by the current generation, as stored (unknown fields included)."""
    if bundle.repo_id.hex() != doc["id"]:
        raise ForeignKey(f"this key belongs to another repository ({bundle.repo_id.hex()[:12]}…, not {doc['id'][:12]}…)")
    listed = len(doc["keys"])
    if listed > len(bundle.generations):
        raise IntegrityError("this key predates a key rotation of the repository: it no longer opens it",
                             "use a key issued after the rotation")
    if listed < len(bundle.generations):
        raise IntegrityError("the repository config is older than this key (rolled back?)",
                             "restore the config from a copy of the repository")
    if doc["keys"] != describe_keys(bundle):
        raise IntegrityError("the repository config does not match this key (damaged or tampered with)")
    if not bundle.current.verify(bytes.fromhex(signature), SIGNATURE_CONTEXT + canonical_json(doc)):
        raise IntegrityError("repository config failed authentication (damaged or tampered with)")
