"""The repository config (FORMAT.md 2.2): format version, id, chunk size, algorithms, public keys.

Signed with Ed25519 by the full key's current generation and verified by every key holder: a
backup-only host holds only the verify keys, so it can neither forge nor roll back the config
(the HMAC of format version 2 had a key every key holder knew).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field

from imgbackup.crypto.keys import KeyBundle
from imgbackup.crypto.slots import canonical
from imgbackup.errors import IntegrityError, UnsupportedFormat
from imgbackup.format.layout import FORMAT_VERSION

CONFIG_NAME = "config"
FORMAT_NAME = "imgbackup-repository"
MIN_CHUNK = 64 << 10   # below this the per-chunk index entry and envelope outweigh the dedup gained
MAX_CHUNK = 16 << 20   # above this one changed byte stores too much again, and restore buffers grow large
SIGNATURE_CONTEXT = b"imgbackup-config\0"


@dataclass
class RepoConfig:
    id: str
    chunk_size: int
    encryption: str            # "aes-256-gcm" or "none"
    zstd_level: int = 3
    created: float = 0.0
    version: int = FORMAT_VERSION
    format: str = FORMAT_NAME
    keys: list[dict] = field(default_factory=list)   # per generation: data_public, verify_key, check

    @classmethod
    def new(cls, repo_id: str, chunk_size: int, encryption: str, zstd_level: int) -> RepoConfig:
        return cls(id=repo_id, chunk_size=chunk_size, encryption=encryption,
                   zstd_level=zstd_level, created=time.time())

    def describe_keys(self, bundle: KeyBundle) -> None:
        """Set ``keys`` to the bundle's generations (public keys and checks only)."""
        self.keys = [{"generation": g.number, "data_public": g.data_public.hex(), "verify_key": g.verify_key.hex(),
                      "check": bundle.key_check(g.number)} for g in bundle.generations]

    def _signed_bytes(self) -> bytes:
        return SIGNATURE_CONTEXT + canonical(asdict(self))

    def to_bytes(self, bundle: KeyBundle) -> bytes:
        """The signed config document; ``bundle`` must be full (it signs)."""
        self.describe_keys(bundle)
        doc = asdict(self)
        doc["signature"] = bundle.current.sign(self._signed_bytes()).hex()
        return json.dumps(doc, indent=1, sort_keys=True).encode() + b"\n"

    @classmethod
    def peek(cls, raw: bytes) -> tuple[RepoConfig, str]:
        """Parse without authenticating (a key is needed for that): config and its signature."""
        try:
            doc = json.loads(raw)
            if doc.get("format") != FORMAT_NAME:
                raise UnsupportedFormat("this directory is not an imgbackup repository")
            if doc.get("version") != FORMAT_VERSION:
                raise UnsupportedFormat(
                    f"repository format version {doc.get('version')} is not supported by this "
                    f"imgbackup (it reads version {FORMAT_VERSION})")
            signature = doc.pop("signature")
            cfg = cls(**doc)
            if not isinstance(signature, str) or not isinstance(cfg.keys, list) or not cfg.keys:
                raise TypeError("signature or keys missing")
            for n, gen in enumerate(cfg.keys, 1):
                if not isinstance(gen, dict) or gen.get("generation") != n:
                    raise TypeError("key generations out of order")
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise IntegrityError(f"repository config is damaged: {exc}") from None
        if not (MIN_CHUNK <= cfg.chunk_size <= MAX_CHUNK) or cfg.chunk_size & (cfg.chunk_size - 1):
            raise IntegrityError(f"repository config has an invalid chunk size {cfg.chunk_size}")
        return cfg, signature

    def check(self, signature: str, bundle: KeyBundle) -> None:
        """The bundle belongs to this config and the config is signed by its current generation."""
        if bundle.repo_id.hex() != self.id:
            raise IntegrityError("this key belongs to another repository")
        if len(self.keys) > len(bundle.generations):
            raise IntegrityError("this key predates a key rotation of the repository: it no longer opens it",
                                 "use a key issued after the rotation ('imgbackup key list' with such a key)")
        if len(self.keys) < len(bundle.generations):
            raise IntegrityError("repository config is older than this key (rolled back?)",
                                 "restore the config from a copy of the repository")
        described = RepoConfig(**{**asdict(self), "keys": []})
        described.describe_keys(bundle)
        try:
            sig = bytes.fromhex(signature)
        except ValueError:
            sig = b""
        if described.keys != self.keys or not bundle.current.verify(sig, self._signed_bytes()):
            raise IntegrityError("repository config failed authentication (damaged or tampered with, "
                                 "or a key of another repository)")
