"""The guest lab: boot the rescue media under QEMU (TCG) with extra disks and drive them.

What this host's kernel lacks (device-mapper, a udev daemon, disks with serials and WWNs) the
rescue system booted from Debian's kernel has. ``Guest`` starts ``qemu-system-x86_64`` in its own
process group with the media as a CD-ROM and the given disks, keeps the serial console in a log
file (and a buffer to ``expect`` on), and — when booted for the shell — runs commands in a root
shell on a virtio console (``/dev/hvc0``), returning their output and exit code. The qemu
process group is killed by its own PID on ``close`` (and by PR_SET_PDEATHSIG if the test process
dies), so no guest outlives its test.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from imgbackup.device.tools import _die_with_parent
from imgbackup.engine.rescue.media import BASE_CMDLINE
from imgbackup.engine.verify.qemu import find_ovmf

QEMU = "qemu-system-x86_64"
BOOT_TIMEOUT = 300       # kernel + initramfs + systemd to a shell: 40-60 s under TCG here, >120 s at load ~13
SETTLE_TIMEOUT = 180     # udev's coldplug queue, drained after the shell is up (see boot_lab)
PROBE_EVERY = 2          # s between readiness probes of the lab shell (each answered one is drained)
MEMORY_MIB = 1536        # python3 + numpy + a restore's buffers, plus the RAM overlay root


@dataclass
class Disk:
    """A raw image attached to the guest. ``bus``: virtio (serial only) or scsi (serial, model, WWN)."""

    path: Path
    serial: str | None = None
    model: str | None = None
    vendor: str | None = None
    wwn: str | None = None
    bus: str = "virtio"
    read_only: bool = False


@dataclass
class Result:
    output: str
    rc: int

    def check(self) -> Result:
        assert self.rc == 0, f"guest command failed ({self.rc}):\n{self.output[-3000:]}"
        return self


def _disk_args(disks: list[Disk]) -> list[str]:
    args: list[str] = []
    if any(d.bus == "scsi" for d in disks):
        args += ["-device", "virtio-scsi-pci,id=scsi0"]
    for i, d in enumerate(disks):
        path = str(d.path).replace(",", ",,")
        args += ["-drive", f"if=none,id=d{i},file={path},format=raw,cache=unsafe"
                           + (",readonly=on" if d.read_only else "")]
        if d.bus == "scsi":
            props = [f"scsi-hd,bus=scsi0.0,drive=d{i}"]
            props += [f"{k}={v}" for k, v in (("serial", d.serial), ("product", d.model), ("vendor", d.vendor),
                                              ("wwn", d.wwn)) if v]
        else:
            props = [f"virtio-blk-pci,drive=d{i}"] + ([f"serial={d.serial}"] if d.serial else [])
        args += ["-device", ",".join(props)]
    return args


def extract_boot_files(iso: Path, dest: Path) -> tuple[Path, Path, str]:
    """Kernel, initramfs and media id out of the ISO (for booting the lab without firmware and menu)."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("vmlinuz", "initrd.img", "media-id"):
        subprocess.run(["xorriso", "-osirrox", "on", "-indev", str(iso), "-extract", f"/imgbackup/{name}",
                        str(dest / name)], check=True, capture_output=True)
    return dest / "vmlinuz", dest / "initrd.img", (dest / "media-id").read_text().strip()


