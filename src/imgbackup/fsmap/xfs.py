"""XFS: free space from the per-AG by-block B+tree (bnobt), cross-checked against the by-size
tree (cntbt) and the AGF's free count, and only when the internal log is clean.

All fields are big-endian. Block numbers inside an AG are AG-relative; ``sb_logstart`` is an
encoded fsblock (agno << agblklog | agbno). A log is clean when its head record is a
lone unmount record ending exactly at the head (the kernel's xlog_check_unmount_rec); the
head is where the cycle number stamped on every 512-byte log block drops.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from imgbackup.fsmap.base import FsMapUnsure, FsUsage, Reader, all_used, clear_range, read_exact

SB_MAGIC, AGF_MAGIC, LOG_MAGIC = b"XFSB", b"XAGF", 0xFEEDBABE
BNO_MAGICS, CNT_MAGICS = (b"ABTB", b"AB3B"), (b"ABTC", b"AB3C")
INCOMPAT_NEEDSREPAIR = 0x10
INCOMPAT_KNOWN = 0x1 | 0x2 | 0x4 | 0x8 | 0x20
BB = 512
LOG_WINDOW = 4096  # 8 in-core log buffers of up to 256 KiB: how far unordered writes can reach
UNMOUNT_TRANS = 0x20
MAX_BTREE_BLOCKS = 1 << 22   # far more free-space btree blocks than a 1 TiB AG needs: a walk this long is a loop


@dataclass
class Super:
    block_size: int
    dblocks: int
    agblocks: int
    agcount: int
    agblklog: int
    sectsize: int
    logstart: int
    logblocks: int
    version: int
    incompat: int
    log_incompat: int
    inprogress: int

    def ag_len(self, agno: int) -> int:
        return min(self.agblocks, self.dblocks - agno * self.agblocks)


def _parse_super(raw: bytes) -> Super:
    if raw[:4] != SB_MAGIC:
        raise FsMapUnsure("no XFS superblock")
    bs, dblocks = struct.unpack_from(">IQ", raw, 4)
    logstart = struct.unpack_from(">Q", raw, 48)[0]
    agblocks, agcount, _rbm, logblocks, vnum, sectsize = struct.unpack_from(">IIIIHH", raw, 84)
    version = vnum & 0xF
    incompat, log_incompat = struct.unpack_from(">II", raw, 216) if version == 5 else (0, 0)
    return Super(block_size=bs, dblocks=dblocks, agblocks=agblocks, agcount=agcount,
                 agblklog=raw[124], sectsize=sectsize, logstart=logstart, logblocks=logblocks,
                 version=version, incompat=incompat, log_incompat=log_incompat, inprogress=raw[126])


def probe(read: Reader, offset: int, length: int) -> bool:
    """True when an XFS superblock with a sane geometry starts the region."""
    raw = bytes(read(offset, 512))
    if len(raw) < 512 or raw[:4] != SB_MAGIC:
        return False
    sb = _parse_super(raw)
    return (sb.block_size in (512, 1024, 2048, 4096, 8192, 16384, 32768, 65536)
            and sb.agcount > 0 and sb.agblocks > 0 and sb.version in (4, 5))


def _check_trust(sb: Super, length: int) -> None:
    if sb.inprogress:
        raise FsMapUnsure("XFS mkfs did not finish (sb_inprogress)")
    if sb.incompat & INCOMPAT_NEEDSREPAIR:
        raise FsMapUnsure("XFS is flagged needsrepair: run xfs_repair")
    if sb.incompat & ~INCOMPAT_KNOWN:
        raise FsMapUnsure(f"unknown XFS incompat features 0x{sb.incompat & ~INCOMPAT_KNOWN:x}")
    if sb.log_incompat:
        raise FsMapUnsure("XFS log has incompat items (not cleanly unmounted)")
    if sb.dblocks * sb.block_size > length:
        raise FsMapUnsure("XFS filesystem is larger than its region")
    if (sb.agcount - 1) * sb.agblocks >= sb.dblocks or sb.agcount * sb.agblocks < sb.dblocks:
        raise FsMapUnsure("XFS AG geometry does not add up")
    if sb.logstart == 0:
        raise FsMapUnsure("XFS with an external log: cannot tell whether it is clean")
    agno, agbno = sb.logstart >> sb.agblklog, sb.logstart & ((1 << sb.agblklog) - 1)
    if agno >= sb.agcount or agbno + sb.logblocks > sb.ag_len(agno) or sb.logblocks == 0:
        raise FsMapUnsure("XFS internal log lies outside its AG")


class _Log:
    """Random access to the internal log in 512-byte basic blocks."""

    def __init__(self, read: Reader, offset: int, sb: Super) -> None:
        agno, agbno = sb.logstart >> sb.agblklog, sb.logstart & ((1 << sb.agblklog) - 1)
        self.base = offset + (agno * sb.agblocks + agbno) * sb.block_size
        self.n = sb.logblocks * sb.block_size // BB
        self.read = read

    def block(self, i: int) -> bytes:
        return read_exact(self.read, self.base + (i % self.n) * BB, BB)

    def cycle(self, i: int) -> int:
        raw = self.block(i)
        word = struct.unpack_from(">I", raw)[0]
        return struct.unpack_from(">I", raw, 4)[0] if word == LOG_MAGIC else word


def _find_head(log: _Log) -> tuple[int, int, int]:
    """(head block, current cycle, previous cycle): the first block still of the older cycle."""
    first, last = log.cycle(0), log.cycle(log.n - 1)
    if first == 0:
        raise FsMapUnsure("XFS log was never written")
    if first == last or last not in (first - 1, 0):
        raise FsMapUnsure("cannot locate the XFS log head")
    lo, hi = 0, log.n - 1
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if log.cycle(mid) == first:
            lo = mid
        else:
            hi = mid
    return hi, first, last


def check_log_clean(read: Reader, offset: int, sb: Super) -> None:
    """Raise FsMapUnsure unless the internal log ends in a lone unmount record."""
    log = _Log(read, offset, sb)
    head, cur, old = _find_head(log)
    window = min(LOG_WINDOW, log.n)
    for i in range(max(0, head - window), head):
        if log.cycle(i) != cur:
            raise FsMapUnsure("XFS log has a hole before its head (torn writes): dirty")
    for i in range(head, min(log.n, head + window)):
        if log.cycle(i) != old:
            raise FsMapUnsure("XFS log has newer blocks past its head: dirty")
    for back in range(1, window + 1):
        rec = (head - back) % log.n
        raw = log.block(rec)
        if struct.unpack_from(">I", raw)[0] == LOG_MAGIC:
            break
    else:
        raise FsMapUnsure("no XFS log record before the head")
    version, length = struct.unpack_from(">II", raw, 8)
    nops = struct.unpack_from(">I", raw, 40)[0]
    h_size = struct.unpack_from(">I", raw, 320)[0]
    hblks = max(1, -(-h_size // 32768)) if version & 2 else 1
    if (rec + hblks + -(-length // BB)) % log.n != head % log.n or nops != 1:
        raise FsMapUnsure("XFS log head is not an unmount record: log is dirty (mount it to replay)")
    if not log.block(rec + hblks)[9] & UNMOUNT_TRANS:
        raise FsMapUnsure("XFS log head is not an unmount record: log is dirty (mount it to replay)")


def _walk(read: Reader, ag_base: int, sb: Super, ag_len: int, root: int, level: int,
          magics: tuple[bytes, bytes]) -> list[tuple[int, int]]:
    """All (start, count) records of one free-space B+tree, iteratively, loop-safe."""
    hdr = 56 if sb.version == 5 else 16
    maxrecs = (sb.block_size - hdr) // 12
    out: list[tuple[int, int]] = []
    stack, seen = [(root, level)], set()
    while stack:
        agbno, want = stack.pop()
        if agbno in seen or not 0 < agbno < ag_len or len(seen) > MAX_BTREE_BLOCKS:
            raise FsMapUnsure(f"XFS btree pointer {agbno} loops or leaves the AG")
        seen.add(agbno)
        raw = read_exact(read, ag_base + agbno * sb.block_size, sb.block_size)
        lvl, nrecs = struct.unpack_from(">HH", raw, 4)
        if raw[:4] not in magics or lvl != want:
            raise FsMapUnsure(f"XFS btree block {agbno}: bad magic or level")
        if nrecs > (maxrecs if lvl else (sb.block_size - hdr) // 8):
            raise FsMapUnsure(f"XFS btree block {agbno}: too many records")
        if lvl == 0:
            out += list(struct.iter_unpack(">II", raw[hdr:hdr + 8 * nrecs]))
        else:
            ptrs = struct.unpack_from(f">{nrecs}I", raw, hdr + 8 * maxrecs)
            stack += [(p, lvl - 1) for p in reversed(ptrs)]
    return out


def _ag_free(read: Reader, offset: int, sb: Super, agno: int) -> list[tuple[int, int]]:
    """Free extents of one AG, after the AGF and both trees agree with each other."""
    ag_base = offset + agno * sb.agblocks * sb.block_size
    agf = read_exact(read, ag_base + sb.sectsize, 64)
    magic, _v, seqno, length, bno_root, cnt_root, _r, bno_lvl, cnt_lvl = struct.unpack_from(">4sIIIIIIII", agf)
    freeblks = struct.unpack_from(">I", agf, 52)[0]
    if magic != AGF_MAGIC or seqno != agno or length != sb.ag_len(agno):
        raise FsMapUnsure(f"XFS AG {agno}: bad AGF header")
    bno = _walk(read, ag_base, sb, length, bno_root, bno_lvl - 1, BNO_MAGICS)
    cnt = _walk(read, ag_base, sb, length, cnt_root, cnt_lvl - 1, CNT_MAGICS)
    if sorted(bno) != sorted(cnt):
        raise FsMapUnsure(f"XFS AG {agno}: by-block and by-size free trees disagree")
    end = 0
    for start, count in bno:
        if start < end or count == 0 or start + count > length:
            raise FsMapUnsure(f"XFS AG {agno}: free extent {start}+{count} overlaps or leaves the AG")
        end = start + count
    if sum(c for _, c in bno) != freeblks:
        raise FsMapUnsure(f"XFS AG {agno}: AGF says {freeblks} free blocks, trees have {sum(c for _, c in bno)}")
    return bno


def used_blocks(read: Reader, offset: int, length: int) -> FsUsage:
    """Used-block map of the XFS data device at ``offset``; FsMapUnsure unless clean and consistent."""
    sb = _parse_super(read_exact(read, offset, 512))
    _check_trust(sb, length)
    check_log_clean(read, offset, sb)
    bits = all_used(sb.dblocks)
    for agno in range(sb.agcount):
        for start, count in _ag_free(read, offset, sb, agno):
            clear_range(bits, agno * sb.agblocks + start, count)
    return FsUsage(block_size=sb.block_size, nblocks=sb.dblocks, bits=bits)
