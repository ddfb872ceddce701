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
import json
import math
import os
import struct
import sys
from pathlib import Path

import blake3
import zstandard
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.argon2 import Argon2id
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

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


def unwrap_slot(slot: dict, repo_id: bytes, passphrase: bytes | None) -> bytes | None:
    """Section 2.1: the key bundle a slot wraps, or None when the passphrase is not this slot's."""
    if slot["kdf"] is None:
        return base64.b64decode(slot["keys"])
    kdf = slot["kdf"]
    kek = Argon2id(salt=base64.b64decode(kdf["salt"]), length=32, iterations=kdf["iterations"],
                   lanes=kdf["lanes"], memory_cost=kdf["memory_kib"]).derive(passphrase)
    wrapped = base64.b64decode(slot["wrapped"])
    kind = {"full": 1, "backup-only": 2}[slot["kind"]]
    aad = b"imgbackup-key\x00" + repo_id + bytes.fromhex(slot["slot"]) + bytes([kind])
    try:
        return AESGCM(kek).decrypt(wrapped[:12], wrapped[12:], aad)
    except InvalidTag:
        return None


def public_keys(data_private: bytes, signing_seed: bytes) -> tuple[bytes, bytes]:
    raw = (Encoding.Raw, PublicFormat.Raw)
    return (X25519PrivateKey.from_private_bytes(data_private).public_key().public_bytes(*raw),
            Ed25519PrivateKey.from_private_bytes(signing_seed).public_key().public_bytes(*raw))


class Repo:
    def __init__(self, root: Path, passphrase: bytes | None) -> None:
        self.root = root
        config = json.loads((root / "config").read_bytes())
        if config.get("format") != "imgbackup-repository" or config.get("version") != 4:
            raise Damaged("not a version-4 imgbackup repository")
        repo_id = bytes.fromhex(config["id"])
        for path in sorted((root / "keys").iterdir()):
            if ".tmp-" not in path.name:
                bundle = unwrap_slot(json.loads(path.read_bytes()), repo_id, passphrase)
                if bundle is not None:
                    break
        else:
            raise Damaged("the passphrase opens no key slot")
        self._read_bundle(bundle, repo_id, config)
        self.config = config
        self.algorithm = 1 if config["encryption"] == "aes-256-gcm" else 0
        self._chunks: dict[bytes, list[tuple]] | None = None
        self._data_keys: dict[int, AESGCM] = {}

    def _read_bundle(self, bundle: bytes, repo_id: bytes, config: dict) -> None:
        """Section 2.1 (bundle layout) and 2.2 (the checks against the config, the signature)."""
        magic, version, kind, count, bundle_repo, self.id_key = struct.unpack_from("<8sBBH16s32s", bundle)
        if magic != b"IMGBKEYS" or version != 1 or kind != 1 or bundle_repo != repo_id:
            raise Damaged("not a full key bundle of this repository")
        if len(bundle) != 60 + 100 * count or len(config["keys"]) != count:
            raise Damaged("bundle and config disagree on the generations")
        self.meta_keys: dict[int, AESGCM] = {}
        self.data_private: dict[int, bytes] = {}
        for n in range(1, count + 1):
            number, meta, data_private, seed = struct.unpack_from("<I32s32s32s", bundle, 60 + 100 * (n - 1))
            data_public, verify = public_keys(data_private, seed)
            check = hashlib.sha256(b"imgbackup-key-check\x00" + repo_id + struct.pack("<I", n) + self.id_key
                                   + meta).digest()[:16]
            listed = config["keys"][n - 1]
            if number != n or listed != {"generation": n, "data_public": data_public.hex(),
                                         "verify_key": verify.hex(), "check": check.hex()}:
                raise Damaged(f"generation {n} does not match the config")
            self.meta_keys[n] = AESGCM(meta)
            self.data_private[n] = data_private
        signature = bytes.fromhex(config.pop("signature"))
        try:
            Ed25519PublicKey.from_public_bytes(verify).verify(signature, b"imgbackup-config\x00" + canonical(config))
        except InvalidSignature:
            raise Damaged("config signature does not verify") from None

    def data_key(self, key_id: int) -> AESGCM:
        """Section 2.3: datakeys/<16 hex>, opened with the private X25519 key of its generation."""
        if key_id not in self._data_keys:
            blob = (self.root / "datakeys" / f"{key_id:016x}").read_bytes()
            magic, version, generation, stored_id, eph = struct.unpack_from("<8sHxxIQ32s", blob)
            if magic != b"IMGBDKEY" or version != 4 or stored_id != key_id or len(blob) != 116:
                raise Damaged(f"data key {key_id:016x}: bad header")
            private = X25519PrivateKey.from_private_bytes(self.data_private[generation])
            shared = private.exchange(X25519PublicKey.from_public_bytes(eph))
            public = private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
            wrap = HKDF(hashes.SHA256(), 32, eph + public, b"imgbackup-datakey\x00" + blob[12:24]).derive(shared)
            self._data_keys[key_id] = AESGCM(AESGCM(wrap).decrypt(blob[56:68], blob[68:], blob[:56]))
        return self._data_keys[key_id]

    # -- section 3 -----------------------------------------------------------------------------
    def open(self, obj_type: int, obj_id: bytes, blob: bytes, limit: int, base: tuple[bytes, bytes] | None = None
             ) -> bytes:
        version, otype, alg, comp, key_id, nonce = ENVELOPE.unpack_from(blob)
        if version != 3 or otype != obj_type or alg != self.algorithm:
            raise Damaged(f"bad envelope header {version, otype, alg, key_id}")
        if (comp == 2) != (base is not None):
            raise Damaged("delta flag and compression disagree")
        aad = blob[:ENVELOPE.size] + obj_id + (base[0] if base else b"")
        if alg == 1:
            if obj_type == 1 and key_id >= 1 << 63:
                aead = self.data_key(key_id)
            elif obj_type != 1 and 1 <= key_id < 1 << 32:
                aead = self.meta_keys[key_id]
            else:
                raise Damaged(f"key id {key_id} for object type {obj_type}")
            packed = aead.decrypt(nonce, blob[ENVELOPE.size:], aad)
        else:
            if key_id != 0:
                raise Damaged("a key id without encryption")
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
            if magic != b"IMGBCIDX" or version != 4:
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
        if magic != b"IMGBIMG1" or version != 4:
            raise Damaged(f"image {image_id}: bad head")
        oid = bytes.fromhex(image_id)
        meta = json.loads(self.open(2, oid, raw[IMAGE_HEAD.size:IMAGE_HEAD.size + hlen], 64 << 20))
        if meta["version"] != 4 or meta["id"] != image_id:
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
        if (magic, version, chunk_size, count) != (b"IMGBSLOT", 4, meta["chunk_size"], slots) \
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
