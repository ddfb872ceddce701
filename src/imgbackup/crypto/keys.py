"""The repository's keys (FORMAT.md section 2): a ``KeyBundle`` and the passphrase KDF.

A bundle holds ``id_key`` (keyed BLAKE3 chunk ids) and one ``Generation`` per key rotation: a
metadata key (AES-256-GCM for everything but chunks), an X25519 pair (per-session data keys are
sealed to its public half) and an Ed25519 pair (signs the config and the key slots). A *full*
bundle holds the private halves; a *backup-only* bundle only the public ones, so its holder can
seal new data but never open any, and cannot sign. The last generation is the one writers use.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.kdf.argon2 import Argon2id
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from imgbackup.errors import IntegrityError, UnsupportedFormat
from imgbackup.format.layout import (
    KEY_BUNDLE_HEAD,
    KEY_BUNDLE_MAGIC,
    KEY_BUNDLE_VERSION,
    KEY_GENERATION,
    KIND_BACKUP_ONLY,
    KIND_FULL,
    MAX_GENERATIONS,
)

KEY_SIZE = 32
FULL, BACKUP_ONLY = "full", "backup-only"
KIND_BYTE = {FULL: KIND_FULL, BACKUP_ONLY: KIND_BACKUP_ONLY}
KIND_NAME = {v: k for k, v in KIND_BYTE.items()}

# Argon2id defaults: 64 MiB, 3 passes, ~0.3 s here. Above OWASP's baseline (19 MiB, 2 passes), yet the
# KDF's memory stays below the pipeline's, so it does not set the process's peak RSS (rescue media).
DEFAULT_KDF = {"name": "argon2id", "memory_kib": 65536, "iterations": 3, "lanes": 4}
# Only for test repositories (IMGBACKUP_TEST_CHEAP_KDF=1); recorded in the key slot like any other.
CHEAP_KDF = {"name": "argon2id", "memory_kib": 1024, "iterations": 1, "lanes": 1}
# What a key slot may ask of the KDF: beyond these it is damage (or a trap: 2**40 KiB of memory).
MAX_KDF_MEMORY_KIB = 4 << 20    # 4 GiB: far above any sane setting, below what rescue media can give
MAX_KDF_ITERATIONS = 1000
MAX_KDF_LANES = 255


def _x25519_public(private: bytes) -> bytes:
    return X25519PrivateKey.from_private_bytes(private).public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def _ed25519_public(seed: bytes) -> bytes:
    return Ed25519PrivateKey.from_private_bytes(seed).public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


@dataclass(frozen=True, repr=False)
class Generation:
    """One generation of keys; the private halves are None in a backup-only bundle."""

    number: int
    meta_key: bytes
    data_public: bytes
    verify_key: bytes
    data_private: bytes | None = None
    signing_key: bytes | None = None

    def __repr__(self) -> str:   # never print a key (a traceback or a debug log must not leak one)
        return f"Generation({self.number}, {'full' if self.data_private else 'backup-only'})"

    @classmethod
    def generate(cls, number: int) -> Generation:
        data = X25519PrivateKey.generate().private_bytes_raw()
        sign = Ed25519PrivateKey.generate().private_bytes_raw()
        return cls(number, os.urandom(KEY_SIZE), _x25519_public(data), _ed25519_public(sign), data, sign)

    def public_only(self) -> Generation:
        return Generation(self.number, self.meta_key, self.data_public, self.verify_key)

    def sign(self, message: bytes) -> bytes:
        if self.signing_key is None:
            raise ValueError("a backup-only key cannot sign")
        return Ed25519PrivateKey.from_private_bytes(self.signing_key).sign(message)

    def verify(self, signature: bytes, message: bytes) -> bool:
        from cryptography.exceptions import InvalidSignature

        try:
            Ed25519PublicKey.from_public_bytes(self.verify_key).verify(signature, message)
        except (InvalidSignature, ValueError):
            return False
        return True


@dataclass(frozen=True, repr=False)
class KeyBundle:
    kind: str
    repo_id: bytes
    id_key: bytes
    generations: tuple[Generation, ...]

    def __repr__(self) -> str:
        return f"KeyBundle({self.kind}, repository {self.repo_id.hex()}, {len(self.generations)} generation(s))"

    @classmethod
    def generate(cls, repo_id: bytes) -> KeyBundle:
        return cls(FULL, repo_id, os.urandom(KEY_SIZE), (Generation.generate(1),))

    @property
    def full(self) -> bool:
        return self.kind == FULL

    @property
    def current(self) -> Generation:
        return self.generations[-1]

    def generation(self, number: int) -> Generation | None:
        return self.generations[number - 1] if 1 <= number <= len(self.generations) else None

    @property
    def mac_key(self) -> bytes:
        """A MAC key every key holder has, stable across rotations: for local caches and record ids
        (never for anything a backup-only host must not forge — the config and slots are signed)."""
        return hmac.digest(self.id_key, b"imgbackup-mac-key", "sha256")

    def backup_only(self) -> KeyBundle:
        """The same repository's keys without any private half."""
        return KeyBundle(BACKUP_ONLY, self.repo_id, self.id_key, tuple(g.public_only() for g in self.generations))

    def rotated(self) -> KeyBundle:
        """This full bundle with one more generation (new meta, data and signing keys; the same id_key)."""
        if not self.full:
            raise ValueError("only a full key can be rotated")
        return KeyBundle(FULL, self.repo_id, self.id_key, (*self.generations, Generation.generate(len(self.generations) + 1)))

    def key_check(self, number: int) -> str:
        """The config's ``check`` of a generation: proves id_key and its meta key without revealing them."""
        gen = self.generations[number - 1]
        msg = b"imgbackup-key-check\0" + self.repo_id + number.to_bytes(4, "little") + self.id_key + gen.meta_key
        return hashlib.sha256(msg).digest()[:16].hex()

    def to_bytes(self) -> bytes:
        head = KEY_BUNDLE_HEAD.pack(KEY_BUNDLE_MAGIC, KEY_BUNDLE_VERSION, KIND_BYTE[self.kind],
                                    len(self.generations), self.repo_id, self.id_key)
        rows = [KEY_GENERATION.pack(g.number, g.meta_key, g.data_private if self.full else g.data_public,
                                    g.signing_key if self.full else g.verify_key) for g in self.generations]
        return head + b"".join(rows)

    @classmethod
    def from_bytes(cls, raw: bytes) -> KeyBundle:
        if len(raw) < KEY_BUNDLE_HEAD.size:
            raise IntegrityError("key material is truncated")
        magic, version, kind, count, repo_id, id_key = KEY_BUNDLE_HEAD.unpack_from(raw)
        if magic != KEY_BUNDLE_MAGIC:
            raise IntegrityError("key material has a bad magic number")
        if version != KEY_BUNDLE_VERSION:
            raise UnsupportedFormat(f"key bundle version {version} is not supported")
        if kind not in KIND_NAME or not 1 <= count <= MAX_GENERATIONS:
            raise IntegrityError("key material has a damaged header")
        if len(raw) != bundle_length(count):
            raise IntegrityError("key material has the wrong length")
        gens = []
        for i in range(count):
            number, meta, data, sign = KEY_GENERATION.unpack_from(raw, KEY_BUNDLE_HEAD.size + i * KEY_GENERATION.size)
            if number != i + 1:
                raise IntegrityError("key material lists its generations out of order")
            try:
                if kind == KIND_FULL:
                    gens.append(Generation(number, meta, _x25519_public(data), _ed25519_public(sign), data, sign))
                else:
                    gens.append(Generation(number, meta, data, sign))
            except ValueError:
                raise IntegrityError("key material holds an invalid key") from None
        return cls(KIND_NAME[kind], repo_id, id_key, tuple(gens))


