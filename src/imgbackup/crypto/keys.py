"""Repository keys: random data keys, wrapped by a key derived from the passphrase with Argon2id.

Three independent 32-byte keys make up a ``KeySet``: ``enc_key`` (AES-256-GCM for every object),
``id_key`` (keyed BLAKE3 chunk ids, so ids reveal nothing about content to someone without it) and
``mac_key`` (authenticates the repository config). The key file stores them wrapped by AES-256-GCM
under the Argon2id-derived key, with the repository id as associated data so a key file cannot be
moved to another repository unnoticed.
"""

from __future__ import annotations

import base64
import os
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.argon2 import Argon2id

from imgbackup.errors import IntegrityError, UnsupportedFormat, WrongPassphrase
from imgbackup.format import validate as v

KEY_SIZE = 32

# Argon2id defaults: 64 MiB, 3 passes, ~0.3 s here. Above OWASP's baseline (19 MiB, 2 passes), yet the
# KDF's memory stays below the pipeline's, so it does not set the process's peak RSS (rescue media).
DEFAULT_KDF = {"name": "argon2id", "memory_kib": 65536, "iterations": 3, "lanes": 4}
# Only for test repositories (IMGBACKUP_TEST_CHEAP_KDF=1); recorded in the key file like any other.
CHEAP_KDF = {"name": "argon2id", "memory_kib": 1024, "iterations": 1, "lanes": 1}
# What a key file may ask of the KDF: beyond these it is damage (or a trap: 2**40 KiB of memory).
MAX_KDF_MEMORY_KIB = 4 << 20    # 4 GiB: far above any sane setting, below what rescue media can give
MAX_KDF_ITERATIONS = 1000
MAX_KDF_LANES = 255
WRAPPED_SIZE = 12 + 3 * KEY_SIZE + 16   # nonce, the three keys, GCM tag


@dataclass(frozen=True)
class KeySet:
    enc_key: bytes
    id_key: bytes
    mac_key: bytes

    @classmethod
    def generate(cls) -> KeySet:
        return cls(os.urandom(KEY_SIZE), os.urandom(KEY_SIZE), os.urandom(KEY_SIZE))

    def to_bytes(self) -> bytes:
        return self.enc_key + self.id_key + self.mac_key

    @classmethod
    def from_bytes(cls, raw: bytes) -> KeySet:
        if len(raw) != 3 * KEY_SIZE:
            raise IntegrityError("key material has the wrong length")
        return cls(raw[:32], raw[32:64], raw[64:96])


def kdf_params_for_new_key() -> dict:
    cheap = os.environ.get("IMGBACKUP_TEST_CHEAP_KDF", "") in ("1", "true", "yes")
    return dict(CHEAP_KDF if cheap else DEFAULT_KDF)


def derive_key(passphrase: bytes, salt: bytes, params: dict) -> bytes:
    if params.get("name") != "argon2id":
        raise UnsupportedFormat(f"unknown key derivation function {params.get('name')!r}")
    kdf = Argon2id(salt=salt, length=KEY_SIZE, iterations=int(params["iterations"]),
                   lanes=int(params["lanes"]), memory_cost=int(params["memory_kib"]))
    return kdf.derive(passphrase)


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def _unb64(text: str, what: str = "key file", size: int | None = None, label: str = "") -> bytes:
    try:
        raw = base64.b64decode(text, validate=True)
    except (ValueError, TypeError):
        raise v.damaged(what, f"{label or 'a field'} is not base64") from None
    if size is not None and len(raw) != size:
        raise v.damaged(what, f"{label} holds {len(raw)} bytes, not {size}")
    return raw


def parse_key_file(raw: bytes, what: str = "key file") -> dict:
    """The key-file document, every field checked before a passphrase is asked for or the KDF runs."""
    doc = v.obj(v.parse_json(raw, what), what)
    version = v.integer(doc, "version", what, 0)
    if version != 1:
        raise UnsupportedFormat(f"{what}: key file version {version} is not supported")
    kdf = v.child(doc, "kdf", what, dict, nullable=True)
    if kdf is None:
        _unb64(v.text(doc, "keys", what), what, 3 * KEY_SIZE, "'keys'")
        return doc
    where = f"{what} (kdf)"
    if v.text(kdf, "name", where) != "argon2id":
        raise UnsupportedFormat(f"{what}: unknown key derivation function {kdf['name'][:40]!r}")
    lanes = v.integer(kdf, "lanes", where, 1, MAX_KDF_LANES)
    v.integer(kdf, "memory_kib", where, 8 * lanes, MAX_KDF_MEMORY_KIB)   # Argon2 needs 8 KiB per lane
    v.integer(kdf, "iterations", where, 1, MAX_KDF_ITERATIONS)
    if len(_unb64(v.text(kdf, "salt", where), where, None, "'salt'")) < 8:
        raise v.damaged(where, "'salt' is shorter than Argon2's 8 bytes")
    _unb64(v.text(doc, "wrapped", what), what, WRAPPED_SIZE, "'wrapped'")
    return doc


def wrap_keys(keys: KeySet, passphrase: bytes | None, repo_id: bytes) -> dict:
    """The key-file document; ``passphrase=None`` stores the keys unwrapped (``--encryption none``)."""
    if passphrase is None:
        return {"version": 1, "kdf": None, "keys": _b64(keys.to_bytes())}
    params = kdf_params_for_new_key()
    salt = os.urandom(16)
    kek = derive_key(passphrase, salt, params)
    nonce = os.urandom(12)
    sealed = AESGCM(kek).encrypt(nonce, keys.to_bytes(), b"imgbackup-key\x00" + repo_id)
    return {"version": 1, "kdf": {**params, "salt": _b64(salt)}, "wrapped": _b64(nonce + sealed)}


def unwrap_keys(doc: dict, passphrase: bytes | None, repo_id: bytes) -> KeySet:
    """The keys from a key-file document (checked by ``parse_key_file`` when read from storage)."""
    if doc.get("version") != 1:
        raise UnsupportedFormat(f"key file version {doc.get('version')!r} is not supported")
    if doc.get("kdf") is None:
        return KeySet.from_bytes(_unb64(doc["keys"]))
    if passphrase is None:
        raise WrongPassphrase("this repository is encrypted and no passphrase was given")
    params = doc["kdf"]
    kek = derive_key(passphrase, _unb64(params["salt"]), params)
    blob = _unb64(doc["wrapped"])
    try:
        raw = AESGCM(kek).decrypt(blob[:12], blob[12:], b"imgbackup-key\x00" + repo_id)
    except InvalidTag:
        raise WrongPassphrase("wrong passphrase (or a damaged key file)") from None
    return KeySet.from_bytes(raw)
