"""Unit tests of repository pieces: the envelope, key wrapping, the config mac, storage, packs (leases:
tests/test_leases.py).

Each tamper test changes one field and expects a refusal; known answers are checked with
``cryptography``/``hashlib`` directly, not with the code under test.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import zstandard
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from tests.disks import small_tmpfs

from imgbackup.crypto.envelope import Envelope
from imgbackup.crypto.keys import KeyBundle
from imgbackup.crypto.slots import make_slot, new_slot_id, open_slot, parse_slot, slot_info
from imgbackup.errors import (
    IntegrityError,
    ObjectMissing,
    StorageError,
    UnsupportedFormat,
    WrongPassphrase,
)
from imgbackup.format.layout import ENVELOPE_HEADER, OBJ_CHUNK, OBJ_IMAGE_BODY, OBJ_IMAGE_HEADER
from imgbackup.repository.backends.directory import DirectoryStorage
from imgbackup.repository.backends.memory import MemoryStorage
from imgbackup.repository.chunkindex import ChunkIndex
from imgbackup.repository.config import RepoConfig, check_config, peek_config
from imgbackup.repository.indexfile import decode_chunk_index, encode_chunk_index, write_index_files
from imgbackup.repository.packs import BlobLocation, PackWriter, _Commit, pack_name, read_pack_trailer

KEY = bytes(range(32))
OID = hashlib.sha256(b"object id").digest()
H = ENVELOPE_HEADER.size


# --- envelope ---------------------------------------------------------------------------------

def test_envelope_aes_layout_known_answer() -> None:
    """header(version 3, type, alg 1, comp 0, key id, nonce) + AES-GCM(nonce, body, aad=header+id): a chunk
    names a data key (id >= 2**63), every other object its generation's metadata key (id 1)."""
    plain = os.urandom(5000)                                # incompressible: stored raw
    blob = Envelope(KEY).seal(OBJ_CHUNK, OID, plain)
    assert H == 24
    version, otype, alg, comp, key_id, nonce = ENVELOPE_HEADER.unpack_from(blob)
    assert (version, otype, alg, comp, key_id) == (3, OBJ_CHUNK, 1, 0, 1 << 63)
    assert blob[4:12] == (1 << 63).to_bytes(8, "little") and blob[12:24] == nonce
    assert AESGCM(KEY).decrypt(nonce, blob[H:], blob[:H] + OID) == plain   # a static data key: KEY itself
    assert Envelope(KEY).open(OBJ_CHUNK, OID, blob, "x") == plain
    meta = Envelope({1: KEY, 2: bytes(32)}).seal(OBJ_IMAGE_HEADER, OID, plain)
    assert ENVELOPE_HEADER.unpack_from(meta)[4] == 2          # the newest generation seals
    assert AESGCM(bytes(32)).decrypt(meta[12:24], meta[H:], meta[:H] + OID) == plain
    with pytest.raises(IntegrityError):                       # a chunk must not name a metadata key
        Envelope(KEY).open(OBJ_CHUNK, OID, Envelope(KEY).seal(OBJ_IMAGE_HEADER, OID, plain)[:1] + bytes([OBJ_CHUNK])
                           + Envelope(KEY).seal(OBJ_IMAGE_HEADER, OID, plain)[2:], "x")
    with pytest.raises(IntegrityError):                       # an older key set lacks generation 2
        Envelope(KEY).open(OBJ_IMAGE_HEADER, OID, meta, "x")


def test_envelope_none_layout_known_answer() -> None:
    """Without encryption: header + plaintext + SHA-256(header + id + plaintext)."""
    plain = b"hello, imgbackup"
    blob = Envelope(None).seal(OBJ_CHUNK, OID, plain, compress=False)
    header = bytes([3, OBJ_CHUNK, 0, 0]) + bytes(8) + bytes(12)
    assert ENVELOPE_HEADER.pack(3, OBJ_CHUNK, 0, 0, 0, bytes(12)) == header
    assert blob == header + plain + hashlib.sha256(header + OID + plain).digest()


