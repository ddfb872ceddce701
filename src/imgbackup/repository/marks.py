"""Collection marks: stored copies found unreferenced, and when — the first phase of collection.

A collection never deletes what it has just found unneeded. It writes a mark object
``gc/<32 hex>`` (sealed, object type 10) naming the candidate copies (chunk id, pack, offset) and the
candidate packs that no index names, each with the storage time it was first marked; a later
collection deletes a candidate only if it is still unneeded, its mark is older than the grace
period, and no backup session that began before the mark is still alive. Backups load the marks
before the chunk index and never deduplicate against a marked copy: a chunk whose only copies are
marked is stored again. docs/FORMAT.md ("Garbage collection in two phases") has the proof.

Plaintext (little-endian): magic ``IMGBMARK``, version u16, 2 reserved bytes, P u32 (pack ids), C u32
(copies), O u32 (whole packs); P pack ids (32 bytes each); C copies of 48 bytes: chunk id (32),
pack number u32, offset u32, marked-at f64; O whole packs of 12 bytes: pack number u32, marked-at
f64. A marked-at of 0 means "when this object was written" (its storage time, ``modified``).
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field

import numpy as np

from imgbackup.crypto.envelope import Envelope
from imgbackup.errors import IntegrityError
from imgbackup.format.layout import OBJ_GC_MARKS
from imgbackup.repository.lease import CLOCK_TOLERANCE
from imgbackup.repository.lock import SESSION_PREFIX, leases
from imgbackup.repository.storage import ObjectMissing, Storage, confirm_stored

MARKS_FOLDER = "gc"
GC_GRACE = 3600.0        # seconds a candidate waits after its mark, beyond the session rule: margin for clock
                         # steps of the storage and for a backup that stalls between its lease and its listing
LIST_RETRIES = 5         # a mark deleted between listing and reading means a collection replaced it: list again
MARKS_MAGIC = b"IMGBMARK"
MARKS_VERSION = 1
MARKS_HEAD = struct.Struct("<8sHxxIII")
COPY_DTYPE = np.dtype([("id", "V32"), ("pack", "<u4"), ("offset", "<u4"), ("at", "<f8")])
PACK_DTYPE = np.dtype([("pack", "<u4"), ("at", "<f8")])
assert COPY_DTYPE.itemsize == 48 and PACK_DTYPE.itemsize == 12


@dataclass
class Marks:
    """The union of all mark objects: marked copies and whole packs, each with its first mark time."""

    copy_ids: np.ndarray = field(default_factory=lambda: np.zeros((0, 32), np.uint8))
    copy_packs: np.ndarray = field(default_factory=lambda: np.zeros((0, 32), np.uint8))
    copy_offsets: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint32))
    copy_times: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float64))
    packs: dict[bytes, float] = field(default_factory=dict)    # pack id -> marked at (packs no index names)
    names: list[str] = field(default_factory=list)             # the mark objects read

    def __len__(self) -> int:
        return len(self.copy_ids) + len(self.packs)

    def copy_keys(self) -> dict[tuple[bytes, bytes, int], float]:
        """(chunk id, pack id, offset) -> marked at (a Python view: for small sets and tests)."""
        out: dict[tuple[bytes, bytes, int], float] = {}
        for cid, pid, off, at in zip(self.copy_ids, self.copy_packs, self.copy_offsets.tolist(),
                                     self.copy_times.tolist(), strict=True):
            key = (cid.tobytes(), pid.tobytes(), off)
            out[key] = min(at, out.get(key, at))
        return out


CopyArrays = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]   # chunk ids, pack ids (k, 32), offsets, times


def copy_arrays(copies: list[tuple[bytes, bytes, int, float]] | CopyArrays) -> CopyArrays:
    """Marked copies as arrays; a list of (chunk id, pack id, offset, marked at) is sorted first."""
    if isinstance(copies, tuple):
        return copies
    rows = sorted(copies)
    ids = np.frombuffer(b"".join(r[0] for r in rows), np.uint8).reshape(-1, 32)
    packs = np.frombuffer(b"".join(r[1] for r in rows), np.uint8).reshape(-1, 32)
    return ids, packs, np.array([r[2] for r in rows], np.uint32), np.array([r[3] for r in rows], np.float64)


def encode_marks(copies: list[tuple[bytes, bytes, int, float]] | CopyArrays, packs: dict[bytes, float]) -> bytes:
    """Plaintext of one mark object: (chunk id, pack id, offset, marked at) copies — a list, or arrays
    (a collection holding millions) — and pack id -> marked at."""
    ids, copy_packs, offsets, times = copy_arrays(copies)
    whole_ids = np.frombuffer(b"".join(sorted(packs)), np.uint8).reshape(-1, 32)
    every = np.ascontiguousarray(np.concatenate([copy_packs, whole_ids])).view("V32")[:, 0]
    pack_ids, number = np.unique(every, return_inverse=True)     # sorted as bytes are
    number = number.reshape(-1)
    rows = np.zeros(len(ids), COPY_DTYPE)
    rows["id"] = np.ascontiguousarray(ids).view("V32")[:, 0] if len(ids) else rows["id"]
    rows["pack"], rows["offset"], rows["at"] = number[: len(ids)], offsets, times
    whole = np.zeros(len(packs), PACK_DTYPE)
    whole["pack"] = number[len(ids) :]
    whole["at"] = [packs[p] for p in sorted(packs)]
    head = MARKS_HEAD.pack(MARKS_MAGIC, MARKS_VERSION, len(pack_ids), len(rows), len(whole))
    return head + pack_ids.tobytes() + rows.tobytes() + whole.tobytes()


def decode_marks(plain: bytes, name: str, written: float) -> tuple[np.ndarray, np.ndarray, np.ndarray,
                                                                   np.ndarray, dict[bytes, float]]:
    what = f"collection marks {name}"
    if len(plain) < MARKS_HEAD.size:
        raise IntegrityError(f"{what} are truncated")
    magic, version, n_packs, n_copies, n_whole = MARKS_HEAD.unpack_from(plain)
    pos = MARKS_HEAD.size
    if magic != MARKS_MAGIC or version != MARKS_VERSION:
        raise IntegrityError(f"{what} have a bad header")
    if len(plain) != pos + 32 * n_packs + COPY_DTYPE.itemsize * n_copies + PACK_DTYPE.itemsize * n_whole:
        raise IntegrityError(f"{what} have the wrong length")
    pack_ids = np.frombuffer(plain, np.uint8, 32 * n_packs, pos).reshape(n_packs, 32)
    pos += 32 * n_packs
    rows = np.frombuffer(plain, COPY_DTYPE, n_copies, pos)
    whole = np.frombuffer(plain, PACK_DTYPE, n_whole, pos + COPY_DTYPE.itemsize * n_copies)
    for part in (rows, whole):
        if len(part) and int(part["pack"].max()) >= n_packs:
            raise IntegrityError(f"{what} name a pack they do not list")
        if len(part) and not (np.isfinite(part["at"]).all() and (part["at"] >= 0).all()):
            raise IntegrityError(f"{what} have a bad time")
    times = np.where(rows["at"] > 0, rows["at"], written)
    ids = np.frombuffer(rows["id"].tobytes(), np.uint8).reshape(-1, 32)
    packs = {pack_ids[int(p)].tobytes(): (float(at) if at > 0 else written) for p, at in whole.tolist()}
    return ids, pack_ids[rows["pack"].astype(np.int64)] if n_copies else np.zeros((0, 32), np.uint8), \
        rows["offset"].astype(np.uint32), times.astype(np.float64), packs


def gc_grace() -> float:
    """The grace period: ``IMGBACKUP_GC_GRACE_SECONDS`` (tests set 0), else GC_GRACE."""
    try:
        return max(float(os.environ.get("IMGBACKUP_GC_GRACE_SECONDS", GC_GRACE)), 0.0)
    except ValueError:
        return GC_GRACE


@dataclass
class Safety:
    """When a candidate marked at ``at`` (storage time) may be deleted: the mark is older than the
    grace period, and every backup session alive now began after the mark (so it read the marks,
    and never deduplicated against a marked copy). Judged before the images are read."""

    now: float
    grace: float
    session_starts: list[float]    # storage time each live session began (-inf: an unreadable lease)

    def mature(self, at: float) -> bool:
        return at + self.grace <= self.now and all(start >= at + CLOCK_TOLERANCE for start in self.session_starts)


def judge_safety(storage: Storage, grace: float | None = None, but: str | None = None) -> Safety:
    """The live sessions (``but`` the lease of that name: the caller's own), then the storage's clock
    (read after them: a mark is never judged older than it is)."""
    live = [state for state in leases(storage, SESSION_PREFIX) if state.alive and state.name != but]
    return Safety(storage.now(), gc_grace() if grace is None else grace,
                  [state.info.started if state.info else float("-inf") for state in live])


def load_marks(storage: Storage, envelope: Envelope) -> Marks:
    """Every mark object. A mark deleted between the listing and its read was replaced by a
    collection (which writes the new one first): then the listing is taken again, so a reader never
    sees fewer marks than there are."""
    for _ in range(LIST_RETRIES):
        marks = _read_marks(storage, envelope)
        if marks is not None:
            return marks
    raise IntegrityError("the collection marks (gc/) keep changing while they are read",
                         "run the command again once compact, delete or prune has finished")


def _read_marks(storage: Storage, envelope: Envelope) -> Marks | None:
    parts = []
    marks = Marks()
    for name in sorted(storage.list(MARKS_FOLDER)):
        try:
            written = storage.modified(name)
            sealed = storage.get(name)
        except ObjectMissing:
            return None
        plain = envelope.open(OBJ_GC_MARKS, bytes.fromhex(name.rsplit("/", 1)[1]), sealed, f"collection marks {name}")
        parts.append(decode_marks(plain, name, written))
        marks.names.append(name)
    if parts:
        marks.copy_ids = np.concatenate([p[0] for p in parts])
        marks.copy_packs = np.concatenate([p[1] for p in parts])
        marks.copy_offsets = np.concatenate([p[2] for p in parts])
        marks.copy_times = np.concatenate([p[3] for p in parts])
        for p in parts:
            for pid, at in p[4].items():
                marks.packs[pid] = min(at, marks.packs.get(pid, at))
    return marks


def marked_copies(marks: Marks) -> list[tuple[bytes, bytes, int]]:
    """(chunk id, pack id, offset) of every marked copy: what a backup must not deduplicate against."""
    return [(cid.tobytes(), pid.tobytes(), int(off))
            for cid, pid, off in zip(marks.copy_ids, marks.copy_packs, marks.copy_offsets.tolist(), strict=True)]


def write_marks(storage: Storage, envelope: Envelope, copies: list[tuple[bytes, bytes, int, float]] | CopyArrays,
                packs: dict[bytes, float]) -> tuple[str, float]:
    """Store one new mark object; (its name, its storage time — the mark time of new candidates)."""
    mark_id = os.urandom(16)
    name = f"{MARKS_FOLDER}/{mark_id.hex()}"
    sealed = envelope.seal(OBJ_GC_MARKS, mark_id, encode_marks(copies, packs))
    storage.put(name, sealed)
    confirm_stored(storage, name, len(sealed))
    return name, storage.modified(name)
