"""Build the rescue media: a hybrid ISO (BIOS and UEFI, CD or raw on a USB stick).

Two stages. The *parts* (kernel, initramfs, squashfs root) are the slow one (mmdebstrap, ~1-3
min) and are cached under ``cache_dir`` by a hash of everything that goes into them: the package
list and the versions apt would install, the media's own scripts, and every file of the imgbackup
installation being copied. The *ISO* is assembled from them by grub-mkrescue in seconds, so media
with different baked-in parameters (``--cmdline``) or an embedded repository cost almost nothing
once the parts exist.

grub-mkrescue writes an El Torito BIOS image, an EFI system partition image and an MBR/GPT
hybrid, so the same file boots from CD or USB, on BIOS or UEFI. The kernel and the systemd in the
root talk on both the serial port and the screen.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from imgbackup.device import tools
from imgbackup.engine.rescue import payload, rootfs
from imgbackup.engine.rescue.params import parse_params
from imgbackup.errors import ImgBackupError, UsageError

DEFAULT_CACHE = Path(os.environ.get("IMGBACKUP_RESCUE_CACHE", "/var/cache/imgbackup/rescue"))
VOLUME_ID = "IMGBACKUP_RESCUE"
KEEP_PARTS = 2            # cached part sets kept (one per recent imgbackup build): ~200 MB each
CONSOLES = "console=tty0 console=ttyS0,115200n8"   # the last one is /dev/console: serial, for logs
BASE_CMDLINE = f"{CONSOLES} loglevel=4 systemd.show_status=auto"
# Host tools and the Debian package bringing each (apt install on the build machine).
BUILD_TOOLS = {"mmdebstrap": "mmdebstrap", "mksquashfs": "squashfs-tools", "grub-mkrescue": "grub-common",
               "xorriso": "xorriso", "mformat": "mtools", "depmod": "kmod"}
GRUB_DIRS = {"/usr/lib/grub/i386-pc": "grub-pc-bin", "/usr/lib/grub/x86_64-efi": "grub-efi-amd64-bin"}
Log = Callable[[str], None]


class ToolsMissing(ImgBackupError):
    exit_code = 12


@dataclass
class MediaResult:
    path: str
    size: int
    seconds: float
    parts_cached: bool
    parts_seconds: float
    media_id: str
    kernel: str
    cmdline: str
    embedded_repo: bool

    def to_dict(self) -> dict:
        return asdict(self)


def check_tools() -> None:
    missing = sorted({pkg for tool, pkg in BUILD_TOOLS.items() if shutil.which(tool) is None}
                     | {pkg for d, pkg in GRUB_DIRS.items() if not Path(d).is_dir()})
    if missing:
        raise ToolsMissing(f"building rescue media needs {', '.join(missing)}",
                           f"apt install {' '.join(missing)}")
    if os.geteuid() != 0:
        raise UsageError("building rescue media needs root (mmdebstrap installs packages into a chroot)")


def _candidate_versions(packages: tuple[str, ...]) -> str:
    """What apt would install now: a security update to the kernel changes the cache key."""
    proc = tools.run(["apt-cache", "policy", *packages], timeout=120)
    return "\n".join(line.strip() for line in proc.stdout.splitlines() if "Candidate:" in line or
                     line.endswith(":") and not line.startswith(" "))


def _data_fingerprint() -> str:
    h = hashlib.sha256()
    base = Path(rootfs.__file__).parent
    for path in sorted((base / "data").rglob("*")):
        if path.is_file():
            h.update(str(path.relative_to(base)).encode() + b"\0" + path.read_bytes())
    return h.hexdigest()


def debian_key(mirror: str | None) -> str:
    """The Debian root's cache key: its inputs — suite, mirror, packages and the versions apt would
    install, the build's settings (rootfs constants, ROOTFS_FORMAT) and the media's own files."""
    settings = json.dumps([rootfs.ROOTFS_FORMAT, rootfs.DPKG_EXCLUDES, rootfs.DROP_MODULE_DIRS,
                           rootfs.MASKED_UNITS, rootfs.DROP_FILES, rootfs.SQUASHFS_OPTS, rootfs.INITRAMFS_APPLETS])
    h = hashlib.sha256()
    for piece in (rootfs.SUITE, mirror or "", ",".join(rootfs.PACKAGES), _candidate_versions(rootfs.PACKAGES),
                  settings, _data_fingerprint()):
        h.update(piece.encode() + b"\n")
    return h.hexdigest()[:20]


@contextlib.contextmanager
def cache_lock(cache_dir: Path) -> Iterator[None]:
    """Hold the cache dir's lock (waiting for it): while held, no other build or prune — another
    ``rescue build``, another test run — changes or removes what this one builds and reads.
    Not re-entrant: take it once, around ensure_debian/ensure_payload/assemble_iso together."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    with open(cache_dir / ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _prune(cache_dir: Path, pattern: str, keep: Path) -> None:
    sets = sorted((p for p in cache_dir.glob(pattern) if p != keep),
                  key=lambda p: p.stat().st_mtime, reverse=True)
    for old in sets[KEEP_PARTS - 1:]:
        if old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)


