"""Key management on a repository: unlock, list, add, remove, change a passphrase, rotate.

Every change is one whole-object operation, so a crash leaves the old state or the new one: ``add``
creates a new slot object, ``passwd`` replaces one slot object atomically (``put``), ``remove``
deletes one. ``rotate`` writes its new slot before the new config and removes the old slots last;
``unlock`` skips a slot that unwraps but does not match the config, so at every point some slot
still opens the repository. ``remove`` and ``rotate`` hold the repository lock, so two of them
cannot together remove the last full key.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from pathlib import Path

from imgbackup.crypto.keys import FULL, KeyBundle
from imgbackup.crypto.slots import (
    SlotInfo,
    kept_signature,
    make_slot,
    new_slot_id,
    open_slot,
    parse_slot,
    slot_info,
    slot_name,
)
from imgbackup.errors import (
    ImageNotFound,
    ImgBackupError,
    IntegrityError,
    UnsupportedFormat,
    UsageError,
    WrongPassphrase,
)
from imgbackup.repository.config import CONFIG_NAME, check_config
from imgbackup.repository.repo import Repository, encode_slot
from imgbackup.repository.storage import ObjectMissing, Storage, confirm_stored

SLOT_ENV = "IMGBACKUP_KEY_SLOT"


def _state_file(repo_id: str) -> Path:
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(base) / "imgbackup" / "key-slots" / repo_id


def remembered_slot(repo_id: str) -> str | None:
    try:
        return _state_file(repo_id).read_text().strip() or None
    except OSError:
        return None


def remember_slot(repo_id: str, slot: str) -> None:
    """Which slot opened this repository here last (not secret): tried first next time, saving one
    Argon2id run (~0.3 s) per slot before it."""
    if remembered_slot(repo_id) == slot:
        return
    path = _state_file(repo_id)
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
        tmp.write_text(slot + "\n")
        os.replace(tmp, path)
    except OSError:
        pass


def read_slots(storage: Storage) -> tuple[list[dict], list[str]]:
    """Every parseable slot document, and an error line for each damaged one."""
    docs, errors = [], []
    for name in storage.list("keys"):
        try:
            docs.append(parse_slot(storage.get(name), name))
        except ObjectMissing:
            continue
        except (IntegrityError, UnsupportedFormat) as exc:
            errors.append(str(exc))
    return docs, errors


def _order(docs: list[dict], repo_id: str) -> list[dict]:
    wanted = os.environ.get(SLOT_ENV, "").strip()
    if wanted:
        chosen = [d for d in docs if d["slot"].startswith(wanted.lower()) or d["label"] == wanted]
        if not chosen:
            raise UsageError(f"{SLOT_ENV}={wanted}: no such key slot", "'imgbackup key list' shows the slots")
        return chosen
    first = remembered_slot(repo_id)
    return sorted(docs, key=lambda d: d["slot"] != first)


def unlock(storage: Storage, config: dict, signature: str, passphrase: Callable[[], bytes]
           ) -> tuple[KeyBundle, str, bool]:
    """The bundle of the first slot the passphrase opens that matches the config (``peek_config``'s
    document), its slot id, and whether that slot was unencrypted (``--encryption none``)."""
    repo_id = bytes.fromhex(config["id"])
    docs, damaged = read_slots(storage)
    if not docs:
        raise IntegrityError(f"the repository has no usable key slot ({'; '.join(damaged) or 'keys/ is empty'})",
                             "open it with the paper recovery sheet: 'imgbackup key import --paper FILE'")
    secret: bytes | None = None
    mismatch: ImgBackupError | None = None
    for doc in _order(docs, config["id"]):
        if doc.get("kdf") is not None and secret is None:
            secret = passphrase()
        try:
            bundle = open_slot(doc, secret, repo_id)
            check_config(config, signature, bundle)
        except WrongPassphrase:
            continue
        except IntegrityError as exc:    # unwraps but does not fit (an interrupted rotation, a damaged slot)
            mismatch = mismatch or exc
            continue
        remember_slot(config["id"], doc["slot"])
        return bundle, doc["slot"], doc.get("kdf") is None
    if mismatch is not None:
        raise mismatch
    count = len(docs)
    raise WrongPassphrase(f"wrong passphrase: it opens none of the {count} key slot{'s' if count > 1 else ''}")


def list_slots(repo: Repository) -> tuple[list[SlotInfo], list[str]]:
    docs, damaged = read_slots(repo.storage)
    infos = [slot_info(d, repo.keys.repo_id, repo.keys) for d in docs]
    return sorted(infos, key=lambda s: s.created), damaged


def resolve_slot(repo: Repository, spec: str) -> dict:
    docs, _ = read_slots(repo.storage)
    spec = spec.strip().lower()
    matches = [d for d in docs if spec and d["slot"].startswith(spec)] or [d for d in docs if d["label"] == spec]
    if not matches:
        raise ImageNotFound(f"no key slot matches {spec!r}", "'imgbackup key list' shows the slots")
    if len(matches) > 1:
        raise UsageError(f"key slot {spec!r} is ambiguous ({len(matches)} slots)", "give more of the slot id")
    return matches[0]


def _refuse_unencrypted(repo: Repository) -> None:
    if repo.config.encryption == "none":
        raise UsageError("this repository is not encrypted (--encryption none): it has no keys to manage")


def add_slot(repo: Repository, passphrase: bytes, label: str, backup_only: bool = False) -> SlotInfo:
    """A new slot holding the full key, or its backup-only part; signed by this (full) key."""
    _refuse_unencrypted(repo)
    repo.require_full_key("add keys")
    bundle = repo.keys.backup_only() if backup_only else repo.keys
    return _create_slot(repo.storage, bundle, passphrase, label, repo.keys)


def _create_slot(storage: Storage, bundle: KeyBundle, passphrase: bytes, label: str, signer: KeyBundle) -> SlotInfo:
    try:
        make_slot(bundle, None, "0" * 16, label, None)       # the label's check, before the KDF runs
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    while True:
        slot = new_slot_id()
        doc = make_slot(bundle, passphrase, slot, label, signer)
        data = encode_slot(doc)
        if storage.create(slot_name(slot), data):
            confirm_stored(storage, slot_name(slot), len(data))
            return slot_info(doc, bundle.repo_id, signer)


def import_paper(repo: Repository, passphrase: bytes, label: str) -> SlotInfo:
    """A full slot for the bundle the repository was opened with (from a paper sheet)."""
    _refuse_unencrypted(repo)
    repo.require_full_key("add keys")
    return _create_slot(repo.storage, repo.keys, passphrase, label, repo.keys)


def remove_slot(repo: Repository, spec: str) -> SlotInfo:
    """Delete one slot; never the last full one (nothing could read the images any more)."""
    _refuse_unencrypted(repo)
    repo.require_full_key("remove keys")
    with repo.lock("key remove"):
        doc = resolve_slot(repo, spec)
        docs, _ = read_slots(repo.storage)
        infos = {d["slot"]: slot_info(d, repo.keys.repo_id, repo.keys) for d in docs}
        fulls = [s for s, info in infos.items() if info.kind == FULL and s != doc["slot"]]
        if doc["kind"] == FULL and not fulls:
            raise UsageError(f"key slot {doc['slot']} is the last full key: without it nothing could restore "
                             "the images", "add another first: 'imgbackup key add'")
        repo.storage.delete(slot_name(doc["slot"]))
        return infos[doc["slot"]]


def change_passphrase(repo: Repository, new: bytes) -> SlotInfo:
    """Re-wrap the slot this repository was opened with under ``new``: one atomic replace."""
    _refuse_unencrypted(repo)
    if repo.slot is None:
        raise UsageError("opened with a recovery sheet, not a key slot: nothing to change",
                         "'imgbackup key import --paper' adds a slot with a new passphrase")
    name = slot_name(repo.slot)
    old = parse_slot(repo.storage.get(name), name)
    signer = repo.keys if repo.keys.full else None
    doc = make_slot(repo.keys, new, repo.slot, old["label"], signer, created=old["created"],
                    signature=None if signer else kept_signature(old))
    data = encode_slot(doc)
    repo.storage.put(name, data)
    confirm_stored(repo.storage, name, len(data))
    return slot_info(doc, repo.keys.repo_id, repo.keys)


def rotate(repo: Repository, passphrase: bytes, label: str) -> tuple[Repository, SlotInfo, list[SlotInfo]]:
    """A new key generation; a new slot (``passphrase``) holds it; every other slot is removed.

    Order: new slot, new config, then the old slots — at each point one of them opens the repository."""
    _refuse_unencrypted(repo)
    repo.require_full_key("rotate keys")
    with repo.lock("key rotate"):
        rotated = repo.keys.rotated()
        docs, damaged = read_slots(repo.storage)
        new = _create_slot(repo.storage, rotated, passphrase, label, rotated)
        config = dataclasses.replace(repo.config)
        data = config.to_bytes(rotated)
        repo.storage.put(CONFIG_NAME, data)
        confirm_stored(repo.storage, CONFIG_NAME, len(data))
        removed = []
        for doc in docs:
            removed.append(slot_info(doc, repo.keys.repo_id, repo.keys))
            repo.storage.delete(slot_name(doc["slot"]))
    remember_slot(config.id, new.slot)
    return Repository(repo.storage, config, rotated, repo.location, new.slot), new, removed



