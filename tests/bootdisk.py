"""Build tiny bootable disk images from Debian parts, to prove that a restored disk boots.

A disk holds an ext4 root labelled ``ibroot`` as its LAST partition; its ``/sbin/init`` prints a
marker on the serial console and powers off. The kernel comes from the package that
``linux-image-amd64`` depends on, the initramfs is busybox-static plus the virtio/ext4 modules,
and it finds the root by label, so the disk still boots after a restore grew or moved partitions.

Kinds: ``bios-mbr`` (syslinux mbr.bin + extlinux), ``bios-gpt`` (gptmbr.bin + extlinux on a
legacy-BIOS-bootable partition) and ``uefi`` (FAT ESP made with mtools holding systemd-boot as
``EFI/BOOT/BOOTX64.EFI``, kernel and initrd). Kernel, modules and initramfs are cached under
``cache_dir`` so a second build takes about a second. BIOS kinds need root (extlinux wants a
mounted filesystem); ``uefi`` needs no root at all.
"""

from __future__ import annotations

import contextlib
import fcntl
import gzip
import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

from tests.disks import loop_device, mounted

DEFAULT_CACHE = Path(os.environ.get("IMGBACKUP_TEST_CACHE", "/var/cache/imgbackup-test"))
ROOT_LABEL = "ibroot"
KINDS = ("bios-mbr", "bios-gpt", "uefi")
SECTOR = 512
ESP_MIB = 24
SPARE_MIB = 4  # bios-gpt: a small first partition, so the root is not partition 1
ROOT_MODULES = ("crc32c_generic", "virtio_pci", "virtio_blk", "ext4")
_MODULE_DIRS = ("drivers/virtio/*", "drivers/block/virtio_blk.ko", "fs/ext4/*", "fs/jbd2/*",
                "fs/mbcache.ko", "lib/crc*", "lib/libcrc32c.ko", "crypto/crc32c*")
KERNEL_CMDLINE = "console=ttyS0 panic=-1 loglevel=4"
_MARKER_RE = re.compile(r"^[A-Za-z0-9_.:=+-]{4,80}$")

INITRAMFS_INIT = """#!/bin/sh
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for m in $(cat /lib/modules/order); do
  insmod /lib/modules/$m || echo "ibinit: insmod $m failed"
done
dev=""
i=0
while [ $i -lt 100 ]; do
  dev=$(findfs LABEL=@LABEL@ 2>/dev/null) && break
  usleep 100000
  i=$((i+1))
done
if [ -z "$dev" ]; then echo "ibinit: no filesystem labelled @LABEL@"; poweroff -f; fi
if ! mount -t ext4 -o ro "$dev" /newroot; then echo "ibinit: cannot mount $dev"; poweroff -f; fi
echo "ibinit: root is $dev"
exec switch_root /newroot /sbin/init
""".replace("@LABEL@", ROOT_LABEL)

SYSLINUX_CFG = f"""PROMPT 0
DEFAULT linux
LABEL linux
  KERNEL /boot/vmlinuz
  INITRD /boot/initrd.img
  APPEND {KERNEL_CMDLINE}
"""


def _run(*args: str | os.PathLike, **kw) -> subprocess.CompletedProcess:
    """Run a tool; on failure raise with its stderr so a broken build says why."""
    proc = subprocess.run([str(a) for a in args], capture_output=True, **kw)
    if proc.returncode != 0:
        err = proc.stderr.decode(errors="replace") if isinstance(proc.stderr, bytes) else proc.stderr
        raise RuntimeError(f"{args[0]} failed ({proc.returncode}): {err.strip()[-800:]}")
    return proc


def kernel_package(cache_dir: Path = DEFAULT_CACHE) -> str:
    """The versioned kernel package ``linux-image-amd64`` depends on (asked once per apt update)."""
    lists = Path("/var/lib/apt/lists")
    stamp = str(lists.stat().st_mtime_ns) if lists.exists() else "none"
    memo = cache_dir / "kernel-package"
    with contextlib.suppress(OSError, ValueError):
        seen_stamp, pkg = memo.read_text().split()
        if seen_stamp == stamp:
            return pkg
    out = _run("apt-cache", "depends", "linux-image-amd64", text=True).stdout
    for line in out.splitlines():
        m = re.match(r"\s*Depends:\s*(linux-image-\S+)", line)
        if m:
            with contextlib.suppress(OSError):
                memo.write_text(f"{stamp} {m.group(1)}\n")
            return m.group(1)
    raise RuntimeError("linux-image-amd64 depends on no linux-image package")


