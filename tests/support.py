"""Shared test helpers: real loop devices and disk images, cleaned up by their own names.

``need(cond, why)`` skips a test on a developer machine that lacks a part, but fails it
under CI=true, where every real part must be present.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def need(condition: bool, why: str) -> None:
    if condition:
        return
    if IN_CI:
        pytest.fail(f"required for CI but missing: {why}")
    pytest.skip(why)


def need_root() -> None:
    need(os.geteuid() == 0, "needs root")


def need_tool(*names: str) -> None:
    for name in names:
        need(shutil.which(name) is not None, f"needs {name}")


def run(*args: str | os.PathLike, check: bool = True, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in args], check=check, capture_output=True, text=True, **kw)


@contextlib.contextmanager
def loop_device(image: Path, partitions: bool = False, read_only: bool = False,
                offset: int | None = None, sizelimit: int | None = None,
                sector_size: int | None = None) -> Iterator[str]:
    """Attach ``image`` to a new loop device; with ``partitions`` add pN nodes via partx.

    Always detaches the device it created (partx -d first), even when the body fails.
    """
    need_root()
    need(Path("/dev/loop-control").exists(), "needs loop devices")
    cmd = ["losetup", "--find", "--show"]
    if read_only:
        cmd.append("--read-only")
    if offset is not None:
        cmd += ["--offset", str(offset)]
    if sizelimit is not None:
        cmd += ["--sizelimit", str(sizelimit)]
    if sector_size is not None:
        cmd += ["--sector-size", str(sector_size)]
    dev = run(*cmd, str(image)).stdout.strip()
    try:
        if partitions:
            run("partx", "-a", dev, check=False)
        yield dev
    finally:
        if partitions:
            run("partx", "-d", dev, check=False)
        for _ in range(20):
            if run("losetup", "-d", dev, check=False).returncode == 0:
                break
            import time

            time.sleep(0.1)


@contextlib.contextmanager
def mounted(device: str, mountpoint: Path, options: str = "ro") -> Iterator[Path]:
    """Mount ``device`` at ``mountpoint`` for the body; always unmounts it."""
    mountpoint.mkdir(parents=True, exist_ok=True)
    run("mount", "-o", options, device, mountpoint)
    try:
        yield mountpoint
    finally:
        for _ in range(20):
            if run("umount", mountpoint, check=False).returncode == 0:
                break
            import time

            time.sleep(0.1)


@contextlib.contextmanager
def small_tmpfs(mountpoint: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` (``1m``…) at ``mountpoint``: a disk that fills up; always unmounted."""
    need_root()
    mountpoint.mkdir(parents=True, exist_ok=True)
    run("mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", mountpoint)
    try:
        yield mountpoint
    finally:
        run("umount", mountpoint, check=False)


def sha256_file(path: str | os.PathLike, size: int | None = None) -> str:
    import hashlib

    h = hashlib.sha256()
    remaining = size
    with open(path, "rb") as f:
        while True:
            want = 8 << 20 if remaining is None else min(8 << 20, remaining)
            if want == 0:
                break
            block = f.read(want)
            if not block:
                break
            h.update(block)
            if remaining is not None:
                remaining -= len(block)
    return h.hexdigest()
