"""Per-session data keys sealed to the repository's X25519 public key (FORMAT.md 2.3).

Sealing needs only the public key, so a backup-only host can make and store data keys for the
chunks it writes; opening one needs the private key, which only a full key holds. Each object
uses a fresh ephemeral key pair (ECIES: X25519, HKDF-SHA256, AES-256-GCM).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from imgbackup.crypto.keys import KeyBundle
from imgbackup.errors import IntegrityError, KeyNotAllowed
from imgbackup.format.layout import (
    DATA_KEY_HEAD,
    DATA_KEY_ID_MIN,
    DATA_KEY_MAGIC,
    DATA_KEY_SIZE,
    FORMAT_VERSION,
)

BACKUP_ONLY_REFUSAL = ("this key is backup-only: it can add images but not read their data "
                       "(restore, mount, restore-files and verify --data need a full key)")


def data_key_name(key_id: int) -> str:
    return f"datakeys/{key_id:016x}"


def new_key_id() -> int:
    return int.from_bytes(os.urandom(8), "little") | DATA_KEY_ID_MIN


def _wrap_key(shared: bytes, ephemeral: bytes, public: bytes, head: bytes) -> bytes:
    """HKDF of the shared secret, bound to both public keys, the generation and the key id (not to the
    repository id: related repositories share the key pair, and ``copy`` moves data keys verbatim)."""
    if shared == bytes(32):
        raise IntegrityError("data key object has an invalid ephemeral key")
    info = b"imgbackup-datakey\0" + head[12:24]
    return HKDF(hashes.SHA256(), 32, ephemeral + public, info).derive(shared)


def seal_data_key(data_key: bytes, key_id: int, generation: int, public: bytes) -> bytes:
    eph = X25519PrivateKey.generate()
    eph_pub = eph.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    nonce = os.urandom(12)
    head = DATA_KEY_HEAD.pack(DATA_KEY_MAGIC, FORMAT_VERSION, generation, key_id, eph_pub, nonce)
    shared = eph.exchange(X25519PublicKey.from_public_bytes(public))
    wrap = _wrap_key(shared, eph_pub, public, head)
    return head + AESGCM(wrap).encrypt(nonce, data_key, head[:56])


def open_data_key(blob: bytes, key_id: int, bundle: KeyBundle) -> bytes:
    what = f"data key {key_id:016x}"
    if len(blob) != DATA_KEY_SIZE:
        raise IntegrityError(f"{what} has the wrong length")
    magic, version, generation, stored_id, eph_pub, nonce = DATA_KEY_HEAD.unpack_from(blob)
    if magic != DATA_KEY_MAGIC or version != FORMAT_VERSION or stored_id != key_id:
        raise IntegrityError(f"{what} has a bad header")
    gen = bundle.generation(generation)
    if gen is None:
        raise IntegrityError(f"{what} is sealed to key generation {generation}, which this key does not hold")
    if gen.data_private is None:
        raise KeyNotAllowed(BACKUP_ONLY_REFUSAL)
    try:
        shared = X25519PrivateKey.from_private_bytes(gen.data_private).exchange(X25519PublicKey.from_public_bytes(eph_pub))
    except ValueError:
        raise IntegrityError(f"{what} has an invalid ephemeral key") from None
    wrap = _wrap_key(shared, eph_pub, gen.data_public, blob[: DATA_KEY_HEAD.size])
    try:
        return AESGCM(wrap).decrypt(nonce, blob[DATA_KEY_HEAD.size :], blob[:56])
    except InvalidTag:
        raise IntegrityError(f"{what} failed authentication (corrupted or tampered with)") from None


class DataKeys:
    """The data keys of one process: its session's key, made (and stored) at the first chunk sealed,
    and the keys of stored chunks, opened on demand and cached. Thread-safe.

    ``store(key_id, blob)`` stores a new data-key object (create-if-absent; False when the id is
    taken), ``fetch(key_id)`` reads one; both come from the repository layer.
    """

    def __init__(self, bundle: KeyBundle, store: Callable[[int, bytes], bool], fetch: Callable[[int], bytes]) -> None:
        self.bundle = bundle
        self._store = store
        self._fetch = fetch
        self._lock = threading.Lock()
        self._aeads: dict[int, AESGCM] = {}
        self._session: tuple[int, AESGCM] | None = None

    def session(self) -> tuple[int, AESGCM]:
        with self._lock:
            if self._session is None:
                gen = self.bundle.current
                key = os.urandom(32)
                while True:
                    key_id = new_key_id()
                    if self._store(key_id, seal_data_key(key, key_id, gen.number, gen.data_public)):
                        break
                self._session = (key_id, AESGCM(key))
                self._aeads[key_id] = self._session[1]
            return self._session

    def aead(self, key_id: int) -> AESGCM:
        with self._lock:
            found = self._aeads.get(key_id)
            if found is not None:
                return found
            if not self.bundle.full:
                raise KeyNotAllowed(BACKUP_ONLY_REFUSAL)
            aead = AESGCM(open_data_key(self._fetch(key_id), key_id, self.bundle))
            self._aeads[key_id] = aead
            return aead


class StaticDataKeys:
    """One fixed data key (no storage): for sealing objects outside a repository (tests, tools)."""

    KEY_ID = DATA_KEY_ID_MIN

    def __init__(self, key: bytes) -> None:
        self._aead = AESGCM(key)

    def session(self) -> tuple[int, AESGCM]:
        return self.KEY_ID, self._aead

    def aead(self, key_id: int) -> AESGCM:
        if key_id != self.KEY_ID:
            raise IntegrityError(f"sealed with data key {key_id:016x}, which this key cannot open")
        return self._aead
