"""Hashing every file of a mounted image vs. the original filesystem (run by hand as root).

    python benchmarks/bench_mount.py [--mib 200]

Builds an ext4 filesystem of about ``--mib`` MiB of files (copies of /usr/lib/python3* plus some
large random files), backs it up with the CLI, mounts the image with ``--filesystems`` and hashes
every file (SHA-256) through the mount, cold (after drop_caches). The judge is the same walk over
the original filesystem on a read-only loop device, also cold. Prints both throughputs and the
ratio (mounted / original time); the goal is a ratio under 2. One JSON line at the end.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ENV = dict(os.environ, IMGBACKUP_PASSPHRASE="bench-passphrase", IMGBACKUP_TEST_CHEAP_KDF="1")


def sh(*args) -> str:
    return subprocess.run([str(a) for a in args], check=True, capture_output=True, text=True, env=ENV).stdout


def cli(*args) -> str:
    return sh(sys.executable, "-m", "imgbackup", *args)


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def hash_tree(root: Path) -> tuple[float, int]:
    """Seconds to SHA-256 every regular file under root, and the bytes read."""
    drop_caches()
    started, total = time.perf_counter(), 0
    for dirpath, _, files in os.walk(root):
        for name in files:
            p = os.path.join(dirpath, name)
            if os.path.islink(p):
                continue
            with open(p, "rb") as f:
                h = hashlib.sha256()
                while block := f.read(1 << 20):
                    h.update(block)
                    total += len(block)
    return time.perf_counter() - started, total


def build(root: Path, mib: int) -> Path:
    fs = root / "fs.img"
    with open(fs, "wb") as f:
        f.truncate((mib * 2 + 64) << 20)
    sh("mkfs.ext4", "-q", "-F", fs)
    mnt = root / "build"
    mnt.mkdir()
    dev = sh("losetup", "-f", "--show", fs).strip()
    try:
        sh("mount", dev, mnt)
        try:
            for src in sorted(Path("/usr/lib").glob("python3*")):
                shutil.copytree(src, mnt / src.name, symlinks=True, ignore_dangling_symlinks=True,
                                dirs_exist_ok=True)
            used = sum(p.stat().st_size for p in mnt.rglob("*") if p.is_file() and not p.is_symlink())
            for i in range(max(0, (mib << 20) - used) // (16 << 20)):
                (mnt / f"big{i}.bin").write_bytes(os.urandom(16 << 20))
        finally:
            sh("umount", mnt)
    finally:
        sh("losetup", "-d", dev)
    return fs


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=int, default=200)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-mount-") as tmp:
        root = Path(tmp)
        fs = build(root, args.mib)
        cli("init", "-r", root / "repo")
        cli("backup", "-r", root / "repo", fs)
        orig = root / "orig"
        orig.mkdir()
        dev = sh("losetup", "-r", "-f", "--show", fs).strip()
        try:
            sh("mount", "-o", "ro,noload", dev, orig)
            try:
                t_orig, n = hash_tree(orig)
            finally:
                sh("umount", orig)
        finally:
            sh("losetup", "-d", dev)
        mnt = root / "mnt"
        mnt.mkdir()
        cli("mount", "-r", root / "repo", "latest", mnt, "--filesystems")
        try:
            t_mount, n2 = hash_tree(mnt / "fs" / "disk")
        finally:
            cli("umount", mnt)
    assert n == n2, (n, n2)
    print(f"original: {n / t_orig / 1e6:8.1f} MB/s  ({t_orig:.2f} s for {n / 1e6:.0f} MB)")
    print(f"mounted:  {n / t_mount / 1e6:8.1f} MB/s  ({t_mount:.2f} s)")
    print(f"ratio mounted/original: {t_mount / t_orig:.2f}")
    print(json.dumps({"bytes": n, "original_s": round(t_orig, 3), "mounted_s": round(t_mount, 3),
                      "ratio": round(t_mount / t_orig, 3)}))


if __name__ == "__main__":
    main()
