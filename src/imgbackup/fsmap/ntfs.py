"""NTFS: the used-cluster map is the $Bitmap file (MFT record 6), bit i = cluster i, LSB first.

Layout (little-endian): the boot sector gives the geometry and the MFT's first cluster; MFT
records ("FILE") carry an update sequence array whose value must end every 512-byte stride
(the fixups) and is swapped back before parsing. Attributes follow the record header; a
non-resident attribute's clusters are mapping pairs: a header byte (low nibble: bytes of the
run length, high nibble: bytes of the signed LCN delta, 0 = sparse), ended by a zero byte.

We trust the bitmap only when $Volume is not dirty, $LogFile's restart area says the volume
was shut down cleanly (not hibernated, not crashed), every structure we read is consistent,
and the clusters of the boot sector, the whole $MFT, $MFTMirr and $Bitmap itself are all
marked used. NTFS stores no free-cluster count to cross-check against.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

from imgbackup.fsmap.base import FsMapUnsure, FsUsage, Reader, read_exact, set_range

OEM_ID = b"NTFS    "
FIXUP_STRIDE = 512
AT_VOLUME_INFORMATION, AT_DATA, AT_END = 0x70, 0x80, 0xFFFFFFFF
ATTR_COMPRESSED, ATTR_ENCRYPTED, ATTR_SPARSE = 0x0001, 0x4000, 0x8000
VOLUME_IS_DIRTY, VOLUME_CHKDSK_UNDERWAY = 0x0001, 0x4000
MFT_RECORD_IN_USE = 0x0001
BOOT_FILE_BYTES = 8192  # $Boot: the boot sector and the boot code after it
REC_MFT, REC_MFTMIRR, REC_LOGFILE, REC_VOLUME, REC_BITMAP = 0, 1, 2, 3, 6
RESTART_VOLUME_IS_CLEAN, LOGFILE_NO_CLIENT = 0x0002, 0xFFFF
MAX_BITMAP_BYTES = 1 << 30  # 8 Gi clusters: 32 TiB at 4 KiB, far beyond a sane test of trust

Run = tuple[int, int | None]  # (length in clusters, LCN or None for a sparse run)


@dataclass
class Boot:
    bytes_per_sector: int
    cluster_size: int
    total_sectors: int
    mft_lcn: int
    mftmirr_lcn: int
    record_size: int

    @property
    def clusters(self) -> int:
        return self.total_sectors * self.bytes_per_sector // self.cluster_size


def _parse_boot(raw: bytes) -> Boot | None:
    """The boot sector's geometry, or None when it is not a sane NTFS boot sector."""
    if len(raw) < 512 or raw[3:11] != OEM_ID or raw[510:512] != b"\x55\xaa":
        return None
    bps, spc_code = struct.unpack_from("<HB", raw, 11)
    total, mft, mirr = struct.unpack_from("<QQQ", raw, 40)
    rec_code = struct.unpack_from("<b", raw, 64)[0]
    if bps not in (256, 512, 1024, 2048, 4096):
        return None
    if spc_code <= 0x80:
        spc = spc_code
    elif spc_code >= 0xE0:  # large clusters: sectors per cluster = 2 ** (256 - code)
        spc = 1 << (256 - spc_code)
    else:
        return None
    if spc == 0 or spc & (spc - 1) or bps * spc > 2 << 20:
        return None
    cs = bps * spc
    rec = rec_code * cs if rec_code > 0 else 1 << -rec_code if rec_code > -31 else 0
    if rec < 256 or rec & (rec - 1) or rec > 65536 or rec % FIXUP_STRIDE:
        return None
    boot = Boot(bps, cs, total, mft, mirr, rec)
    if boot.clusters == 0 or not 0 < mft < boot.clusters or not 0 < mirr < boot.clusters:
        return None
    return boot


def probe(read: Reader, offset: int, length: int) -> bool:
    """True when the region starts with an NTFS boot sector whose volume fits the region."""
    boot = _parse_boot(bytes(read(offset, 512)))
    return boot is not None and boot.total_sectors * boot.bytes_per_sector <= length


