#!/usr/bin/env python3
"""Build a tiny bootable disk image (as the tests do) and optionally boot it once in QEMU.

    scripts/make-boot-disk.py /tmp/disk.img --kind uefi --marker HELLO-42 --boot

The kernel, modules and initramfs are downloaded with apt once and cached (default
/var/cache/imgbackup-test, or --cache-dir / IMGBACKUP_TEST_CACHE), so later builds take about a
second. BIOS kinds need root (extlinux installs into a mounted filesystem).
Exit status: 0 built (and booted, with --boot), 1 the boot check failed, 2 the build failed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(HERE / "tests"))
sys.path.insert(0, str(HERE / "src"))
sys.path.insert(0, str(HERE))          # bootdisk uses tests.disks for its loop device and mount

import bootdisk  # noqa: E402  (lives in tests/, found through the path set above)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("path", type=Path, help="image file to create (overwritten)")
    ap.add_argument("--kind", choices=bootdisk.KINDS, default="bios-gpt")
    ap.add_argument("--size-mib", type=int, default=64)
    ap.add_argument("--marker", default="IMGBACKUP-BOOT-OK", help="text the guest prints at boot")
    ap.add_argument("--cache-dir", type=Path, default=bootdisk.DEFAULT_CACHE)
    ap.add_argument("--boot", action="store_true", help="boot the result once and wait for the marker")
    ap.add_argument("--timeout", type=float, default=120)
    args = ap.parse_args(argv)
    try:
        bootdisk.build_boot_disk(args.path, args.kind, args.size_mib, args.marker, args.cache_dir)
    except (RuntimeError, ValueError, OSError) as exc:
        print(f"make-boot-disk: {exc}", file=sys.stderr)
        return 2
    print(f"built {args.path} ({args.kind}, {args.size_mib} MiB, marker {args.marker})")
    if not args.boot:
        return 0
    from imgbackup.engine.verify.qemu import boot_check

    firmware = "uefi" if args.kind == "uefi" else "bios"
    result = boot_check(str(args.path), args.marker, timeout=args.timeout, firmware=firmware)
    print(f"boot: {result.reason} after {result.seconds:.1f} s")
    if not result.booted:
        print(result.console_tail[-2000:], file=sys.stderr)
    return 0 if result.booted else 1


if __name__ == "__main__":
    sys.exit(main())