@pytest.mark.parametrize("key", [KEY, None], ids=["aes", "none"])
def test_delta_chunk_is_a_zstd_frame_against_its_base_bound_to_the_base_id(key) -> None:
    """A changed chunk sealed against its parent: compression 2, AD = header + id + base id; the
    payload is a plain zstd frame that zstd opens with the base as raw-content dictionary."""
    env = Envelope(key)
    base = os.urandom(1 << 16)
    new = bytearray(base)
    new[1000:1100] = os.urandom(100)
    base_id, cid = hashlib.sha256(base).digest(), hashlib.sha256(new).digest()
    blob, used = env.seal_chunk(cid, bytes(new), (base_id, base))
    assert used == base_id and ENVELOPE_HEADER.unpack_from(blob)[3] == 2 and len(blob) < 2000
    assert env.open(OBJ_CHUNK, cid, blob, "x", base=(base_id, base)) == new
    if key is not None:
        payload = AESGCM(key).decrypt(blob[12:24], blob[H:], blob[:H] + cid + base_id)
        raw = zstandard.ZstdCompressionDict(base, dict_type=zstandard.DICT_TYPE_RAWCONTENT)
        assert zstandard.ZstdDecompressor(dict_data=raw).decompress(payload) == new
    with pytest.raises(IntegrityError):                       # another base id: AD differs
        env.open(OBJ_CHUNK, cid, blob, "x", base=(cid, base))
    with pytest.raises(IntegrityError):                       # the index forgot it is a delta
        env.open(OBJ_CHUNK, cid, blob, "x")
    with contextlib.suppress(IntegrityError):   # the right id, wrong base bytes: caught by the id check
        assert env.open(OBJ_CHUNK, cid, blob, "x", base=(base_id, os.urandom(1 << 16))) != new
    plain_blob, none = env.seal_chunk(cid, bytes(new))
    assert none is None and ENVELOPE_HEADER.unpack_from(plain_blob)[3] == 0
    with pytest.raises(IntegrityError):                       # a plain chunk the index calls a delta
        env.open(OBJ_CHUNK, cid, plain_blob, "x", base=(base_id, base))


def test_delta_that_does_not_pay_is_stored_whole() -> None:
    env = Envelope(KEY)
    base, new = os.urandom(50_000), os.urandom(25_000).hex().encode()   # nothing in common
    blob, used = env.seal_chunk(OID, new, (OID, base))
    assert used is None and ENVELOPE_HEADER.unpack_from(blob)[3] == 1
    assert env.open(OBJ_CHUNK, OID, blob, "x") == new


def test_envelope_key_id_is_authenticated_and_foreign_key_ids_refused() -> None:
    env = Envelope(KEY)
    blob = bytearray(env.seal(OBJ_CHUNK, OID, b"payload"))
    blob[4] = 7                                               # another data key id: not ours
    with pytest.raises(IntegrityError, match="data key 8000000000000007"):
        env.open(OBJ_CHUNK, OID, bytes(blob), "x")
    blob[4:12] = (1).to_bytes(8, "little")                    # a chunk naming a metadata key
    with pytest.raises(IntegrityError, match="not sealed with a data key"):
        env.open(OBJ_CHUNK, OID, bytes(blob), "x")


@pytest.mark.parametrize("key", [KEY, None], ids=["aes", "none"])
def test_envelope_compresses_and_round_trips(key) -> None:
    plain = b"A" * 100_000
    env = Envelope(key)
    blob = env.seal(OBJ_CHUNK, OID, plain)
    assert len(blob) < 10_000 and ENVELOPE_HEADER.unpack_from(blob)[3] == 1
    assert env.open(OBJ_CHUNK, OID, blob, "x") == plain


# Offsets into a sealed blob: version, type, alg, comp, key id, nonce, payload, tag (last byte).
FIELDS = {"version": 0, "type": 1, "alg": 2, "comp": 3, "key_id": 9, "nonce": 16, "payload": H + 10, "tag": -1}


@pytest.mark.parametrize("key", [KEY, None], ids=["aes", "none"])
@pytest.mark.parametrize("field", FIELDS)
def test_envelope_tampered_field_is_refused(key, field: str) -> None:
    env = Envelope(key)
    blob = bytearray(env.seal(OBJ_CHUNK, OID, os.urandom(300)))
    blob[FIELDS[field]] ^= 0x04
    with pytest.raises(IntegrityError):
        env.open(OBJ_CHUNK, OID, bytes(blob), "x")