def apply_fixups(raw: bytearray, what: str) -> None:
    """Check and undo the update sequence array of a multi-sector record, in place."""
    usa_ofs, usa_count = struct.unpack_from("<HH", raw, 4)
    strides = len(raw) // FIXUP_STRIDE
    if usa_count != strides + 1 or usa_ofs & 1 or usa_ofs < 8 or usa_ofs + 2 * usa_count > FIXUP_STRIDE - 2:
        raise FsMapUnsure(f"NTFS {what}: bad update sequence array ({usa_ofs}, {usa_count})")
    usn = raw[usa_ofs:usa_ofs + 2]
    for i in range(strides):
        end = (i + 1) * FIXUP_STRIDE - 2
        if raw[end:end + 2] != usn:
            raise FsMapUnsure(f"NTFS {what}: torn write (fixup mismatch in sector {i})")
        fix = usa_ofs + 2 * (i + 1)
        raw[end:end + 2] = raw[fix:fix + 2]


@dataclass
class Attr:
    type: int
    flags: int
    name_length: int
    resident: bytes | None  # the value of a resident attribute
    lowest_vcn: int = 0
    highest_vcn: int = -1
    allocated: int = 0
    data_size: int = 0
    initialized: int = 0
    runs_raw: bytes = b""


def _parse_attr(rec: bytes, pos: int, length: int) -> Attr:
    atype, _len, nonres, name_len, _name_ofs, flags = struct.unpack_from("<IIBBHH", rec, pos)
    if not nonres:
        vlen, voff = struct.unpack_from("<IH", rec, pos + 16)
        if voff + vlen > length:
            raise FsMapUnsure(f"NTFS attribute 0x{atype:x}: resident value leaves the attribute")
        return Attr(atype, flags, name_len, bytes(rec[pos + voff:pos + voff + vlen]))
    if length < 64:
        raise FsMapUnsure(f"NTFS attribute 0x{atype:x}: non-resident header too short")
    low, high = struct.unpack_from("<qq", rec, pos + 16)
    mp_ofs = struct.unpack_from("<H", rec, pos + 32)[0]
    alloc, size, init = struct.unpack_from("<qqq", rec, pos + 40)
    if not 64 <= mp_ofs < length:
        raise FsMapUnsure(f"NTFS attribute 0x{atype:x}: mapping pairs outside the attribute")
    return Attr(atype, flags, name_len, None, low, high, alloc, size, init,
                bytes(rec[pos + mp_ofs:pos + length]))


def fixed_record(raw: bytes, number: int) -> bytearray:
    """MFT record ``number`` with its fixups checked and undone."""
    rec = bytearray(raw)
    if rec[:4] != b"FILE":
        raise FsMapUnsure(f"NTFS MFT record {number}: no FILE signature")
    apply_fixups(rec, f"MFT record {number}")
    return rec


def parse_record(raw: bytes, number: int, record_size: int) -> list[Attr]:
    """The attributes of base MFT record ``number`` (fixups applied and checked)."""
    rec = fixed_record(raw, number)
    attrs_ofs, flags, in_use, allocated = struct.unpack_from("<HHII", rec, 20)
    base = struct.unpack_from("<Q", rec, 32)[0]
    if not flags & MFT_RECORD_IN_USE or base != 0:
        raise FsMapUnsure(f"NTFS MFT record {number}: not an in-use base record")
    if allocated != record_size or not 24 <= attrs_ofs < in_use <= allocated:
        raise FsMapUnsure(f"NTFS MFT record {number}: header sizes are inconsistent")
    if attrs_ofs >= 48 and struct.unpack_from("<I", rec, 44)[0] != number:
        raise FsMapUnsure(f"NTFS MFT record {number}: claims to be record {struct.unpack_from('<I', rec, 44)[0]}")
    attrs, pos = [], attrs_ofs
    while True:
        if pos + 4 > in_use:
            raise FsMapUnsure(f"NTFS MFT record {number}: attributes run past the record's end")
        atype = struct.unpack_from("<I", rec, pos)[0]
        if atype == AT_END:
            return attrs
        length = struct.unpack_from("<I", rec, pos + 4)[0]
        if length < 24 or length & 7 or pos + length > in_use:
            raise FsMapUnsure(f"NTFS MFT record {number}: attribute at {pos} has a bad length")
        attrs.append(_parse_attr(rec, pos, length))
        pos += length


