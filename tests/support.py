"""Shared test helpers: requirements, running tools, and the CLI as a user runs it.

``need(cond, why)`` skips a test on a developer machine that lacks a part, but fails it
under CI=true, where every real part must be present. Disks, loop devices and mounts are in
``tests/disks.py``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
MIB = 1 << 20


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


def cli_env(repo: str | os.PathLike | None = None, passphrase: str | None = "test-pass", **extra: str) -> dict:
    """The environment for one CLI run: repository, passphrase and the cheap test KDF."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMGBACKUP_") or k == "IMGBACKUP_CORE"}
    env["IMGBACKUP_TEST_CHEAP_KDF"] = "1"
    # no grace period for collections unless a test asks for one (conftest.py; tests/test_fleet.py)
    env["IMGBACKUP_GC_GRACE_SECONDS"] = os.environ.get("IMGBACKUP_GC_GRACE_SECONDS", "0")
    if repo is not None:
        env["IMGBACKUP_REPO"] = str(repo)
    if passphrase is not None:
        env["IMGBACKUP_PASSPHRASE"] = passphrase
    env.update(extra)
    return env


def cli(*args: str | os.PathLike, repo: str | os.PathLike | None = None, passphrase: str | None = "test-pass",
        timeout: float = 300, **extra: str) -> subprocess.CompletedProcess:
    """Run ``python -m imgbackup ARGS`` as a user would, without a terminal; never raises on failure."""
    return subprocess.run([sys.executable, "-m", "imgbackup", *map(str, args)], env=cli_env(repo, passphrase, **extra),
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout)


def cli_json(*args: str | os.PathLike, repo: str | os.PathLike | None = None, **kw) -> dict:
    """Run a command with --json that must succeed; its parsed document."""
    proc = cli(*args, "--json", repo=repo, **kw)
    assert proc.returncode == 0, f"{args} exited {proc.returncode}: {proc.stderr}"
    return json.loads(proc.stdout)
