"""Malformed metadata that authenticates (issue 9 §8): each case is one of the fault sweep's traceback
classes, or a sibling of it, written into a real repository. In an ``--encryption none`` repository
anyone can recompute the checksums (tests/forge.py does), so every structure must be checked before
use: the commands end with exit 6 naming the damaged object, never a traceback, never wrong bytes.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
from tests.forge import (
    ForgedImage,
    chunk_index_counts,
    forge_chunk_index,
    forge_pack_trailer,
    seal,
    zstd_frame_claiming,
)
from tests.malformed import COMMANDS, build_base, copy_repo, run_all, run_cli
from tests.support import cli

from imgbackup.format.layout import FORMAT_VERSION, OBJ_IMAGE_BODY, OBJ_IMAGE_HEADER


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> dict:
    return build_base(tmp_path_factory.mktemp("malformed"))


@pytest.fixture
def repo(base, tmp_path: Path) -> Path:
    return copy_repo(base, tmp_path / "repo")


def _damaged(outcomes, *commands: int, word: str = "") -> None:
    """Those commands found the damage: exit 6 (verify: 11, "found problems"), naming ``word``."""
    for n in commands:
        out = outcomes[n]
        assert out.code in ((6, 11) if out.args[0] == "verify" else (6,)), (out.args, out.stderr)
        assert word in out.stdout + out.stderr, (out.args, word, out.stdout, out.stderr)


# ---- the config: its MAC before any field --------------------------------------------------------

def _edit_config(repo: Path, edit) -> None:
    path = repo / "config"
    path.write_text(edit(path.read_text()))


CONFIG_CASES = {
    "id-char-flipped": lambda t: t.replace('"id": "', '"id": "z', 1),
    "id-other-hex": lambda t: t.replace('"id": "', '"id": "0', 1)[:-1] + "",
    "id-number": lambda t: json.dumps(dict(json.loads(t), id=7)),
    "id-short": lambda t: json.dumps(dict(json.loads(t), id="abcd")),
    "not-json": lambda t: t[:-5],
    "a-list": lambda t: "[1, 2]",
    "a-string": lambda t: '"config"',
    "signature-missing": lambda t: json.dumps({k: v for k, v in json.loads(t).items() if k != "signature"}),
    "signature-number": lambda t: json.dumps(dict(json.loads(t), signature=5)),
    "keys-empty": lambda t: json.dumps(dict(json.loads(t), keys=[])),
    "keys-generation-2": lambda t: json.dumps(dict(json.loads(t), keys=[dict(json.loads(t)["keys"][0], generation=2)])),
    "keys-public-changed": lambda t: json.dumps(dict(json.loads(t), keys=[dict(json.loads(t)["keys"][0],
                                                                                 data_public="00" * 32)])),
    "chunk-size-string": lambda t: json.dumps(dict(json.loads(t), chunk_size="65536")),
    "chunk-size-float": lambda t: json.dumps(dict(json.loads(t), chunk_size=65536.0)),
    "encryption-unknown": lambda t: json.dumps(dict(json.loads(t), encryption="rot13")),
    "zstd-level-list": lambda t: json.dumps(dict(json.loads(t), zstd_level=[3])),
    "created-object": lambda t: json.dumps(dict(json.loads(t), created={})),
    "extra-field": lambda t: json.dumps(dict(json.loads(t), extra=1)),
}


@pytest.mark.parametrize("case", sorted(CONFIG_CASES))
def test_damaged_config_is_exit_6_before_its_fields_are_used(base, repo: Path, tmp_path: Path, case: str) -> None:
    _edit_config(repo, CONFIG_CASES[case])
    outcomes = run_all(repo, base["full"], tmp_path, commands=(("list",), ("verify",)))
    _damaged(outcomes, 0, 1, word="config")


def test_config_id_changed_names_the_config_not_a_hex_error(base, repo: Path) -> None:
    """The sweep's one config traceback: a flipped character in `id`, through the real entry point."""
    _edit_config(repo, CONFIG_CASES["id-char-flipped"])
    proc = cli("list", repo=repo)
    assert proc.returncode == 6 and "Traceback" not in proc.stderr, proc.stderr
    assert "config" in proc.stderr and "fromhex" not in proc.stderr, proc.stderr


# ---- the key slot -------------------------------------------------------------------------------

def _keyfile(repo: Path) -> Path:
    return next((repo / "keys").iterdir())


