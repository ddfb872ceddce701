"""Repository: creating and opening one, and reading and writing its objects."""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from imgbackup import __version__, audit, interrupts
from imgbackup.crypto.envelope import Envelope
from imgbackup.crypto.keys import KeySet, unwrap_keys, wrap_keys
from imgbackup.errors import (
    IntegrityError,
    RepositoryExists,
    RepositoryNotFound,
    UsageError,
    WrongPassphrase,
)
from imgbackup.repository.config import CONFIG_NAME, MAX_CHUNK, MIN_CHUNK, RepoConfig
from imgbackup.repository.damage import DamageLog
from imgbackup.repository.images import ImageStore, series_tag
from imgbackup.repository.indexcache import IndexCache
from imgbackup.repository.lease import Lease
from imgbackup.repository.lock import open_session, put_reserve, take_exclusive
from imgbackup.repository.packs import BlobLocation, PackWriter
from imgbackup.repository.storage import ObjectMissing, Storage, open_storage

ENCRYPTIONS = ("aes-256-gcm", "none")
DEFAULT_CHUNK_SIZE = 1 << 20
MIN_PASSPHRASE_LENGTH = 8   # characters; shorter ones only with --weak-passphrase (Argon2id slows guessing, no more)
FOLDERS = ("packs", "index", "images", "locks", "damage", "gc")

if TYPE_CHECKING:
    from imgbackup.repository.chunkindex import ChunkIndex

PassphraseSource = Callable[[], bytes]


def _keyfile_name(repo_id: str) -> str:
    return f"keys/{repo_id[:16]}"


