"""The catalog log: an append-only, hash-chained record of what happened to the images and holds.

Entry ``n`` is the object ``catalog/<n as 16 hex>``, created only if absent — never replaced, never
deleted, so the log also lives under S3 Object Lock. It is sealed (envelope type 8, object id = n as
8 bytes big-endian) and names the SHA-256 of entry n-1's stored bytes (entry 0: 64 zeros), so an
entry cannot be moved, replaced, or dropped from the middle unnoticed. Writers on several hosts
append at once: whoever loses the create of entry n reads it and tries n+1 after it.

A client remembers the newest entry it has seen (its number and hash, and the state folded up to it)
in ``$XDG_STATE_HOME/imgbackup/<repo id>/catalog.json``; a repository whose log ends before that
entry, or holds another entry there, was rolled back (or forked), and ``verify`` says so. The
remembered state also spares reading the whole log: only entries after it are read.

The events and what verify concludes from them: docs/FORMAT.md, "The catalog log".
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from imgbackup.crypto.envelope import Envelope
from imgbackup.errors import IntegrityError, RepositoryLocked
from imgbackup.format.layout import OBJ_CATALOG_ENTRY
from imgbackup.repository.catalogentry import (
    CATALOG,
    ZERO_HASH,
    CatalogState,
    CatalogView,
    Entry,
    actor,
    check_event,
    command_line,
    decode_entry,
    encode_entry,
    entry_name,
)
from imgbackup.repository.storage import ObjectMissing, Storage, confirm_stored

__all__ = ["CATALOG", "Catalog", "CatalogState", "CatalogView", "Entry", "actor", "check_event", "command_line",
           "decode_entry", "encode_entry", "entry_name", "state_dir", "ZERO_HASH"]

STATE_VERSION = 1
MAX_ENTRY = 4 << 20       # an entry is a few events of JSON; more is damage (or a forged frame)
MAX_RACES = 1000          # entries other writers may slip in before this one gives up
READ_THREADS = 8          # entries read at once when catching up (a bucket answers each GET slowly)
_NAME = re.compile(r"^catalog/([0-9a-f]{16})$")
log = logging.getLogger("imgbackup.storage")

# --- the log ----------------------------------------------------------------------------------

def state_dir(repo_id: str) -> Path:
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(base) / "imgbackup" / repo_id


class Catalog:
    """Appending to and reading one repository's log; remembers the newest entry seen."""

    def __init__(self, storage: Storage, envelope: Envelope, repo_id: str, remember: bool = True) -> None:
        self.storage = storage
        self.envelope = envelope
        self.repo_id = repo_id
        self.remember = remember
        self._known: tuple[int, str] | None = None      # newest entry this process saw or wrote
        self._warned = False
        self._appending = threading.Lock()   # threads of one process append in turn (no race among them)

    # -- local memory

    @property
    def state_file(self) -> Path:
        return state_dir(self.repo_id) / "catalog.json"

    def remembered(self) -> CatalogState | None:
        """The newest state this client saw (None without one, or when the file is unreadable)."""
        if not self.remember:
            return None
        try:
            doc = json.loads(self.state_file.read_text())
            if doc.get("version") != STATE_VERSION or doc.get("repository") != self.repo_id:
                return None
            return CatalogState.from_dict(doc["state"])
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return None

    def _store_memory(self, state: CatalogState) -> None:
        if not self.remember:
            return
        path = self.state_file
        tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps({"version": STATE_VERSION, "repository": self.repo_id,
                                       "state": state.to_dict()}))
            os.replace(tmp, path)
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink()
            if not self._warned:
                self._warned = True
                log.warning("cannot remember the catalog head in %s (%s): rollbacks of this repository "
                            "go unnoticed on this machine", path, exc.strerror or exc)

    def forget(self) -> None:
        """Drop what this client remembers (after an intended restore of the repository from an older copy)."""
        with contextlib.suppress(FileNotFoundError):
            self.state_file.unlink()

    # -- reading

    def read(self, seq: int) -> Entry:
        name = entry_name(seq)
        try:
            raw = self.storage.get(name)
        except ObjectMissing:
            raise IntegrityError(f"catalog entry {seq} is missing") from None
        obj_id = seq.to_bytes(8, "big")
        plain = self.envelope.open(OBJ_CATALOG_ENTRY, obj_id, raw, f"catalog entry {seq}", MAX_ENTRY)
        return decode_entry(plain, self.repo_id, seq, hashlib.sha256(raw).hexdigest())

    def _exists(self, seq: int) -> bool:
        return self.storage.exists(entry_name(seq))

    def head_seq(self, hint: int = -1) -> int:
        """The number of the newest entry (-1: none), by galloping then bisecting from ``hint``; the
        log is written in order, so the entries present are 0..head."""
        low = hint if hint >= 0 and self._exists(hint) else -1
        step = 1
        high = low + step
        while self._exists(high):
            low, step = high, step * 2
            high = low + step
        while high - low > 1:
            mid = (low + high) // 2
            if self._exists(mid):
                low = mid
            else:
                high = mid
        return low

    def _entries(self, seqs: list[int]) -> Iterator[Entry]:
        """Entries ``seqs`` in order, several read at once (a bucket answers each GET slowly)."""
        if len(seqs) <= 2:
            yield from (self.read(s) for s in seqs)
            return
        workers = min(READ_THREADS, max(1, int(getattr(self.storage, "read_parallelism", READ_THREADS))))
        pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="imgbackup-catalog")
        try:
            yield from pool.map(self.read, seqs)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def _check_anchor(self, anchor: CatalogState | None, head: int) -> str | None:
        """Why the log is not a continuation of what this client saw, or None."""
        if anchor is None:
            return None
        if head < anchor.seq:
            return (f"the catalog ends at entry {head}, but this client saw entry {anchor.seq}: the repository "
                    "was rolled back to an older state (or entries were deleted)")
        try:
            seen = self.read(anchor.seq)
        except IntegrityError as exc:
            return f"catalog entry {anchor.seq}, which this client saw, cannot be read now ({exc.args[0]})"
        if seen.hash != anchor.hash:
            return (f"catalog entry {anchor.seq} differs from the one this client saw: the repository was "
                    "rolled back and written again (a forked history)")
        return None

    def view(self) -> CatalogView:
        """The log's state now: from the remembered state on (or from entry 0), every link checked."""
        anchor = self.remembered()
        head = self.head_seq(anchor.seq if anchor else -1)
        rollback = self._check_anchor(anchor, head)
        state = anchor if anchor is not None and rollback is None else CatalogState()
        out = CatalogView(CatalogState(), rollback)
        todo = list(range(state.seq + 1, head + 1))
        try:
            for entry in self._entries(todo):
                if entry.prev != state.hash:
                    raise IntegrityError(f"catalog entry {entry.seq} does not follow entry {entry.seq - 1} "
                                         "(its hash link is wrong): entries were replaced")
                state.apply(entry)
                out.entries_read += 1
        except IntegrityError as exc:
            out.problems.append(str(exc.args[0]))
        out.state = state
        if rollback is None and not out.problems:
            self._known = (state.seq, state.hash)
            if anchor is None or state.seq != anchor.seq:
                self._store_memory(state)
        return out

    def accept_head(self) -> CatalogView:
        """Forget the remembered head and take the repository's log as it is now."""
        self.forget()
        return self.view()

    # -- appending

    def _start(self) -> tuple[int, str]:
        """The entry to append after: the one this process knows, else the remembered one if the
        repository still has it, else the newest found by searching."""
        if self._known is not None:
            return self._known
        anchor = self.remembered()
        if anchor is not None:
            try:
                seen = self.read(anchor.seq)
                if seen.hash == anchor.hash:
                    return anchor.seq, anchor.hash
            except IntegrityError:
                pass
            log.warning("the catalog of this repository is not the one this client saw (rolled back?): "
                        "'imgbackup verify' reports it")
            self.remember = False          # keep the remembered head, so verify keeps reporting
        head = self.head_seq(-1)
        return (head, self.read(head).hash) if head >= 0 else (-1, ZERO_HASH)

    def append(self, events: list[dict]) -> Entry:
        """Add one entry holding ``events``, after whatever other writers appended meanwhile."""
        events = [check_event(dict(e), "a new catalog entry") for e in events]
        with self._appending:
            return self._append(events)

    def _append(self, events: list[dict]) -> Entry:
        seq, prev = self._start()
        for _ in range(MAX_RACES):
            seq += 1
            plain = encode_entry(self.repo_id, seq, prev, events)
            sealed = self.envelope.seal(OBJ_CATALOG_ENTRY, seq.to_bytes(8, "big"), plain)
            if self.storage.create(entry_name(seq), sealed):
                confirm_stored(self.storage, entry_name(seq), len(sealed))
                entry = decode_entry(plain, self.repo_id, seq, hashlib.sha256(sealed).hexdigest())
                self._known = (seq, entry.hash)
                self._advance_memory(entry)
                return entry
            other = self.read(seq)               # another writer's entry: append after it
            if other.prev != prev:
                raise IntegrityError(f"catalog entry {seq} does not follow entry {seq - 1}: entries were replaced")
            prev = other.hash
        raise RepositoryLocked("could not append to the catalog: other writers keep appending first")

    def _advance_memory(self, entry: Entry) -> None:
        """Fold our own entry into the remembered state when it directly follows it."""
        anchor = self.remembered()
        if anchor is None and entry.seq == 0:
            anchor = CatalogState()
        if anchor is not None and anchor.seq == entry.seq - 1 and anchor.hash == entry.prev:
            anchor.apply(entry)
            self._store_memory(anchor)