def ensure_debian(cache_dir: Path, mirror: str | None, log: Log) -> tuple[Path, bool, float]:
    """The cached Debian part set (kernel, initramfs, root), built when missing: (dir, cached, seconds)."""
    start = time.monotonic()
    key = debian_key(mirror)
    parts = cache_dir / f"debian-{key}"
    if (parts / "manifest.json").exists():
        os.utime(parts)
        log(f"Debian root {key} from the cache ({parts})")
        return parts, True, 0.0
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir, prefix=".build-") as tmp:
        work = Path(tmp)
        stage = work / "parts"
        stage.mkdir()
        info = rootfs.build_debian(stage, work, cache_dir / "apt-archives", mirror, log)
        seconds = time.monotonic() - start
        manifest = {"key": key, **info, "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "seconds": round(seconds, 1), "packages": list(rootfs.PACKAGES),
                    "squashfs_bytes": (stage / "root.squashfs").stat().st_size}
        (stage / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        if parts.exists():
            shutil.rmtree(parts)
        os.replace(stage, parts)
    _prune(cache_dir, "debian-*", parts)
    log(f"Debian root built in {seconds:.0f} s")
    return parts, False, seconds


def ensure_payload(cache_dir: Path, debian: Path, log: Log) -> Path:
    """imgbackup's own squashfs (this installation and its dependencies), cached by their content."""
    python = json.loads((debian / "manifest.json").read_text())["python"]
    if python != payload.python_version():
        raise rootfs.BuildFailed(f"the rescue root has Python {python} but this imgbackup runs on Python "
                                 f"{payload.python_version()}: its compiled core cannot be copied over",
                                 f"build the media with an imgbackup installed on {rootfs.SUITE}'s python3")
    files = payload.payload_files()
    out = cache_dir / f"imgbackup-{payload.fingerprint(files)[:20]}.squashfs"
    if out.exists():
        os.utime(out)
        return out
    with tempfile.TemporaryDirectory(dir=cache_dir, prefix=".payload-") as tmp:
        payload.install(files, Path(tmp) / "root")
        log(f"imgbackup: {len(files)} files")
        rootfs.squash(Path(tmp) / "root", Path(tmp) / "out.squashfs", log)
        os.replace(Path(tmp) / "out.squashfs", out)
    _prune(cache_dir, "imgbackup-*.squashfs", out)
    return out


def _check_cmdline(cmdline: str) -> str:
    words = cmdline.split()
    bad = [w for w in words if w.startswith(("imgbackup.media=", "boot=", "console="))]
    if bad:
        raise UsageError(f"--cmdline must not set {', '.join(bad)}: the media set these themselves")
    if any(ch in cmdline for ch in "\"'\\$;{}\n"):
        raise UsageError("--cmdline: quotes, backslashes, $, ; and braces are not allowed (GRUB would read them)")
    parse_params(cmdline)      # a typo is caught now, not at 3 a.m.
    return " ".join(words)


def grub_cfg(media_id: str, cmdline: str, timeout: int) -> str:
    title = "imgbackup rescue: " + (f"unattended ({cmdline})" if "imgbackup.action=" in cmdline
                                    else "guided restore (menu)")
    text = rootfs.data_file("grub.cfg.in").decode()
    for key, value in (("BUILT", time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())), ("TIMEOUT", str(timeout)),
                       ("TITLE", title.replace('"', "'")), ("BASE", f"{BASE_CMDLINE} imgbackup.media={media_id}"),
                       ("CMDLINE", cmdline)):
        text = text.replace(f"@{key}@", value)
    return text