def _module_order(moddir: Path, builtin: set[str]) -> list[str]:
    """Modules needed for ROOT_MODULES, each after everything its ``depends=`` names."""
    files = {p.stem.replace("-", "_"): p for p in moddir.rglob("*.ko")}
    order: list[str] = []

    def visit(name: str, stack: tuple[str, ...]) -> None:
        if name in order or name in builtin:
            return
        if name not in files:
            raise RuntimeError(f"module {name} (needed by {stack}) not in the kernel package")
        deps = _run("modinfo", "-F", "depends", files[name], text=True).stdout.strip()
        for dep in filter(None, deps.split(",")):
            visit(dep.replace("-", "_"), (*stack, name))
        order.append(name)

    for root in ROOT_MODULES:
        visit(root, ())
    return [str(files[n].relative_to(moddir)) for n in order]


def _fetch_kernel(pkg: str, dest: Path) -> None:
    """Download the kernel .deb, keep vmlinuz and the few modules the initramfs needs."""
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".fetch-") as tmp:
        work = Path(tmp)
        _run("apt-get", "download", pkg, cwd=work)
        deb = next(work.glob("*.deb"))
        patterns = ["./boot/vmlinuz-*", "./lib/modules/*/modules.builtin"]
        patterns += [f"./lib/modules/*/kernel/{d}" for d in _MODULE_DIRS]
        tar_in = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE)
        try:
            _run("tar", "-x", "-C", work, "--wildcards", *patterns, stdin=tar_in.stdout)
        finally:
            tar_in.stdout.close()
            tar_in.wait()
        (kdir,) = (work / "lib/modules").iterdir()
        builtin = {Path(line).stem.replace("-", "_")
                   for line in (kdir / "modules.builtin").read_text().split()}
        order = _module_order(kdir / "kernel", builtin)
        stage = work / "stage"
        (stage / "modules").mkdir(parents=True)
        for rel in order:
            shutil.copy2(kdir / "kernel" / rel, stage / "modules" / Path(rel).name)
        (stage / "modules" / "order").write_text("".join(Path(r).name + "\n" for r in order))
        shutil.copy2(next((work / "boot").glob("vmlinuz-*")), stage / "vmlinuz")
        (stage / "package").write_text(pkg + "\n")
        os.replace(stage, dest)