@pytest.mark.parametrize("key", [KEY, None], ids=["aes", "none"])
def test_envelope_bound_to_id_type_and_key(key) -> None:
    env = Envelope(key)
    blob = env.seal(OBJ_CHUNK, OID, b"payload")
    with pytest.raises(IntegrityError):
        env.open(OBJ_CHUNK, hashlib.sha256(b"other").digest(), blob, "x")
    with pytest.raises(IntegrityError):
        env.open(OBJ_IMAGE_BODY, OID, blob, "x")
    with pytest.raises(IntegrityError):
        env.open(OBJ_CHUNK, OID, blob[: H + 3], "x")
    other = Envelope(bytes(32)) if key else Envelope(KEY)
    with pytest.raises(IntegrityError):
        other.open(OBJ_CHUNK, OID, blob, "x")


# --- key slots and bundles ------------------------------------------------------------------

def test_key_slot_round_trip_and_wrong_passphrase(monkeypatch) -> None:
    monkeypatch.setenv("IMGBACKUP_TEST_CHEAP_KDF", "1")
    repo_id = os.urandom(16)
    keys = KeyBundle.generate(repo_id)
    slot = new_slot_id()
    doc = parse_slot(json.dumps(make_slot(keys, b"secret", slot, "laptop", keys)).encode(), f"keys/{slot}")
    assert doc["kdf"]["name"] == "argon2id" and keys.id_key.hex() not in json.dumps(doc)
    assert open_slot(doc, b"secret", repo_id).to_bytes() == keys.to_bytes()
    assert slot_info(doc, repo_id, keys).signed and slot_info(doc, repo_id, keys).label == "laptop"
    for wrong in (b"Secret", None):
        with pytest.raises(WrongPassphrase):
            open_slot(doc, wrong, repo_id)
    with pytest.raises(WrongPassphrase):                    # a slot moved to another repository
        open_slot(doc, b"secret", os.urandom(16))
    with pytest.raises(WrongPassphrase):                    # relabelled as another kind: the wrap binds it
        open_slot({**doc, "kind": "backup-only"}, b"secret", repo_id)
    assert not slot_info({**doc, "label": "forged"}, repo_id, keys).signed
    with pytest.raises(UnsupportedFormat):
        parse_slot(json.dumps({**doc, "version": 2}).encode(), f"keys/{slot}")
    with pytest.raises(IntegrityError):                     # a slot under another name
        parse_slot(json.dumps(doc).encode(), "keys/" + "0" * 16)


def test_bundle_bytes_round_trip_and_backup_only_holds_no_private_key() -> None:
    keys = KeyBundle.generate(os.urandom(16)).rotated()
    assert KeyBundle.from_bytes(keys.to_bytes()).to_bytes() == keys.to_bytes()
    assert len(keys.to_bytes()) == 60 + 100 * 2
    limited = KeyBundle.from_bytes(keys.backup_only().to_bytes())
    assert not limited.full and all(g.data_private is None and g.signing_key is None for g in limited.generations)
    raw = keys.to_bytes()
    for bad in (raw[:-1], raw[:8] + b"\x09" + raw[9:], raw[:9] + b"\x07" + raw[10:]):
        with pytest.raises((IntegrityError, UnsupportedFormat)):
            KeyBundle.from_bytes(bad)
    assert "id_key" not in repr(keys) and keys.id_key.hex() not in repr(keys)


def test_unencrypted_key_slot_needs_no_passphrase() -> None:
    keys = KeyBundle.generate(b"i" * 16)
    assert open_slot(make_slot(keys, None, "ab" * 8, "init", keys), None, b"i" * 16).to_bytes() == keys.to_bytes()


# --- config -----------------------------------------------------------------------------------

