"""Repository: creating and opening one, and reading and writing its objects."""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path

from imgbackup import __version__, interrupts
from imgbackup.crypto.envelope import Envelope
from imgbackup.crypto.keys import KeySet, unwrap_keys, wrap_keys
from imgbackup.errors import (
    IntegrityError,
    RepositoryExists,
    RepositoryNotFound,
    UsageError,
)
from imgbackup.repository.chunkindex import ChunkIndex
from imgbackup.repository.config import CONFIG_NAME, MAX_CHUNK, MIN_CHUNK, RepoConfig
from imgbackup.repository.images import ImageStore
from imgbackup.repository.lock import RepositoryLock
from imgbackup.repository.storage import LocalStorage, ObjectMissing, Storage

ENCRYPTIONS = ("aes-256-gcm", "none")
DEFAULT_CHUNK_SIZE = 1 << 20
MIN_PASSPHRASE_LENGTH = 8   # characters; shorter ones only with --weak-passphrase (Argon2id slows guessing, no more)

PassphraseSource = Callable[[], bytes]


def _keyfile_name(repo_id: str) -> str:
    return f"keys/{repo_id[:16]}"


class Repository:
    def __init__(self, storage: Storage, config: RepoConfig, keys: KeySet, location: str) -> None:
        self.storage = storage
        self.config = config
        self.keys = keys
        self.location = location
        self.envelope = Envelope(None if config.encryption == "none" else keys.enc_key, config.zstd_level)
        self.images = ImageStore(storage, self.envelope)
        self._chunks: ChunkIndex | None = None

    @property
    def chunk_size(self) -> int:
        return self.config.chunk_size

    @classmethod
    def init(cls, path: str | os.PathLike, passphrase: PassphraseSource | None, encryption: str = "aes-256-gcm",
             chunk_size: int = DEFAULT_CHUNK_SIZE, zstd_level: int = 3, weak_passphrase: bool = False) -> Repository:
        if encryption not in ENCRYPTIONS:
            raise UsageError(f"unknown encryption {encryption!r}; choose one of {', '.join(ENCRYPTIONS)}")
        if not (MIN_CHUNK <= chunk_size <= MAX_CHUNK) or chunk_size & (chunk_size - 1):
            raise UsageError(f"chunk size must be a power of two from {MIN_CHUNK} to {MAX_CHUNK}")
        if not 1 <= zstd_level <= 22:
            raise UsageError("zstd level must be 1..22")
        root = Path(path)
        if root.exists() and any(root.iterdir()):
            if (root / CONFIG_NAME).exists():
                raise RepositoryExists(f"{root} already holds a repository")
            raise RepositoryExists(f"{root} exists and is not empty", "choose a new or empty directory")
        storage = LocalStorage(root)
        keys = KeySet.generate()
        config = RepoConfig.new(os.urandom(16).hex(), chunk_size, encryption, zstd_level)
        secret = passphrase() if encryption != "none" else None
        if secret is not None and not weak_passphrase and len(secret.decode(errors="replace")) < MIN_PASSPHRASE_LENGTH:
            raise UsageError(f"the passphrase is shorter than {MIN_PASSPHRASE_LENGTH} characters",
                             "choose a longer one, or pass --weak-passphrase to accept it")
        keydoc = wrap_keys(keys, secret, bytes.fromhex(config.id))
        with interrupts.deferred():   # a few small writes: a repository is made whole or not begun
            storage.put(_keyfile_name(config.id), json.dumps(keydoc, indent=1).encode() + b"\n")
            for folder in ("packs", "index", "images", "locks"):
                (root / folder).mkdir(parents=True, exist_ok=True)
            storage.put(CONFIG_NAME, config.to_bytes(keys.mac_key))
            interrupts.set_status(f"the repository {root} was created")
        return cls(storage, config, keys, str(root))

    @classmethod
    def open(cls, path: str | os.PathLike, passphrase: PassphraseSource) -> Repository:
        root = Path(path)
        if root.exists() and not root.is_dir():
            raise RepositoryNotFound(f"{root} is a file, not a repository directory")
        storage = LocalStorage(root)
        try:
            raw = storage.get(CONFIG_NAME)
        except ObjectMissing:
            raise RepositoryNotFound(f"no imgbackup repository at {root}") from None
        config, mac = RepoConfig.peek(raw)
        repo_id = bytes.fromhex(config.id)
        try:
            keydoc = json.loads(storage.get(_keyfile_name(config.id)))
        except ObjectMissing:
            raise IntegrityError(f"repository key file {_keyfile_name(config.id)} is missing") from None
        except ValueError:
            raise IntegrityError("repository key file is damaged (not JSON)") from None
        try:
            secret = None if keydoc.get("kdf") is None else passphrase()
            keys = unwrap_keys(keydoc, secret, repo_id)
        except (KeyError, TypeError, AttributeError) as exc:
            raise IntegrityError(f"repository key file is damaged ({exc})") from None
        config.check_mac(mac, keys.mac_key)
        return cls(storage, config, keys, str(root))

    def lock(self, command: str = "") -> RepositoryLock:
        return RepositoryLock(self.storage, command)

    def chunk_index(self) -> ChunkIndex:
        if self._chunks is None:
            self._chunks = ChunkIndex.load(self.storage, self.envelope)
        return self._chunks

    def remove_temp_files(self) -> int:
        remover = getattr(self.storage, "remove_temp_files", None)
        return remover() if remover else 0

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