@contextlib.contextmanager
def _cache_lock(cache_dir: Path) -> Iterator[None]:
    """Serialise cache fills between concurrent builders (parallel test runs)."""
    with open(cache_dir / ".lock", "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def kernel_parts(cache_dir: Path = DEFAULT_CACHE) -> Path:
    """Directory holding ``vmlinuz`` and ``modules/`` (with ``order``), downloaded once."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    try:
        pkg = kernel_package(cache_dir)
    except (RuntimeError, FileNotFoundError):
        found = sorted(cache_dir.glob("linux-image-*/vmlinuz"))
        if not found:
            raise
        return found[-1].parent
    dest = cache_dir / pkg
    if not (dest / "vmlinuz").exists():
        with _cache_lock(cache_dir):
            if not (dest / "vmlinuz").exists():
                _fetch_kernel(pkg, dest)
    return dest


def _cpio_dir(src: Path, out: Path) -> None:
    """Pack ``src`` as a gzip'd newc cpio archive (the initramfs format)."""
    names = sorted(str(p.relative_to(src)) for p in src.rglob("*"))
    proc = _run("cpio", "-o", "-H", "newc", "-R", "0:0", "--quiet", cwd=src,
                input="\n".join([".", *names]).encode() + b"\n")
    with gzip.open(out, "wb", compresslevel=6) as f:
        f.write(proc.stdout)


def initramfs(cache_dir: Path = DEFAULT_CACHE) -> Path:
    """The cached initramfs for the current kernel: busybox, modules, and INITRAMFS_INIT."""
    kdir = kernel_parts(cache_dir)
    busybox = Path(shutil.which("busybox") or "/bin/busybox")
    if b"ld-linux" in busybox.read_bytes()[:4096]:  # an ELF interpreter: not the static build
        raise RuntimeError(f"{busybox} is dynamically linked (apt install busybox-static)")
    key = hashlib.sha256(INITRAMFS_INIT.encode() + busybox.read_bytes()
                         + (kdir / "modules/order").read_bytes()).hexdigest()[:16]
    out = kdir / f"initrd-{key}.img"
    if out.exists():
        return out
    with _cache_lock(kdir), tempfile.TemporaryDirectory(dir=kdir, prefix=".initrd-") as tmp:
        root = Path(tmp) / "root"
        for d in ("bin", "dev", "proc", "sys", "newroot", "lib"):
            (root / d).mkdir(parents=True)
        shutil.copy2(busybox, root / "bin/busybox")
        for applet in ("sh", "mount", "insmod", "findfs", "usleep", "poweroff", "switch_root",
                       "cat", "echo"):
            os.symlink("busybox", root / "bin" / applet)
        shutil.copytree(kdir / "modules", root / "lib/modules")
        (root / "init").write_text(INITRAMFS_INIT)
        (root / "init").chmod(0o755)
        tmp_out = Path(tmp) / "initrd.img"
        _cpio_dir(root, tmp_out)
        os.replace(tmp_out, out)
    return out


def _partition(path: Path, kind: str) -> None:
    """Write the partition table; the root filesystem is always the last partition."""
    if kind == "bios-mbr":
        script = "label: dos\nstart=2048, type=83, bootable\n"
    elif kind == "bios-gpt":
        script = (f"label: gpt\nstart=2048, size={SPARE_MIB}MiB, type=L, name=spare\n"
                  "type=L, name=root, attrs=LegacyBIOSBootable\n")
    else:
        script = f"label: gpt\nstart=2048, size={ESP_MIB}MiB, type=U, name=ESP\ntype=L, name=root\n"
    _run("sfdisk", "-q", path, input=script.encode())


def partitions(path: Path) -> list[dict]:
    """The partition list as ``sfdisk --json`` reports it (start/size in sectors)."""
    out = _run("sfdisk", "--json", path, text=True).stdout
    return json.loads(out)["partitiontable"]["partitions"]


def _root_tree(stage: Path, marker: str) -> None:
    """The root filesystem's files: busybox and an init that prints ``marker``."""
    for d in ("bin", "sbin", "dev", "proc", "sys"):
        (stage / d).mkdir(parents=True, exist_ok=True)
    shutil.copy2(shutil.which("busybox") or "/bin/busybox", stage / "bin/busybox")
    init = stage / "sbin/init"
    init.write_text(f"#!/bin/busybox sh\n/bin/busybox echo '{marker}'\n/bin/busybox poweroff -f\n")
    init.chmod(0o755)


def _mkfs_root(disk: Path, start: int, sectors: int, stage: Path) -> None:
    """ext4 written in place at ``start`` (sectors), sized to the partition; no loop needed."""
    _run("mkfs.ext4", "-q", "-F", "-b", "4096", "-L", ROOT_LABEL, "-O", "^64bit,^metadata_csum",
         "-E", f"offset={start * SECTOR},nodiscard", "-d", stage, disk, f"{sectors * SECTOR // 1024}k")


def _syslinux_file(name: str) -> Path:
    for d in ("/usr/lib/syslinux/mbr", "/usr/lib/syslinux", "/usr/share/syslinux"):
        if (Path(d) / name).exists():
            return Path(d) / name
    raise RuntimeError(f"syslinux {name} not found (apt install syslinux)")


def _write_at(disk: Path, offset: int, data: bytes) -> None:
    with open(disk, "r+b") as f:
        f.seek(offset)
        f.write(data)


def _install_bios(disk: Path, kind: str, root: dict, kdir: Path, initrd: Path, tmp: Path) -> None:
    """Kernel + extlinux into the root filesystem, then mbr.bin/gptmbr.bin into bytes 0..439.

    The kernel is copied through a mount with ``--sparse=never``: ``mkfs -d`` would leave
    holes for zero blocks, and syslinux fails on sparse files ("I/O error").
    """
    with loop_device(disk, offset=root["start"] * SECTOR, sizelimit=root["size"] * SECTOR) as dev, \
            mounted(dev, tmp / "mnt", "rw") as mnt:
        (mnt / "boot/syslinux").mkdir(parents=True)
        for src, dst in ((kdir / "vmlinuz", "vmlinuz"), (initrd, "initrd.img")):
            _run("cp", "--sparse=never", src, mnt / "boot" / dst)
        (mnt / "boot/syslinux/syslinux.cfg").write_text(SYSLINUX_CFG)
        _run("extlinux", "--install", mnt / "boot/syslinux")
    code = _syslinux_file("mbr.bin" if kind == "bios-mbr" else "gptmbr.bin").read_bytes()[:440]
    _write_at(disk, 0, code)


def _install_uefi(disk: Path, esp: dict, kdir: Path, initrd: Path, tmp: Path) -> None:
    """A FAT ESP made with mtools: systemd-boot as the removable-media loader, kernel, initrd."""
    efi = Path("/usr/lib/systemd/boot/efi/systemd-bootx64.efi")
    if not efi.exists():
        raise RuntimeError(f"{efi} missing (apt install systemd-boot-efi)")
    img = tmp / "esp.img"
    _run("mkfs.vfat", "-n", "ESP", "-C", img, str(esp["size"] * SECTOR // 1024))
    (tmp / "loader.conf").write_text("timeout 0\ndefault ib.conf\n")
    (tmp / "ib.conf").write_text(f"title imgbackup test\nlinux /vmlinuz\ninitrd /initrd.img\n"
                                 f"options {KERNEL_CMDLINE}\n")
    mt = ["-i", str(img)]
    _run("mmd", *mt, "::/EFI", "::/EFI/BOOT", "::/loader", "::/loader/entries")
    for src, dst in ((efi, "::/EFI/BOOT/BOOTX64.EFI"), (kdir / "vmlinuz", "::/vmlinuz"),
                     (initrd, "::/initrd.img"), (tmp / "loader.conf", "::/loader/loader.conf"),
                     (tmp / "ib.conf", "::/loader/entries/ib.conf")):
        _run("mcopy", *mt, src, dst)
    _write_at(disk, esp["start"] * SECTOR, img.read_bytes())


def build_boot_disk(path: str | os.PathLike, kind: str, size_mib: int = 64,
                    marker: str = "IMGBACKUP-BOOT-OK", cache_dir: str | os.PathLike | None = None) -> Path:
    """Build a raw disk image at ``path`` that boots to ``marker`` on the serial console.

    The root ext4 (label ``ibroot``) is the last partition and fills the disk.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, not {kind!r}")
    if not _MARKER_RE.match(marker):
        raise ValueError("marker: 4-80 characters of [A-Za-z0-9_.:=+-]")
    if size_mib < 32 or (kind == "uefi" and size_mib < ESP_MIB + 24):
        raise ValueError(f"size_mib {size_mib} is too small for {kind}")
    cache = Path(cache_dir) if cache_dir is not None else DEFAULT_CACHE
    kdir = kernel_parts(cache)
    initrd = initramfs(cache)
    disk = Path(path)
    with open(disk, "wb") as f:
        f.truncate(size_mib << 20)
    _partition(disk, kind)
    parts = partitions(disk)
    root = parts[-1]
    with tempfile.TemporaryDirectory(prefix="bootdisk-") as t:
        tmp = Path(t)
        bios = kind.startswith("bios")
        _root_tree(tmp / "stage", marker)
        _mkfs_root(disk, root["start"], root["size"], tmp / "stage")
        if bios:
            _install_bios(disk, kind, root, kdir, initrd, tmp)
        else:
            _install_uefi(disk, parts[0], kdir, initrd, tmp)
    return disk
