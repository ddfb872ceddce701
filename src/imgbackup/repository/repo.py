"""Repository: creating and opening one, and reading and writing its objects."""

from __future__ import annotations

import contextlib
import dataclasses
import hmac
import json
import os
import socket
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from imgbackup import __version__, audit, interrupts
from imgbackup.crypto.datakeys import DataKeys, data_key_name
from imgbackup.crypto.envelope import Envelope
from imgbackup.crypto.keys import KeyBundle
from imgbackup.crypto.protect import forbid_core_dumps
from imgbackup.crypto.slots import make_slot, new_slot_id, slot_name
from imgbackup.errors import (
    AppendOnly,
    ImageHeld,
    ImageNotFound,
    IntegrityError,
    KeyNotAllowed,
    ObjectRetained,
    RepositoryExists,
    RepositoryNotFound,
    StorageError,
    UnsupportedFormat,
    UsageError,
    WrongPassphrase,
)
from imgbackup.repository.catalog import Catalog, CatalogView
from imgbackup.repository.config import (
    CONFIG_NAME,
    ENCRYPTIONS,
    LOCK_MODES,
    MAX_CHUNK,
    MIN_CHUNK,
    RepoConfig,
    check_config,
    peek_config,
)
from imgbackup.repository.damage import DamageLog
from imgbackup.repository.holds import Hold, HoldStore, holds_in_force
from imgbackup.repository.images import ImageStore, series_tag
from imgbackup.repository.indexcache import IndexCache
from imgbackup.repository.lease import Lease
from imgbackup.repository.localcache import BodyCache, HeaderCache
from imgbackup.repository.lock import open_session, put_reserve, take_exclusive
from imgbackup.repository.packs import BlobLocation, PackWriter
from imgbackup.repository.storage import ObjectMissing, Storage, confirm_stored, open_storage

DEFAULT_CHUNK_SIZE = 1 << 20
MIN_PASSPHRASE_LENGTH = 8   # characters; shorter ones only with --weak-passphrase (Argon2id slows guessing, no more)
FOLDERS = ("packs", "index", "images", "locks", "damage", "gc", "catalog", "holds", "keys", "datakeys")
IGNORED_AT_INIT = ("lockprobe/", "locks/")   # an earlier init's lock-probe canaries (retained) do not count
REMOVALS_PER_ENTRY = 2000   # events in one catalog entry (~200 KB): a prune of thousands writes several

if TYPE_CHECKING:
    from imgbackup.repository.chunkindex import ChunkIndex

PassphraseSource = Callable[[], bytes]


def _storage(where: str | os.PathLike | Storage, for_writing: bool) -> Storage:
    """A location (path or URL, through the one factory) or a ready backend (tests' stand-ins)."""
    if isinstance(where, str | os.PathLike):
        return open_storage(os.fspath(where), for_writing=for_writing)
    return where