def decode_runs(raw: bytes) -> list[Run]:
    """Mapping pairs to (length, LCN | None) runs; LCN deltas are signed."""
    runs: list[Run] = []
    pos, lcn = 0, 0
    while pos < len(raw) and raw[pos]:
        nlen, nofs = raw[pos] & 0xF, raw[pos] >> 4
        if not 1 <= nlen <= 8 or nofs > 8 or pos + 1 + nlen + nofs > len(raw):
            raise FsMapUnsure(f"NTFS mapping pairs: bad header byte 0x{raw[pos]:02x}")
        count = int.from_bytes(raw[pos + 1:pos + 1 + nlen], "little", signed=True)
        if count <= 0:
            raise FsMapUnsure("NTFS mapping pairs: run of zero or negative length")
        if nofs:
            lcn += int.from_bytes(raw[pos + 1 + nlen:pos + 1 + nlen + nofs], "little", signed=True)
            runs.append((count, lcn))
        else:
            runs.append((count, None))
        pos += 1 + nlen + nofs
    if pos >= len(raw):
        raise FsMapUnsure("NTFS mapping pairs: no terminating zero byte")
    return runs


def _whole_runs(attr: Attr, boot: Boot, what: str) -> list[tuple[int, int]]:
    """The runs of a complete, plain (not sparse, compressed or encrypted) non-resident attribute."""
    if attr.resident is not None:
        raise FsMapUnsure(f"NTFS {what}: resident, expected non-resident data")
    if attr.flags & (ATTR_COMPRESSED | ATTR_ENCRYPTED | ATTR_SPARSE):
        raise FsMapUnsure(f"NTFS {what}: compressed, encrypted or sparse")
    cs = boot.cluster_size
    if attr.lowest_vcn != 0 or attr.allocated % cs or attr.highest_vcn + 1 != attr.allocated // cs:
        raise FsMapUnsure(f"NTFS {what}: data is split across extent records")
    if not 0 <= attr.initialized <= attr.data_size <= attr.allocated:
        raise FsMapUnsure(f"NTFS {what}: sizes are inconsistent")
    runs = decode_runs(attr.runs_raw)
    if sum(n for n, _ in runs) != attr.highest_vcn + 1:
        raise FsMapUnsure(f"NTFS {what}: runs do not cover the attribute")
    out = []
    for count, lcn in runs:
        if lcn is None:
            raise FsMapUnsure(f"NTFS {what}: sparse run")
        if lcn < 0 or lcn + count > boot.clusters:
            raise FsMapUnsure(f"NTFS {what}: run {lcn}+{count} leaves the volume")
        out.append((lcn, count))
    return out


def _read_runs(read: Reader, offset: int, boot: Boot, runs: list[tuple[int, int]],
               start: int, length: int) -> bytes:
    """``length`` bytes from byte ``start`` of an attribute stored in ``runs``."""
    cs, out, vbase = boot.cluster_size, [], 0
    end = start + length
    for lcn, count in runs:
        lo, hi = max(start, vbase), min(end, vbase + count * cs)
        if lo < hi:
            out.append(read_exact(read, offset + lcn * cs + lo - vbase, hi - lo))
        vbase += count * cs
    data = b"".join(out)
    if len(data) != length:
        raise FsMapUnsure(f"NTFS attribute bytes {start}+{length} lie past its runs")
    return data


def _unnamed(attrs: list[Attr], atype: int, what: str) -> Attr:
    found = [a for a in attrs if a.type == atype and a.name_length == 0]
    if len(found) != 1:
        raise FsMapUnsure(f"NTFS {what}: {len(found)} unnamed attributes of type 0x{atype:x}")
    return found[0]


