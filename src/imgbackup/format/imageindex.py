"""The image index: one slot per chunk of the source (zero, data or unused) plus metadata.

The body holds ``kinds`` (one byte per slot), the ids of the data slots in slot order, and the
changed-slot bitmap against the parent. The header is JSON metadata that also carries the SHA-256
of the body, so neither half can be swapped for another image's.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

import numpy as np

from imgbackup.errors import IntegrityError
from imgbackup.format.imageheader import bad_ranges, parse_header  # noqa: F401 - re-exported
from imgbackup.format.layout import (
    FORMAT_VERSION,
    ID_SIZE,
    IMAGE_BODY_HEAD,
    IMAGE_BODY_MAGIC,
    SLOT_DATA,
    SLOT_UNUSED,
)
from imgbackup.format.validate import damaged, need_bytes


@dataclass
class ImageIndex:
    meta: dict
    kinds: np.ndarray                     # uint8[slots]
    ids: np.ndarray                       # uint8[data slots, 32]
    changed: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint8))  # packed bits

    @property
    def id(self) -> str:
        return self.meta["id"]

    @property
    def chunk_size(self) -> int:
        return int(self.meta["chunk_size"])

    @property
    def slots(self) -> int:
        return len(self.kinds)

    @property
    def size(self) -> int:
        return int(self.meta["source"]["size"])

    def data_slot_numbers(self) -> np.ndarray:
        """Slot numbers of the data slots, in the order of ``ids``."""
        return np.flatnonzero(self.kinds == SLOT_DATA)

    def ids_by_slot(self) -> np.ndarray:
        """A read-only (slots, 32) array: the id of each data slot, zeros elsewhere.

        Built once per index (32 MiB for a 1 TiB image): a backup asks for its parent's several times.
        """
        cached = getattr(self, "_ids_by_slot", None)
        if cached is None or len(cached) != self.slots:
            cached = np.zeros((self.slots, ID_SIZE), np.uint8)
            cached[self.kinds == SLOT_DATA] = self.ids
            cached.setflags(write=False)
            self._ids_by_slot = cached
        return cached

    def slot_length(self, slot: int) -> int:
        return min(self.chunk_size, self.size - slot * self.chunk_size)

    def unique_ids(self) -> set[bytes]:
        return {bytes(row) for row in self.ids}

    def content_digest(self) -> str:
        """SHA-256 over size, chunk size, slot kinds and data ids: what the image's bytes are."""
        h = hashlib.sha256()
        h.update(self.size.to_bytes(8, "little") + self.chunk_size.to_bytes(4, "little"))
        h.update(np.where(self.kinds == SLOT_UNUSED, 0, self.kinds).astype(np.uint8).tobytes())
        h.update(self.ids.tobytes())
        return h.hexdigest()

    def body_bytes(self) -> bytes:
        head = IMAGE_BODY_HEAD.pack(IMAGE_BODY_MAGIC, FORMAT_VERSION, self.chunk_size, self.slots)
        return b"".join((head, self.kinds.tobytes(), self.ids.tobytes(), self.changed.tobytes()))

    def header_bytes(self, body: bytes) -> bytes:
        meta = dict(self.meta, body_sha256=hashlib.sha256(body).hexdigest(),
                    content_digest=self.content_digest())
        self.meta = meta
        return json.dumps(meta, sort_keys=True, separators=(",", ":")).encode()


def body_size_limit(meta: dict) -> int:
    """The most bytes a body of this (checked) header can hold: what decompressing it may produce."""
    slots = int(meta["slots"])
    return IMAGE_BODY_HEAD.size + slots * (1 + ID_SIZE) + (slots + 7) // 8


def parse_body(meta: dict, body: bytes) -> ImageIndex:
    """The body of an image whose header ``parse_header`` checked: every length against the bytes
    present before an array is made, kinds, bitmap padding, slot count and content digest."""
    image_id = meta["id"]
    what = f"image {image_id} index body"
    if hashlib.sha256(body).hexdigest() != meta["body_sha256"]:
        raise IntegrityError(f"image {image_id}: index body does not match its header digest")
    if len(body) < IMAGE_BODY_HEAD.size:
        raise IntegrityError(f"image {image_id}: index body is truncated")
    magic, version, chunk_size, slots = IMAGE_BODY_HEAD.unpack_from(body)
    if magic != IMAGE_BODY_MAGIC or version != FORMAT_VERSION or chunk_size != meta["chunk_size"]:
        raise IntegrityError(f"image {image_id}: index body has a bad header")
    if slots != meta["slots"]:
        raise IntegrityError(f"image {image_id}: index has {slots} slots, expected {meta['slots']}")
    pos = IMAGE_BODY_HEAD.size
    end = need_bytes(body, pos, slots, 1, what, "slot kinds")
    kinds = np.frombuffer(body, np.uint8, slots, pos).copy()
    if kinds.max(initial=0) > SLOT_UNUSED:
        raise IntegrityError(f"image {image_id}: index has an invalid slot kind")
    n_data = int(np.count_nonzero(kinds == SLOT_DATA))
    pos, end = end, need_bytes(body, end, n_data, ID_SIZE, what, "chunk ids")
    ids = np.frombuffer(body, np.uint8, n_data * ID_SIZE, pos).reshape(n_data, ID_SIZE).copy()
    bitmap = (slots + 7) // 8
    if len(body) != end + bitmap:
        raise damaged(what, f"its changed-slot bitmap is {len(body) - end} bytes, not {bitmap}")
    changed = np.frombuffer(body, np.uint8, bitmap, end).copy()
    if slots % 8 and int(changed[-1]) >> (slots % 8):
        raise damaged(what, "padding bits of its changed-slot bitmap are set")
    index = ImageIndex(meta, kinds, ids, changed)
    if index.content_digest() != meta["content_digest"]:
        raise IntegrityError(f"image {image_id}: index content digest mismatch")
    return index