def test_config_signature_detects_tampering_and_a_backup_only_key_cannot_sign() -> None:
    keys = KeyBundle.generate(bytes.fromhex("ab" * 16))
    raw = RepoConfig.new("ab" * 16, 1 << 20, "aes-256-gcm", 3).to_bytes(keys)
    doc, signature = peek_config(raw)
    check_config(doc, signature, keys)
    check_config(doc, signature, keys.backup_only())        # every key verifies
    assert RepoConfig.from_document(doc).chunk_size == 1 << 20
    with pytest.raises(IntegrityError):
        check_config(doc, signature, KeyBundle.generate(bytes.fromhex("ab" * 16)))
    with pytest.raises(IntegrityError):                     # a key from before a rotation
        check_config(*peek_config(RepoConfig.new("ab" * 16, 1 << 20, "aes-256-gcm", 3).to_bytes(keys.rotated())), keys)
    with pytest.raises(IntegrityError):
        RepoConfig.new("ab" * 16, 1 << 20, "aes-256-gcm", 3).to_bytes(keys.backup_only())
    stored = json.loads(raw)
    for field, value in (("chunk_size", 1 << 16), ("encryption", "none"), ("zstd_level", 1), ("extra", 1),
                         ("append_only", True)):
        forged, forged_sig = peek_config(json.dumps({**stored, field: value}).encode())
        with pytest.raises(IntegrityError):
            check_config(forged, forged_sig, keys)
    with pytest.raises(UnsupportedFormat):
        peek_config(json.dumps({**stored, "version": 99}).encode())
    with pytest.raises(IntegrityError):
        peek_config(raw[:-10])
    with pytest.raises(IntegrityError):
        peek_config(json.dumps({**stored, "keys": []}).encode())
    with pytest.raises(IntegrityError):
        RepoConfig.from_document({**doc, "chunk_size": 3 << 20})


# --- storage ----------------------------------------------------------------------------------

def test_storage_put_replaces_create_does_not(tmp_path: Path) -> None:
    storage = DirectoryStorage(tmp_path)
    storage.put("images/a", b"one")
    storage.put("images/a", b"two")
    assert storage.get("images/a") == b"two"
    assert storage.create("locks/x", b"first") is True
    assert storage.create("locks/x", b"second") is False
    assert storage.get("locks/x") == b"first"
    assert storage.get_range("images/a", 1, 5) == b"wo"
    assert not [p for p in tmp_path.rglob("*") if ".tmp-" in p.name]
    with pytest.raises(ObjectMissing):
        storage.get("images/missing")
    with pytest.raises(ValueError):
        storage.get("../outside")


def test_storage_lists_without_temp_files_and_sweeps_them(tmp_path: Path) -> None:
    storage = DirectoryStorage(tmp_path)
    storage.put("packs/ab/ab01", b"x")
    (tmp_path / "packs" / "ab" / "ab02.tmp-1-ff").write_bytes(b"half")
    assert list(storage.list("packs")) == ["packs/ab/ab01"]
    assert storage.remove_temp_files() == 1
    assert sorted(p.name for p in (tmp_path / "packs" / "ab").iterdir()) == ["ab01"]


def test_storage_put_on_full_disk_keeps_old_object(tmp_path: Path) -> None:
    with small_tmpfs(tmp_path / "tiny", "1m") as mnt:
        storage = DirectoryStorage(mnt)
        storage.put("images/a", b"old")
        with pytest.raises(StorageError, match="full"):
            storage.put("images/a", os.urandom(2 << 20))
        with pytest.raises(StorageError):
            storage.create("images/b", os.urandom(2 << 20))
        assert storage.get("images/a") == b"old"
        assert not storage.exists("images/b")
        assert not [p for p in mnt.rglob("*") if ".tmp-" in p.name]


def test_object_writer_is_invisible_until_commit_and_abort_leaves_nothing(tmp_path: Path) -> None:
    storage = DirectoryStorage(tmp_path)
    out = storage.open_writer("packs/cd/cd01")
    out.write(b"first ")
    out.write(memoryview(b"second"))
    assert not storage.exists("packs/cd/cd01") and list(storage.list("packs")) == []
    out.commit()
    assert storage.get("packs/cd/cd01") == b"first second"
    gone = storage.open_writer("packs/cd/cd02")
    gone.write(b"half")
    gone.abort()
    assert list(storage.list("packs")) == ["packs/cd/cd01"]
    assert not [p for p in tmp_path.rglob("*") if ".tmp-" in p.name]


def test_object_writer_on_full_disk_says_so_and_leaves_nothing(tmp_path: Path) -> None:
    with small_tmpfs(tmp_path / "tiny", "1m") as mnt:
        storage = DirectoryStorage(mnt)
        out = storage.open_writer("packs/ef/ef01")
        with pytest.raises(StorageError, match="full while writing packs/ef/ef01"):
            out.write(os.urandom(2 << 20))
        out.abort()
        assert not [p for p in mnt.rglob("*") if p.is_file()]


