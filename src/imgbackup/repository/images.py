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
from dataclasses import dataclass
from typing import TYPE_CHECKING

from imgbackup.errors import ImageNotFound, IntegrityError, StorageError, UnsupportedFormat
from imgbackup.format.imageheader import parse_header
from imgbackup.format.layout import (
    FORMAT_VERSION,
    IMAGE_HEAD,
    IMAGE_MAGIC,
    OBJ_IMAGE_BODY,
    OBJ_IMAGE_HEADER,
)
from imgbackup.repository.catalog import Catalog
from imgbackup.repository.storage import ObjectMissing, Storage, confirm_stored

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
    def __init__(self, storage: Storage, envelope: Envelope, catalog: Catalog | None = None) -> None:
        self.storage = storage
        self.envelope = envelope
        self.catalog = catalog

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
        if self.catalog is not None:
            self.catalog.append([{"event": "added", "image": index.id, "name": name,
                                  "created": float(index.meta["created"]), "type": str(index.meta.get("type"))}])
        return len(data)

    def ids(self) -> list[str]:
        return [n.rsplit("/", 1)[1] for n in self.storage.list("images")]

    def _head(self, image_id: str, raw: bytes) -> int:
        if len(raw) < IMAGE_HEAD.size:
            raise IntegrityError(f"image {image_id} is truncated")
        magic, version, header_len = IMAGE_HEAD.unpack_from(raw)
        if magic != IMAGE_MAGIC:
            raise IntegrityError(f"image {image_id} has a bad magic number")
        if version != FORMAT_VERSION:
            raise UnsupportedFormat(f"image {image_id} has unsupported format version {version}")
        return header_len

    def read_meta(self, image_id: str) -> dict:
        name = image_name(image_id)
        try:
            header_len = self._head(image_id, self.storage.get_range(name, 0, IMAGE_HEAD.size))
            sealed = self.storage.get_range(name, IMAGE_HEAD.size, header_len)
        except ObjectMissing:
            raise ImageNotFound(f"image {image_id} does not exist") from None
        plain = self.envelope.open(OBJ_IMAGE_HEADER, bytes.fromhex(image_id), sealed, f"image {image_id} header")
        return parse_header(plain, image_id)

    def load(self, image_id: str) -> ImageIndex:
        from imgbackup.format.imageindex import parse_body

        try:
            raw = self.storage.get(image_name(image_id))
        except ObjectMissing:
            raise ImageNotFound(f"image {image_id} does not exist") from None
        header_len = self._head(image_id, raw)
        oid = bytes.fromhex(image_id)
        split = IMAGE_HEAD.size + header_len
        meta = parse_header(self.envelope.open(OBJ_IMAGE_HEADER, oid, raw[IMAGE_HEAD.size:split],
                                               f"image {image_id} header"), image_id)
        body = self.envelope.open(OBJ_IMAGE_BODY, oid, raw[split:], f"image {image_id} index")
        return parse_body(meta, body)

    def entries(self) -> list[ImageEntry]:
        """Every image, oldest first; damaged ones carry their error instead of metadata."""
        out = []
        for image_id in self.ids():
            try:
                out.append(ImageEntry(image_id, self.read_meta(image_id)))
            except (IntegrityError, UnsupportedFormat) as exc:
                out.append(ImageEntry(image_id, None, str(exc)))
        return sorted(out, key=lambda e: (e.meta or {}).get("created", 0.0))

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