KEYFILE_CASES = {
    "not-json": lambda d: "{",
    "slot-renamed": lambda d: json.dumps(dict(d, slot="0" * 16)),
    "label-control": lambda d: json.dumps(dict(d, label="a\x01b")),
    "kind-unknown": lambda d: json.dumps(dict(d, kind="admin")),
    "signature-short": lambda d: json.dumps(dict(d, signature="ab", signed_by=1)),
    "a-list": lambda d: "[]",
    "version-string": lambda d: json.dumps(dict(d, version="1")),
    "keys-missing": lambda d: json.dumps({k: v for k, v in d.items() if k != "keys"}),
    "keys-number": lambda d: json.dumps(dict(d, keys=12)),
    "keys-not-base64": lambda d: json.dumps(dict(d, keys="%%%")),
    "keys-short": lambda d: json.dumps(dict(d, keys="AAAA")),
    "kdf-string": lambda d: json.dumps(dict(d, kdf="argon2id")),
    "kdf-huge-memory": lambda d: json.dumps(dict(d, kdf={"name": "argon2id", "memory_kib": 1 << 40,
                                                           "iterations": 1, "lanes": 1, "salt": "AAAAAAAAAAAAAAAAAAAAAA=="},
                                                  wrapped="AAAA")),
}


@pytest.mark.parametrize("case", sorted(KEYFILE_CASES))
def test_damaged_key_file_is_exit_6(base, repo: Path, tmp_path: Path, case: str) -> None:
    path = _keyfile(repo)
    path.write_text(KEYFILE_CASES[case](json.loads(path.read_text())))
    outcomes = run_all(repo, base["full"], tmp_path, commands=(("list",),))
    _damaged(outcomes, 0, word="key slot")


# ---- image header JSON, correctly sealed ----------------------------------------------------------

def _set(field, value):
    return lambda m: {**m, field: value}


def _drop(field):
    return lambda m: {k: v for k, v in m.items() if k != field}


def _source(**fields):
    return lambda m: {**m, "source": {**m["source"], **fields}}


HEADER_CASES = {
    "a-list": lambda m: [m],
    "a-string": lambda m: "image",
    "a-number": lambda m: 42,
    "null": lambda m: None,
    "created-object": _set("created", {}),
    "created-string": _set("created", "yesterday"),
    "created-nan": _set("created", float("nan")),
    "chunk-size-missing": _drop("chunk_size"),
    "chunk-size-string": _set("chunk_size", "65536"),
    "chunk-size-zero": _set("chunk_size", 0),
    "source-number": _set("source", 1048576),
    "source-string": _set("source", "/dev/sda"),
    "source-missing": _drop("source"),
    "source-size-negative": _source(size=-1),
    "source-size-string": _source(size="1048576"),
    "source-size-huge": _source(size=1 << 70),
    "source-size-bool": _source(size=True),
    "source-path-number": _source(path=3),
    "name-number": _set("name", 3),
    "name-missing": _drop("name"),
    "type-unknown": _set("type", "weekly"),
    "parent-number": _set("parent", 12),
    "parent-not-hex": _set("parent", "zz" * 16),
    "id-missing": _drop("id"),
    "slots-string": _set("slots", "16"),
    "used-map-list": _set("used_map", []),
    "used-map-regions-string": lambda m: {**m, "used_map": {**m["used_map"], "regions": "all"}},
    "used-map-region-bad": lambda m: {**m, "used_map": {"enabled": True, "regions": [{"start": "0"}]}},
    "body-sha256-number": _set("body_sha256", 0),
    "content-digest-missing": _drop("content_digest"),
    "hostname-list": _set("hostname", ["a"]),
    "bad-ranges-string": _set("bad_ranges", "none"),
}


@pytest.mark.parametrize("case", sorted(HEADER_CASES))
def test_forged_image_header_is_exit_6(base, repo: Path, tmp_path: Path, case: str) -> None:
    image = ForgedImage(repo, base["incremental"])
    image.meta = HEADER_CASES[case](image.meta)
    image.save(fix_digests=False)    # the body is unchanged: its digest in the header still holds
    outcomes = run_all(repo, base["incremental"], tmp_path, commands=(
        ("list",), ("info", base["incremental"]), ("verify", base["incremental"]),
        ("restore", base["incremental"], "{out}"), ("restore", base["full"], "{out}")),
        expect={base["full"]: base["full_bytes"]})
    _damaged(outcomes, 1, 2, 3, word=base["incremental"])
    assert outcomes[0].code in (0, 6) and base["incremental"][:12] in outcomes[0].stdout + outcomes[0].stderr
    assert outcomes[4].code == 0, "the other image must still restore"


