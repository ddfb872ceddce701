"""Judges shared by the fsmap tests, and property tests of the packed-bitmap helpers.

The judges are outside tools: partclone's ddrescue domain log ("+" = used range) and, for
ext, dumpe2fs's per-group free block lists. The key property everywhere: no byte a judge
calls used may fall in a block our map calls unused.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tests.disks import blank
from tests.support import need_tool, run

from imgbackup.fsmap import UsedMap, read_used_map
from imgbackup.fsmap.base import all_used, clear_range, popcount, set_range, shift_up, zero_runs

MIB = 1 << 20


@contextlib.contextmanager
def image_reader(path: Path) -> Iterator:
    fd = os.open(path, os.O_RDONLY)
    try:
        yield lambda offset, length: os.pread(fd, length, offset)
    finally:
        os.close(fd)


def map_of(path: Path, **kw) -> UsedMap:
    with image_reader(path) as read:
        return read_used_map(read, path.stat().st_size, **kw)


def partclone_used(fstype: str, source: Path) -> list[tuple[int, int]]:
    """Used byte ranges (offset, length) according to partclone.<fstype> -D."""
    need_tool(f"partclone.{fstype}")
    log = source.with_suffix(".domain")
    log.unlink(missing_ok=True)  # partclone refuses to overwrite its log
    run(f"partclone.{fstype}", "-D", "-s", source, "-o", log)
    ranges = []
    for line in log.read_text().splitlines():
        m = re.match(r"^0x([0-9A-Fa-f]+)\s+0x([0-9A-Fa-f]+)\s+\+$", line.strip())
        if m:
            ranges.append((int(m.group(1), 16), int(m.group(2), 16)))
    assert ranges, "partclone reported no used range at all"
    return ranges


def unpack(m: UsedMap) -> np.ndarray:
    return np.unpackbits(m.bits, bitorder="little")[:m.nbits].astype(bool)


def assert_covers(m: UsedMap, ranges: list[tuple[int, int]], base: int = 0) -> None:
    """Every map block touching a judged-used byte range must be used."""
    used = unpack(m)
    bs = m.block_size
    for off, length in ranges:
        first, last = (base + off) // bs, -(-(base + off + length) // bs)
        missing = np.flatnonzero(~used[first:last])
        assert not len(missing), f"judge says bytes {base + off}+{length} used; block {first + missing[0]} unused"


def judged_blocks(m: UsedMap, ranges: list[tuple[int, int]], base: int = 0) -> int:
    """Map blocks the judge's ranges touch: a floor for our used count."""
    need = np.zeros(m.nbits, dtype=bool)
    for off, length in ranges:
        need[(base + off) // m.block_size: -(-(base + off + length) // m.block_size)] = True
    return int(need.sum())


def make_tree(root: Path, files: dict[str, int], seed: int = 1) -> Path:
    """A directory of random files (name -> size) for mke2fs -d / mcopy."""
    rng = np.random.default_rng(seed)
    for name, size in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(rng.integers(0, 256, size, dtype=np.uint8).tobytes())
    return root


# ---- the bitmap helpers themselves, against an unpacked model ----

ops = st.lists(st.tuples(st.booleans(), st.integers(0, 199), st.integers(0, 60)), max_size=30)


@given(ops)
def test_set_clear_range_match_model(steps) -> None:
    nbits = 200
    bits = all_used(nbits)
    model = np.ones(nbits, dtype=bool)
    for do_set, start, count in steps:
        count = min(count, nbits - start)
        (set_range if do_set else clear_range)(bits, start, count)
        model[start:start + count] = do_set
    got = np.unpackbits(bits, bitorder="little")[:nbits].astype(bool)
    assert (got == model).all()
    assert popcount(bits, nbits) == int(model.sum())
    runs = [(int(s), int(n)) for ss, ns in zero_runs(bits, nbits) for s, n in zip(ss, ns, strict=True)]
    rebuilt = np.ones(nbits, dtype=bool)
    for s, n in runs:
        assert not rebuilt[s:s + n].all() or n > 0
        rebuilt[s:s + n] = False
    assert (rebuilt == model).all()


@given(st.binary(min_size=1, max_size=40), st.integers(1, 7))
def test_shift_up(raw: bytes, shift: int) -> None:
    bits = np.frombuffer(raw, dtype=np.uint8)
    nbits = len(raw) * 8
    out = np.unpackbits(shift_up(bits, nbits, shift), bitorder="little")
    src = np.unpackbits(bits, bitorder="little")
    assert out[:shift].all() and (out[shift:shift + nbits] == src).all()


# ---- fuzz: damaged metadata never crashes the mapper, it only makes it image more ----

@pytest.fixture(scope="module")
def small_images(tmp_path_factory) -> dict[str, bytes]:
    need_tool("mkfs.ext4", "mkfs.vfat", "mkfs.xfs")
    root = tmp_path_factory.mktemp("fuzz")
    out = {}
    for name, cmd, size in (("ext", ["mkfs.ext4", "-q", "-b", "1024", "-g", "1024"], 4 * MIB),
                            ("fat", ["mkfs.vfat", "-F", "16", "-s", "1"], 8 * MIB),
                            ("xfs", ["mkfs.xfs", "-q", "-f"], 300 * MIB)):
        img = blank(root / f"{name}.img", size)
        run(*cmd, img)
        out[name] = img.read_bytes()[:512 * 1024] if name == "xfs" else img.read_bytes()
    return out


@settings(max_examples=60, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kind=st.sampled_from(["ext", "fat", "xfs"]),
       flips=st.lists(st.tuples(st.integers(0, 64 * 1024 - 1), st.integers(1, 255)), min_size=1, max_size=8))
def test_corrupted_metadata_never_crashes(small_images, kind: str, flips) -> None:
    data = bytearray(small_images[kind])
    size = 300 * MIB if kind == "xfs" else len(data)
    for pos, xor in flips:
        data[pos] ^= xor

    def read(offset: int, length: int) -> bytes:
        return bytes(data[offset:offset + length]).ljust(max(0, min(length, size - offset)), b"\0")

    m = read_used_map(read, size)
    assert {r.mode for r in m.regions} <= {"bitmap", "full"}
    for r in m.regions:
        if r.mode == "full":
            assert unpack(m)[r.start // m.block_size: (r.start + r.size) // m.block_size].all()


@pytest.mark.parametrize("kind", ["ext", "fat"])
def test_short_read_in_metadata_images_the_region_in_full(small_images, kind: str) -> None:
    """A source that ends early under the metadata (read_exact's ShortRead) fails closed, naming the read."""
    data = small_images[kind]
    cut = 8192     # past the superblock / boot sector, before the bitmaps and FATs
    m = read_used_map(lambda offset, length: data[offset:min(offset + length, cut)] if offset < cut else b"",
                      len(data))
    (region,) = m.regions
    assert region.mode == "full" and region.warning.startswith("short read at byte"), region
    assert unpack(m).all()