def _link_or_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _embed(tree: Path, repo: Path | None, passphrase_file: Path | None, log: Log) -> None:
    if repo is not None:
        if not (repo / "config").exists():
            raise UsageError(f"--embed-repo {repo}: not an imgbackup repository (no config file)")
        shutil.copytree(repo, tree / "imgbackup/repo", symlinks=False,
                        ignore=shutil.ignore_patterns("lock", "lock.*"))
        log(f"repository {repo} embedded as MEDIA:/imgbackup/repo")
    if passphrase_file is not None:
        shutil.copy2(passphrase_file, tree / "imgbackup/passphrase")
        (tree / "imgbackup/passphrase").chmod(0o600)
        log("WARNING: the repository passphrase is embedded: anyone holding the media can read the backups")


def assemble_iso(parts: Path, imgbackup_fs: Path, out: Path, cmdline: str, timeout: int, repo: Path | None,
                 passphrase_file: Path | None, log: Log) -> str:
    media_id = uuid.uuid4().hex[:16]
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=parts.parent, prefix=".iso-") as tmp:
        tree = Path(tmp) / "tree"
        for name in ("vmlinuz", "initrd.img", "root.squashfs", "manifest.json"):
            _link_or_copy(parts / name, tree / "imgbackup" / name)
        _link_or_copy(imgbackup_fs, tree / "imgbackup/imgbackup.squashfs")
        (tree / "imgbackup/media-id").write_text(media_id + "\n")
        (tree / "boot/grub").mkdir(parents=True)
        (tree / "boot/grub/grub.cfg").write_text(grub_cfg(media_id, cmdline, timeout))
        _embed(tree, repo, passphrase_file, log)
        tmp_iso = Path(tmp) / "out.iso"
        log("grub-mkrescue (BIOS + UEFI hybrid)")
        rootfs._run(["grub-mkrescue", "--compress=xz", "--fonts=", "--locales=", "--themes=",
                     "-o", str(tmp_iso), str(tree), "--", "-volid", VOLUME_ID], log)
        shutil.move(tmp_iso, out)
    return media_id


def build_media(out: str | os.PathLike, cmdline: str = "", cache_dir: str | os.PathLike | None = None,
                mirror: str | None = None, timeout: int = 5, embed_repo: str | os.PathLike | None = None,
                embed_passphrase_file: str | os.PathLike | None = None, log: Log = print) -> MediaResult:
    """Build the rescue ISO at ``out``; ``cmdline`` is baked into the default boot entry."""
    start = time.monotonic()
    cmdline = _check_cmdline(cmdline)
    if not 0 <= timeout <= 600:
        raise UsageError("--timeout: 0..600 seconds")
    repo = Path(embed_repo) if embed_repo else None
    passphrase = Path(embed_passphrase_file) if embed_passphrase_file else None
    if passphrase is not None and not passphrase.is_file():
        raise UsageError(f"--embed-passphrase-file {passphrase}: no such file")
    check_tools()
    cache = Path(cache_dir) if cache_dir is not None else DEFAULT_CACHE
    with cache_lock(cache):
        parts, cached, parts_seconds = ensure_debian(cache, mirror, log)
        imgbackup_fs = ensure_payload(cache, parts, log)
        media_id = assemble_iso(parts, imgbackup_fs, Path(out), cmdline, timeout, repo, passphrase, log)
    kernel = json.loads((parts / "manifest.json").read_text())["kernel"]
    size = os.path.getsize(out)
    result = MediaResult(os.fspath(out), size, round(time.monotonic() - start, 1), cached,
                         round(parts_seconds, 1), media_id, kernel, cmdline, repo is not None)
    log(f"{out}: {size / 1e6:.0f} MB, kernel {kernel}, {result.seconds:.0f} s")
    return result

