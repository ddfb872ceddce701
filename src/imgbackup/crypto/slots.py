"""Key slots (FORMAT.md 2.1): one passphrase's wrap of the key bundle, with a label and a signature.

Each slot wraps the whole bundle under its own Argon2id-derived key, LUKS-style: any slot opens the
repository, and changing one slot's passphrase rewrites only that slot. The wrap's associated data
binds the repository id, the slot id and the kind, so a slot moved or relabelled fails to open.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import time
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from imgbackup.crypto.keys import (
    KIND_BYTE,
    MAX_KDF_ITERATIONS,
    MAX_KDF_LANES,
    MAX_KDF_MEMORY_KIB,
    KeyBundle,
    bundle_length,
    derive_key,
    kdf_params_for_new_key,
)
from imgbackup.errors import IntegrityError, UnsupportedFormat, WrongPassphrase
from imgbackup.format import validate as v
from imgbackup.format.layout import KEY_BUNDLE_HEAD, KEY_GENERATION, MAX_GENERATIONS

SLOT_VERSION = 4
MAX_LABEL = 200           # characters: a host name and a note, not a document
SLOT_ID_BYTES = 8


def slot_name(slot_id: str) -> str:
    return f"keys/{slot_id}"


def new_slot_id() -> str:
    return os.urandom(SLOT_ID_BYTES).hex()


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def _unb64(text, what: str = "key slot") -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (ValueError, TypeError, binascii.Error):
        raise v.damaged(what, "a field is not base64") from None


def canonical(doc: dict) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def _aad(repo_id: bytes, slot_id: str, kind: str) -> bytes:
    return b"imgbackup-key\0" + repo_id + bytes.fromhex(slot_id) + bytes([KIND_BYTE[kind]])


def _signed_part(repo_id: bytes, doc: dict) -> bytes:
    fields = {k: doc[k] for k in ("created", "kind", "label", "slot")}
    return b"imgbackup-slot\0" + repo_id + canonical(fields)


@dataclass
class SlotInfo:
    """What ``key list`` shows of a slot: nothing secret."""

    slot: str
    kind: str
    label: str
    created: float
    changed: float
    signed: bool            # made by a full-key holder (the signature verifies)
    error: str | None = None

    def to_dict(self) -> dict:
        return {"slot": self.slot, "kind": self.kind, "label": self.label, "created": self.created,
                "changed": self.changed, "signed": self.signed, "error": self.error}


def make_slot(bundle: KeyBundle, passphrase: bytes | None, slot_id: str, label: str, signer: KeyBundle | None,
              created: float | None = None, signature: dict | None = None) -> dict:
    """A slot document wrapping ``bundle``; ``signer`` (a full bundle) signs it, or ``signature`` (the
    ``signed_by``/``signature`` of the slot it replaces) is kept. ``passphrase=None``: no encryption."""
    if len(label) > MAX_LABEL or any(ord(c) < 32 for c in label):
        raise ValueError(f"a key label is at most {MAX_LABEL} printable characters")
    now = time.time()
    doc = {"version": SLOT_VERSION, "slot": slot_id, "kind": bundle.kind, "label": label,
           "created": created if created is not None else now, "changed": now}
    if passphrase is None:
        doc.update(kdf=None, keys=_b64(bundle.to_bytes()))
    else:
        params = kdf_params_for_new_key()
        salt = os.urandom(16)
        kek = derive_key(passphrase, salt, params)
        nonce = os.urandom(12)
        sealed = AESGCM(kek).encrypt(nonce, bundle.to_bytes(), _aad(bundle.repo_id, slot_id, bundle.kind))
        doc.update(kdf={**params, "salt": _b64(salt)}, wrapped=_b64(nonce + sealed))
    if signer is not None:
        gen = signer.current
        doc.update(signed_by=gen.number, signature=gen.sign(_signed_part(bundle.repo_id, doc)).hex())
    elif signature:
        doc.update(signature)
    return doc


def parse_slot(raw: bytes, name: str) -> dict:
    """The slot document, every field checked before a passphrase is asked for or the KDF runs."""
    what = f"key slot {name}"
    doc = v.obj(v.parse_json(raw, what), what)
    version = v.integer(doc, "version", what, 0)
    if version != SLOT_VERSION:
        raise UnsupportedFormat(f"{what} has version {version}, not {SLOT_VERSION}")
    slot = v.hex_id(doc, "slot", what, SLOT_ID_BYTES)
    if name.rsplit("/", 1)[-1] != slot:
        raise v.damaged(what, f"it names slot {slot}, not its own name")
    v.text(doc, "kind", what, choices=tuple(KIND_BYTE))
    label = v.text(doc, "label", what)
    if len(label) > MAX_LABEL or any(ord(c) < 32 for c in label):
        raise v.damaged(what, "its label is too long or not printable")
    v.number(doc, "created", what)
    v.number(doc, "changed", what)
    if "signature" in doc:
        v.integer(doc, "signed_by", what, 1, MAX_GENERATIONS)
        v.hex_id(doc, "signature", what, 64)
    kdf = v.child(doc, "kdf", what, dict, nullable=True)
    if kdf is None:
        size = len(_unb64(v.text(doc, "keys", what), what))
        if (size - KEY_BUNDLE_HEAD.size) % KEY_GENERATION.size or size < bundle_length(1):
            raise v.damaged(what, f"'keys' holds {size} bytes, not a key bundle's")
        return doc
    where = f"{what} (kdf)"
    if v.text(kdf, "name", where) != "argon2id":
        raise UnsupportedFormat(f"{what}: unknown key derivation function {kdf['name'][:40]!r}")
    lanes = v.integer(kdf, "lanes", where, 1, MAX_KDF_LANES)
    v.integer(kdf, "memory_kib", where, 8 * lanes, MAX_KDF_MEMORY_KIB)   # Argon2 needs 8 KiB per lane
    v.integer(kdf, "iterations", where, 1, MAX_KDF_ITERATIONS)
    if len(_unb64(v.text(kdf, "salt", where), where)) < 8:
        raise v.damaged(where, "'salt' is shorter than Argon2's 8 bytes")
    wrapped = len(_unb64(v.text(doc, "wrapped", what), what))
    if (wrapped - 28 - KEY_BUNDLE_HEAD.size) % KEY_GENERATION.size or wrapped < 28 + bundle_length(1):
        raise v.damaged(what, f"'wrapped' holds {wrapped} bytes, not a key bundle's")
    return doc


def slot_info(doc: dict, repo_id: bytes, verifier: KeyBundle | None) -> SlotInfo:
    """``signed`` is checked with ``verifier``'s verify keys (any key holder has them)."""
    signed = False
    if verifier is not None and isinstance(doc.get("signed_by"), int) and isinstance(doc.get("signature"), str):
        gen = verifier.generation(doc["signed_by"])
        try:
            sig = bytes.fromhex(doc["signature"])
        except ValueError:
            sig = b""
        signed = gen is not None and gen.verify(sig, _signed_part(repo_id, doc))
    return SlotInfo(doc["slot"], doc["kind"], doc["label"], float(doc["created"]), float(doc["changed"]), signed)


