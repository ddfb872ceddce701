"""An independent minimal reader of imgbackup repositories, written from docs/FORMAT.md alone.

It imports nothing of imgbackup: only the standard library, cryptography, zstandard and blake3. It
lists the images of a directory repository and restores one to a file, checking what the spec says a
reader must check (section 10). tests/test_independent_reader.py proves it writes byte for byte what
``imgbackup restore`` writes.

    python tests/independent_reader.py list REPO
    python tests/independent_reader.py restore REPO IMAGE_ID TARGET
    python tests/independent_reader.py deltas REPO          # how many chunk-index entries are deltas

The passphrase comes from IMGBACKUP_PASSPHRASE (its UTF-8 bytes, section 2.1).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import math
import os
import struct
import sys
from pathlib import Path

import blake3
import zstandard
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.argon2 import Argon2id

ENVELOPE = struct.Struct("<BBBBQ12s")       # section 3
INDEX_HEAD = struct.Struct("<8sHxxIII")     # section 6
INDEX_ENTRY = struct.Struct("<32sIIII")
BASE_ROW = struct.Struct("<I32s")
IMAGE_HEAD = struct.Struct("<8sHxxI")       # section 7
BODY_HEAD = struct.Struct("<8sHxxIQ")
DELTA_FLAG = 1 << 31
LENGTH_MASK = (1 << 25) - 1


class Damaged(Exception):
    pass


def canonical(doc: dict) -> bytes:
    """Section 2.2: sorted keys, `,` and `:`, no whitespace, ASCII escapes, shortest floats."""
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")


class Repo:
    def __init__(self, root: Path, passphrase: bytes | None) -> None:
        self.root = root
        config = json.loads((root / "config").read_bytes())
        if config.get("format") != "imgbackup-repository" or config.get("version") != 3:
            raise Damaged("not a version-3 imgbackup repository")
        repo_id = bytes.fromhex(config["id"])
        keyfile = json.loads((root / "keys" / config["id"][:16]).read_bytes())
        if keyfile["kdf"] is None:
            keys = base64.b64decode(keyfile["keys"])
        else:
            kdf = keyfile["kdf"]
            kek = Argon2id(salt=base64.b64decode(kdf["salt"]), length=32, iterations=kdf["iterations"],
                           lanes=kdf["lanes"], memory_cost=kdf["memory_kib"]).derive(passphrase)
            wrapped = base64.b64decode(keyfile["wrapped"])
            keys = AESGCM(kek).decrypt(wrapped[:12], wrapped[12:], b"imgbackup-key\x00" + repo_id)
        self.enc_key, self.id_key, mac_key = keys[:32], keys[32:64], keys[64:96]
        mac = config.pop("mac")
        if not hmac.compare_digest(hmac.new(mac_key, canonical(config), hashlib.sha256).hexdigest(), mac):
            raise Damaged("config MAC mismatch")
        self.config = config
        self.algorithm = 1 if config["encryption"] == "aes-256-gcm" else 0
        self.aead = AESGCM(self.enc_key) if self.algorithm == 1 else None
        self._chunks: dict[bytes, list[tuple]] | None = None

    # -- section 3 -----------------------------------------------------------------------------
    def open(self, obj_type: int, obj_id: bytes, blob: bytes, limit: int, base: tuple[bytes, bytes] | None = None
             ) -> bytes:
        version, otype, alg, comp, key_id, nonce = ENVELOPE.unpack_from(blob)
        if version != 2 or otype != obj_type or alg != self.algorithm or key_id != 0:
            raise Damaged(f"bad envelope header {version, otype, alg, key_id}")
        if (comp == 2) != (base is not None):
            raise Damaged("delta flag and compression disagree")
        aad = blob[:ENVELOPE.size] + obj_id + (base[0] if base else b"")
        if alg == 1:
            packed = self.aead.decrypt(nonce, blob[ENVELOPE.size:], aad)
        else:
            packed = blob[ENVELOPE.size:-32]
            if hashlib.sha256(aad + packed).digest() != blob[-32:]:
                raise Damaged("checksum mismatch")
        if comp == 0:
            return packed
        if zstandard.frame_content_size(packed) > limit:
            raise Damaged("frame declares too much")
        if comp == 1:
            return zstandard.ZstdDecompressor().decompress(packed, max_output_size=limit)
        raw_dict = zstandard.ZstdCompressionDict(base[1], dict_type=zstandard.DICT_TYPE_RAWCONTENT)
        return zstandard.ZstdDecompressor(dict_data=raw_dict).decompress(packed, max_output_size=limit)

    # -- sections 6 and 11 -----------------------------------------------------------------------
    def damaged_copies(self) -> set[tuple[bytes, bytes, int]]:
        out: set[tuple[bytes, bytes, int]] = set()
        folder = self.root / "damage"
        for path in sorted(folder.iterdir()) if folder.is_dir() else ():
            if ".tmp-" in path.name:
                continue
            try:
                doc = json.loads(self.open(6, bytes.fromhex(path.name), path.read_bytes(), 256 << 20))
            except Exception:   # noqa: BLE001 - section 11: a reader ignores a damaged record
                continue
            for e in doc["entries"]:
                out.add((bytes.fromhex(e["chunk"]), bytes.fromhex(e["pack"]), e["offset"]))
        return out

    def chunks(self) -> dict[bytes, list[tuple]]:
        """chunk id -> its usable copies (pack id, offset, sealed length, plaintext length, base or None)."""
        if self._chunks is not None:
            return self._chunks
        bad = self.damaged_copies()
        chunks: dict[bytes, list[tuple]] = {}
        for path in sorted((self.root / "index").iterdir()):
            if ".tmp-" in path.name:
                continue
            plain = self.open(4, bytes.fromhex(path.name), path.read_bytes(), 2 << 30)
            magic, version, n_packs, n_entries, n_deltas = INDEX_HEAD.unpack_from(plain)
            if magic != b"IMGBCIDX" or version != 3:
                raise Damaged(f"chunk index {path.name}: bad head")
            if len(plain) != INDEX_HEAD.size + 32 * n_packs + 48 * n_entries + 36 * n_deltas:
                raise Damaged(f"chunk index {path.name}: wrong length")
            pos = INDEX_HEAD.size
            packs = [plain[pos + 32 * i: pos + 32 * i + 32] for i in range(n_packs)]
            pos += 32 * n_packs
            rows = [INDEX_ENTRY.unpack_from(plain, pos + 48 * i) for i in range(n_entries)]
            pos += 48 * n_entries
            bases = dict(BASE_ROW.unpack_from(plain, pos + 36 * i) for i in range(n_deltas))
            for number, (cid, pack, offset, length, info) in enumerate(rows):
                base = bases[number] if info & DELTA_FLAG else None
                if (cid, packs[pack], offset) not in bad:
                    chunks.setdefault(cid, []).append((packs[pack], offset, length, info & LENGTH_MASK, base))
        for copies in chunks.values():
            copies.sort(key=lambda c: c[4] is not None)      # whole copies first (section 4.2)
        self._chunks = chunks
        return chunks

    # -- sections 4 and 5 ----------------------------------------------------------------------
    def read_chunk(self, cid: bytes, must_be_whole: bool = False) -> bytes:
        copies = self.chunks().get(cid)
        if not copies:
            raise Damaged(f"chunk {cid.hex()} has no copy")
        pack, offset, length, raw, base = copies[0]
        if must_be_whole and base is not None:
            raise Damaged(f"base {cid.hex()} is a delta")
        with_base = None if base is None else (base, self.read_chunk(base, must_be_whole=True))
        hexid = pack.hex()
        with open(self.root / "packs" / hexid[:2] / hexid, "rb") as f:
            f.seek(offset)
            blob = f.read(length)
        plain = self.open(1, cid, blob, raw, with_base)
        if len(plain) != raw or blake3.blake3(plain, key=self.id_key).digest() != cid:
            raise Damaged(f"chunk {cid.hex()} does not match its id")
        return plain

    # -- section 7 -----------------------------------------------------------------------------
    def image_ids(self) -> list[str]:
        return sorted(p.name for p in (self.root / "images").iterdir() if ".tmp-" not in p.name)

    def header(self, image_id: str) -> tuple[dict, bytes]:
        raw = (self.root / "images" / image_id).read_bytes()
        magic, version, hlen = IMAGE_HEAD.unpack_from(raw)
        if magic != b"IMGBIMG1" or version != 3:
            raise Damaged(f"image {image_id}: bad head")
        oid = bytes.fromhex(image_id)
        meta = json.loads(self.open(2, oid, raw[IMAGE_HEAD.size:IMAGE_HEAD.size + hlen], 64 << 20))
        if meta["version"] != 3 or meta["id"] != image_id:
            raise Damaged(f"image {image_id}: header names another image")
        return meta, raw[IMAGE_HEAD.size + hlen:]

    def image(self, image_id: str) -> tuple[dict, bytes, list[bytes]]:
        meta, sealed_body = self.header(image_id)
        slots = meta["slots"]
        body = self.open(3, bytes.fromhex(image_id), sealed_body, 24 + 33 * slots + (slots + 7) // 8)
        if hashlib.sha256(body).hexdigest() != meta["body_sha256"]:
            raise Damaged(f"image {image_id}: body digest")
        magic, version, chunk_size, count = BODY_HEAD.unpack_from(body)
        size = meta["source"]["size"]
        if (magic, version, chunk_size, count) != (b"IMGBSLOT", 3, meta["chunk_size"], slots) \
                or slots != math.ceil(size / chunk_size):
            raise Damaged(f"image {image_id}: body head")
        kinds = body[BODY_HEAD.size:BODY_HEAD.size + slots]
        if any(k > 2 for k in kinds):
            raise Damaged(f"image {image_id}: slot kind")
        pos = BODY_HEAD.size + slots
        n_data = kinds.count(1)
        ids = [body[pos + 32 * i: pos + 32 * i + 32] for i in range(n_data)]
        if len(body) != pos + 32 * n_data + (slots + 7) // 8:
            raise Damaged(f"image {image_id}: body length")
        digest = hashlib.sha256(struct.pack("<QI", size, chunk_size) + kinds.replace(b"\x02", b"\x00")
                                + b"".join(ids)).hexdigest()
        if digest != meta["content_digest"]:
            raise Damaged(f"image {image_id}: content digest")
        return meta, kinds, ids

    def restore(self, image_id: str, target: Path) -> None:
        meta, kinds, ids = self.image(image_id)
        size, chunk_size = meta["source"]["size"], meta["chunk_size"]
        needed = set(ids)
        for cid in set(needed):         # section 10: every chunk (and base) checked before writing
            self.read_chunk(cid)
        data = iter(ids)
        with open(target, "wb") as out:
            for slot, kind in enumerate(kinds):
                if kind == 1:
                    plain = self.read_chunk(next(data))
                    if len(plain) != min(chunk_size, size - slot * chunk_size):
                        raise Damaged(f"slot {slot}: chunk of the wrong length")
                    out.seek(slot * chunk_size)
                    out.write(plain)
            out.truncate(size)          # zero and unused slots stay holes: zeros


def main(argv: list[str]) -> int:
    passphrase = os.environ.get("IMGBACKUP_PASSPHRASE")
    command, root = argv[0], Path(argv[1])
    repo = Repo(root, None if passphrase is None else passphrase.encode("utf-8"))
    if command == "list":
        for image_id in repo.image_ids():
            meta, _ = repo.header(image_id)
            print(image_id, meta["created"], meta["type"], meta["name"], meta["source"]["size"])
    elif command == "restore":
        repo.restore(argv[2], Path(argv[3]))
    elif command == "deltas":
        print(sum(1 for copies in repo.chunks().values() for c in copies if c[4] is not None))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