def _storage(where: str | os.PathLike | Storage, for_writing: bool) -> Storage:
    """A location (path or URL, through the one factory) or a ready backend (tests' stand-ins)."""
    if isinstance(where, str | os.PathLike):
        return open_storage(os.fspath(where), for_writing=for_writing)
    return where


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
    def init(cls, where: str | os.PathLike | Storage, passphrase: PassphraseSource | None,
             encryption: str = "aes-256-gcm", chunk_size: int = DEFAULT_CHUNK_SIZE,
             zstd_level: int = 3, weak_passphrase: bool = False) -> Repository:
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
        keys = KeySet.generate()
        config = RepoConfig.new(os.urandom(16).hex(), chunk_size, encryption, zstd_level)
        secret = passphrase() if encryption != "none" else None
        if secret is not None and not weak_passphrase and len(secret.decode(errors="replace")) < MIN_PASSPHRASE_LENGTH:
            raise UsageError(f"the passphrase is shorter than {MIN_PASSPHRASE_LENGTH} characters",
                             "choose a longer one, or pass --weak-passphrase to accept it")
        keydoc = wrap_keys(keys, secret, bytes.fromhex(config.id))
        with interrupts.deferred():   # a few small writes: a repository is made whole or not begun
            storage.prepare(FOLDERS)
            storage.put(_keyfile_name(config.id), json.dumps(keydoc, indent=1).encode() + b"\n")
            put_reserve(storage)
            storage.put(CONFIG_NAME, config.to_bytes(keys.mac_key))  # last: a repository exists once it is there
            interrupts.set_status(f"the repository {storage.location} was created")
        return cls(storage, config, keys, storage.location)

    @classmethod
    def open(cls, where: str | os.PathLike | Storage, passphrase: PassphraseSource,
             for_writing: bool = False) -> Repository:
        """Open the repository at ``where``; ``for_writing`` lets the backend check, once, that it can
        keep the repository's promises (S3: that the server honours create-if-absent)."""
        storage = _storage(where, for_writing)
        root = getattr(storage, "root", None)   # a local directory: naming a file is "no repository" (3)
        if isinstance(root, os.PathLike) and os.path.exists(root) and not os.path.isdir(root):
            raise RepositoryNotFound(f"{root} is a file, not a repository directory")
        try:
            raw = storage.get(CONFIG_NAME)
        except ObjectMissing:
            raise RepositoryNotFound(f"no imgbackup repository at {storage.location}") from None
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
        except WrongPassphrase as exc:
            audit.emit("passphrase_failed", "failed", repository=config.id, location=storage.location, error=str(exc))
            raise
        except (KeyError, TypeError, AttributeError) as exc:
            raise IntegrityError(f"repository key file is damaged ({exc})") from None
        config.check_mac(mac, keys.mac_key)
        return cls(storage, config, keys, storage.location)

    def session(self, command: str) -> Lease:
        """A backup's lease: shared with every other backup, never waits (lock.py)."""
        return open_session(self.storage, command)

    def lock(self, command: str = "", wait: float = 0.0, may_use_reserve: bool = False) -> Lease:
        """The exclusive lease of the commands that remove data; waits up to ``wait`` seconds.
        ``may_use_reserve`` for commands that free space (delete, compact, repair)."""
        return take_exclusive(self.storage, command, wait, may_use_reserve=may_use_reserve,
                              audit_fields={"repository": self.config.id, "location": self.location})

    def index_cache(self) -> IndexCache | None:
        """The local cache of this repository's chunk index (None with IMGBACKUP_INDEX_CACHE=0)."""
        return IndexCache(self.config.id, self.keys.mac_key) if IndexCache.enabled() else None

    def chunk_index(self, for_backup: bool = False) -> ChunkIndex:
        """The chunk index without the copies damage records name (loaded once, then cached).

        ``for_backup``: a backup dedups against this index, so every damage record must be readable,
        the copies a collection marked as candidates are left out (docs/FORMAT.md section 13: they are
        read first), and copies in packs that no longer exist are excluded too (one LIST of packs/,
        taken after the listing of index/: one request per 1,000 packs on a bucket; a directory walk here)."""
        from imgbackup.repository.chunkindex import ChunkIndex  # numpy: not for commands that never need it
        from imgbackup.repository.marks import load_marks, marked_copies

        if self._chunks is None or (for_backup and not self._chunks.packs_checked):
            marked = marked_copies(load_marks(self.storage, self.envelope)) if for_backup else None
            damage = DamageLog.load(self.storage, self.envelope, strict=for_backup)
            packs = (lambda: set(self.storage.list("packs"))) if for_backup else None
            self._chunks = ChunkIndex.load(self.storage, self.envelope, damage, packs, self.index_cache(), marked)
        return self._chunks

    def reload_chunk_index(self) -> ChunkIndex:
        """Load the index afresh (after another process changed it); keeps the pack check if made."""
        checked = self._chunks is not None and self._chunks.packs_checked
        self._chunks = None
        return self.chunk_index(for_backup=checked)

    def pack_writer(self) -> PackWriter:
        """A writer streaming sealed chunks into new packs of this repository."""
        return PackWriter(self.storage, self.envelope)

    def store_chunk_index(self, locations: dict[bytes, BlobLocation], names: list[str] | None = None) -> int:
        """Record where new chunks live (after their packs are stored); returns the bytes written.
        Each new file's name is appended to ``names`` before it is written (for a clean-up)."""
        return self.chunk_index().store(self.storage, self.envelope, locations, names)

    def remove_temp_files(self, older_than: float) -> int:
        """Remove what killed writers left (temp files, multipart uploads) untouched for ``older_than``
        seconds by the storage's clock; only under the exclusive lease."""
        return self.storage.remove_incomplete_writes(older_than)

    def series_tag(self, name: str) -> str:
        """The id suffix of this host's images of source ``name`` (images.series_tag)."""
        return series_tag(self.keys.id_key, socket.gethostname(), name)

    def new_image_meta(self, **fields) -> dict:
        from imgbackup.format.layout import FORMAT_VERSION

        hostname = socket.gethostname()
        return {
            "version": FORMAT_VERSION,
            "id": os.urandom(12).hex() + self.series_tag(str(fields.get("name", ""))),
            "created": time.time(),
            "hostname": hostname,
            "tool_version": __version__,
            "chunk_size": self.chunk_size,
            **fields,
        }
