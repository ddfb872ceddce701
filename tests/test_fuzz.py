"""A seeded fault sweep over the repository's metadata (issue 9 §8): raw bit flips, truncations and
garbage in every metadata object of an encrypted and an unencrypted repository, and structurally
wrong but correctly sealed objects in the unencrypted one (checksums recomputed, as an attacker
would). Each damaged repository gets real CLI commands (list, info, verify, restore, repair's dry run; in this process,
tests/malformed.py): never a traceback, only documented exit codes, never wrong bytes restored with
exit 0. The quick sweep runs in CI (about 120 cases, at most 90 s); the long one (``slow``, opt-in with
IMGBACKUP_FUZZ_LONG=1) runs 1 500. Reproduce a failure
with IMGBACKUP_FUZZ_SEED and the case number in its message.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import struct
import time
from pathlib import Path

import pytest
from tests.forge import ForgedImage, forge_chunk_index, forge_pack_trailer, seal, unseal, zstd_frame_claiming
from tests.malformed import COMMANDS, build_base, run_all

SEED = int(os.environ.get("IMGBACKUP_FUZZ_SEED", "20261201"))
QUICK_CASES = 120
QUICK_BUDGET_S = 90      # the CI sweep stops here even on a loaded machine (it reports how far it got)
SLOW_CASES = int(os.environ.get("IMGBACKUP_FUZZ_CASES", "1500"))
TARGETS = ("config", "keyfile", "image", "index", "pack", "damage")
ENCRYPTED_TARGETS = ("config", "keyfile", "datakey", "image", "index", "pack")   # data keys: only when encrypted
# Damage records (FORMAT.md section 11) exist only after damage was found: the sweep forges one (in the
# unencrypted repository) naming a copy of a real chunk, then damages it like the rest.


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("fuzz")
    return {enc: build_base(root, enc) for enc in ("none", "aes-256-gcm")}


def _forge_damage_record(repo: Path, rng: random.Random) -> Path:
    entry = {"chunk": rng.randbytes(32).hex(), "pack": rng.randbytes(32).hex(), "offset": 16, "length": 100,
             "reason": "damaged", "detail": "found by the sweep"}
    doc = {"version": 1, "created": 1.0, "host": "h", "command": "verify", "entries": [entry]}
    record_id = rng.randbytes(16)
    path = repo / "damage" / record_id.hex()
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(seal(6, record_id, json.dumps(doc).encode()))
    return path


def _files(repo: Path, target: str) -> list[Path]:
    folder = {"config": None, "keyfile": "keys", "datakey": "datakeys", "image": "images", "index": "index",
              "pack": "packs", "damage": "damage"}[target]
    if folder is None:
        return [repo / "config"]
    return sorted(p for p in (repo / folder).rglob("*") if p.is_file())


# ---- raw damage: any repository -------------------------------------------------------------------

def _raw(rng: random.Random, path: Path) -> str:
    data = bytearray(path.read_bytes())
    how = rng.choice(("flip", "flip", "flips", "truncate", "garbage", "append", "zero-run"))
    if how == "flip":
        at = rng.randrange(len(data))
        data[at] ^= 1 << rng.randrange(8)
    elif how == "flips":
        for _ in range(rng.randint(2, 16)):
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    elif how == "truncate":
        del data[rng.randrange(len(data)):]
    elif how == "garbage":
        data = bytearray(rng.randbytes(rng.choice((0, 1, 23, len(data)))))
    elif how == "append":
        data += rng.randbytes(rng.randint(1, 64))
    else:
        at = rng.randrange(len(data))
        data[at:at + rng.randint(1, 64)] = bytes(min(64, len(data) - at))
    path.write_bytes(bytes(data))
    return f"{how} {path.name[:16]}"


# ---- structural damage, correctly sealed: --encryption none only ----------------------------------

def _weird_value(rng: random.Random):
    return rng.choice((None, True, -1, 0, 1 << 64, 2.5, float(1 << 70), "", "x" * 3, "ab" * 16, [], [1, 2],
                       {}, {"a": 1}, [[0, 512]], 1 << 40, -(1 << 63)))


def _mutate_json(rng: random.Random, doc):
    """One random change somewhere in a JSON document: a value replaced, a key dropped or added."""
    if not isinstance(doc, dict) or not doc or rng.random() < 0.05:
        return _weird_value(rng)
    key = rng.choice(sorted(doc))
    how = rng.random()
    if how < 0.2:
        return {k: v for k, v in doc.items() if k != key}
    if how < 0.3:
        return {**doc, "x" + key: _weird_value(rng)}
    if isinstance(doc[key], dict) and rng.random() < 0.7:
        return {**doc, key: _mutate_json(rng, doc[key])}
    if isinstance(doc[key], list) and doc[key] and isinstance(doc[key][0], dict) and rng.random() < 0.7:
        items = list(doc[key])
        items[0] = _mutate_json(rng, items[0])
        return {**doc, key: items}
    return {**doc, key: _weird_value(rng)}


def _mutate_binary(rng: random.Random, plain: bytes, counts_at: tuple[int, ...]) -> bytes:
    """A count field set to an extreme, a word of the body overwritten, or the plaintext cut."""
    data = bytearray(plain)
    how = rng.random()
    if how < 0.4 and counts_at:
        at = rng.choice(counts_at)
        width = 8 if at == -8 else 4
        at = 16 if at == -8 else at
        value = rng.choice((0, 1, (1 << (8 * width)) - 1, 1 << 31, struct.unpack_from("<I", data, at)[0] + 1))
        data[at:at + width] = value.to_bytes(width, "little")
    elif how < 0.8 and len(data) > 4:
        at = rng.randrange(len(data) - 4)
        data[at:at + 4] = struct.pack("<I", rng.choice((0, 1, 0xFFFFFFFF, 1 << 24, 1 << 31, rng.getrandbits(32))))
    else:
        del data[rng.randrange(len(data)):]
    return bytes(data)


def _structural(rng: random.Random, repo: Path, target: str, image_ids: list[str]) -> str:
    if target == "config":
        path = repo / "config"
        doc = json.loads(path.read_text())
        path.write_text(json.dumps(_mutate_json(rng, doc)))         # the MAC is left as it was
        return "config json"
    if target == "keyfile":
        path = _files(repo, "keyfile")[0]
        path.write_text(json.dumps(_mutate_json(rng, json.loads(path.read_text()))))
        return "key file json"
    if target == "image":
        image = ForgedImage(repo, rng.choice(image_ids))
        if rng.random() < 0.5:
            image.meta = _mutate_json(rng, image.meta)
            image.save(fix_digests=False)
            return "header json"
        if rng.random() < 0.1:
            from tests.forge import OBJ_IMAGE_BODY
            image.save(body_sealed=seal(OBJ_IMAGE_BODY, image.oid, zstd_frame_claiming(rng.choice((1 << 40, 1 << 30))),
                                        comp=1))
            return "body bomb"
        image.body = _mutate_binary(rng, image.body, (12, -8))
        image.save()
        return "body binary"
    if target == "damage":
        path = _forge_damage_record(repo, rng)
        doc = json.loads(unseal(path.read_bytes())[2])
        path.write_bytes(seal(6, bytes.fromhex(path.name), json.dumps(_mutate_json(rng, doc)).encode()))
        return "damage record json"
    if target == "index":
        forge_chunk_index(repo, lambda p: _mutate_binary(rng, p, (12, 16, 20)))
        return "chunk index binary"
    pack = rng.choice(_files(repo, "pack"))
    forge_pack_trailer(pack, lambda p: _mutate_binary(rng, p, (12, 16)))
    return f"trailer {pack.name[:16]}"


def _sweep(bases: dict, tmp: Path, cases: int, budget_s: float) -> int:
    rng = random.Random(SEED)
    started = time.monotonic()
    done = 0
    for case in range(cases):
        if time.monotonic() - started > budget_s:
            break
        encryption = rng.choice(("none", "none", "aes-256-gcm"))
        base = bases[encryption]
        repo = Path(shutil.copytree(base["repo"], tmp / f"case-{case}"))
        target = rng.choice(TARGETS if encryption == "none" else ENCRYPTED_TARGETS)
        structural = encryption == "none" and rng.random() < 0.6
        if target == "damage" and not structural:
            _forge_damage_record(repo, rng)
        image_ids = [base["full"], base["incremental"]]
        if structural:
            label = _structural(rng, repo, target, image_ids)
        else:
            label = _raw(rng, rng.choice(_files(repo, target)))
        image_id = rng.choice(image_ids)
        commands = rng.sample(COMMANDS + (("repair",),), 2)   # two commands per case keeps it cheap
        try:
            run_all(repo, image_id, tmp, passphrase="test-pass", expect=base["bytes"], commands=commands)
        except AssertionError as exc:
            raise AssertionError(f"seed {SEED} case {case} ({encryption}, {label}): {exc}") from None
        shutil.rmtree(repo)
        done += 1
    return done


def test_quick_metadata_fault_sweep(bases, tmp_path: Path) -> None:
    done = _sweep(bases, tmp_path, QUICK_CASES, QUICK_BUDGET_S)
    print(f"fault sweep: {done} cases, seed {SEED}")
    assert done >= 20, f"only {done} cases ran within {QUICK_BUDGET_S} s"


if os.environ.get("IMGBACKUP_FUZZ_LONG"):   # by hand, ~10 min: IMGBACKUP_FUZZ_LONG=1 pytest tests/test_fuzz.py
    @pytest.mark.slow
    def test_long_metadata_fault_sweep(bases, tmp_path: Path) -> None:
        """1 500 cases: outside the CI budget (so not even collected there, rather than skipped), for a
        sweep after a format or decoder change."""
        assert _sweep(bases, tmp_path, SLOW_CASES, float("inf")) == SLOW_CASES
