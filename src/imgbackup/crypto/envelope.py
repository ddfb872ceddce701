"""The envelope: how one object (a chunk, an index, a trailer) is compressed, sealed and opened.

The associated data binds the envelope header and the object's id, so a blob moved to another
place, swapped with another, or relabelled as another type fails authentication.
"""

from __future__ import annotations

import hashlib
import os
import threading

import zstandard
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from imgbackup.errors import IntegrityError
from imgbackup.format.layout import (
    ALG_AES256GCM,
    ALG_NONE,
    COMP_NONE,
    COMP_ZSTD,
    ENVELOPE_HEADER,
    ENVELOPE_VERSION,
    TAG_SIZE,
)

MAX_OBJECT = 1 << 31   # refuse to decompress past 2 GiB: a bomb or a damaged length, never a real object


class Envelope:
    """Seals and opens objects with one repository's data key (thread-safe, reentrant)."""

    def __init__(self, enc_key: bytes | None, zstd_level: int = 3) -> None:
        self.alg = ALG_NONE if enc_key is None else ALG_AES256GCM
        self._aead = None if enc_key is None else AESGCM(enc_key)
        self.zstd_level = zstd_level
        self._local = threading.local()

    def _compressor(self) -> zstandard.ZstdCompressor:
        comp = getattr(self._local, "compressor", None)
        if comp is None:
            comp = self._local.compressor = zstandard.ZstdCompressor(level=self.zstd_level)
        return comp

    def _decompressor(self) -> zstandard.ZstdDecompressor:
        dec = getattr(self._local, "decompressor", None)
        if dec is None:
            dec = self._local.decompressor = zstandard.ZstdDecompressor()
        return dec

    def seal(self, obj_type: int, obj_id: bytes, plaintext, compress: bool = True) -> bytes:
        comp = COMP_NONE
        body = plaintext
        if compress:
            packed = self._compressor().compress(plaintext)
            if len(packed) < len(plaintext):
                body, comp = packed, COMP_ZSTD
        nonce = os.urandom(12) if self._aead else bytes(12)
        header = ENVELOPE_HEADER.pack(ENVELOPE_VERSION, obj_type, self.alg, comp, nonce)
        aad = header + obj_id
        if self._aead is None:
            return header + bytes(body) + hashlib.sha256(aad + bytes(body)).digest()
        return header + self._aead.encrypt(nonce, bytes(body), aad)

    def authenticate(self, obj_type: int, obj_id: bytes, blob: bytes, what: str) -> tuple[int, bytes]:
        """Check the envelope and return (compression, payload) without decompressing."""
        if len(blob) < ENVELOPE_HEADER.size + TAG_SIZE.get(self.alg, 16):
            raise IntegrityError(f"{what} is truncated")
        version, otype, alg, comp, nonce = ENVELOPE_HEADER.unpack_from(blob)
        if version != ENVELOPE_VERSION or alg != self.alg or otype != obj_type or comp > COMP_ZSTD:
            raise IntegrityError(f"{what} has an invalid envelope header")
        header = blob[: ENVELOPE_HEADER.size]
        aad = header + obj_id
        if self._aead is None:
            body, digest = blob[ENVELOPE_HEADER.size : -32], blob[-32:]
            if hashlib.sha256(aad + body).digest() != digest:
                raise IntegrityError(f"{what} failed its checksum")
            return comp, body
        try:
            return comp, self._aead.decrypt(nonce, blob[ENVELOPE_HEADER.size :], aad)
        except InvalidTag:
            raise IntegrityError(f"{what} failed authentication (corrupted or tampered with)") from None

    def open(self, obj_type: int, obj_id: bytes, blob: bytes, what: str, max_size: int = MAX_OBJECT) -> bytes:
        comp, payload = self.authenticate(obj_type, obj_id, blob, what)
        if comp == COMP_NONE:
            return payload
        try:
            return self._decompressor().decompress(payload, max_output_size=max_size)
        except zstandard.ZstdError as exc:
            raise IntegrityError(f"{what} does not decompress: {exc}") from None
