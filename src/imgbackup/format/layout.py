"""Every magic number and struct layout imgbackup writes, in one place. docs/FORMAT.md mirrors this.

All integers are little-endian.
"""

from __future__ import annotations

import struct

FORMAT_VERSION = 4     # 2: keyed BLAKE3 ids, delta chunks, key id in the envelope; 3: the catalog log, hold
                       # records, append-only and S3 Object Lock settings; 4: key slots, per-session data
                       # keys sealed to X25519, the config signed with Ed25519, leases, collection marks,
                       # host-tagged image ids (FORMAT.md, "Version 4")

# Slot kinds in an image index.
SLOT_ZERO = 0      # all-zero chunk: nothing stored
SLOT_DATA = 1      # a stored chunk, named by its id
SLOT_UNUSED = 2    # blocks the filesystem does not use: not read, not stored, restored as zeros

ID_SIZE = 32

# Envelope: version u8, object type u8, algorithm u8, compression u8, key id u64, nonce 12 bytes.
ENVELOPE_HEADER = struct.Struct("<BBBBQ12s")
ENVELOPE_VERSION = 3
ALG_NONE = 0           # plaintext + SHA-256 over (header, object id, plaintext)
ALG_AES256GCM = 1      # ciphertext + 16-byte GCM tag
COMP_NONE = 0
COMP_ZSTD = 1
COMP_ZSTD_DELTA = 2    # a zstd frame compressed against a base chunk's plaintext (raw-content dictionary)
# Envelope key ids (FORMAT.md section 3): 0 no key (algorithm 0); 1..2**32-1 the metadata key of that
# generation; 2**63.. a per-session data key in datakeys/<16 hex>, for chunks only.
KEY_ID_NONE = 0
META_KEY_ID_MAX = (1 << 32) - 1
DATA_KEY_ID_MIN = 1 << 63
TAG_SIZE = {ALG_NONE: 32, ALG_AES256GCM: 16}

OBJ_CHUNK = 1
OBJ_IMAGE_HEADER = 2
OBJ_IMAGE_BODY = 3
OBJ_CHUNK_INDEX = 4
OBJ_PACK_TRAILER = 5
OBJ_DAMAGE_RECORD = 6
OBJ_CHECK_RECORD = 7     # a verify or drill result
OBJ_CATALOG_ENTRY = 8    # one entry of the catalog log
OBJ_HOLD_RECORD = 9      # a legal hold placed or released
OBJ_GC_MARKS = 10        # collection marks: candidates for deletion (two-phase collection)

# Pack file: header, blobs, trailer envelope, footer.
PACK_MAGIC = b"IMGBPACK"
PACK_HEADER = struct.Struct("<8sH6x")                  # magic, version, reserved
PACK_FOOTER = struct.Struct("<QI4s")                   # trailer offset, trailer length, b"PEND"
PACK_FOOTER_MAGIC = b"PEND"
PACK_TRAILER_HEAD = struct.Struct("<8sHxxII")          # b"IMGBPTRL", version, count, delta count
PACK_TRAILER_MAGIC = b"IMGBPTRL"
PACK_TRAILER_ENTRY = struct.Struct("<32sIII")          # chunk id, offset, stored length, info
BASE_ENTRY = struct.Struct("<I32s")                    # entry number of a delta, its base chunk id

# The info word of a pack-trailer or chunk-index entry: plaintext length and flags.
INFO_LENGTH_MASK = (1 << 25) - 1    # plaintext length: chunks are at most 16 MiB = 2**24 bytes
INFO_DELTA = 1 << 31                # the chunk is a delta: its base is in the side table
INFO_RESERVED = ~(INFO_LENGTH_MASK | INFO_DELTA) & 0xFFFFFFFF
MAX_PACK_SIZE = 1 << 32             # offsets are u32

# Chunk-index file: which pack holds which chunk.
CHUNK_INDEX_MAGIC = b"IMGBCIDX"
CHUNK_INDEX_HEAD = struct.Struct("<8sHxxIII")          # magic, version, pack count, entry count, delta count
CHUNK_INDEX_ENTRY = struct.Struct("<32sIIII")          # chunk id, pack number, offset, length, info (48 bytes)

# Image index file: fixed head, header envelope, body envelope.
IMAGE_MAGIC = b"IMGBIMG1"
IMAGE_HEAD = struct.Struct("<8sHxxI")                  # magic, version, header envelope length
IMAGE_BODY_MAGIC = b"IMGBSLOT"
IMAGE_BODY_HEAD = struct.Struct("<8sHxxIQ")            # magic, version, chunk size, slot count

# Key bundle (FORMAT.md 2.1): the plaintext a key slot wraps and the paper sheet carries.
KEY_BUNDLE_MAGIC = b"IMGBKEYS"
KEY_BUNDLE_VERSION = 1
KEY_BUNDLE_HEAD = struct.Struct("<8sBBH16s32s")       # magic, version, kind, generations, repo id, id_key
KEY_GENERATION = struct.Struct("<I32s32s32s")          # number, meta key, data key (priv|pub), signing (priv|pub)
KIND_FULL = 1
KIND_BACKUP_ONLY = 2
MAX_GENERATIONS = 1000

# Data-key object (FORMAT.md 2.3): datakeys/<16 hex key id>.
DATA_KEY_MAGIC = b"IMGBDKEY"
DATA_KEY_HEAD = struct.Struct("<8sHxxIQ32s12s")        # magic, version, generation, key id, ephemeral pub, nonce
DATA_KEY_SIZE = DATA_KEY_HEAD.size + 32 + 16           # + sealed 32-byte key and its GCM tag = 116
