"""The repository config: format version, id, chunk size, algorithms; authenticated with the mac key."""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from dataclasses import asdict, dataclass

from imgbackup.errors import IntegrityError, UnsupportedFormat
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
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":")).encode()

    def to_bytes(self, mac_key: bytes) -> bytes:
        doc = asdict(self)
        doc["mac"] = hmac.new(mac_key, self._canonical(), hashlib.sha256).hexdigest()
        return json.dumps(doc, indent=1, sort_keys=True).encode() + b"\n"

    @classmethod
    def peek(cls, raw: bytes) -> tuple[RepoConfig, str]:
        """Parse without authenticating (the key is needed for that): config and its mac."""
        try:
            doc = json.loads(raw)
            if doc.get("format") != FORMAT_NAME:
                raise UnsupportedFormat("this directory is not an imgbackup repository")
            if doc.get("version") != FORMAT_VERSION:
                raise UnsupportedFormat(
                    f"repository format version {doc.get('version')} is not supported by this "
                    f"imgbackup (it reads version {FORMAT_VERSION})")
            mac = doc.pop("mac")
            cfg = cls(**doc)
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise IntegrityError(f"repository config is damaged: {exc}") from None
        if not (MIN_CHUNK <= cfg.chunk_size <= MAX_CHUNK) or cfg.chunk_size & (cfg.chunk_size - 1):
            raise IntegrityError(f"repository config has an invalid chunk size {cfg.chunk_size}")
        if not isinstance(cfg.append_only, bool) or not _valid_lock(cfg.object_lock):
            raise IntegrityError("repository config has invalid append-only or object-lock settings")
        return cfg, mac

    def check_mac(self, mac: str, mac_key: bytes) -> None:
        want = hmac.new(mac_key, self._canonical(), hashlib.sha256).hexdigest()
        if not hmac.compare_digest(want, mac):
            raise IntegrityError("repository config failed authentication (damaged or tampered with)")
