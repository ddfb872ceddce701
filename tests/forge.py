"""The attacker's tools for an ``--encryption none`` repository: open and re-seal its objects with
checksums recomputed, so a structurally wrong object still authenticates (issue 9 §8).

Written from docs/FORMAT.md (sections 3, 5, 6, 7); it uses imgbackup only for the layout constants.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import zstandard

from imgbackup.format.layout import (
    CHUNK_INDEX_HEAD,
    ENVELOPE_HEADER,
    ENVELOPE_VERSION,
    IMAGE_HEAD,
    OBJ_CHUNK_INDEX,
    OBJ_IMAGE_BODY,
    OBJ_IMAGE_HEADER,
    OBJ_PACK_TRAILER,
    PACK_FOOTER,
)


def _version_of(head: bytes) -> int:
    """The image head's version field, kept as the repository wrote it."""
    return IMAGE_HEAD.unpack_from(head)[1]


def unseal(blob: bytes) -> tuple[int, int, bytes]:
    """(object type, compression, plaintext) of an algorithm-0 envelope (decompressed if zstd)."""
    _version, otype, alg, comp, _key_id, _nonce = ENVELOPE_HEADER.unpack_from(blob)
    assert alg == 0, "forging needs an --encryption none repository"
    payload = blob[ENVELOPE_HEADER.size:-32]
    if comp == 1:
        payload = zstandard.ZstdDecompressor().decompress(payload)
    return otype, comp, payload


def seal(obj_type: int, obj_id: bytes, payload: bytes, comp: int = 0, base_id: bytes = b"",
         alg: int = 0, nonce: bytes = bytes(12)) -> bytes:
    """An envelope whose trailer is the SHA-256 anyone can compute (``payload`` as given)."""
    header = ENVELOPE_HEADER.pack(ENVELOPE_VERSION, obj_type, alg, comp, 0, nonce)
    return header + payload + hashlib.sha256(header + obj_id + base_id + payload).digest()


def zstd_frame_claiming(size: int) -> bytes:
    """A tiny zstd frame whose header declares ``size`` bytes of content (a decompression bomb's lie)."""
    return b"\x28\xb5\x2f\xfd" + bytes([0xE0]) + struct.pack("<Q", size) + bytes([1, 0, 0])


class ForgedImage:
    """One image index, split open: ``meta`` (header JSON) and ``body`` (plaintext), re-sealed by ``save``."""

    def __init__(self, repo: Path, image_id: str) -> None:
        self.path = repo / "images" / image_id
        self.oid = bytes.fromhex(image_id)
        raw = self.path.read_bytes()
        _magic, _version, hlen = IMAGE_HEAD.unpack_from(raw)
        self.head = raw[:IMAGE_HEAD.size]
        self.header_raw = unseal(raw[IMAGE_HEAD.size:IMAGE_HEAD.size + hlen])[2]
        self.meta = json.loads(self.header_raw)
        self.body = unseal(raw[IMAGE_HEAD.size + hlen:])[2]

    def save(self, header: bytes | None = None, body_sealed: bytes | None = None,
             fix_digests: bool = True) -> None:
        """Write back; the body's SHA-256 in the header is recomputed unless told not to."""
        if header is None:
            meta = self.meta
            if fix_digests and isinstance(meta, dict):
                meta = dict(meta, body_sha256=hashlib.sha256(self.body).hexdigest())
            header = json.dumps(meta, sort_keys=True, separators=(",", ":")).encode()
        sealed_header = seal(OBJ_IMAGE_HEADER, self.oid, header)
        sealed_body = body_sealed if body_sealed is not None else seal(OBJ_IMAGE_BODY, self.oid, self.body)
        self.path.write_bytes(struct.pack("<8sHxxI", self.head[:8], _version_of(self.head), len(sealed_header))
                              + sealed_header + sealed_body)


def forge_chunk_index(repo: Path, mutate) -> Path:
    """Apply ``mutate(plaintext) -> plaintext`` to the (only) chunk-index file and re-seal it."""
    path = sorted((repo / "index").iterdir())[0]
    plain = unseal(path.read_bytes())[2]
    path.write_bytes(seal(OBJ_CHUNK_INDEX, bytes.fromhex(path.name), mutate(plain)))
    return path


def chunk_index_counts(plain: bytes) -> tuple[int, int, int]:
    _m, _v, packs, entries, deltas = CHUNK_INDEX_HEAD.unpack_from(plain)
    return packs, entries, deltas


def forge_pack_trailer(pack: Path, mutate) -> None:
    """Apply ``mutate(trailer plaintext) -> plaintext`` to a pack's trailer, re-seal it, fix the footer."""
    raw = pack.read_bytes()
    t_off, t_len, _magic = PACK_FOOTER.unpack_from(raw, len(raw) - PACK_FOOTER.size)
    plain = unseal(raw[t_off:t_off + t_len])[2]
    sealed = seal(OBJ_PACK_TRAILER, bytes.fromhex(pack.name), mutate(plain))
    pack.write_bytes(raw[:t_off] + sealed + PACK_FOOTER.pack(t_off, len(sealed), b"PEND"))
