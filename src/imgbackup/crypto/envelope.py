"""The envelope: how one object (a chunk, an index, a trailer) is compressed, sealed and opened.

The associated data binds the envelope header and the object's id (and a delta's base id), so a
blob moved to another place, swapped with another, relabelled as another type or pointed at
another base fails authentication. The header's key id names the data key (0: the repository's
own); later per-session data keys get other ids without another format change.
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
    COMP_ZSTD_DELTA,
    ENVELOPE_HEADER,
    ENVELOPE_VERSION,
    ID_SIZE,
    KEY_ID_REPOSITORY,
    OBJ_CHUNK,
    TAG_SIZE,
)
from imgbackup.format.validate import decompress

MAX_OBJECT = 1 << 31   # refuse to decompress past 2 GiB: a bomb or a damaged length, never a real object
# zstd levels below 3 ("fast") found almost nothing in a 1 MiB base: on the benchmark's change set
# 238 deltas took 39.3 MiB at level 1 and 0.30 MiB at level 3, so deltas use at least level 3.
MIN_DELTA_LEVEL = 3
# A delta this much smaller than its plaintext is kept without trying a plain frame (most are: the
# 238 above averaged 1.3 KB per 1 MiB chunk; a plain frame beats 1/32 only for chunks that compress
# over 32:1); a larger one must beat the plain frame by 10 %, else the chunk is stored whole.
DELTA_SURE_FRACTION = 1 / 32
DELTA_MIN_GAIN = 0.9


def _raw_dict(base) -> zstandard.ZstdCompressionDict:
    return zstandard.ZstdCompressionDict(bytes(base), dict_type=zstandard.DICT_TYPE_RAWCONTENT)


class Envelope:
    """Seals and opens objects with one repository's data key (thread-safe, reentrant)."""

    def __init__(self, enc_key: bytes | None, zstd_level: int = 3) -> None:
        self.alg = ALG_NONE if enc_key is None else ALG_AES256GCM
        self._aead = None if enc_key is None else AESGCM(enc_key)
        self.zstd_level = zstd_level
        self.key_id = KEY_ID_REPOSITORY
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
        return self._seal(obj_type, obj_id, comp, body)

    def seal_chunk(self, chunk_id: bytes, plaintext, base: tuple[bytes, bytes] | None = None
                   ) -> tuple[bytes, bytes | None]:
        """Seal a data chunk, as a delta against ``base`` = (base id, base plaintext) where that pays.

        Returns the blob and the base id it depends on (None when stored whole).
        """
        if base is not None:
            base_id, base_plain = base
            level = max(self.zstd_level, MIN_DELTA_LEVEL)
            delta = zstandard.ZstdCompressor(level=level, dict_data=_raw_dict(base_plain)).compress(plaintext)
            if len(delta) <= len(plaintext) * DELTA_SURE_FRACTION:
                return self._seal(OBJ_CHUNK, chunk_id, COMP_ZSTD_DELTA, delta, base_id), base_id
            plain = self._compressor().compress(plaintext)
            if len(delta) < DELTA_MIN_GAIN * min(len(plain), len(plaintext)):
                return self._seal(OBJ_CHUNK, chunk_id, COMP_ZSTD_DELTA, delta, base_id), base_id
            if len(plain) < len(plaintext):
                return self._seal(OBJ_CHUNK, chunk_id, COMP_ZSTD, plain), None
            return self._seal(OBJ_CHUNK, chunk_id, COMP_NONE, plaintext), None
        return self.seal(OBJ_CHUNK, chunk_id, plaintext), None

    def _seal(self, obj_type: int, obj_id: bytes, comp: int, body, base_id: bytes = b"") -> bytes:
        nonce = os.urandom(12) if self._aead else bytes(12)
        header = ENVELOPE_HEADER.pack(ENVELOPE_VERSION, obj_type, self.alg, comp, self.key_id, nonce)
        aad = header + obj_id + base_id
        if self._aead is None:
            return header + bytes(body) + hashlib.sha256(aad + bytes(body)).digest()
        return header + self._aead.encrypt(nonce, bytes(body), aad)

    def authenticate(self, obj_type: int, obj_id: bytes, blob: bytes, what: str,
                     base_id: bytes | None = None) -> tuple[int, bytes]:
        """Check the envelope and return (compression, payload) without decompressing.

        A delta (compression 2) authenticates only together with the base id the index names.
        """
        if len(blob) < ENVELOPE_HEADER.size + TAG_SIZE.get(self.alg, 16):
            raise IntegrityError(f"{what} is truncated")
        version, otype, alg, comp, key_id, nonce = ENVELOPE_HEADER.unpack_from(blob)
        if version != ENVELOPE_VERSION or alg != self.alg or otype != obj_type or comp > COMP_ZSTD_DELTA:
            raise IntegrityError(f"{what} has an invalid envelope header")
        if key_id != self.key_id:
            raise IntegrityError(f"{what} is sealed with data key {key_id}, which this key cannot open")
        if (comp == COMP_ZSTD_DELTA) != (base_id is not None) or (base_id is not None and len(base_id) != ID_SIZE):
            raise IntegrityError(f"{what} is {'a' if comp == COMP_ZSTD_DELTA else 'not a'} delta, "
                                 "unlike what the chunk index says")
        header = blob[: ENVELOPE_HEADER.size]
        aad = header + obj_id + (base_id or b"")
        if self._aead is None:
            body, digest = blob[ENVELOPE_HEADER.size : -32], blob[-32:]
            if hashlib.sha256(aad + body).digest() != digest:
                raise IntegrityError(f"{what} failed its checksum")
            return comp, body
        try:
            return comp, self._aead.decrypt(nonce, blob[ENVELOPE_HEADER.size :], aad)
        except InvalidTag:
            raise IntegrityError(f"{what} failed authentication (corrupted or tampered with)") from None

    def open(self, obj_type: int, obj_id: bytes, blob: bytes, what: str, max_size: int = MAX_OBJECT,
             base: tuple[bytes, bytes] | None = None) -> bytes:
        """Authenticate and decompress; a delta needs ``base`` = (base id, base plaintext)."""
        comp, payload = self.authenticate(obj_type, obj_id, blob, what, base[0] if base else None)
        if comp == COMP_NONE:
            return payload
        if comp == COMP_ZSTD_DELTA:
            dec = zstandard.ZstdDecompressor(dict_data=_raw_dict(base[1]))
        else:
            dec = self._decompressor()
        return decompress(dec, payload, max_size, what)   # the frame's declared size bounded first
