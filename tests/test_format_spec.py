"""docs/FORMAT.md read as a stranger (issue 9 §7): what its text says, checked against what the tool
writes and accepts — the config signature's canonical JSON computed from the spec's rules alone (not with
the json module's serializer), and the refusal of a forged algorithm-0 object in an encrypted
repository.
"""

from __future__ import annotations

import base64
import json
import random
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from tests.forge import seal
from tests.malformed import build_base, copy_repo, run_cli
from tests.support import MIB, cli, need_tool, run

from imgbackup.format.layout import (
    FORMAT_VERSION,
    IMAGE_HEAD,
    OBJ_CHUNK_INDEX,
    OBJ_IMAGE_BODY,
    OBJ_IMAGE_HEADER,
)

SHORT_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def spec_string(text: str) -> str:
    """FORMAT.md 2.2: `"` and `\\` escaped, short escapes, every other character outside U+0020..U+007E
    (controls, DEL and all non-ASCII) as lowercase \\uXXXX (surrogate pairs outside the BMP), `/` as is."""
    out = []
    for ch in text:
        code = ord(ch)
        if ch in SHORT_ESCAPES:
            out.append(SHORT_ESCAPES[ch])
        elif code < 0x20 or 0x7F <= code <= 0xFFFF:
            out.append(f"\\u{code:04x}")
        elif code > 0xFFFF:
            code -= 0x10000
            out.append(f"\\u{0xD800 + (code >> 10):04x}\\u{0xDC00 + (code & 0x3FF):04x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def spec_float(value: float) -> str:
    """The shortest decimal that parses back to the same double; exponent form below 1e-4 or from 1e16."""
    digits = repr(value)       # Python's repr is the spec's reference for the digit string
    if "e" not in digits and "." not in digits and "inf" not in digits and "nan" not in digits:
        digits += ".0"
    return digits


def spec_canonical(value) -> str:
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return spec_float(value)
    if isinstance(value, str):
        return spec_string(value)
    if isinstance(value, list):
        return "[" + ",".join(spec_canonical(v) for v in value) + "]"
    return "{" + ",".join(f"{spec_string(k)}:{spec_canonical(value[k])}" for k in sorted(value)) + "}"


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("spec")
    return {enc: build_base(root, enc) for enc in ("none", "aes-256-gcm")}


def _signing_key(repo: Path) -> Ed25519PrivateKey:
    """FORMAT.md 2.1: the unencrypted slot's bundle; generation 1's Ed25519 seed is at 60 + 4 + 32 + 32."""
    doc = json.loads(next((repo / "keys").iterdir()).read_text())
    bundle = base64.b64decode(doc["keys"])
    return Ed25519PrivateKey.from_private_bytes(bundle[128:160])


def _signature(doc: dict, key: Ed25519PrivateKey) -> str:
    text = spec_canonical({k: v for k, v in doc.items() if k != "signature"})
    assert text.isascii()
    return key.sign(b"imgbackup-config\0" + text.encode("ascii")).hex()


def test_config_signature_matches_the_spec_rules(bases) -> None:
    repo = bases["none"]["repo"]
    doc = json.loads((repo / "config").read_text())
    assert isinstance(doc["created"], float) and isinstance(doc["chunk_size"], int)
    assert _signature(doc, _signing_key(repo)) == doc["signature"]     # Ed25519 is deterministic


@pytest.mark.parametrize("extra", [
    {"note": "é ünïcode / \"quoted\" \\ back\nline \u0001 \U0001f600 \x7f"},
    {"created": 1e16},
    {"created": 1.5e-05},
    {"created": 1764596739.0},
    {"created": 0.1 + 0.2},
    {"zz": [1, -2, 3.25, None, True, {"b": 1, "a": 2}]},
])
def test_config_written_by_the_spec_rules_opens(bases, tmp_path: Path, extra: dict) -> None:
    """A config a stranger's writer made from the spec (unknown fields included) is accepted; the same
    config signed over any other serialisation is refused."""
    repo = copy_repo(bases["none"], tmp_path / "repo")
    doc = {k: v for k, v in json.loads((repo / "config").read_text()).items() if k != "signature"}
    doc.update(extra)
    key = _signing_key(repo)
    (repo / "config").write_text(json.dumps({**doc, "signature": _signature(doc, key)}, indent=3, ensure_ascii=False))
    assert run_cli(["list"], repo).code == 0
    wrong = key.sign(b"imgbackup-config\0" + json.dumps(doc, sort_keys=True).encode()).hex()
    (repo / "config").write_text(json.dumps({**doc, "signature": wrong}))
    refused = run_cli(["list"], repo)
    assert refused.code == 6 and "config failed authentication" in refused.stderr


def _open_encrypted(repo: Path):
    from imgbackup.repository.repo import Repository

    return Repository.open(repo, lambda: b"test-pass")


def test_forged_algorithm_0_image_is_refused_in_an_encrypted_repository(bases, tmp_path: Path) -> None:
    """Someone without the key rewrites an image index with algorithm-0 envelopes (checksums right):
    the reader refuses it, since the config says aes-256-gcm (FORMAT.md sections 3 and 10)."""
    base = bases["aes-256-gcm"]
    repo = copy_repo(base, tmp_path / "repo")
    image_id = base["full"]
    opened = _open_encrypted(repo)
    path = repo / "images" / image_id
    raw = path.read_bytes()
    oid = bytes.fromhex(image_id)
    hlen = IMAGE_HEAD.unpack_from(raw)[2]
    header = opened.envelope.open(OBJ_IMAGE_HEADER, oid, raw[IMAGE_HEAD.size:IMAGE_HEAD.size + hlen], "header")
    body = opened.envelope.open(OBJ_IMAGE_BODY, oid, raw[IMAGE_HEAD.size + hlen:], "body")
    forged_header = seal(OBJ_IMAGE_HEADER, oid, header)
    path.write_bytes(IMAGE_HEAD.pack(b"IMGBIMG1", FORMAT_VERSION, len(forged_header)) + forged_header
                     + seal(OBJ_IMAGE_BODY, oid, body))
    for args in (["info", image_id], ["restore", image_id, tmp_path / "out.img"]):
        proc = cli(*args, repo=repo)
        assert proc.returncode == 6 and "Traceback" not in proc.stderr, proc.stderr
        assert image_id in proc.stderr and "envelope" in proc.stderr, proc.stderr
    assert not (tmp_path / "out.img").exists()
    assert cli("restore", base["incremental"], tmp_path / "other.img", repo=repo).returncode == 0


def test_forged_algorithm_0_chunk_index_is_refused(bases, tmp_path: Path) -> None:
    """An extra chunk-index file sealed with algorithm 0 (it could point chunks anywhere): refused."""
    base = bases["aes-256-gcm"]
    repo = copy_repo(base, tmp_path / "repo")
    existing = sorted((repo / "index").iterdir())[0]
    plain = _open_encrypted(repo).envelope.open(OBJ_CHUNK_INDEX, bytes.fromhex(existing.name),
                                                existing.read_bytes(), "index")
    file_id = bytes(range(32))
    (repo / "index" / file_id.hex()).write_bytes(seal(OBJ_CHUNK_INDEX, file_id, plain))
    outcome = run_cli(["restore", base["full"], tmp_path / "out.img"], repo, passphrase="test-pass")
    outcome.check(outcome.args)
    assert outcome.code == 6 and file_id.hex() in outcome.stderr and "envelope" in outcome.stderr


def _free_blocks(image: Path) -> set[int]:
    """The filesystem's free blocks, from dumpe2fs's per-group "Free blocks:" lists."""
    out = run("dumpe2fs", image).stdout
    free: set[int] = set()
    for line in out.splitlines():
        line = line.strip()
        if not line.startswith("Free blocks: "):
            continue
        for part in filter(None, (p.strip() for p in line[len("Free blocks: "):].split(","))):
            first, _, last = part.partition("-")
            free.update(range(int(first), int(last or first) + 1))
    return free


def test_used_block_zeroing_is_at_4_kib_on_a_1_kib_ext4(tmp_path: Path) -> None:
    """FORMAT.md section 4: whole free 4 KiB blocks restore as zeros; free 1 KiB blocks that share a
    4 KiB block with a used one keep what the disk held (here a 'deleted data' marker)."""
    need_tool("mkfs.ext4", "dumpe2fs")
    files = tmp_path / "files"
    files.mkdir()
    (files / "a").write_bytes(random.Random(1).randbytes(5000))
    (files / "b").write_bytes(random.Random(2).randbytes(1500))
    image = tmp_path / "fs.img"
    marker = b"DELETED!"
    image.write_bytes(marker * (8 * MIB // len(marker)))     # what earlier, deleted files left behind
    run("mkfs.ext4", "-q", "-F", "-b", "1024", "-E", "nodiscard", "-d", files, image)
    free = _free_blocks(image)
    repo = tmp_path / "repo"
    assert cli("init", "--encryption", "none", repo=repo).returncode == 0
    assert cli("backup", image, repo=repo).returncode == 0
    restored = tmp_path / "restored.img"
    assert cli("restore", "latest", restored, repo=repo).returncode == 0
    source, out = image.read_bytes(), restored.read_bytes()
    kept = 0
    for block4 in range(len(source) // 4096):
        subs = range(4 * block4, 4 * block4 + 4)
        if all(b in free for b in subs):
            assert out[4096 * block4:4096 * (block4 + 1)] == bytes(4096), f"free 4 KiB block {block4} not zeroed"
            continue
        assert out[4096 * block4:4096 * (block4 + 1)] == source[4096 * block4:4096 * (block4 + 1)]
        kept += sum(1 for b in subs if b in free and marker in out[1024 * b:1024 * (b + 1)])
    assert kept > 0, "expected free 1 KiB blocks beside used ones to keep their old contents, as documented"


def test_decompression_is_bounded_before_and_while_decompressing() -> None:
    """format/validate.decompress: a declared size over the limit is refused before anything is
    allocated; a large honest frame decompresses in pieces; a frame without a declared size stops at
    the limit."""
    import zstandard

    from imgbackup.errors import IntegrityError
    from imgbackup.format.validate import EAGER_DECOMPRESS_LIMIT, decompress

    dec = zstandard.ZstdDecompressor()
    content = bytes(EAGER_DECOMPRESS_LIMIT + 4096)
    frame = zstandard.ZstdCompressor(level=1).compress(content)
    assert decompress(dec, frame, len(content), "big") == content          # the piecewise path
    with pytest.raises(IntegrityError, match="declares"):
        decompress(dec, frame, len(content) - 1, "big")
    unsized = zstandard.ZstdCompressor(level=1, write_content_size=False).compressobj()
    frame = unsized.compress(bytes(3 << 20)) + unsized.flush()
    assert zstandard.frame_content_size(frame) == -1
    assert len(decompress(dec, frame, 3 << 20, "unsized")) == 3 << 20
    with pytest.raises(IntegrityError, match="unsized"):
        decompress(dec, frame, 1 << 20, "unsized")