class _Mft:
    """MFT records by number, read through the $MFT's own runs (record 0 bootstraps them)."""

    def __init__(self, read: Reader, offset: int, boot: Boot) -> None:
        self.read, self.offset, self.boot = read, offset, boot
        raw = read_exact(read, offset + boot.mft_lcn * boot.cluster_size, boot.record_size)
        data = _unnamed(parse_record(raw, REC_MFT, boot.record_size), AT_DATA, "$MFT")
        self.runs = _whole_runs(data, boot, "$MFT $DATA")
        if self.runs[0][0] != boot.mft_lcn or data.data_size < (REC_BITMAP + 1) * boot.record_size:
            raise FsMapUnsure("NTFS $MFT: its data does not start at the boot sector's MFT cluster")

    def raw(self, number: int) -> bytes:
        size = self.boot.record_size
        return _read_runs(self.read, self.offset, self.boot, self.runs, number * size, size)

    def record(self, number: int) -> list[Attr]:
        return parse_record(self.raw(number), number, self.boot.record_size)

    def check_mirror(self) -> None:
        """Records 0-3 must equal their copies in $MFTMirr (ntfs-3g refuses to mount otherwise)."""
        size = self.boot.record_size
        attr, runs = self.data_runs(REC_MFTMIRR, "$MFTMirr")
        if runs[0][0] != self.boot.mftmirr_lcn or attr.data_size < (REC_VOLUME + 1) * size:
            raise FsMapUnsure("NTFS $MFTMirr: not where the boot sector says, or too short")
        for number in range(REC_VOLUME + 1):
            rec = fixed_record(self.raw(number), number)
            mirror = fixed_record(_read_runs(self.read, self.offset, self.boot, runs, number * size, size), number)
            in_use = struct.unpack_from("<I", rec, 24)[0]
            if rec[:in_use] != mirror[:in_use]:
                raise FsMapUnsure(f"NTFS $MFTMirr does not match $MFT (record {number})")

    def data_runs(self, number: int, what: str) -> tuple[Attr, list[tuple[int, int]]]:
        data = _unnamed(self.record(number), AT_DATA, what)
        return data, _whole_runs(data, self.boot, f"{what} $DATA")


def check_volume_clean(mft: _Mft) -> None:
    """$Volume's $VOLUME_INFORMATION must not be flagged dirty or in chkdsk."""
    info = _unnamed(mft.record(REC_VOLUME), AT_VOLUME_INFORMATION, "$Volume").resident
    if info is None or len(info) < 12:
        raise FsMapUnsure("NTFS $Volume: $VOLUME_INFORMATION is not a resident 12-byte value")
    major, _minor, flags = struct.unpack_from("<BBH", info, 8)
    if major not in (1, 3):
        raise FsMapUnsure(f"NTFS version {major}.{_minor} is unknown")
    if flags & VOLUME_IS_DIRTY:
        raise FsMapUnsure("NTFS volume is marked dirty (mounted or not cleanly unmounted): run chkdsk")
    if flags & VOLUME_CHKDSK_UNDERWAY:
        raise FsMapUnsure("NTFS volume is marked with chkdsk under way")


def _restart_page(raw: bytes, pos: int) -> tuple[int, bool] | None:
    """(current LSN, clean) of a valid restart page at ``pos``, or None."""
    page_size = struct.unpack_from("<I", raw, pos + 16)[0]
    if page_size < 512 or page_size & (page_size - 1) or pos + page_size > len(raw):
        return None
    page = bytearray(raw[pos:pos + page_size])
    try:
        apply_fixups(page, "$LogFile restart page")
    except FsMapUnsure:
        return None
    ra_ofs, minor, major = struct.unpack_from("<Hhh", page, 24)
    if ra_ofs & 7 or ra_ofs + 48 > page_size or (major, minor) not in ((1, 1), (2, 0)):
        return None
    lsn, clients, _free, in_use, flags = struct.unpack_from("<QHHHH", page, ra_ofs)
    if in_use != LOGFILE_NO_CLIENT and in_use >= clients:
        return None
    return lsn, in_use == LOGFILE_NO_CLIENT or bool(flags & RESTART_VOLUME_IS_CLEAN)


