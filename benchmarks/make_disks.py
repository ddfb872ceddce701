"""Builds the benchmark disks, deterministically, and caches them in a work directory.

- ``disk4g-s1.img``: 4 GiB GPT disk, 512 MiB FAT32 ESP + ext4 root with ~1.5 GiB of real files from this
  machine (python stdlib, /usr/share/doc, /usr/lib) and seeded random data; deleted-file garbage in free space.
- ``disk4g-s2.img``: the same disk after a ~2-3 % change set (files added, edited, deleted), applied to a copy
  through a loop mount; ``disk4g-s2.changes``: the extents (``OFFSET LENGTH``) that differ from state 1.
- ``raw2g.img``: 2 GiB without a filesystem: zero, seeded-random and text blocks of 1 MiB.
- ``sparse1t.img``: 1 TiB sparse GPT disk, one ext4 partition holding a few GiB.

Fixed seeds, UUIDs and file order: the same machine builds the same disks.  A disk is rebuilt only if it
is missing (``--force`` rebuilds all).  Needs root (loop devices, mount).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import sysconfig
from pathlib import Path

import numpy as np
from benchlib import GiB, MiB, loop, mounted, sh

SECTOR = 512
ESP_START, ESP_SIZE = 1 * MiB, 512 * MiB
DISK_GUID = "6b1f1c2e-0000-4000-8000-000000000001"
ESP_GUID, ROOT_GUID = "6b1f1c2e-0000-4000-8000-0000000000e5", "6b1f1c2e-0000-4000-8000-0000000000f5"
ROOT_UUID = "0b0e4f2a-1111-4222-8333-444455556666"
BIG_UUID = "0b0e4f2a-1111-4222-8333-777788889999"
SOURCES = [  # (directory, byte budget) walked in sorted order; the choice is fixed by this table
    (sysconfig.get_paths()["stdlib"], 240 * MiB),
    ("/usr/share/doc", 120 * MiB),
    ("/usr/lib", 900 * MiB),
]
RANDOM_BYTES = 256 * MiB
GARBAGE_BYTES = 384 * MiB


def pick_files(budget_scale: float = 1.0) -> list[tuple[Path, str]]:
    """(source file, name inside the image), sorted walk, skipping links, site-packages and huge files."""
    chosen = []
    for top, budget in SOURCES:
        left = int(budget * budget_scale)
        for dirpath, dirnames, files in os.walk(top):
            dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "__pycache__"))
            for name in sorted(files):
                p = Path(dirpath, name)
                if p.is_symlink() or not p.is_file():
                    continue
                size = p.stat().st_size
                if size > 64 * MiB or size > left:
                    continue
                left -= size
                chosen.append((p, f"{Path(top).name}{dirpath[len(top):]}/{name}"))
            if left <= 0:
                break
    return chosen


def write_random(path: Path, size: int, seed: int, piece: int = 8 * MiB) -> None:
    rng = np.random.Generator(np.random.PCG64(seed))
    with open(path, "wb") as f:
        for off in range(0, size, piece):
            f.write(rng.bytes(min(piece, size - off)))


def fill_tree(root: Path, files: list[tuple[Path, str]], random_bytes: int, seed: int) -> None:
    """Copy the chosen files in order, then seeded random files of 32 MiB each."""
    for src, rel in files:
        dst = root / "data" / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)
    (root / "random").mkdir(exist_ok=True)
    for i in range(0, random_bytes, 32 * MiB):
        write_random(root / "random" / f"r{i // (32 * MiB):03d}.bin", min(32 * MiB, random_bytes - i), seed + i)


def leave_garbage(root: Path, size: int, seed: int) -> None:
    """Write files then delete them: their blocks stay in free space (the deleted-file garbage)."""
    g = root / "garbage"
    g.mkdir()
    write_random(g / "deleted-random.bin", size // 2, seed)
    text = b"".join(p.read_bytes() for p, _ in pick_files(0.05)[:400])
    with open(g / "deleted-text.bin", "wb") as f:
        for _ in range(0, size // 2, len(text)):
            f.write(text)
    os.sync()
    shutil.rmtree(g)
    os.sync()


def make_esp(path: Path, files: list[tuple[Path, str]]) -> None:
    """A FAT32 ESP built by mtools (the kernel here cannot mount vfat)."""
    path.unlink(missing_ok=True)
    sh("truncate", "-s", str(ESP_SIZE), path)
    sh("mkfs.vfat", "-F", "32", "-i", "5ee0e5ee", "-n", "BENCHESP", "--invariant", path)
    sh("mmd", "-i", path, "::/EFI", "::/EFI/BOOT", "::/docs")
    budget = 48 * MiB
    for src, rel in files:
        if rel.startswith("lib/") and src.suffix == ".so" and budget > src.stat().st_size:
            budget -= src.stat().st_size
            sh("mcopy", "-o", "-i", path, src, f"::/docs/{src.name[:60]}")
    write_random(path.with_suffix(".efi"), 4 * MiB, 4242)
    sh("mcopy", "-i", path, path.with_suffix(".efi"), "::/EFI/BOOT/BOOTX64.EFI")
    path.with_suffix(".efi").unlink()


def partition(img: Path, size: int, esp: bool) -> tuple[int, int]:
    """Create the sparse file and its GPT; return (offset, size) of the ext4 partition."""
    img.unlink(missing_ok=True)
    sh("truncate", "-s", str(size), img)
    last = size // SECTOR - 34
    args = ["sgdisk", "-U", DISK_GUID]
    root_start = (ESP_START + ESP_SIZE) if esp else ESP_START
    if esp:
        args += [f"-n1:{ESP_START // SECTOR}:{(ESP_START + ESP_SIZE) // SECTOR - 1}",
                 "-t1:ef00", "-c1:ESP", f"-u1:{ESP_GUID}"]
    n = 2 if esp else 1
    args += [f"-n{n}:{root_start // SECTOR}:{last}", f"-t{n}:8300", f"-c{n}:root", f"-u{n}:{ROOT_GUID}", str(img)]
    sh(*args)
    return root_start, (last + 1) * SECTOR - root_start


def make_disk4g(work: Path) -> None:
    img = work / "disk4g-s1.img"
    tmp = work / "disk4g-s1.tmp"
    off, size = partition(tmp, 4 * GiB, esp=True)
    files = pick_files()
    esp = work / "esp.img"
    make_esp(esp, files)
    sh("dd", f"if={esp}", f"of={tmp}", "bs=1M", f"seek={ESP_START // MiB}", "conv=notrunc,sparse", "status=none")
    esp.unlink()
    with loop(tmp, off, size) as dev:
        sh("mkfs.ext4", "-q", "-F", "-U", ROOT_UUID, "-E", f"hash_seed={ROOT_UUID},lazy_itable_init=0,"
           "lazy_journal_init=0", "-L", "bench-root", dev)
        with mounted(dev) as mnt:
            fill_tree(mnt, files, RANDOM_BYTES, seed=1000)
            leave_garbage(mnt, GARBAGE_BYTES, seed=2000)
    tmp.rename(img)


def apply_changes(mnt: Path, seed: int) -> int:
    """~2-3 % of the disk: delete, edit in place, append, add; returns the bytes touched."""
    rng = np.random.Generator(np.random.PCG64(seed))
    files = sorted(p for p in (mnt / "data").rglob("*") if p.is_file() and not p.is_symlink())
    order = rng.permutation(len(files))
    touched, deleted, edited = 0, 0, 0
    for i in order:
        p = files[i]
        size = p.stat().st_size
        if deleted < 36 * MiB:
            p.unlink()
            deleted += size
        elif edited < 60 * MiB and size >= 64 * 1024:
            length = max(4096, size // 4)
            with open(p, "r+b") as f:
                f.seek(int(rng.integers(0, size - length + 1)))
                f.write(rng.bytes(length))
                f.seek(0, os.SEEK_END)
                f.write(b"appended line\n" * 300)
            edited += length
        else:
            break
    touched = deleted + edited
    new = mnt / "added"
    new.mkdir()
    write_random(new / "new-random.bin", 56 * MiB, seed + 1)
    for j, p in enumerate(files[:: max(1, len(files) // 400)][:400]):
        if p.exists():
            shutil.copyfile(p, new / f"{j:03d}-{p.name}")
            touched += p.stat().st_size
    return touched + 56 * MiB


def make_state2(work: Path) -> None:
    s1, tmp = work / "disk4g-s1.img", work / "disk4g-s2.tmp"
    sh("cp", "--sparse=always", s1, tmp)
    off, size = partition_offsets(tmp)
    with loop(tmp, off, size) as dev, mounted(dev) as mnt:
        touched = apply_changes(mnt, seed=3000)
    note = work / "esp-note.txt"
    note.write_text("state 2 boot entry\n" * 100)
    sh("mcopy", "-o", "-i", f"{tmp}@@{ESP_START}", note, "::/EFI/BOOT/state2.txt")
    note.unlink()
    extents = changed_extents(s1, tmp)
    changed = sum(n for _, n in extents)
    (work / "disk4g-s2.changes").write_text("# imgbackup-extents v1\n" + "".join(f"{o} {n}\n" for o, n in extents))
    print(f"state 2: {touched / MiB:.0f} MiB of files touched, {changed / MiB:.1f} MiB of the disk differ "
          f"({100 * changed / (4 * GiB):.2f} %) in {len(extents)} extents", file=sys.stderr)
    tmp.rename(work / "disk4g-s2.img")


def partition_offsets(img: Path) -> tuple[int, int]:
    """(offset, size) of the last partition, read back from the GPT with sgdisk."""
    out = sh("sgdisk", "-p", img).stdout.splitlines()
    rows = [ln.split() for ln in out if ln.strip()[:1].isdigit()]
    start, end = int(rows[-1][1]), int(rows[-1][2])
    return start * SECTOR, (end - start + 1) * SECTOR


def changed_extents(a: Path, b: Path, block: int = 4096, piece: int = 16 * MiB) -> list[tuple[int, int]]:
    """Byte extents, in ``block`` units, where the two images differ (merged runs)."""
    runs: list[tuple[int, int]] = []
    with open(a, "rb", buffering=0) as fa, open(b, "rb", buffering=0) as fb:
        pos = 0
        while (x := fa.read(piece)) and (y := fb.read(piece)):
            if x != y:
                xa = np.frombuffer(x, np.uint8).reshape(-1, block)
                ya = np.frombuffer(y, np.uint8).reshape(-1, block)
                for i in np.flatnonzero((xa != ya).any(axis=1)):
                    o = pos + int(i) * block
                    if runs and runs[-1][0] + runs[-1][1] == o:
                        runs[-1] = (runs[-1][0], runs[-1][1] + block)
                    else:
                        runs.append((o, block))
            pos += len(x)
    return runs


def make_raw2g(work: Path) -> None:
    """1 MiB blocks: 30 % zero, 35 % seeded random, 35 % text from the python stdlib."""
    rng = np.random.Generator(np.random.PCG64(5000))
    text = bytearray()
    for p, _ in pick_files(0.25):
        if p.suffix == ".py":
            text += p.read_bytes()
        if len(text) >= 64 * MiB:
            break
    tmp = work / "raw2g.tmp"
    with open(tmp, "wb") as f:
        f.truncate(2 * GiB)
        for i in range(2048):
            kind = rng.choice(3, p=[0.30, 0.35, 0.35])
            if kind == 0:
                continue
            f.seek(i * MiB)
            t0 = (i * MiB) % (len(text) - MiB)
            f.write(rng.bytes(MiB) if kind == 1 else bytes(text[t0:t0 + MiB]))
    tmp.rename(work / "raw2g.img")


def make_sparse1t(work: Path) -> None:
    tmp = work / "sparse1t.tmp"
    off, size = partition(tmp, 1 << 40, esp=False)
    with loop(tmp, off, size) as dev:
        sh("mkfs.ext4", "-q", "-F", "-T", "largefile4", "-U", BIG_UUID, "-E",
           f"hash_seed={BIG_UUID},lazy_itable_init=0,lazy_journal_init=0,nodiscard", "-L", "bench-big", dev)
        with mounted(dev) as mnt:
            fill_tree(mnt, pick_files(), 1 * GiB, seed=6000)
    tmp.rename(work / "sparse1t.img")


BUILDERS = {"disk4g-s1.img": make_disk4g, "disk4g-s2.img": make_state2, "raw2g.img": make_raw2g,
            "sparse1t.img": make_sparse1t}


def build(work: Path, names: list[str], force: bool = False) -> None:
    """Build the named disks that are missing (state 2 needs state 1 and is built after it)."""
    work.mkdir(parents=True, exist_ok=True)
    for name in BUILDERS:
        if name not in names:
            continue
        if force or not (work / name).exists():
            print(f"building {name} ...", file=sys.stderr, flush=True)
            BUILDERS[name](work)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("/var/tmp/imgbackup-bench"))
    ap.add_argument("--force", action="store_true")
    ap.add_argument("disks", nargs="*", default=list(BUILDERS))
    a = ap.parse_args()
    build(a.work, a.disks, a.force)


if __name__ == "__main__":
    main()