def _check_object_lock(storage: Storage, lock: tuple[str, int]) -> dict:
    """Refuse Object Lock where the storage cannot do it or the server does not enforce it; the probe's result."""
    mode, _seconds = lock
    if mode not in LOCK_MODES:
        raise UsageError(f"unknown object lock mode {mode!r}; choose {' or '.join(LOCK_MODES)}")
    enabled = getattr(storage, "object_lock_enabled", None)
    if enabled is None:
        raise UsageError(f"{storage.location} cannot lock objects: Object Lock needs an S3 bucket",
                         "for a directory, --append-only guards against accidents (not against root)")
    if not enabled():
        raise UsageError(f"the bucket of {storage.location} was not created with Object Lock enabled",
                         "create a bucket with Object Lock (e.g. aws s3api create-bucket "
                         "--object-lock-enabled-for-bucket) and init there")
    probe = storage.lock_probe(mode)   # type: ignore[attr-defined]
    if not probe["passed"]:
        failed = ", ".join(k for k, ok in probe["checks"].items() if not ok)
        raise StorageError(f"the S3 server at {storage.location} does not enforce Object Lock ({failed} failed "
                           "on a test object)", "nothing was written; use a server that enforces it, or init "
                           "without --object-lock")
    return probe


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
        self.catalog = Catalog(storage, self.envelope, config.id)
        remote = getattr(storage, "remote", False)
        cache = HeaderCache.for_repository(config.id) if remote else None
        bodies = BodyCache.for_repository(config.id) if remote else None
        self.images = ImageStore(storage, self.envelope, self.catalog, cache, bodies)
        self.holds = HoldStore(storage, self.envelope)
        self._chunks: ChunkIndex | None = None
        self._chunks_for_backup = False                # _chunks was loaded with the backup's filters

    @property
    def chunk_size(self) -> int:
        return self.config.chunk_size

    @property
    def can_read_data(self) -> bool:
        """False for a backup-only key: it seals chunks it can never open."""
        return self.keys.full or self.config.encryption == "none"

    def require_full_key(self, action: str) -> None:
        """The one refusal (exit 4) of everything a backup-only key must not do: read data, remove, sign."""
        if not self.keys.full:
            raise KeyNotAllowed(f"this key is backup-only: it can add images but not {action}")

    @classmethod
    def init(cls, where: str | os.PathLike | Storage, passphrase: PassphraseSource | None,
             encryption: str = "aes-256-gcm", chunk_size: int = DEFAULT_CHUNK_SIZE,
             zstd_level: int = 3, related_to: Repository | None = None, weak_passphrase: bool = False,
             append_only: bool = False, object_lock: tuple[str, int] | None = None,
             label: str = "init") -> Repository:
        """Create a repository at ``where``: a path, ``file://``, ``s3://`` or ``memory://`` URL, or a Storage.

        ``related_to``: the new repository shares that one's key bundle (chunk-id key, every
        generation's keys) and chunk size, under an id and a key slot of its own, so ``copy`` can move
        sealed chunks, data keys and image indexes between the two verbatim (FORMAT.md §2.1).
        ``label``: the first key slot's label (``key list`` shows it).
        ``object_lock`` = (mode, seconds): S3 Object Lock; the server must pass the lock probe
        before anything is written, and then every object is written with a retention date."""
        _check_init_options(encryption, chunk_size, zstd_level, related_to)
        storage = _storage(where, for_writing=True)
        if storage.exists(CONFIG_NAME):
            raise RepositoryExists(f"{storage.location} already holds a repository")
        if next((n for n in storage.list("") if not n.startswith(IGNORED_AT_INIT)), None) is not None:
            raise RepositoryExists(f"{storage.location} exists and is not empty",
                                   "choose a new or empty directory or prefix")
        probe = _check_object_lock(storage, object_lock) if object_lock else None
        forbid_core_dumps()
        config = RepoConfig.new(os.urandom(16).hex(), chunk_size, encryption, zstd_level)
        if related_to is not None:
            related_to.require_full_key("make a related repository")
            keys = dataclasses.replace(related_to.keys, repo_id=bytes.fromhex(config.id))
        else:
            keys = KeyBundle.generate(bytes.fromhex(config.id))
        config.append_only = append_only
        if object_lock:
            config.object_lock = {"mode": object_lock[0], "seconds": int(object_lock[1])}
            storage.use_object_lock(object_lock[0], int(object_lock[1]))   # type: ignore[attr-defined]
        secret = passphrase() if encryption != "none" else None
        if secret is not None:
            refuse_weak_passphrase(secret, weak_passphrase)
        slot = new_slot_id()
        slot_doc = make_slot(keys, secret, slot, label, signer=keys)
        with interrupts.deferred():   # a few small writes: a repository is made whole or not begun
            storage.prepare(FOLDERS)
            storage.put(slot_name(slot), encode_slot(slot_doc))
            put_reserve(storage)
            repo = cls(storage, config, keys, storage.location, slot)
            repo.catalog.append([{"event": "created"}, {"event": "append_only", "value": append_only},
                                 *([{"event": "lock_probe", "result": probe}] if probe else [])])
            storage.put(CONFIG_NAME, config.to_bytes(keys))  # last: a repository exists once it is there
            interrupts.set_status(f"the repository {storage.location} was created")
        return repo

    @classmethod
    def open(cls, where: str | os.PathLike | Storage, passphrase: PassphraseSource,
             for_writing: bool = False) -> Repository:
        """Open the repository at ``where`` with whichever key slot the passphrase opens (FORMAT.md
        2.1); ``for_writing`` lets the backend check, once, that it can keep the repository's promises
        (S3: that the server honours create-if-absent)."""
        from imgbackup.repository.keyslots import unlock

        storage = _storage(where, for_writing)
        doc, signature = _read_config(storage)
        forbid_core_dumps()
        try:
            keys, slot, unwrapped = unlock(storage, doc, signature, passphrase)
        except WrongPassphrase as exc:
            audit.emit("passphrase_failed", "failed", repository=doc["id"], location=storage.location, error=str(exc))
            raise
        if (doc.get("encryption") == "none") != unwrapped:
            raise IntegrityError(f"key slot {slot} does not match the config's encryption "
                                 "(replaced or tampered with)")
        return cls._opened(storage, doc, keys, slot, for_writing)

    @classmethod
    def open_with_bundle(cls, where: str | os.PathLike | Storage, keys: KeyBundle,
                         for_writing: bool = False) -> Repository:
        """Open with a key bundle in hand (a paper recovery sheet), no key slot involved."""
        storage = _storage(where, for_writing)
        doc, signature = _read_config(storage)
        forbid_core_dumps()
        check_config(doc, signature, keys)
        return cls._opened(storage, doc, keys, None, for_writing)

    @classmethod
    def _opened(cls, storage: Storage, doc: dict, keys: KeyBundle, slot: str | None, for_writing: bool) -> Repository:
        config = RepoConfig.from_document(doc)     # only now: the signature covered every field
        if config.object_lock:
            use = getattr(storage, "use_object_lock", None)
            if use is not None:
                use(config.object_lock["mode"], config.object_lock["seconds"])
            elif for_writing:
                raise UsageError(f"the repository at {storage.location} is kept under S3 Object Lock, which this "
                                 "storage cannot apply", "write to it only at its S3 bucket")
        return cls(storage, config, keys, storage.location, slot)

    def is_related(self, other: Repository) -> bool:
        """Whether ``other`` holds the same key material and chunk size (``init --related-to``): its
        sealed chunks and image indexes then authenticate here unchanged."""
        mine, theirs = self.keys.to_bytes(), dataclasses.replace(other.keys, repo_id=self.keys.repo_id).to_bytes()
        return (self.chunk_size == other.chunk_size and self.config.encryption == other.config.encryption
                and self.keys.kind == other.keys.kind and hmac.compare_digest(mine, theirs))

    def _store_data_key(self, key_id: int, blob: bytes) -> bool:
        name = data_key_name(key_id)
        if not self.storage.create(name, blob):
            return False
        confirm_stored(self.storage, name, len(blob))
        return True

    def access_warnings(self) -> list[str]:
        """What the storage finds too open about the key material (a local directory's modes)."""
        check = getattr(self.storage, "access_warnings", None)
        return check() if check is not None else []

    def data_key_object(self, key_id: int) -> bytes:
        """The stored (sealed) data-key object, for copying it verbatim to a related repository."""
        return self._fetch_data_key(key_id)

    def adopt_data_key(self, key_id: int, blob: bytes) -> None:
        """Store a data-key object copied from a related repository (kept if already there)."""
        if not self.storage.create(data_key_name(key_id), blob) and self.storage.get(data_key_name(key_id)) != blob:
            raise IntegrityError(f"data key {key_id:016x} differs from the one the source holds")
        confirm_stored(self.storage, data_key_name(key_id), len(blob))

    def _fetch_data_key(self, key_id: int) -> bytes:
        try:
            return self.storage.get(data_key_name(key_id))
        except ObjectMissing:
            raise IntegrityError(f"data key {key_id:016x} is missing (its chunks cannot be opened)") from None

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

    def chunk_index(self, for_backup: bool = False, from_repository: bool = False,
                    list_packs: bool = False) -> ChunkIndex:
        """The chunk index without the copies damage records name (loaded once, then cached).

        ``from_repository`` (verify): every index file is read and checked, never the local cache,
        which would hide a file damaged since it was cached.

        ``for_backup``: a backup dedups against this index, so every damage record must be readable
        and the copies a collection marked as candidates are left out (docs/FORMAT.md section 16: the
        marks are read first). Whether the packs it then uses exist is checked by the backup, for
        those packs only (packcheck.py), never by listing every host's packs here.

        ``list_packs`` (copy, which lists them anyway): also without the copies in packs absent from
        one listing of packs/, taken after the listing of index/ (``listed_packs`` keeps it)."""
        if (self._chunks is None or (for_backup and not self._chunks_for_backup) or from_repository
                or (list_packs and self._chunks.listed_packs is None)):
            self._chunks = self._load_chunk_index(for_backup, from_repository, list_packs)
            self._chunks_for_backup = for_backup
        return self._chunks

    def fresh_chunk_index(self) -> ChunkIndex:
        """The index as it is now, filtered as for a backup; the one ``chunk_index`` keeps is left as
        it is (a backup holds it, with its own copies and exclusions)."""
        return self._load_chunk_index(True, False)

    def _load_chunk_index(self, for_backup: bool, from_repository: bool, list_packs: bool = False) -> ChunkIndex:
        from imgbackup.repository.chunkindex import ChunkIndex  # numpy: not for commands that never need it
        from imgbackup.repository.marks import load_marks, marked_copies

        cache = None if from_repository else self.index_cache()
        marked = marked_copies(load_marks(self.storage, self.envelope)) if for_backup else None
        damage = DamageLog.load(self.storage, self.envelope, strict=for_backup)
        packs = (lambda: set(self.storage.list("packs"))) if list_packs else None
        return ChunkIndex.load(self.storage, self.envelope, damage, packs, cache, marked)

    def reload_chunk_index(self) -> ChunkIndex:
        """Load the index afresh (after another process changed it); keeps the backup's filters if set."""
        for_backup = self._chunks is not None and self._chunks_for_backup
        self._chunks = None
        return self.chunk_index(for_backup=for_backup)

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

    # --- what may be removed ------------------------------------------------------------------

    def refuse_if_append_only(self, command: str) -> None:
        if self.config.append_only:
            raise AppendOnly(f"the repository is append-only: {command} refused")

    def held_images(self, view: CatalogView | None = None) -> dict[str, list[Hold]]:
        """Images under legal hold, and their holds (from the hold records and the catalog log)."""
        view = view or self.catalog.view()
        return holds_in_force(self.holds, view.state.holds)

    def remove_images(self, image_ids: list[str], event: str, view: CatalogView | None = None) -> list[str]:
        """Remove images for good: refused (nothing removed) when one is held; the catalog records the
        removal (that is the commit point), then the indexes go. Returns the ids whose index the
        storage retained (Object Lock): a later prune, delete or compact removes them."""
        self.require_full_key("remove images")
        held = self.held_images(view)
        for image_id in image_ids:
            if image_id in held:
                hold = held[image_id][0]
                by = f", placed by {hold.user} on {hold.host}" if hold.user else ""
                raise ImageHeld(f"image {image_id[:12]} is under legal hold ({hold.reason}{by}); "
                                "nothing was removed")
        events = []
        for image_id in image_ids:
            event_doc = {"event": event, "image": image_id}
            with contextlib.suppress(ImageNotFound, IntegrityError, UnsupportedFormat):
                event_doc["name"] = str(self.images.read_meta(image_id).get("name"))
            events.append(event_doc)
        for start in range(0, len(events), REMOVALS_PER_ENTRY):
            self.catalog.append(events[start : start + REMOVALS_PER_ENTRY])
        return self.delete_image_objects(image_ids)

    def delete_image_objects(self, image_ids: list[str]) -> list[str]:
        """Delete image indexes whose removal the log holds; the ids the storage retained."""
        retained = []
        for image_id in image_ids:
            try:
                self.images.delete(image_id)
            except ObjectRetained:
                retained.append(image_id)
        return retained

    def pending_removals(self, view: CatalogView) -> list[str]:
        """Images the log records as removed whose index is still there (a remover was interrupted,
        or Object Lock retained the index): the next remover deletes them."""
        removed = {i for i, r in view.state.images.items() if r["status"] == "removed"}
        return [i for i in self.images.ids() if i in removed]

    def set_append_only(self, value: bool) -> None:
        """Turn append-only on or off. The order makes an interrupted change harmless: on = the config
        first, then the log; off = the log first, then the config (verify flags a log that says on
        beside a config that says off)."""
        self.require_full_key("change the repository config")
        self.config.append_only = value
        if value:
            self.storage.put(CONFIG_NAME, self.config.to_bytes(self.keys))
            self.catalog.append([{"event": "append_only", "value": True}])
        else:
            self.catalog.append([{"event": "append_only", "value": False}])
            self.storage.put(CONFIG_NAME, self.config.to_bytes(self.keys))

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