def check_logfile_clean(mft: _Mft) -> None:
    """The newest restart page of $LogFile must say no transaction is pending.

    mkntfs and ntfs-3g leave an empty log (all 0xFF); Windows leaves two restart pages.
    """
    data, runs = mft.data_runs(REC_LOGFILE, "$LogFile")
    head = min(data.data_size, 64 << 10)
    raw = _read_runs(mft.read, mft.offset, mft.boot, runs, 0, head)
    if raw[:4] == b"CHKD":
        raise FsMapUnsure("NTFS $LogFile: chkdsk did not finish")
    pages = [raw[p:p + 4] == b"RSTR" and _restart_page(raw, p)
             for p in (0, *(1 << k for k in range(9, 17)))]
    valid = [p for p in pages if p]
    if not valid:
        if raw[:8192] == b"\xff" * min(8192, head):
            return
        raise FsMapUnsure("NTFS $LogFile: no valid restart page")
    if not max(valid)[1]:
        raise FsMapUnsure("NTFS $LogFile holds pending transactions (crashed or hibernated Windows)")


def _require_used(bits: np.ndarray, runs: list[tuple[int, int]], what: str) -> None:
    """Every cluster of ``runs`` must be set in the packed bitmap (unpacking only those runs)."""
    for lcn, count in runs:
        piece = np.unpackbits(bits[lcn >> 3:(lcn + count + 7) >> 3], bitorder="little")
        piece = piece[lcn & 7:(lcn & 7) + count]
        if len(piece) < count or not piece.all():
            bad = lcn + (int(np.flatnonzero(piece == 0)[0]) if not piece.all() else len(piece))
            raise FsMapUnsure(f"NTFS $Bitmap marks cluster {bad} of {what} free: inconsistent")


def used_blocks(read: Reader, offset: int, length: int) -> FsUsage:
    """Per-cluster used map of the NTFS volume at ``offset`` from its $Bitmap; FsMapUnsure unless clean.

    The backup boot sector (the sector after the volume's last counted sector) lies past
    the last whole cluster, where every block counts as used.
    """
    boot = _parse_boot(read_exact(read, offset, 512))
    if boot is None:
        raise FsMapUnsure("no NTFS boot sector")
    if boot.total_sectors * boot.bytes_per_sector > length:
        raise FsMapUnsure("NTFS volume is larger than its region")
    mft = _Mft(read, offset, boot)
    mft.check_mirror()
    check_volume_clean(mft)
    check_logfile_clean(mft)
    bm_attr, bm_runs = mft.data_runs(REC_BITMAP, "$Bitmap")
    n = boot.clusters
    need = -(-n // 8)
    if bm_attr.initialized < need or bm_attr.data_size < need:
        raise FsMapUnsure(f"NTFS $Bitmap holds {bm_attr.initialized * 8} bits for {n} clusters")
    if need > MAX_BITMAP_BYTES:
        raise FsMapUnsure(f"NTFS $Bitmap of {need} bytes is too large")
    bits = np.frombuffer(_read_runs(read, offset, boot, bm_runs, 0, need), dtype=np.uint8).copy()
    if n % 8:
        bits[-1] &= (1 << (n % 8)) - 1
    boot_clusters = -(-BOOT_FILE_BYTES // boot.cluster_size)
    _require_used(bits, [(0, 1)], "the boot sector")
    _require_used(bits, mft.runs, "$MFT")
    _require_used(bits, mft.data_runs(REC_MFTMIRR, "$MFTMirr")[1], "$MFTMirr")
    _require_used(bits, bm_runs, "$Bitmap")
    set_range(bits, 0, min(boot_clusters, n))  # $Boot spans 8 KiB: keep it whatever the bitmap says
    return FsUsage(block_size=boot.cluster_size, nblocks=n, bits=bits)