def test_header_not_utf8_is_exit_6(base, repo: Path, tmp_path: Path) -> None:
    image = ForgedImage(repo, base["full"])
    image.save(header=b"\xff\xfe{}")
    _damaged(run_all(repo, base["full"], tmp_path)[1:], 0, 1, 2)


# ---- image body, correctly sealed -----------------------------------------------------------------

def _body_with_slots(body: bytes, slots: int) -> bytes:
    return body[:16] + struct.pack("<Q", slots) + body[24:]


BODY_CASES = {
    "slots-2^40": lambda b: _body_with_slots(b, 1 << 40),
    "slots-2^64-1": lambda b: _body_with_slots(b, (1 << 64) - 1),
    "slots-one-more": lambda b: _body_with_slots(b, struct.unpack_from("<Q", b, 16)[0] + 1),
    "slot-kind-3": lambda b: b[:24] + b"\x03" + b[25:],
    "truncated-ids": lambda b: b[:-40],
    "empty": lambda b: b"",
    "magic": lambda b: b"IMGBSLOX" + b[8:],
    "chunk-size": lambda b: b[:12] + struct.pack("<I", 1 << 17) + b[16:],
    "bitmap-long": lambda b: b + b"\xff" * 9,
}


@pytest.mark.parametrize("case", sorted(BODY_CASES))
def test_forged_image_body_is_exit_6(base, repo: Path, tmp_path: Path, case: str) -> None:
    image = ForgedImage(repo, base["full"])
    image.body = BODY_CASES[case](image.body)
    image.save()      # body_sha256 recomputed: only the structure is wrong
    _damaged(run_all(repo, base["full"], tmp_path)[1:], 1, 2, word=base["full"])


@pytest.mark.parametrize("part", ["header", "body"])
def test_zstd_frame_declaring_a_huge_size_is_not_allocated(base, repo: Path, tmp_path: Path, part: str) -> None:
    image = ForgedImage(repo, base["full"])
    bomb = zstd_frame_claiming(1 << 40)
    if part == "header":
        sealed_body = seal(OBJ_IMAGE_BODY, image.oid, image.body)
        image.save(header=None, body_sealed=sealed_body)
        raw = image.path.read_bytes()
        head = seal(OBJ_IMAGE_HEADER, image.oid, bomb, comp=1)
        image.path.write_bytes(raw[:8] + struct.pack("<HxxI", FORMAT_VERSION, len(head)) + head + sealed_body)
    else:
        image.save(body_sealed=seal(OBJ_IMAGE_BODY, image.oid, bomb, comp=1))
    outcomes = run_all(repo, base["full"], tmp_path)
    _damaged(outcomes[1:] if part == "header" else outcomes[2:], 0, 1)


# ---- chunk-index files ----------------------------------------------------------------------------

def _entry_field(plain: bytes, row: int, offset: int, value: int) -> bytes:
    packs, _n, _d = chunk_index_counts(plain)
    pos = 24 + 32 * packs + 48 * row + offset
    return plain[:pos] + struct.pack("<I", value) + plain[pos + 4:]


INDEX_CASES = {
    "entries-2^32-1": lambda p: p[:16] + struct.pack("<I", 0xFFFFFFFF) + p[20:],
    "packs-2^32-1": lambda p: p[:12] + struct.pack("<I", 0xFFFFFFFF) + p[16:],
    "pack-number-out-of-range": lambda p: _entry_field(p, 0, 32, 99),
    "offset-in-pack-header": lambda p: _entry_field(p, 0, 36, 3),
    "length-zero": lambda p: _entry_field(p, 0, 40, 0),
    "length-huge": lambda p: _entry_field(p, 0, 40, 0xFFFFFFFF),   # past 4 GiB from any offset (0xFFFFFFF0 at offset 16 ends at 4 GiB: valid)
    "info-reserved-bits": lambda p: _entry_field(p, 0, 44, 1 << 28),
    "raw-length-over-chunk-size": lambda p: _entry_field(p, 0, 44, (1 << 24) + 1),
    "unsorted": lambda p: p[:24 + 32 * chunk_index_counts(p)[0]] + p[24 + 32 * chunk_index_counts(p)[0] + 48:
                          24 + 32 * chunk_index_counts(p)[0] + 96] + p[24 + 32 * chunk_index_counts(p)[0]:
                          24 + 32 * chunk_index_counts(p)[0] + 48] + p[24 + 32 * chunk_index_counts(p)[0] + 96:],
    "bomb": None,
    "truncated": lambda p: p[:-1],
    "magic": lambda p: b"IMGBCIDY" + p[8:],
}