# --- packs ------------------------------------------------------------------------------------

def test_pack_writer_commits_packs_in_background_and_counts_them_only_once_stored(tmp_path: Path) -> None:
    storage = DirectoryStorage(tmp_path)
    envelope = Envelope(KEY)
    writer = PackWriter(storage, envelope, target_size=3000)
    blobs = {hashlib.sha256(bytes([i])).digest(): envelope.seal(OBJ_CHUNK, hashlib.sha256(bytes([i])).digest(),
                                                                  os.urandom(1000)) for i in range(10)}
    for cid, blob in blobs.items():
        writer.add(cid, blob, 1000)
    assert len(writer.written) < len(blobs)  # the last pack is still open
    writer.flush()
    assert set(writer.written) == set(blobs)
    packs = list(storage.list("packs"))
    assert len(packs) >= 3 and writer.bytes_written == sum(storage.size(n) for n in packs)
    for cid, loc in writer.written.items():
        assert storage.get_range(pack_name(loc.pack_id), loc.offset, loc.length) == blobs[cid]
    for pack_id in {loc.pack_id for loc in writer.written.values()}:
        assert {cid for cid, _ in read_pack_trailer(storage, envelope, pack_id)} <= set(blobs)
    assert not [p for p in tmp_path.rglob("*") if ".tmp-" in p.name]


class _GatedStorage(DirectoryStorage):
    """A directory whose commits wait at a gate: holds a pack commit open while a real signal lands."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.gate = threading.Event()
        self.committing = threading.Event()

    def open_writer(self, name: str):
        inner, storage = super().open_writer(name), self

        class Gated:
            def write(self, data) -> None:
                inner.write(data)

            def commit(self) -> None:
                storage.committing.set()
                storage.gate.wait(30)
                inner.commit()

            def abort(self) -> None:
                inner.abort()
        return Gated()


@pytest.fixture
def python_sigint():
    """Python's own SIGINT handler for the test: an earlier in-process CLI run in this worker leaves
    imgbackup's one-shot handler installed, which ignores a second signal (CI ran into it)."""
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    yield
    signal.signal(signal.SIGINT, old)


@pytest.mark.usefixtures("python_sigint")
def test_a_ctrl_c_while_waiting_for_a_pack_commit_never_loses_track_of_that_pack(tmp_path: Path) -> None:
    """A SIGINT that interrupts the wait for a commit leaves the commit listed: abort() waits for it
    and reports its pack as written, so a failed backup's clean-up removes it (CI saw one left)."""
    storage = _GatedStorage(tmp_path)
    envelope = Envelope(KEY)
    writer = PackWriter(storage, envelope, target_size=1 << 20)
    cid = hashlib.sha256(b"one").digest()
    writer.add(cid, envelope.seal(OBJ_CHUNK, cid, os.urandom(1000)), 1000)
    main = threading.main_thread().ident
    signaller = threading.Thread(target=lambda: (storage.committing.wait(30), time.sleep(0.2),
                                                 signal.pthread_kill(main, signal.SIGINT)))
    signaller.start()
    with pytest.raises(KeyboardInterrupt):
        writer.flush()                          # interrupted inside the join of the running commit
    signaller.join()
    storage.gate.set()
    writer.abort()                              # waits for the commit, which then lands
    assert set(writer.written) == {cid}
    assert [pack_name(loc.pack_id) for loc in writer.written.values()] == list(storage.list("packs"))


