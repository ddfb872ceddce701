"""Session fixtures for the guest tests: the rescue media, built at most once per session.

The builder caches the slow part (the Debian root, ~2-4 min cold) by a hash of its inputs, and
imgbackup's own squashfs by its files' content, under its cache dir (``IMGBACKUP_RESCUE_CACHE``,
default /var/cache/imgbackup/rescue); the ISOs themselves
are cached there too, keyed by those two and the baked-in parameters. A developer's second run
therefore starts its guests at once; a clean CI machine builds once per session.
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from imgbackup.engine.rescue.media import DEFAULT_CACHE
from support import need, need_root, need_tool

RESCUE_CACHE = DEFAULT_CACHE     # shared with 'imgbackup rescue build': one apt cache, one Debian root
BACKUP_LABEL = "IBBACKUP"
TARGET_SERIAL = "IBTARGET01"
# The unattended media the restore tests boot: everything by label or stable identity.
UNATTENDED = (f"imgbackup.action=restore imgbackup.repo=LABEL={BACKUP_LABEL}:/repo imgbackup.image=latest "
              f"imgbackup.name=srcdisk imgbackup.target=/dev/disk/by-id/virtio-{TARGET_SERIAL} "
              f"imgbackup.passphrase-file=LABEL={BACKUP_LABEL}:/pass imgbackup.grow=yes "
              "imgbackup.after=poweroff imgbackup.on-failure=poweroff imgbackup.wait=20")


@dataclass
class RescueMedia:
    plain: Path            # boot menu (5 s), default entry: the guided menu
    unattended: Path       # UNATTENDED baked into the default entry, 1 s menu
    build_seconds: float
    built: list[str]


def _iso(name: str, cmdline: str, timeout: int, log: list[str]) -> Path:
    from imgbackup.engine.rescue import media, payload

    debian, _, _ = media.ensure_debian(RESCUE_CACHE, None, log.append)
    fs = media.ensure_payload(RESCUE_CACHE, debian, log.append)
    key = hashlib.sha256(f"{debian.name}\n{fs.name}\n{cmdline}\n{timeout}".encode()).hexdigest()[:16]
    out = RESCUE_CACHE / f"test-{name}-{key}.iso"
    if not out.exists():
        for old in RESCUE_CACHE.glob(f"test-{name}-*.iso"):
            old.unlink()
        tmp = out.with_suffix(".part")
        media.assemble_iso(debian, fs, tmp, cmdline, timeout, None, None, log.append)
        os.replace(tmp, out)
        log.append(f"built {out.name}")
    del payload
    return out


@pytest.fixture(scope="session")
def rescue_media() -> RescueMedia:
    need_root()
    need_tool("mmdebstrap", "mksquashfs", "grub-mkrescue", "xorriso", "qemu-system-x86_64", "mformat")
    from imgbackup.engine.rescue import media

    try:
        media.check_tools()
    except Exception as exc:  # noqa: BLE001 - turned into need()'s skip/fail
        need(False, str(exc))
    start = time.monotonic()
    log: list[str] = []
    plain = _iso("plain", "", 5, log)
    unattended = _iso("unattended", UNATTENDED, 1, log)
    return RescueMedia(plain, unattended, time.monotonic() - start, log)