@pytest.mark.parametrize("case", sorted(INDEX_CASES))
def test_forged_chunk_index_is_exit_6(base, repo: Path, tmp_path: Path, case: str) -> None:
    if case == "bomb":
        path = sorted((repo / "index").iterdir())[0]
        from tests.forge import OBJ_CHUNK_INDEX
        path.write_bytes(seal(OBJ_CHUNK_INDEX, bytes.fromhex(path.name), zstd_frame_claiming(1 << 40), comp=1))
    else:
        forge_chunk_index(repo, INDEX_CASES[case])
    outcomes = run_all(repo, base["full"], tmp_path, expect={base["full"]: base["full_bytes"]})
    _damaged(outcomes, 2, 3, word="chunk index")


def test_a_cached_index_never_hides_a_forged_index_file_from_verify(base, repo: Path, tmp_path: Path) -> None:
    """The local cache covers every index file (a list loaded them), then one file is forged: restore
    may serve the cached, authenticated entries (right bytes), but verify reads the repository's files."""
    warm = run_cli(["restore", "--yes", base["full"], tmp_path / "warm.img"], repo, index_cache=True)
    assert warm.code == 0, warm.stderr              # the cache now covers every index file
    forge_chunk_index(repo, INDEX_CASES["unsorted"])
    outcomes = run_all(repo, base["full"], tmp_path, expect={base["full"]: base["full_bytes"]}, index_cache=True)
    assert outcomes[3].code in (0, 6)             # run_all checked the bytes of a restore that succeeded
    _damaged(outcomes, 2, word="chunk index")


def test_stray_names_are_reported_not_crashed(base, repo: Path, tmp_path: Path) -> None:
    (repo / "index" / "not-hex").write_bytes(b"x")
    (repo / "images" / "zz").write_bytes(b"x")
    outcomes = run_all(repo, base["full"], tmp_path, expect={base["full"]: base["full_bytes"]})
    listed = outcomes[0].stdout + outcomes[0].stderr      # list names one of them (it may load the index first)
    assert outcomes[0].code in (0, 6) and ("images/zz" in listed or "index/not-hex" in listed), listed
    _damaged(outcomes, 2, 3, word="not-hex")


# ---- pack trailers (what repair reads) --------------------------------------------------------------

TRAILER_CASES = {
    "count-2^32-1": lambda p: p[:12] + struct.pack("<I", 0xFFFFFFFF) + p[16:],
    "deltas-2^32-1": lambda p: p[:16] + struct.pack("<I", 0xFFFFFFFF) + p[20:],
    "offset-in-header": lambda p: p[:20 + 32] + struct.pack("<I", 2) + p[20 + 36:],
    "length-past-trailer": lambda p: p[:20 + 36] + struct.pack("<I", 1 << 31) + p[20 + 40:],
    "reserved-bits": lambda p: p[:20 + 40] + struct.pack("<I", (1 << 27) | 5) + p[20 + 44:],
    "truncated": lambda p: p[:-3],
    "bomb": None,
}


@pytest.mark.parametrize("case", sorted(TRAILER_CASES))
def test_forged_pack_trailer_is_refused(base, repo: Path, case: str) -> None:
    from imgbackup.errors import IntegrityError
    from imgbackup.repository.packs import read_pack_trailer
    from imgbackup.repository.repo import Repository

    pack = sorted((repo / "packs").rglob("*"))[-1]
    if case == "bomb":
        raw = pack.read_bytes()
        t_off = struct.unpack_from("<Q", raw, len(raw) - 16)[0]
        sealed = seal(5, bytes.fromhex(pack.name), zstd_frame_claiming(1 << 40), comp=1)
        pack.write_bytes(raw[:t_off] + sealed + struct.pack("<QI4s", t_off, len(sealed), b"PEND"))
    else:
        forge_pack_trailer(pack, TRAILER_CASES[case])
    opened = Repository.open(repo, lambda: b"")
    with pytest.raises(IntegrityError, match=pack.name[:16]):
        read_pack_trailer(opened.storage, opened.envelope, bytes.fromhex(pack.name))


