"""The rescue media's host-side parts that need no build: boot menu, payload, checks, the run's log."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from imgbackup.engine.rescue import media, payload, rootfs
from imgbackup.engine.rescue.console import RescueLog
from imgbackup.engine.rescue.unattended import run_from_cmdline
from imgbackup.errors import UsageError
from rescue_fixtures import UNATTENDED
from support import cli_json, need_tool


def test_baked_parameters_go_into_the_default_entry_only() -> None:
    cfg = media.grub_cfg("0123456789abcdef", media._check_cmdline(UNATTENDED), 3)
    entries = cfg.split("menuentry ")[1:]
    assert len(entries) == 3
    assert UNATTENDED in entries[0] and "imgbackup.action=menu" in entries[1] and "action=shell" in entries[2]
    assert all("imgbackup.media=0123456789abcdef" in e and "console=ttyS0,115200n8" in e for e in entries)
    assert "set timeout=3" in cfg and "terminal_output serial console" in cfg


@pytest.mark.parametrize(("cmdline", "message"), [
    ("imgbackup.action=restore imgbackup.repo=LABEL=B:/r imgbackup.name=x imgbackup.target=/dev/sda", "stable"),
    ("imgbackup.media=abc", "must not set"),
    ("console=ttyS1", "must not set"),
    ('imgbackup.action=shell quiet"', "quotes"),
    ("imgbackup.action=shell; reboot", "quotes"),
])
def test_bad_baked_parameters_are_refused_at_build_time(cmdline: str, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        media.build_media("/nonexistent/out.iso", cmdline=cmdline)


def test_payload_holds_the_compiled_core_and_every_dependency() -> None:
    dests = {f.dest for f in payload.payload_files()}
    assert any(d.startswith("imgbackup/_core/scan.") and d.endswith(".so") for d in dests)
    assert "imgbackup/engine/rescue/data/initramfs/init" in dests
    tops = {d.split("/")[0] for d in dests}
    for dep in ("numpy", "zstandard", "cryptography", "typer", "tqdm", "pyudev"):
        assert dep in tops, dep
    assert not any(d.endswith((".pyc", ".c")) or "__pycache__" in d for d in dests)


def test_module_closure_follows_dependencies(tmp_path: Path) -> None:
    (tmp_path / "modules.dep").write_text(
        "kernel/drivers/ata/ahci.ko: kernel/drivers/ata/libahci.ko kernel/drivers/ata/libata.ko\n"
        "kernel/drivers/ata/libahci.ko: kernel/drivers/ata/libata.ko\n"
        "kernel/drivers/ata/libata.ko:\nkernel/fs/isofs/isofs.ko:\nkernel/drivers/usb/storage/usb-storage.ko:\n")
    (tmp_path / "modules.builtin").write_text("kernel/fs/squashfs/squashfs.ko\n")
    got = rootfs._module_closure(tmp_path, ["ahci", "usb_storage", "squashfs"])
    assert got == ["kernel/drivers/ata/ahci.ko", "kernel/drivers/ata/libahci.ko", "kernel/drivers/ata/libata.ko",
                   "kernel/drivers/usb/storage/usb-storage.ko"]
    assert rootfs._module_closure(tmp_path, ["isofs", "nvme"]) == ["kernel/fs/isofs/isofs.ko"]  # gone: skipped
    with pytest.raises(rootfs.BuildFailed, match="nvme, sr_mod"):
        rootfs._module_closure(tmp_path, ["isofs", "nvme", "sr_mod"])


def test_missing_build_tools_are_named_with_their_package(tmp_path: Path) -> None:
    env = dict(os.environ, PATH=str(Path(sys.executable).parent))     # python, nothing of Debian's
    proc = subprocess.run([sys.executable, "-m", "imgbackup", "rescue", "build", str(tmp_path / "x.iso")],
                          env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    assert proc.returncode == 12, proc.stderr
    assert "mmdebstrap" in proc.stderr and "apt install" in proc.stderr and "squashfs-tools" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "x.iso").exists()


def test_a_bad_parameter_stops_the_run_with_its_reason(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from imgbackup.engine.rescue import unattended

    monkeypatch.setattr(unattended, "STATUS_FILE", tmp_path / "status.json")
    console = tmp_path / "console"
    console.touch()
    log = RescueLog([str(console)], echo=lambda line: None)
    cmdline = UNATTENDED.replace("/dev/disk/by-id/virtio-IBTARGET01", "/dev/sda").replace(
        "on-failure=poweroff", "on-failure=shell")
    code = run_from_cmdline(cmdline, log)
    assert code == 2
    text = console.read_bytes().decode()
    assert "FAILED: imgbackup.target=/dev/sda is not a stable identity" in text and "\r\n" in text
    assert "root shell is open" in text
    assert '"ok": false' in (tmp_path / "status.json").read_text()


def test_the_unattended_restore_runs_the_engine_in_its_own_process(tmp_path: Path) -> None:
    """The run's restore step: the image's bytes on the target, the command a sysadmin would type in
    the log, and the CLI's refusals with their exit codes (wrong or unreadable passphrase: 4)."""
    import random

    from imgbackup.engine.rescue import unattended
    from imgbackup.engine.rescue.params import parse_params
    from imgbackup.errors import ImgBackupError

    data = random.Random(5).randbytes(3 << 20)
    (tmp_path / "disk.img").write_bytes(data)
    (tmp_path / "pass").write_text("test-pass\n")
    cli_json("init", repo=tmp_path / "repo")
    cli_json("backup", tmp_path / "disk.img", "--name", "srcdisk", repo=tmp_path / "repo")
    params = parse_params(UNATTENDED)
    lines: list[str] = []
    log = RescueLog([], echo=lines.append)
    result = unattended._restore_here(params, tmp_path / "repo", tmp_path / "pass", str(tmp_path / "out.img"), log)
    assert (tmp_path / "out.img").read_bytes() == data and result.bytes_written > 0
    assert any(f"running: imgbackup restore latest {tmp_path / 'out.img'} --yes --name srcdisk --grow" in line
               for line in lines)
    (tmp_path / "pass").write_text("wrong-pass\n")
    for passphrase_file in (tmp_path / "pass", tmp_path / "missing", None):
        with pytest.raises(ImgBackupError) as refused:
            unattended._restore_here(params, tmp_path / "repo", passphrase_file, str(tmp_path / "out2.img"), log)
        assert refused.value.exit_code == 4, refused.value
    assert not (tmp_path / "out2.img").exists()
    assert "test-pass" not in "\n".join(lines)


