"""Repository: creating and opening one, and reading and writing its objects."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from imgbackup import __version__
from imgbackup.crypto.datakeys import DataKeys, data_key_name
from imgbackup.crypto.envelope import Envelope
from imgbackup.crypto.keys import KeyBundle
from imgbackup.crypto.protect import forbid_core_dumps
from imgbackup.crypto.slots import make_slot, new_slot_id, slot_name
from imgbackup.errors import (
    IntegrityError,
    KeyNotAllowed,
    RepositoryExists,
    RepositoryNotFound,
    UsageError,
)
from imgbackup.repository.config import CONFIG_NAME, MAX_CHUNK, MIN_CHUNK, RepoConfig
from imgbackup.repository.images import ImageStore
from imgbackup.repository.lock import RepositoryLock
from imgbackup.repository.packs import BlobLocation, PackWriter
from imgbackup.repository.storage import ObjectMissing, Storage, confirm_stored, open_storage

ENCRYPTIONS = ("aes-256-gcm", "none")
DEFAULT_CHUNK_SIZE = 1 << 20
FOLDERS = ("packs", "index", "images", "locks", "keys", "datakeys")

if TYPE_CHECKING:
    from imgbackup.repository.chunkindex import ChunkIndex

PassphraseSource = Callable[[], bytes]


def _storage(where: str | os.PathLike | Storage, for_writing: bool) -> Storage:
    """A location (path or URL, through the one factory) or a ready backend (tests' stand-ins)."""
    if isinstance(where, str | os.PathLike):
        return open_storage(os.fspath(where), for_writing=for_writing)
    return where


class Repository:
    def __init__(self, storage: Storage, config: RepoConfig, keys: KeyBundle, location: str,
                 slot: str | None = None) -> None:
        self.storage = storage
        self.config = config
        self.keys = keys
        self.slot = slot               # the key slot this repository was opened with (None: a paper key)
        self.location = location
        self.data_keys = DataKeys(keys, self._store_data_key, self._fetch_data_key)
        meta = {g.number: g.meta_key for g in keys.generations}
        self.envelope = Envelope(None if config.encryption == "none" else meta, config.zstd_level, self.data_keys)
        self.images = ImageStore(storage, self.envelope)
        self._chunks: ChunkIndex | None = None

    @property
    def chunk_size(self) -> int:
        return self.config.chunk_size

    @property
    def can_read_data(self) -> bool:
        """False for a backup-only key: it seals chunks it can never open."""
        return self.keys.full or self.config.encryption == "none"

    def require_full_key(self, action: str) -> None:
        """The one refusal (exit 4) of everything a backup-only key must not do: read data, remove."""
        if not self.keys.full:
            raise KeyNotAllowed(f"this key is backup-only: it can add images but not {action}")

    @classmethod
    def init(cls, where: str | os.PathLike | Storage, passphrase: PassphraseSource | None,
             encryption: str = "aes-256-gcm", chunk_size: int = DEFAULT_CHUNK_SIZE,
             zstd_level: int = 3, label: str = "init") -> Repository:
        """Create a repository at ``where``: a path, ``file://``, ``s3://`` or ``memory://`` URL, or a Storage."""
        if encryption not in ENCRYPTIONS:
            raise UsageError(f"unknown encryption {encryption!r}; choose one of {', '.join(ENCRYPTIONS)}")
        if not (MIN_CHUNK <= chunk_size <= MAX_CHUNK) or chunk_size & (chunk_size - 1):
            raise UsageError(f"chunk size must be a power of two from {MIN_CHUNK} to {MAX_CHUNK}")
        if not 1 <= zstd_level <= 22:
            raise UsageError("zstd level must be 1..22")
        storage = _storage(where, for_writing=True)
        if storage.exists(CONFIG_NAME):
            raise RepositoryExists(f"{storage.location} already holds a repository")
        if next(iter(storage.list("")), None) is not None:
            raise RepositoryExists(f"{storage.location} exists and is not empty",
                                   "choose a new or empty directory or prefix")
        forbid_core_dumps()
        config = RepoConfig.new(os.urandom(16).hex(), chunk_size, encryption, zstd_level)
        keys = KeyBundle.generate(bytes.fromhex(config.id))
        secret = passphrase() if encryption != "none" else None
        slot = new_slot_id()
        storage.prepare(FOLDERS)
        storage.put(slot_name(slot), encode_slot(make_slot(keys, secret, slot, label, signer=keys)))
        storage.put(CONFIG_NAME, config.to_bytes(keys))  # last: a repository exists once it is there
        return cls(storage, config, keys, storage.location, slot)

    @classmethod
    def open(cls, where: str | os.PathLike | Storage, passphrase: PassphraseSource,
             for_writing: bool = False) -> Repository:
        """Open the repository at ``where`` with whichever key slot the passphrase opens;
        ``for_writing`` lets the backend check, once, that it can keep the repository's promises
        (S3: that the server honours create-if-absent)."""
        from imgbackup.repository.keyslots import unlock

        storage = _storage(where, for_writing)
        config, signature = read_config(storage)
        forbid_core_dumps()
        keys, slot = unlock(storage, config, signature, passphrase)
        return cls(storage, config, keys, storage.location, slot)

    @classmethod
    def open_with_bundle(cls, where: str | os.PathLike | Storage, keys: KeyBundle,
                         for_writing: bool = False) -> Repository:
        """Open with a key bundle in hand (a paper recovery sheet), no slot involved."""
        storage = _storage(where, for_writing)
        config, signature = read_config(storage)
        forbid_core_dumps()
        config.check(signature, keys)
        return cls(storage, config, keys, storage.location, None)

    def _store_data_key(self, key_id: int, blob: bytes) -> bool:
        name = data_key_name(key_id)
        if not self.storage.create(name, blob):
            return False
        confirm_stored(self.storage, name, len(blob))
        return True

    def _fetch_data_key(self, key_id: int) -> bytes:
        try:
            return self.storage.get(data_key_name(key_id))
        except ObjectMissing:
            raise IntegrityError(f"data key {key_id:016x} is missing (its chunks cannot be opened)") from None

    def lock(self, command: str = "") -> RepositoryLock:
        return RepositoryLock(self.storage, command)

    def chunk_index(self) -> ChunkIndex:
        from imgbackup.repository.chunkindex import ChunkIndex  # numpy: not for commands that never need it

        if self._chunks is None:
            self._chunks = ChunkIndex.load(self.storage, self.envelope)
        return self._chunks

    def pack_writer(self) -> PackWriter:
        """A writer streaming sealed chunks into new packs of this repository."""
        return PackWriter(self.storage, self.envelope)

    def store_chunk_index(self, locations: dict[bytes, BlobLocation]) -> int:
        """Record where new chunks live (after their packs are stored); returns the bytes written."""
        return self.chunk_index().store(self.storage, self.envelope, locations)

    def remove_temp_files(self) -> int:
        """Remove what killed writers left (temp files, multipart uploads); only under the lock."""
        return self.storage.remove_incomplete_writes()

    def new_image_meta(self, **fields) -> dict:
        from imgbackup.format.layout import FORMAT_VERSION

        return {
            "version": FORMAT_VERSION,
            "id": os.urandom(16).hex(),
            "created": time.time(),
            "hostname": socket.gethostname(),
            "tool_version": __version__,
            "chunk_size": self.chunk_size,
            **fields,
        }


def encode_slot(doc: dict) -> bytes:
    import json

    return json.dumps(doc, indent=1, sort_keys=True).encode() + b"\n"


def read_config(storage: Storage) -> tuple[RepoConfig, str]:
    try:
        raw = storage.get(CONFIG_NAME)
    except ObjectMissing:
        raise RepositoryNotFound(f"no imgbackup repository at {storage.location}") from None
    return RepoConfig.peek(raw)