class Guest:
    """One QEMU guest booted from the rescue media; use as a context manager."""

    def __init__(self, iso: Path, workdir: Path, disks: list[Disk] = (), firmware: str = "bios",
                 append: str | None = None, memory_mib: int = MEMORY_MIB, lab_shell: bool = False,
                 screen: bool = True) -> None:
        self.iso, self.workdir, self.disks = iso, workdir, list(disks)
        self.firmware, self.append, self.memory_mib, self.lab_shell = firmware, append, memory_mib, lab_shell
        self.screen = screen      # False: no display adapter at all, a serial-only (headless) server
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.console_log = workdir / "console.log"
        self._buf = b""
        self._lock = threading.Condition()
        self._proc: subprocess.Popen | None = None
        self._sock: socket.socket | None = None
        self._shell_buf = b""
        self.started = 0.0
        self.broken: str | None = None   # why the lab shell can no longer be trusted (a command hung)

    # -- lifecycle -------------------------------------------------------------------------
    def command(self) -> list[str]:
        # q35: AHCI and PCIe as on current hardware, and no floppy controller to probe
        # -cpu max: numpy's wheels need x86-64-v2 (SSE4.2, POPCNT), which TCG's default CPU lacks
        cmd = [QEMU, "-machine", "q35", "-accel", "tcg", "-cpu", "max", "-m", str(self.memory_mib), "-smp", "2",
               "-display", "none", "-monitor", "none", "-serial", "stdio", "-no-reboot", "-net", "none",
               "-drive", f"if=none,id=cd,file={self.iso},media=cdrom,readonly=on",
               "-device", "ide-cd,drive=cd,bus=ide.0" + ("" if self.append is not None else ",bootindex=0")]
        if not self.screen:
            cmd += ["-vga", "none"]
        if self.firmware == "uefi":
            ovmf = find_ovmf()
            assert ovmf is not None, "OVMF missing (apt install ovmf)"
            vars_copy = self.workdir / "OVMF_VARS.fd"
            shutil.copyfile(ovmf[1], vars_copy)
            cmd += ["-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={ovmf[0]}",
                    "-drive", f"if=pflash,format=raw,unit=1,file={vars_copy}"]
        if self.append is not None:
            kernel, initrd, media_id = extract_boot_files(self.iso, self.workdir / "boot")
            base = f"{BASE_CMDLINE} imgbackup.media={media_id}"
            cmd += ["-kernel", str(kernel), "-initrd", str(initrd), "-append", f"{base} {self.append}"]
        if self.lab_shell:
            self._sock_path = self.workdir / "lab.sock"
            cmd += ["-device", "virtio-serial-pci",
                    "-chardev", f"socket,id=lab,path={self._sock_path},server=on,wait=off",
                    "-device", "virtconsole,chardev=lab"]
        return cmd + _disk_args(self.disks)

    def start(self) -> Guest:
        self.started = time.monotonic()
        self._log = open(self.console_log, "wb")  # noqa: SIM115 - closed in close()
        self._times = open(self.workdir / "console.times", "w")  # noqa: SIM115 - "SECONDS END-OFFSET" lines
        self._proc = subprocess.Popen(self.command(), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, start_new_session=True, cwd=self.workdir,
                                      preexec_fn=_die_with_parent())
        threading.Thread(target=self._pump, daemon=True).start()
        return self

    def _pump(self) -> None:
        fd = self._proc.stdout.fileno()
        while True:
            try:
                chunk = os.read(fd, 65536)
            except OSError:
                chunk = b""
            with self._lock:
                if chunk:
                    self._buf += chunk
                    self._log.write(chunk)
                    self._log.flush()
                    # where a slow test's seconds went: when each console byte arrived (s since start)
                    self._times.write(f"{time.monotonic() - self.started:.2f} {len(self._buf)}\n")
                    self._times.flush()
                else:
                    self._eof = True
                self._lock.notify_all()
            if not chunk:
                return

    def close(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
        if self._proc is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self._proc.pid, 9)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(timeout=10)
        with contextlib.suppress(Exception):
            self._log.close()
            self._times.close()

    def __enter__(self) -> Guest:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    # -- serial console --------------------------------------------------------------------
    @property
    def console(self) -> str:
        with self._lock:
            return self._buf.decode(errors="replace").replace("\r\n", "\n")

    def expect(self, pattern: str, timeout: float, since: int = 0) -> re.Match:
        """Wait until ``pattern`` (a regex) appears in the console after offset ``since``."""
        rx = re.compile(pattern.encode())
        deadline = time.monotonic() + timeout
        with self._lock:
            while True:
                m = rx.search(self._buf, since)
                if m:
                    return m
                if getattr(self, "_eof", False) or time.monotonic() > deadline:
                    tail = self._buf[-4000:].decode(errors="replace")
                    why = "qemu exited" if getattr(self, "_eof", False) else f"{timeout:.0f} s passed"
                    raise AssertionError(f"console never showed {pattern!r} ({why}); tail:\n{tail}")
                self._lock.wait(0.5)

    def mark(self) -> int:
        with self._lock:
            return len(self._buf)

    def send(self, text: str, pace: float = 0.0) -> None:
        """Type ``text`` on the serial console (``pace`` s between bytes, for boot loaders)."""
        data = text.encode()
        if not pace:
            self._proc.stdin.write(data)
            self._proc.stdin.flush()
            return
        for b in data:
            self._proc.stdin.write(bytes([b]))
            self._proc.stdin.flush()
            time.sleep(pace)

    def wait_exit(self, timeout: float) -> int:
        """Wait for qemu to exit (the guest powered off); returns its exit status."""
        try:
            return self._proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"guest still running after {timeout:.0f} s; console tail:\n"
                                 f"{self.console[-4000:]}") from None

    # -- lab shell on hvc0 -----------------------------------------------------------------
    def _recv_until(self, token: bytes, deadline: float) -> bytes:
        while token not in self._shell_buf:
            left = deadline - time.monotonic()
            if left <= 0 or self._proc.poll() is not None:
                # the command still runs (or the guest died): what this shell says next is not trustworthy
                self.broken = f"no {token!r} from the lab shell"
                raise AssertionError(f"lab shell: no {token!r}; got {self._shell_buf[-2000:]!r}; console tail:\n"
                                     f"{self.console[-3000:]}")
            self._sock.settimeout(min(left, 1.0))
            try:
                chunk = self._sock.recv(65536)
            except TimeoutError:
                continue
            if not chunk:
                self.broken = "the guest closed the lab console"
                raise AssertionError("lab shell: the guest closed the console")
            self._shell_buf += chunk
        head, _, rest = self._shell_buf.partition(token)
        self._shell_buf = rest
        return head

    def wait_shell(self, timeout: float = BOOT_TIMEOUT) -> float:
        """Connect to the lab console and wait for a root shell; returns the seconds since start."""
        deadline = time.monotonic() + timeout
        while self._sock is None:
            try:
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.connect(str(self._sock_path))
                self._sock = s
            except OSError:
                if time.monotonic() > deadline or self._proc.poll() is not None:
                    raise AssertionError(f"lab console never opened; console tail:\n{self.console[-3000:]}") from None
                time.sleep(0.5)
        ready = f"LAB-READY-{secrets.token_hex(4)}"
        half = len(ready) // 2
        # until a shell answers: the getty may not be up yet (what was typed before it is lost), so keep
        # asking; every 15 s cost up to 15 s per boot (measured: shell up ~14 s after start, seen at 31 s)
        while True:
            self._sock.sendall(f"stty -echo; set +m; PS1=''; PS2=''; echo '{ready[:half]}''{ready[half:]}'\n"
                               .encode())
            try:
                self._recv_until(ready.encode(), min(deadline, time.monotonic() + PROBE_EVERY))
                break
            except AssertionError:
                if time.monotonic() > deadline:
                    raise
        self._drain()
        self.broken = None
        return time.monotonic() - self.started

    def _drain(self, quiet_s: float = 1.0) -> None:
        """Drop what the shell still says (repeated readiness probes) until it is quiet."""
        self._sock.settimeout(quiet_s)
        while True:
            try:
                if not self._sock.recv(65536):
                    break
            except TimeoutError:
                break
        self._shell_buf = b""

    def run(self, command: str, timeout: float = 60) -> Result:
        """Run ``command`` in the guest's root shell (bash); stdout and stderr together.

        A command that does not end within ``timeout`` marks the guest ``broken`` (the lab fixture
        then boots a fresh one for the next test instead of typing into a shell that is still busy)."""
        assert self.broken is None, f"lab guest unusable: {self.broken}"
        token = f"LAB-END-{secrets.token_hex(6)}"
        start = time.monotonic()
        script = f"{{ {command}\n}} </dev/null 2>&1; printf '\\n{token} %d\\n' $?\n"
        self._sock.sendall(script.encode())
        head = self._recv_until(token.encode(), time.monotonic() + timeout)
        rest = self._recv_until(b"\n", time.monotonic() + 10)
        out = head.decode(errors="replace").replace("\r\n", "\n")
        with open(self.workdir / "shell.log", "a") as transcript:   # what a failed test's reader needs
            transcript.write(f"$ {command}\n{out}\n[rc {rest.strip().decode()}, {time.monotonic() - start:.1f} s]\n")
        return Result(out[:-1] if out.endswith("\n") else out, int(rest.strip()))

    def put_file(self, path: str, data: bytes, mode: str = "644") -> None:
        """Write ``data`` to ``path`` in the guest (base64 through the shell, in lines)."""
        import base64

        text = base64.b64encode(data).decode()
        lines = "\n".join(text[i:i + 76] for i in range(0, len(text), 76))
        self.run(f"base64 -d > {path} <<'B64EOF'\n{lines}\nB64EOF\nchmod {mode} {path}").check()


