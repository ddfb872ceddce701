"""The collection plan's per-pack sums and the two-phase rule, on arrays (collectplan.py uses them).

Places are ``pack << 32 | offset`` (pack numbered by the listing, collectrows.py): a blob is known
once per place, a later record of a place winning (as a dict assignment would). A pack's dead bytes
are the lengths of its known blobs at places no kept copy occupies: one numpy group sum for all
packs.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import numpy as np

from imgbackup.engine.collectrows import SLICE, PlanTable
from imgbackup.repository.chunktable import ROW_DTYPE
from imgbackup.repository.marks import Marks, Safety
from imgbackup.repository.packs import BlobLocation


def sorted_by_pack(source: PlanTable, arrays: list[np.ndarray]) -> np.ndarray:
    """The refs of ``arrays`` (in order) grouped by pack, keeping their order within a pack."""
    refs = np.concatenate(arrays) if arrays else np.zeros(0, np.int64)
    packs = source.pack_numbers(refs)
    order = np.argsort(packs, kind="stable")
    del packs
    return refs[order]


def measure(source: PlanTable, known: tuple[np.ndarray, np.ndarray], live: list[np.ndarray],
            adopted: dict[int, list[tuple[bytes, BlobLocation]]], n_packs: int,
            refs_bytes: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(copies kept, dead bytes) of each pack: ``live`` refs and ``adopted`` copies are kept.
    ``refs_bytes`` (when given) gets the sealed bytes of each pack's ``live`` refs."""
    known_places, lengths = known
    occupied = np.zeros(len(known_places), bool)
    count = np.zeros(n_packs, np.int64)
    if refs_bytes is not None:
        for refs in live:
            for at in range(0, len(refs), SLICE):
                part = refs[at : at + SLICE]
                refs_bytes += np.rint(np.bincount(source.pack_numbers(part), weights=source.column(part, "length"),
                                                  minlength=n_packs)[:n_packs]).astype(np.int64)
    extra = np.array([(pack << 32) | loc.offset for pack, entries in adopted.items() for _, loc in entries], np.int64)
    parts = [refs[at : at + SLICE] for refs in live for at in range(0, len(refs), SLICE)]
    for part in [*parts, None]:              # in slices: the temporaries stay small
        places = extra if part is None else source.places(part)
        if len(places) and len(known_places):
            count += np.bincount(places >> 32, minlength=n_packs)[:n_packs]
            at = np.minimum(np.searchsorted(known_places, places), len(known_places) - 1)
            occupied[at[known_places[at] == places]] = True
    dead = np.where(occupied, np.uint32(0), lengths)
    del occupied
    starts = np.searchsorted(known_places, np.arange(n_packs + 1, dtype=np.int64) << 32)   # places sort by pack
    sums = np.zeros(n_packs, np.int64)
    some = np.flatnonzero(starts[1:] > starts[:-1])
    if len(some):
        sums[some] = np.add.reduceat(dead, starts[some], dtype=np.int64)
    return count, sums