def kept_signature(doc: dict) -> dict:
    return {k: doc[k] for k in ("signed_by", "signature") if k in doc}


def _bundle(raw: bytes, slot: str) -> KeyBundle:
    try:
        return KeyBundle.from_bytes(raw)
    except IntegrityError as exc:
        raise IntegrityError(f"key slot keys/{slot} is damaged: {exc}") from None


def open_slot(doc: dict, passphrase: bytes | None, repo_id: bytes) -> KeyBundle:
    """Unwrap one slot: WrongPassphrase when the passphrase is not this slot's."""
    if doc.get("kdf") is None:
        bundle = _bundle(_unb64(doc.get("keys")), doc["slot"])
    else:
        if passphrase is None:
            raise WrongPassphrase("this repository is encrypted and no passphrase was given")
        params = doc["kdf"]
        kek = derive_key(passphrase, _unb64(params.get("salt")), params)
        blob = _unb64(doc.get("wrapped"))
        try:
            raw = AESGCM(kek).decrypt(blob[:12], blob[12:], _aad(repo_id, doc["slot"], doc["kind"]))
        except (InvalidTag, ValueError):
            raise WrongPassphrase("wrong passphrase (or a damaged key slot)") from None
        bundle = _bundle(raw, doc["slot"])
    if bundle.kind != doc["kind"] or bundle.repo_id != repo_id:
        raise IntegrityError(f"key slot {doc['slot']} does not belong to this repository")
    return bundle