def boot_lab(iso: Path, workdir: Path, disks: list[Disk] = (), append: str = "") -> Guest:
    """A started guest with a root shell on the lab console (``imgbackup.action=shell``); close() it."""
    guest = Guest(iso, workdir, disks, append=f"imgbackup.action=shell {append}".strip(), lab_shell=True)
    try:
        guest.start()
        guest.wait_shell()
        # coldplug (module loads for every device) can outlast the shell's start by a minute under TCG on a
        # loaded host: a 30 s settle failed here
        guest.run(f"dmesg -n 1; udevadm settle --timeout={SETTLE_TIMEOUT}", SETTLE_TIMEOUT + 30).check()
    except BaseException:
        guest.close()
        raise
    return guest


@contextlib.contextmanager
def lab(iso: Path, workdir: Path, disks: list[Disk] = (), append: str = "") -> Iterator[Guest]:
    """A booted guest with a root shell on the lab console, closed afterwards."""
    guest = boot_lab(iso, workdir, disks, append)
    try:
        yield guest
    finally:
        guest.close()


class LabPool:
    """One lab guest shared by a module's tests, replaced by a fresh boot when a test left it
    ``broken`` (a command that never returned), so one hung command fails one test, not the rest.

    ``setup`` runs in every new guest (``imgbackup init`` …); the disks are the same files, so state
    a test keeps on them survives a replacement."""

    def __init__(self, iso: Path, workdir: Path, disks: list[Disk], setup=None) -> None:
        self.iso, self.workdir, self.disks, self.setup = iso, workdir, disks, setup
        self.guest: Guest | None = None
        self.boots: list[float] = []      # seconds each boot took to a usable shell

    def get(self) -> Guest:
        if self.guest is not None and self.guest.broken is None and self.guest._proc.poll() is None:
            return self.guest
        self.close()
        start = time.monotonic()
        guest = boot_lab(self.iso, self.workdir / f"boot{len(self.boots) + 1}", self.disks)
        try:
            if self.setup is not None:
                self.setup(guest)
        except BaseException:
            guest.close()
            raise
        self.boots.append(time.monotonic() - start)
        self.guest = guest
        return guest

    def close(self) -> None:
        if self.guest is not None:
            self.guest.close()
            self.guest = None