class HeldCopies(Mapping):
    """Candidate copies held (kept in place and in the index): (chunk id, pack id, offset) -> the time
    first marked (0.0: found now). Refs into the table, one per distinct copy."""

    def __init__(self, source: PlanTable, refs: np.ndarray, times: np.ndarray) -> None:
        if len(refs) and len(source.table.spare):     # only a chunk with spare copies can list one copy twice
            copies = np.zeros(source.n_rows, bool)
            copies[source.keys(np.arange(source.n_rows, source.n_rows + len(source.table.spare)))] = True
            suspect = np.flatnonzero(copies[source.keys(refs)])
            del copies
            first = np.unique(_copy_keys(source, refs[suspect]), return_index=True)[1]
            keep = np.ones(len(refs), bool)
            keep[suspect] = False
            keep[suspect[first]] = True
            if not keep.all():
                refs, times = refs[keep], times[keep]
        self.source, self.refs, self.times = source, refs, times
        self._dict: dict | None = None

    def __len__(self) -> int:
        return len(self.refs)

    def items(self):  # type: ignore[override]
        for (cid, loc), at in zip(self.source.entries(self.refs), self.times.tolist(), strict=True):
            yield (cid, loc.pack_id, loc.offset), at

    def __iter__(self) -> Iterator[tuple[bytes, bytes, int]]:
        for key, _ in self.items():
            yield key

    def mark_arrays(self, select: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """The held copies (those ``select`` flags) as marks.write_marks takes them: arrays, no objects."""
        refs, times = (self.refs, self.times) if select is None else (self.refs[select], self.times[select])
        rows = self.source.rows_of(refs)
        view = rows.view(ROW_DTYPE)[:, 0] if len(rows) else np.zeros(0, ROW_DTYPE)
        packs = self.source.packs[view["pack"].astype(np.int64)]
        return np.ascontiguousarray(rows[:, :32]), packs, view["offset"].astype(np.uint32), times.astype(np.float64)

    def in_packs(self, numbers: list[int]) -> np.ndarray:
        """Which held copies lie in the packs numbered ``numbers`` (listing numbers)."""
        return np.isin(self.source.pack_numbers(self.refs), np.array(numbers, np.int32))

    def __getitem__(self, key):
        if self._dict is None:
            self._dict = dict(self.items())
        return self._dict[key]


def _copy_keys(source: PlanTable, refs: np.ndarray) -> np.ndarray:
    """One 16-byte value per copy (chunk key, place), equal exactly for equal copies; sorts as bytes."""
    out = np.empty((len(refs), 2), ">u8")
    out[:, 0] = source.keys(refs)
    out[:, 1] = source.places(refs)
    return out.view("V16")[:, 0]


def marked_times(source: PlanTable, marks: Marks, refs: np.ndarray) -> np.ndarray:
    """The first mark time of each copy of ``refs`` (NaN: not marked)."""
    at = np.full(len(refs), np.nan)
    if not len(marks.copy_ids) or not len(refs):
        return at
    keys = source.table.find(marks.copy_ids)
    packs, inverse = np.unique(np.ascontiguousarray(marks.copy_packs).view("V32")[:, 0], return_inverse=True)
    numbers = source.number_of(np.frombuffer(packs.tobytes(), np.uint8).reshape(-1, 32))[inverse.reshape(-1)]
    ok = (keys >= 0) & (numbers >= 0)
    if not ok.any():
        return at
    mark = np.empty((int(ok.sum()), 2), ">u8")
    mark[:, 0] = keys[ok]
    mark[:, 1] = (numbers[ok] << 32) | marks.copy_offsets[ok].astype(np.int64)
    mark_keys, times = mark.view("V16")[:, 0], marks.copy_times[ok]
    order = np.argsort(mark_keys, kind="stable")
    mark_keys, times = mark_keys[order], times[order]
    starts = np.flatnonzero(np.concatenate([[True], mark_keys[1:] != mark_keys[:-1]]))
    mark_keys, times = mark_keys[starts], np.minimum.reduceat(times, starts)
    wanted = _copy_keys(source, refs)
    pos = np.searchsorted(mark_keys, wanted)
    inside = pos < len(mark_keys)
    match = np.zeros(len(refs), bool)
    match[inside] = mark_keys[pos[inside]] == wanted[inside]
    at[match] = times[pos[match]]
    return at


def mature(safety: Safety, at: np.ndarray) -> np.ndarray:
    """``Safety.mature`` for an array of mark times."""
    from imgbackup.repository.lease import CLOCK_TOLERANCE

    ok = at + safety.grace <= safety.now
    for start in safety.session_starts:
        ok &= start >= at + CLOCK_TOLERANCE
    return ok


def hold_candidates(plan, source: PlanTable, located: np.ndarray, unindexed: np.ndarray,
                    adopted: dict[int, list], kept: np.ndarray, safety: Safety, provisional: bool) -> np.ndarray:
    """The two-phase rule: a copy of an unneeded chunk, or a pack no index names (and holding nothing
    needed), may go only once its mark is ripe; until then it is held — kept where it is (a held copy
    stays in the index too). A candidate found now is new: marked when the plan is carried out.
    Returns the refs of the held copies (every copy, as the packs keep them)."""
    needed_rows = np.zeros(source.n_rows, bool)
    needed_rows[located] = True
    spare_keys = source.keys(np.arange(source.n_rows, source.n_rows + len(source.table.spare), dtype=np.int64))
    candidates = np.concatenate([np.flatnonzero(~needed_rows),
                                 source.n_rows + np.flatnonzero(~needed_rows[spare_keys])]).astype(np.int64)
    del needed_rows, spare_keys
    ripe_now = safety.mature(safety.now)       # as if marked now: only with no grace and no session
    if len(plan.marks.copy_ids):
        at = marked_times(source, plan.marks, candidates)
        new = np.isnan(at)
        fresh = int(new.sum())
        held = np.where(new, not (provisional and ripe_now), ~mature(safety, np.where(new, 0.0, at)))
        refs, times = candidates[held], np.where(new, 0.0, at)[held]
        del at, new, held
    else:                                      # none marked: all found now (times untouched zero pages)
        fresh = len(candidates)
        refs = candidates if not (provisional and ripe_now) else candidates[:0]
        times = np.zeros(len(refs))
    del candidates
    plan.new_candidates += fresh
    plan.ripe_new += fresh if ripe_now else 0
    plan.held = HeldCopies(source, refs, times)
    for pack in np.flatnonzero(unindexed).tolist():
        if pack in adopted or kept[pack]:
            continue                  # it holds needed chunks no index named (adopted), or is unreadable
        pack_id = source.pack_id(pack)
        mark = plan.marks.packs.get(pack_id)
        if mark is None:
            plan.new_candidates += 1
            plan.ripe_new += ripe_now
            is_held = not (provisional and ripe_now)
        else:
            is_held = not safety.mature(mark)
        if is_held:
            plan.held_packs[pack_id] = mark or 0.0
            kept[pack] = True
    return refs
