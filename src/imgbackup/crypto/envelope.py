"""The envelope: how one object (a chunk, an index, a trailer) is compressed, sealed and opened.

The associated data binds the envelope header and the object's id (and a delta's base id), so a
blob moved to another place, swapped with another, relabelled as another type or pointed at
another base fails authentication. The header's key id names the key (FORMAT.md section 3): chunks
are sealed with the session's data key (``DataKeys``), everything else with the current
generation's metadata key; opening picks the key the blob names.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Mapping

import zstandard
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from imgbackup.crypto.datakeys import DataKeys, StaticDataKeys
from imgbackup.errors import IntegrityError
from imgbackup.format.layout import (
    ALG_AES256GCM,
    ALG_NONE,
    COMP_NONE,
    COMP_ZSTD,
    COMP_ZSTD_DELTA,
    DATA_KEY_ID_MIN,
    ENVELOPE_HEADER,
    ENVELOPE_VERSION,
    ID_SIZE,
    KEY_ID_NONE,
    META_KEY_ID_MAX,
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
    """Seals and opens one repository's objects (thread-safe, reentrant).

    ``meta_keys``: the metadata key, or {generation: key} (the highest seals); None for no encryption.
    ``data_keys``: where chunk keys come from (the repository's ``DataKeys``); without it a fixed data
    key derived from nothing else is used (objects sealed outside a repository: tests, tools).
    """

    def __init__(self, meta_keys: bytes | Mapping[int, bytes] | None, zstd_level: int = 3,
                 data_keys: DataKeys | StaticDataKeys | None = None) -> None:
        self.zstd_level = zstd_level
        self._local = threading.local()
        if meta_keys is None:
            self.alg, self._meta, self.key_id, self._data = ALG_NONE, {}, KEY_ID_NONE, None
            return
        keys = {1: meta_keys} if isinstance(meta_keys, bytes | bytearray) else dict(meta_keys)
        self.alg = ALG_AES256GCM
        self._meta = {gen: AESGCM(bytes(key)) for gen, key in keys.items()}
        self.key_id = max(keys)                   # the metadata key id writers use
        self._data = data_keys if data_keys is not None else StaticDataKeys(bytes(keys[self.key_id]))

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
        if self.alg == ALG_NONE:
            header = ENVELOPE_HEADER.pack(ENVELOPE_VERSION, obj_type, ALG_NONE, comp, KEY_ID_NONE, bytes(12))
            return header + bytes(body) + hashlib.sha256(header + obj_id + base_id + bytes(body)).digest()
        if obj_type == OBJ_CHUNK:
            key_id, aead = self._data.session()
        else:
            key_id, aead = self.key_id, self._meta[self.key_id]
        nonce = os.urandom(12)
        header = ENVELOPE_HEADER.pack(ENVELOPE_VERSION, obj_type, ALG_AES256GCM, comp, key_id, nonce)
        return header + aead.encrypt(nonce, bytes(body), header + obj_id + base_id)

    def _aead_for(self, obj_type: int, key_id: int, what: str) -> AESGCM:
        """The key a blob names: data keys for chunks only, metadata keys for everything else."""
        if obj_type == OBJ_CHUNK:
            if key_id < DATA_KEY_ID_MIN:
                raise IntegrityError(f"{what} is not sealed with a data key (key id {key_id})")
            return self._data.aead(key_id)
        if not 1 <= key_id <= META_KEY_ID_MAX:
            raise IntegrityError(f"{what} is not sealed with a metadata key (key id {key_id})")
        aead = self._meta.get(key_id)
        if aead is None:
            raise IntegrityError(f"{what} is sealed with the metadata key of generation {key_id}, "
                                 "which this key does not hold")
        return aead

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
        if alg == ALG_NONE and key_id != KEY_ID_NONE:
            raise IntegrityError(f"{what} names key {key_id} in an unencrypted repository")
        if (comp == COMP_ZSTD_DELTA) != (base_id is not None) or (base_id is not None and len(base_id) != ID_SIZE):
            raise IntegrityError(f"{what} is {'a' if comp == COMP_ZSTD_DELTA else 'not a'} delta, "
                                 "unlike what the chunk index says")
        header = blob[: ENVELOPE_HEADER.size]
        aad = header + obj_id + (base_id or b"")
        if alg == ALG_NONE:
            body, digest = blob[ENVELOPE_HEADER.size : -32], blob[-32:]
            if hashlib.sha256(aad + body).digest() != digest:
                raise IntegrityError(f"{what} failed its checksum")
            return comp, body
        aead = self._aead_for(otype, key_id, what)
        try:
            return comp, aead.decrypt(nonce, blob[ENVELOPE_HEADER.size :], aad)
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
