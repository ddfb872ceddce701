"""Every magic number and struct layout imgbackup writes, in one place. docs/FORMAT.md mirrors this.

All integers are little-endian.
"""

from __future__ import annotations

import struct

FORMAT_VERSION = 2     # 2: the catalog log, hold records, object-lock and append-only settings (FORMAT.md)

# Slot kinds in an image index.
SLOT_ZERO = 0      # all-zero chunk: nothing stored
SLOT_DATA = 1      # a stored chunk, named by its id
SLOT_UNUSED = 2    # blocks the filesystem does not use: not read, not stored, restored as zeros

ID_SIZE = 32

# Envelope: version u8, object type u8, algorithm u8, compression u8, nonce 12 bytes.
ENVELOPE_HEADER = struct.Struct("<BBBB12s")
ENVELOPE_VERSION = 1
ALG_NONE = 0           # plaintext + SHA-256 over (header, object id, plaintext)
ALG_AES256GCM = 1      # ciphertext + 16-byte GCM tag
COMP_NONE = 0
COMP_ZSTD = 1
TAG_SIZE = {ALG_NONE: 32, ALG_AES256GCM: 16}

OBJ_CHUNK = 1
OBJ_IMAGE_HEADER = 2
OBJ_IMAGE_BODY = 3
OBJ_CHUNK_INDEX = 4
OBJ_PACK_TRAILER = 5
OBJ_CATALOG_ENTRY = 8   # one entry of the catalog log (6 and 7 are taken by damage and check records)
OBJ_HOLD_RECORD = 9     # a legal hold placed or released

# Pack file: header, blobs, trailer envelope, footer.
PACK_MAGIC = b"IMGBPACK"
PACK_HEADER = struct.Struct("<8sH6x")                  # magic, version, reserved
PACK_FOOTER = struct.Struct("<QI4s")                   # trailer offset, trailer length, b"PEND"
PACK_FOOTER_MAGIC = b"PEND"
PACK_TRAILER_HEAD = struct.Struct("<8sHxxI")           # b"IMGBPTRL", version, count
PACK_TRAILER_MAGIC = b"IMGBPTRL"
PACK_TRAILER_ENTRY = struct.Struct("<32sQII")          # chunk id, offset, stored length, raw length

# Chunk-index file: which pack holds which chunk.
CHUNK_INDEX_MAGIC = b"IMGBCIDX"
CHUNK_INDEX_HEAD = struct.Struct("<8sHxxII")           # magic, version, pack count, entry count
CHUNK_INDEX_ENTRY = struct.Struct("<32sIQII")          # chunk id, pack number, offset, length, raw length

# Image index file: fixed head, header envelope, body envelope.
IMAGE_MAGIC = b"IMGBIMG1"
IMAGE_HEAD = struct.Struct("<8sHxxI")                  # magic, version, header envelope length
IMAGE_BODY_MAGIC = b"IMGBSLOT"
IMAGE_BODY_HEAD = struct.Struct("<8sHxxIQ")            # magic, version, chunk size, slot count