def test_login_on_a_terminal_shows_the_outcome_then_the_guide(tmp_path: Path) -> None:
    """What every console of the media runs at login (bash_profile): the unattended run's outcome, then
    — booted for the menu, as a command line without imgbackup.action is (this host's) — the guide
    on that terminal. The guest test drives the guide itself after a failed run's shell."""
    import json

    from tests.terminal import Terminal

    (tmp_path / "rescue-status.json").write_text(json.dumps(
        {"ok": False, "reason": "target /dev/disk/by-id/virtio-X not found", "exit_code": 8,
         "log_path": "/run/x.log", "seconds": 1.0}))
    assert "imgbackup.action" not in Path("/proc/cmdline").read_text()
    with Terminal("rescue", "login", IMGBACKUP_RESCUE_RUN=str(tmp_path)) as term:
        term.expect(r"unattended restore FAILED: target /dev/disk/by-id/virtio-X not found")
        term.expect(r"log: /run/x.log")
        term.expect(r"imgbackup rescue menu\r?\n\s+1\) restore an image onto a disk \(guided\)")
        term.expect(r"choose \[1\]: ")
        term.send("3\n")
        term.expect(r"shell: imgbackup is on PATH")
        assert term.wait() == 0


def test_a_failed_run_takes_on_failure_not_after(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """imgbackup.on-failure=poweroff (racks): a run that failed powers off instead of leaving a shell,
    and never takes imgbackup.after. The guest tests prove 'systemctl poweroff' itself (after=poweroff)
    and on-failure=shell; here the choice between them, and a failed run's report and exit code (run
    with on-failure=shell: nothing on this host is powered off or stubbed)."""
    from imgbackup.engine.rescue import unattended
    from imgbackup.engine.rescue.params import parse_params

    assert "imgbackup.on-failure=poweroff" in UNATTENDED
    racks = parse_params(UNATTENDED.replace("after=poweroff", "after=reboot"))
    assert unattended.final_action(racks, ok=False) == "poweroff"
    assert unattended.final_action(racks, ok=True) == "reboot"
    default = parse_params(UNATTENDED.replace(" imgbackup.on-failure=poweroff", ""))
    assert unattended.final_action(default, ok=False) == "shell"

    monkeypatch.setattr(unattended, "STATUS_FILE", tmp_path / "status.json")
    cmdline = (UNATTENDED.replace("LABEL=IBBACKUP:/repo", str(tmp_path / "norepo"))
               .replace("LABEL=IBBACKUP:/pass", str(tmp_path / "pass")).replace("on-failure=poweroff", "on-failure=shell"))
    lines: list[str] = []
    assert run_from_cmdline(cmdline, RescueLog([], echo=lines.append)) == 3
    assert any(f"FAILED: no imgbackup repository at {tmp_path / 'norepo'}" in line for line in lines), lines
    assert any("a root shell is open on every console" in line for line in lines), lines


def test_log_lines_before_the_file_exists_are_written_to_it_first(tmp_path: Path) -> None:
    log = RescueLog([], echo=lambda line: None)
    log("first")
    log.attach(tmp_path / "logs" / "run.log")
    log("second")
    log.detach()
    lines = (tmp_path / "logs" / "run.log").read_text().splitlines()
    assert [line.split(": ", 1)[1] for line in lines] == ["first", "second"]


def test_cache_lock_keeps_a_second_builder_out_until_the_first_is_done(tmp_path: Path) -> None:
    """Two builds (two test runs, two 'rescue build's) never work on one cache dir at once."""
    import fcntl

    holder = subprocess.Popen([sys.executable, "-c",
                               "import sys; from pathlib import Path; from imgbackup.engine.rescue import media\n"
                               f"with media.cache_lock(Path({str(tmp_path)!r})):\n"
                               "    print('held', flush=True); sys.stdin.read()"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with open(tmp_path / ".lock", "a") as lock:
            with pytest.raises(BlockingIOError):
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            holder.stdin.close()                      # the first build finishes
            assert holder.wait(timeout=30) == 0
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)   # now free
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()


def test_payload_pyc_files_are_valid_where_the_guest_imports_them(tmp_path: Path) -> None:
    """Each .py of the payload has a .pyc that the guest's python accepts (source mtime and size in its
    header, the guest's path inside): a stale or missing one is compiled again at every start in TCG."""
    import importlib.util
    import marshal

    files = [f for f in payload.payload_files() if f.dest.startswith("imgbackup/cli/")]
    assert len(files) > 10
    site = payload.install(files, tmp_path / "root")
    for f in files:
        if not f.dest.endswith(".py"):
            continue
        src = site / f.dest
        pyc = Path(importlib.util.cache_from_source(str(src)))
        data = pyc.read_bytes()
        assert data[:4] == importlib.util.MAGIC_NUMBER, pyc
        flags, mtime, size = (int.from_bytes(data[i:i + 4], "little") for i in (4, 8, 12))
        st = src.stat()
        assert flags == 0 and mtime == int(st.st_mtime) & 0xFFFFFFFF and size == st.st_size, pyc
        code = marshal.loads(data[16:])
        assert code.co_filename == f"/usr/local/lib/python{payload.python_version()}/dist-packages/{f.dest}"


def _trigger_args() -> list[str]:
    text = rootfs.data_file("systemd/udev-trigger.conf").decode().replace("\\\n", " ")
    lines = [line.split("=", 1)[1] for line in text.splitlines() if line.startswith("ExecStart=") and "=-" in line]
    devices = next(line for line in lines if "--type=devices" in line)
    return devices.lstrip("-").split()


def test_udev_coldplug_covers_disks_and_consoles_and_skips_the_rest() -> None:
    """The media's narrowed coldplug, run here as a dry run: disks and consoles are in, CPUs and memory
    blocks (whose modules cost a TCG guest a minute) are out, and udevadm accepts every option."""
    need_tool("udevadm")
    args = _trigger_args()
    for subsystem in ("block", "scsi", "tty", "pci", "virtio", "usb"):
        assert f"--subsystem-match={subsystem}" in args, subsystem
    proc = subprocess.run([*args, "--dry-run", "--verbose"], capture_output=True, text=True, check=True)
    paths = proc.stdout.split()
    subsystems = {os.path.basename(os.path.realpath(os.path.join(p, "subsystem"))) for p in paths}
    assert "block" in subsystems and "tty" in subsystems
    assert not subsystems & {"cpu", "memory", "acpi", "input"}
    everything = subprocess.run(["udevadm", "trigger", "--dry-run", "--verbose", "--type=devices"],
                                capture_output=True, text=True, check=True).stdout.split()
    assert len(paths) < len(everything)


def test_the_rescue_unit_starts_with_the_boot_and_verifies(tmp_path: Path) -> None:
    """imgbackup-rescue.service is not ordered after sysinit/basic (Python's start overlaps the boot),
    so its run must wait for udev's coldplug itself; systemd-analyze finds nothing else wrong with it."""
    need_tool("systemd-analyze")
    text = rootfs.data_file("systemd/imgbackup-rescue.service").decode()
    assert "DefaultDependencies=no" in text and "rescue run --after-coldplug" in text
    assert "Wants=systemd-udevd.service systemd-udev-trigger.service" in text and "Before=shutdown.target" in text
    (tmp_path / "imgbackup-rescue.service").write_text(text)
    check = subprocess.run(["systemd-analyze", "verify", str(tmp_path / "imgbackup-rescue.service")],
                           capture_output=True, text=True)
    problems = [line for line in check.stderr.splitlines()
                if "/usr/local/bin/imgbackup is not executable" not in line]    # the media's, not this host's
    assert problems == [], check.stderr


def test_the_guide_asks_for_an_encrypted_repositorys_passphrase_before_its_first_probe(tmp_path: Path) -> None:
    """The guide's repository probe (``imgbackup list``, a child) needs the passphrase; asked first when
    the config says the repository is encrypted and none is known, instead of after a failed probe."""
    from imgbackup.engine.rescue.menu import _needs_a_passphrase

    cli_json("init", repo=tmp_path / "enc")
    cli_json("init", "--encryption", "none", repo=tmp_path / "plain")
    assert _needs_a_passphrase(tmp_path / "enc", {}) is True
    assert _needs_a_passphrase(tmp_path / "enc", {"IMGBACKUP_PASSPHRASE_FILE": "/x"}) is False
    assert _needs_a_passphrase(tmp_path / "plain", {}) is False        # the probe decides (it may need none)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config").write_text("{not json")
    assert _needs_a_passphrase(tmp_path / "broken", {}) is False       # the probe says what is wrong


def _launcher(*args: str, **env: str) -> subprocess.CompletedProcess:
    """The media's /usr/local/bin/imgbackup (payload.LAUNCHER) run by this Python with ARGS."""
    code = payload.LAUNCHER.split("\n", 1)[1]
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120,
                          stdin=subprocess.DEVNULL, env={**os.environ, **env})


def test_the_media_launcher_runs_its_own_commands_without_typer(tmp_path: Path) -> None:
    """rescue login/run/menu (what the media's units and logins start) skip Typer: ~5 s of a cold TCG
    boot; anything else (--help, other commands, an unknown option) goes through the full CLI."""
    import json

    (tmp_path / "rescue-status.json").write_text(json.dumps(
        {"ok": False, "reason": "target /dev/x not found", "exit_code": 8, "log_path": "/run/y.log", "seconds": 2.0}))
    probe = ("import sys; sys.argv = ['imgbackup', 'rescue', 'login']; "
             "from imgbackup.cli import lean; import atexit; "
             "atexit.register(lambda: print('typer loaded:', 'typer' in sys.modules, file=sys.stderr)); lean.run()")
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120,
                          stdin=subprocess.DEVNULL, env={**os.environ, "IMGBACKUP_RESCUE_RUN": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr
    assert "typer loaded: False" in proc.stderr and "log: /run/y.log" in proc.stdout, proc
    assert "unattended restore FAILED: target /dev/x not found" in proc.stdout
    helped = _launcher("rescue", "run", "--help")
    assert helped.returncode == 0 and "--after-coldplug" in helped.stdout, helped.stderr
    wrong = _launcher("rescue", "run", "--no-such-option")
    assert wrong.returncode == 2 and wrong.stderr.startswith("imgbackup: error: "), wrong.stderr
    assert _launcher("--version").stdout.startswith("imgbackup ")
