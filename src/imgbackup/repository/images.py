"""The images: writing, listing, loading, naming and deleting image indexes.

An image object is written in one atomic put after all the chunks it names are stored and
indexed, so a half-written image never exists. The catalog log (catalog.py) records it twice:
announced (``adding``) before the put, confirmed (``added``) once the storage holds it — so an
image present that the log never announced was put there by something other than imgbackup.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

from imgbackup.errors import ImageNotFound, IntegrityError, StorageError, UnsupportedFormat
from imgbackup.format.imageheader import MAX_HEADER_SIZE, parse_header
from imgbackup.format.layout import (
    FORMAT_VERSION,
    IMAGE_HEAD,
    IMAGE_MAGIC,
    OBJ_IMAGE_BODY,
    OBJ_IMAGE_HEADER,
)
from imgbackup.format.validate import is_hex
from imgbackup.repository.catalog import Catalog
from imgbackup.repository.localcache import BodyCache, HeaderCache
from imgbackup.repository.storage import ObjectMissing, Storage, confirm_stored

HEADER_READ = 8 << 10   # the first ranged read of an image: its fixed head and, nearly always, the whole header

if TYPE_CHECKING:   # numpy (through imageindex) and the crypto stack load only when used
    from imgbackup.crypto.envelope import Envelope
    from imgbackup.format.imageindex import ImageIndex


def image_name(image_id: str) -> str:
    return f"images/{image_id}"


def series_tag(id_key: bytes, hostname: str, name: str) -> str:
    """The last 8 hex digits of the ids of one host's images of one source name: a keyed hash, so
    the listing of images/ shows a backup its own series without reading another host's image (and
    shows no one else which images belong together)."""
    msg = b"imgbackup-series\0" + hostname.encode() + b"\0" + name.encode()
    return hmac.digest(id_key, msg, hashlib.sha256)[:4].hex()


@dataclass
class ImageEntry:
    """One image in a listing: its metadata, or the error that kept it from being read."""

    id: str
    meta: dict | None
    error: str | None = None


class ImageStore:
    """``cache`` (optional) keeps sealed headers locally, ``bodies`` sealed bodies: they are
    immutable, and a listing of a bucket would otherwise fetch every one of them (localcache.py)."""

    def __init__(self, storage: Storage, envelope: Envelope, catalog: Catalog | None = None,
                 cache: HeaderCache | None = None, bodies: BodyCache | None = None) -> None:
        self.storage = storage
        self.envelope = envelope
        self.catalog = catalog
        self.cache = cache
        self.bodies = bodies

    def write(self, index: ImageIndex) -> int:
        oid = bytes.fromhex(index.id)
        body = index.body_bytes()
        header = index.header_bytes(body)
        sealed_header = self.envelope.seal(OBJ_IMAGE_HEADER, oid, header)
        sealed_body = self.envelope.seal(OBJ_IMAGE_BODY, oid, body)
        data = IMAGE_HEAD.pack(IMAGE_MAGIC, FORMAT_VERSION, len(sealed_header)) + sealed_header + sealed_body
        name = str(index.meta.get("name"))
        if self.catalog is not None:
            self.catalog.append([{"event": "adding", "image": index.id, "name": name}])
        self.storage.put(image_name(index.id), data)
        confirm_stored(self.storage, image_name(index.id), len(data))
        if self.cache is not None:
            self.cache.put(index.id, sealed_header)
            self.cache.save()
        if self.catalog is not None:
            self.catalog.append([{"event": "added", "image": index.id, "name": name,
                                  "created": float(index.meta["created"]), "type": str(index.meta.get("type"))}])
        return len(data)

    def ids(self) -> list[str]:
        """Every image id stored; a name that is not one (32 lowercase hex) is listed too, and reads
        as damaged, so that nothing under images/ goes unnoticed."""
        return [n.rsplit("/", 1)[1] for n in self.storage.list("images")]

    def _check_id(self, image_id: str) -> bytes:
        if not is_hex(image_id, 16):
            raise IntegrityError(f"images/{image_id[:40]} is not an image index (its name is not 32 hex digits)")
        return bytes.fromhex(image_id)

    def _head(self, image_id: str, raw: bytes) -> int:
        if len(raw) < IMAGE_HEAD.size:
            raise IntegrityError(f"image {image_id} is truncated")
        magic, version, header_len = IMAGE_HEAD.unpack_from(raw)
        if magic != IMAGE_MAGIC:
            raise IntegrityError(f"image {image_id} has a bad magic number")
        if version != FORMAT_VERSION:
            raise UnsupportedFormat(f"image {image_id} has unsupported format version {version}")
        return header_len

    def _fetch_sealed_header(self, image_id: str) -> bytes:
        """The sealed header from the repository: one ranged read, two for a header past HEADER_READ."""
        name = image_name(image_id)
        self._check_id(image_id)
        try:
            first = self.storage.get_range(name, 0, HEADER_READ)
            header_len = self._head(image_id, first)
            end = IMAGE_HEAD.size + header_len
            if end <= len(first):
                return first[IMAGE_HEAD.size:end]
            return first[IMAGE_HEAD.size:] + self.storage.get_range(name, len(first), end - len(first))
        except ObjectMissing:
            raise ImageNotFound(f"image {image_id} does not exist") from None

    def _open_header(self, image_id: str, sealed: bytes) -> dict:
        plain = self.envelope.open(OBJ_IMAGE_HEADER, self._check_id(image_id), sealed, f"image {image_id} header",
                                   max_size=MAX_HEADER_SIZE)
        return parse_header(plain, image_id)

    def read_meta(self, image_id: str) -> dict:
        """An image's header, from the local cache when it holds it (authenticated again) or the repository."""
        cached = self.cache.get(image_id) if self.cache is not None else None
        if cached is not None:
            try:
                return self._open_header(image_id, cached)
            except (IntegrityError, UnsupportedFormat):
                self.cache.drop(image_id)   # a damaged cache entry: fetch it again
        sealed = self._fetch_sealed_header(image_id)
        meta = self._open_header(image_id, sealed)
        if self.cache is not None:
            self.cache.put(image_id, sealed)
        return meta

    def load(self, image_id: str) -> ImageIndex:
        return self.load_raw(image_id)[1]

    def load_raw(self, image_id: str) -> tuple[bytes, ImageIndex]:
        """The image object's exact bytes and its parsed, authenticated index (from the repository)."""
        try:
            raw = self.storage.get(image_name(image_id))
        except ObjectMissing:
            raise ImageNotFound(f"image {image_id} does not exist") from None
        header_len = self._head(image_id, raw)
        split = IMAGE_HEAD.size + header_len
        return raw, self._open_index(image_id, raw[IMAGE_HEAD.size:split], raw[split:])

    def _open_index(self, image_id: str, sealed_header: bytes, sealed_body: bytes) -> ImageIndex:
        from imgbackup.format.imageindex import body_size_limit, parse_body

        meta = self._open_header(image_id, sealed_header)
        body = self.envelope.open(OBJ_IMAGE_BODY, self._check_id(image_id), sealed_body, f"image {image_id} index",
                                  max_size=body_size_limit(meta))
        return parse_body(meta, body)

    def load_cached(self, image_id: str) -> tuple[ImageIndex, int]:
        """The authenticated index and its object's size in bytes, from the local caches when they hold
        both parts (authenticated again, as from the repository; for stats and listings: verify and
        restore read the repository), else from the repository (and the caches filled)."""
        header = self.cache.get(image_id) if self.cache is not None and self.bodies is not None else None
        body = self.bodies.get(image_id) if header is not None else None
        if header is not None and body is not None:
            try:
                return self._open_index(image_id, header, body), IMAGE_HEAD.size + len(header) + len(body)
            except (IntegrityError, UnsupportedFormat):
                self.cache.drop(image_id)    # one part is damaged: fetch both again
                self.bodies.drop(image_id)
        raw, index = self.load_raw(image_id)
        if self.cache is not None and self.bodies is not None:
            split = IMAGE_HEAD.size + self._head(image_id, raw)
            self.cache.put(image_id, raw[IMAGE_HEAD.size:split])
            self.bodies.put(image_id, raw[split:])
        return index, len(raw)

    def save_cache(self) -> None:
        """Write the header cache if this process added to it (the body cache writes as it goes)."""
        if self.cache is not None:
            self.cache.save()

    def put_raw(self, image_id: str, raw: bytes) -> int:
        """Store an image object as it is (a copy into a related repository: it authenticates here,
        since the keys are the same); it must open here, or nothing is written."""
        from imgbackup.format.imageindex import body_size_limit

        header_len = self._head(image_id, raw)
        sealed_header = raw[IMAGE_HEAD.size:IMAGE_HEAD.size + header_len]
        meta = self._open_header(image_id, sealed_header)
        self.envelope.open(OBJ_IMAGE_BODY, self._check_id(image_id), raw[IMAGE_HEAD.size + header_len:],
                           f"image {image_id} index", max_size=body_size_limit(meta))
        name = str(meta.get("name"))
        if self.catalog is not None:   # the destination's own catalog records it, as write() does
            self.catalog.append([{"event": "adding", "image": image_id, "name": name}])
        self.storage.put(image_name(image_id), raw)
        confirm_stored(self.storage, image_name(image_id), len(raw))
        if self.cache is not None:
            self.cache.put(image_id, sealed_header)
            self.cache.save()
        if self.catalog is not None:
            self.catalog.append([{"event": "added", "image": image_id, "name": name,
                                  "created": float(meta["created"]), "type": str(meta.get("type"))}])
        return len(raw)

    def entries(self) -> list[ImageEntry]:
        """Every image, oldest first; damaged ones carry their error instead of metadata.

        Headers the cache lacks are fetched several at a time (the storage's read parallelism)."""
        ids = self.ids()
        if self.cache is not None:
            self.cache.keep_only(set(ids))
        if self.bodies is not None:
            self.bodies.keep_only(set(ids))

        def one(image_id: str) -> ImageEntry | None:
            try:
                return ImageEntry(image_id, self.read_meta(image_id))
            except ImageNotFound:
                return None   # deleted between list and read by a concurrent delete
            except (IntegrityError, UnsupportedFormat) as exc:
                return ImageEntry(image_id, None, str(exc))

        workers = min(getattr(self.storage, "read_parallelism", 1), len(ids))
        if workers > 1:
            with ThreadPoolExecutor(workers, thread_name_prefix="imgbackup-headers") as pool:
                out = list(pool.map(one, ids))
        else:
            out = [one(i) for i in ids]
        if self.cache is not None:
            self.cache.save()
        return sorted((e for e in out if e is not None), key=lambda e: (e.meta or {}).get("created", 0.0))

    def standing(self, entries: list[ImageEntry]) -> list[ImageEntry]:
        """``entries`` without the images the catalog log records as removed (an index Object Lock
        retains, or an interrupted removal): they are never ``latest`` nor a parent again."""
        removed = self.removed_ids()
        return [e for e in entries if e.id not in removed]

    def removed_ids(self) -> set[str]:
        """The images the catalog log records as removed (none without a catalog)."""
        if self.catalog is None:
            return set()
        return {i for i, r in self.catalog.view().state.images.items() if r["status"] == "removed"}

    def resolve(self, spec: str, name: str | None = None) -> str:
        """An image id from a unique id prefix, or ``latest`` (of source ``name`` if given; never an
        image the log records as removed)."""
        everything = self.entries()
        entries = [e for e in everything if e.meta is not None]
        if spec == "latest":
            entries = self.standing(entries)
            if name is not None:
                entries = [e for e in entries if e.meta.get("name") == name]
            if not entries:
                damaged = [e for e in everything if e.meta is None]
                if damaged:
                    raise IntegrityError(f"no readable image to call 'latest': {damaged[-1].error}")
                where = f" of source name {name!r}" if name else ""
                raise ImageNotFound(f"no image{where} in this repository")
            names = {e.meta.get("name") for e in entries}
            if name is None and len(names) > 1:
                raise ImageNotFound(f"'latest' is ambiguous: images of {len(names)} sources",
                                    f"pick one with --name ({', '.join(sorted(map(str, names)))})")
            return entries[-1].id
        spec = spec.lower()
        matches = [i for i in self.ids() if i.startswith(spec)]
        if not spec or not matches:
            raise ImageNotFound(f"no image matches {spec!r}")
        if len(matches) > 1:
            raise ImageNotFound(f"image id prefix {spec!r} is ambiguous ({len(matches)} images)",
                                "give more characters of the id")
        return matches[0]

    def latest_of(self, name: str, full_only: bool = False, hostname: str | None = None,
                  tag: str | None = None) -> dict | None:
        """Newest readable image of a source name (of ``hostname`` only, if given; optionally only
        full images; never an image the log records as removed): its metadata. With ``tag``
        (series_tag) only the headers of images whose id ends with it are read: a backup's work
        does not grow with other hosts' images."""
        removed = self.removed_ids()
        ids = [i for i in self.ids() if (tag is None or i.endswith(tag)) and i not in removed]
        found = []
        for image_id in ids:
            try:
                meta = self.read_meta(image_id)
            except (IntegrityError, UnsupportedFormat, ImageNotFound):
                continue
            if (meta.get("name") == name and (hostname is None or meta.get("hostname") == hostname)
                    and (not full_only or meta.get("type") == "full")):
                found.append(meta)
        return max(found, key=lambda m: m.get("created", 0.0)) if found else None

    def withdraw(self, image_id: str, name: str) -> None:
        """Take back an image this process stored but may not commit (its backup's lease was lost): the
        log's ``withdrawn`` first (a removal: the index gone is then no problem, and an index left behind
        is a removal the next remover finishes), then the object, even when the log cannot be written."""
        if self.catalog is not None:
            with contextlib.suppress(StorageError, IntegrityError):
                self.catalog.append([{"event": "withdrawn", "image": image_id, "name": name}])
        self.delete(image_id)

    def delete(self, image_id: str) -> None:
        """Delete the object alone: for an image this process wrote and then gave up (a failed
        backup). Removing an image for good is ``Repository.remove_images`` (holds, the log)."""
        self.storage.delete(image_name(image_id))
        if self.bodies is not None:
            self.bodies.drop(image_id)
        if self.cache is not None:
            self.cache.drop(image_id)
            self.cache.save()