def encode_slot(doc: dict) -> bytes:
    return json.dumps(doc, indent=1, sort_keys=True).encode() + b"\n"


def _read_config(storage: Storage) -> tuple[dict, str]:
    """The config document and its signature, not yet checked against a key."""
    root = getattr(storage, "root", None)   # a local directory: naming a file is "no repository" (3)
    if isinstance(root, os.PathLike) and os.path.exists(root) and not os.path.isdir(root):
        raise RepositoryNotFound(f"{root} is a file, not a repository directory")
    try:
        raw = storage.get(CONFIG_NAME)
    except ObjectMissing:
        raise RepositoryNotFound(f"no imgbackup repository at {storage.location}") from None
    return peek_config(raw)


def refuse_weak_passphrase(secret: bytes, weak_ok: bool) -> None:
    """A new passphrase (init, key add, key passwd) of fewer than MIN_PASSPHRASE_LENGTH characters is
    refused unless the user said --weak-passphrase."""
    if not weak_ok and len(secret.decode(errors="replace")) < MIN_PASSPHRASE_LENGTH:
        raise UsageError(f"the passphrase is shorter than {MIN_PASSPHRASE_LENGTH} characters",
                         "choose a longer one, or pass --weak-passphrase to accept it")


def _check_init_options(encryption: str, chunk_size: int, zstd_level: int, related_to: Repository | None) -> None:
    if related_to is not None and (chunk_size != related_to.chunk_size
                                   or encryption != related_to.config.encryption):
        raise UsageError("a related repository has the chunk size and encryption of the one it is "
                         f"related to ({related_to.chunk_size} bytes, {related_to.config.encryption})",
                         "leave out --chunk-size and --encryption with --related-to")
    if encryption not in ENCRYPTIONS:
        raise UsageError(f"unknown encryption {encryption!r}; choose one of {', '.join(ENCRYPTIONS)}")
    if not (MIN_CHUNK <= chunk_size <= MAX_CHUNK) or chunk_size & (chunk_size - 1):
        raise UsageError(f"chunk size must be a power of two from {MIN_CHUNK} to {MAX_CHUNK}")
    if not 1 <= zstd_level <= 22:
        raise UsageError("zstd level must be 1..22")