def test_in_process_runner_sees_a_healthy_repository(base, repo: Path, tmp_path: Path) -> None:
    """The harness itself: a clean repository lists, verifies and restores exactly."""
    outcomes = run_all(repo, base["incremental"], tmp_path, expect=base["bytes"])
    assert [o.code for o in outcomes] == [0, 0, 0, 0]
    assert run_cli(["verify"], repo).code == 0


# ---- damage records (heal), correctly sealed --------------------------------------------------------

def _record(entries) -> bytes:
    return json.dumps({"version": 1, "created": 1.0, "host": "h", "command": "verify", "entries": entries}).encode()


GOOD_ENTRY = {"chunk": "ab" * 32, "pack": "cd" * 32, "offset": 16, "length": 100, "reason": "damaged", "detail": "x"}
DAMAGE_CASES = {
    "not-json": b"{",
    "a-list": b"[]",
    "deep-nesting": b"[" * 100000 + b"]" * 100000,
    "nan-created": _record([]).replace(b"1.0", b"NaN"),
    "entries-string": json.dumps({"version": 1, "created": 1.0, "host": "h", "command": "c", "entries": "x"}).encode(),
    "offset-string": _record([{**GOOD_ENTRY, "offset": "16"}]),
    "chunk-short": _record([{**GOOD_ENTRY, "chunk": "ab"}]),
    "reason-unknown": _record([{**GOOD_ENTRY, "reason": "cosmic"}]),
    "bomb": None,
}


@pytest.mark.parametrize("case", sorted(DAMAGE_CASES))
def test_forged_damage_record_readers_go_on_and_backup_refuses(base, repo: Path, tmp_path: Path, case: str) -> None:
    """FORMAT.md section 11: a damaged record is ignored by readers (they authenticate every chunk
    anyway) and stops a backup (exit 6, naming the record), never a traceback."""
    record_id = bytes(range(16))
    content, comp = (zstd_frame_claiming(1 << 40), 1) if case == "bomb" else (DAMAGE_CASES[case], 0)
    (repo / "damage").mkdir(exist_ok=True)
    (repo / "damage" / record_id.hex()).write_bytes(seal(6, record_id, content, comp=comp))
    outcomes = run_all(repo, base["incremental"], tmp_path, expect=base["bytes"],
                       commands=(*COMMANDS, ("repair",), ("backup", "--type", "full", str(base["source"]))))
    assert [o.code for o in outcomes[:4]] == [0, 0, 0, 0], [o.stderr for o in outcomes]
    assert outcomes[5].code == 6 and record_id.hex() in outcomes[5].stderr, outcomes[5].stderr


# ---- an index entry whose length lies (a writer's bug, or a forger holding the id key) ---------------

@pytest.mark.parametrize("length", [1000, 2 * 65536])
def test_chunk_of_the_wrong_length_is_refused_before_writing(base, repo: Path, tmp_path: Path, length: int) -> None:
    """A data slot names a genuine, authentic chunk of the wrong length (in an --encryption none
    repository anyone can make one: the id key is in the key file). Restore refuses before writing a
    byte: no write past the slot, no stale bytes left in it."""
    import numpy as np

    from imgbackup._core import scan
    from imgbackup.repository.repo import Repository

    opened = Repository.open(repo, lambda: b"")
    plain = bytes(range(256)) * (length // 256) + bytes(length % 256)
    cid = scan.chunk_id(opened.keys.id_key, plain)
    writer = opened.pack_writer()
    writer.add(cid, opened.envelope.seal_chunk(cid, plain)[0], len(plain))
    writer.flush()
    opened.store_chunk_index(writer.written)
    index = opened.images.load(base["full"])
    index.ids[len(index.ids) // 2] = np.frombuffer(cid, np.uint8)    # not slot 0: the plan reads that one
    opened.images.write(index)                   # digests recomputed: the image itself is consistent
    target = tmp_path / "target.img"
    target.write_bytes(b"\xee" * len(base["full_bytes"]))
    outcome = run_cli(["restore", "--yes", base["full"], target], repo)
    outcome.check(outcome.args)
    assert outcome.code == 6 and cid.hex()[:16] in outcome.stderr and "bytes" in outcome.stderr, outcome.stderr
    unchanged = target.read_bytes() == b"\xee" * len(base["full_bytes"])   # a bool: no megabyte diff on failure
    assert unchanged, "the target was written"