@pytest.mark.usefixtures("python_sigint")
def test_a_ctrl_c_while_a_full_pack_waits_for_the_commit_before_it_leaves_no_temp_file(tmp_path: Path) -> None:
    """The second pack fills while the first one's commit runs; a SIGINT that lands while it waits
    for that commit must leave the second pack where abort() drops it (CI found its temp file left)."""
    storage = _GatedStorage(tmp_path)
    envelope = Envelope(KEY)
    writer = PackWriter(storage, envelope, target_size=1 << 16)
    ids = [hashlib.sha256(bytes([i])).digest() for i in range(2)]
    writer.add(ids[0], envelope.seal(OBJ_CHUNK, ids[0], os.urandom(70000)), 70000)   # first pack: committing
    storage.committing.wait(30)
    main = threading.main_thread().ident
    signaller = threading.Thread(target=lambda: (time.sleep(0.3), signal.pthread_kill(main, signal.SIGINT)))
    signaller.start()
    with pytest.raises(KeyboardInterrupt):
        writer.add(ids[1], envelope.seal(OBJ_CHUNK, ids[1], os.urandom(70000)), 70000)   # seals, waits
    signaller.join()
    storage.gate.set()
    writer.abort()
    assert set(writer.written) == {ids[0]}
    left = sorted(p.name for p in tmp_path.rglob("*") if p.is_file())
    assert left == [pack_name(writer.written[ids[0]].pack_id).rsplit("/", 1)[1]], left


def test_a_commit_whose_start_was_cut_short_is_aborted_exactly_once(tmp_path: Path) -> None:
    """join() after an interrupted start(): the claim decides between the thread and the abort."""
    storage = DirectoryStorage(tmp_path)
    out = storage.open_writer("packs/aa/x")
    out.write(b"pack")
    commit = _Commit(storage, "packs/aa/x", out, {}, 4)      # never started, as if start() was cut short
    with pytest.raises(RuntimeError, match="never started"):
        commit.join()
    commit._thread.start()                                    # a thread that begins after all does nothing
    commit._thread.join(10)
    assert commit._error is None                              # it did not try to commit the aborted pack
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]


def test_delta_bases_survive_pack_trailers_and_chunk_index_files(tmp_path: Path) -> None:
    """Flag bit + side table: the bases come back from both, so the index can be rebuilt from packs."""
    storage = DirectoryStorage(tmp_path)
    envelope = Envelope(KEY)
    writer = PackWriter(storage, envelope)
    ids = [hashlib.sha256(bytes([i])).digest() for i in range(6)]
    bases = {ids[1]: ids[0], ids[4]: ids[0], ids[5]: ids[2]}
    for i, cid in enumerate(ids):
        writer.add(cid, envelope.seal(OBJ_CHUNK, cid, bytes([i]) * 100), 100 + i, bases.get(cid))
    writer.flush()
    (pack_id,) = {loc.pack_id for loc in writer.written.values()}
    from_trailer = dict(read_pack_trailer(storage, envelope, pack_id))
    assert from_trailer == writer.written
    assert {cid: loc.base for cid, loc in from_trailer.items() if loc.base} == bases
    assert [from_trailer[c].raw_length for c in ids] == [100 + i for i in range(6)]
    plain = encode_chunk_index(writer.written)
    assert len(plain) == 24 + 32 + 48 * 6 + 36 * 3           # head, pack ids, entries, side table
    assert dict(decode_chunk_index(plain, "x")) == writer.written
    broken = bytearray(plain)
    broken[24 + 32 + 44 + 3] ^= 0x80                          # entry 0 claims to be a delta
    with pytest.raises(IntegrityError):
        decode_chunk_index(bytes(broken), "x")


def test_a_chunk_known_twice_keeps_its_whole_copy() -> None:
    whole = BlobLocation(b"p" * 32, 16, 100, 100)   # valid entries: a sealed blob is at least an envelope
    delta = BlobLocation(b"q" * 32, 16, 50, 100, OID)
    for order in ([whole, delta], [delta, whole]):
        storage, envelope = MemoryStorage(), Envelope(None)
        for loc in order:                       # one index file each, as two backups would write them
            write_index_files(storage, envelope, [(b"c" * 32, loc)])
        index = ChunkIndex.load(storage, envelope)
        assert index.get(b"c" * 32) == whole and index.spare == [(b"c" * 32, delta)]


def test_pack_writer_abort_drops_the_open_pack(tmp_path: Path) -> None:
    storage = DirectoryStorage(tmp_path)
    writer = PackWriter(storage, Envelope(KEY))
    writer.add(OID, Envelope(KEY).seal(OBJ_CHUNK, OID, b"x" * 100), 100)
    assert [p for p in tmp_path.rglob("*") if ".tmp-" in p.name]
    writer.abort()
    assert list(storage.list("packs")) == [] and not writer.written
    assert not [p for p in tmp_path.rglob("*") if ".tmp-" in p.name]