def bundle_length(generations: int) -> int:
    return KEY_BUNDLE_HEAD.size + generations * KEY_GENERATION.size


def kdf_params_for_new_key() -> dict:
    cheap = os.environ.get("IMGBACKUP_TEST_CHEAP_KDF", "") in ("1", "true", "yes")
    return dict(CHEAP_KDF if cheap else DEFAULT_KDF)


def derive_key(passphrase: bytes, salt: bytes, params: dict) -> bytes:
    """Argon2id, with the slot's parameters checked first (a damaged slot gets a clear error)."""
    if params.get("name") != "argon2id":
        raise UnsupportedFormat(f"unknown key derivation function {params.get('name')!r}")
    try:
        memory, iterations, lanes = int(params["memory_kib"]), int(params["iterations"]), int(params["lanes"])
    except (KeyError, TypeError, ValueError):
        raise IntegrityError("key slot has damaged KDF parameters") from None
    if not (1 <= lanes <= MAX_KDF_LANES and 8 * lanes <= memory <= MAX_KDF_MEMORY_KIB
            and 1 <= iterations <= MAX_KDF_ITERATIONS) or len(salt) < 8:
        raise IntegrityError("key slot has KDF parameters out of range")
    kdf = Argon2id(salt=salt, length=KEY_SIZE, iterations=iterations, lanes=lanes, memory_cost=memory)
    return kdf.derive(passphrase)
