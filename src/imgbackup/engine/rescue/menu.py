"""The rescue system's consoles: what a login shows, and the guided restore.

Every console (screen and serial) logs in as root and runs ``imgbackup rescue login``: it shows
the outcome of an unattended run if there was one, then — when the media were booted for the
menu — the guide: choose the repository, an image, and the target disk by model, serial and size;
confirm by typing the disk's name; watch the restore. "Shell" leaves a root shell with imgbackup
on PATH. Every question can be left with Ctrl-C.
"""

from __future__ import annotations

import getpass
import json
import os
import sys
import time
from pathlib import Path

from imgbackup import __version__
from imgbackup.device import tools
from imgbackup.device.discovery import list_devices
from imgbackup.device.identity import human_size
from imgbackup.engine.rescue.locate import Mounts, medium_device, whole_disk_of
from imgbackup.engine.rescue.params import parse_location, parse_params
from imgbackup.engine.rescue.unattended import STATUS_FILE
from imgbackup.errors import ImgBackupError

MENU = ("1) restore an image onto a disk (guided)", "2) list disks", "3) shell", "4) power off", "5) reboot")


def _say(text: str = "") -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def _ask(prompt: str, default: str = "") -> str:
    answer = input(f"{prompt}{f' [{default}]' if default else ''}: ").strip()
    return answer or default


def _cmdline() -> str:
    try:
        return Path("/proc/cmdline").read_text()
    except OSError:
        return ""


def on_login() -> int:
    """Banner, the unattended outcome if any, then the guide when booted for the menu."""
    _say(f"imgbackup {__version__} rescue system - 'imgbackup --help', 'imgbackup rescue menu'")
    if STATUS_FILE.exists():
        try:
            status = json.loads(STATUS_FILE.read_text())
            _say(("unattended restore SUCCEEDED: " if status["ok"] else "unattended restore FAILED: ")
                 + status["reason"])
            if status.get("log_path"):
                _say(f"log: {status['log_path']}")
        except (OSError, ValueError, KeyError):
            pass
    try:
        action = parse_params(_cmdline()).action
    except ImgBackupError as exc:
        _say(f"kernel parameters: {exc}")
        return 0
    tty = os.ttyname(0) if os.isatty(0) else ""
    if action == "menu" and not tty.startswith("/dev/hvc"):
        return guided()
    return 0


def _imgbackup(args: list[str], env: dict[str, str]):
    """imgbackup ARGS as a child, output captured (what the guide parses or shows)."""
    return tools.run([sys.executable, "-m", "imgbackup", *args], timeout=None, env=env)


def _imgbackup_here(args: list[str], env: dict[str, str]) -> int:
    """imgbackup ARGS on this console (its progress bar and messages shown as they come)."""
    return tools.run_on_terminal([sys.executable, "-m", "imgbackup", *args], env=env)


def _filesystems() -> None:
    _say("filesystems found:")
    for d in list_devices():
        if d.fstype and d.fstype not in ("iso9660", "LVM2_member", "swap"):
            _say(f"  {d.path:<14} {d.fstype:<6} label={d.label or '-':<14} {human_size(d.size)}")


def _open_repository(mounts: Mounts) -> tuple[dict[str, str], str | None, str]:
    """Ask where the repository is and for its passphrase; returns (child env, its device, the
    ``list --json`` that proved the passphrase: each imgbackup start costs seconds under emulation)."""
    _filesystems()
    while True:
        text = _ask("repository (LABEL=…:/path, /dev/…:/path, or a path)", "LABEL=BACKUP:/repo")
        try:
            path, device = mounts.path_of(parse_location(text, "repo"), 5, read_only=False)
        except ImgBackupError as exc:
            _say(f"  {exc}")
            continue
        if (path / "config").exists():
            break
        _say(f"  no imgbackup repository at {text}")
    env = dict(os.environ, IMGBACKUP_REPO=str(path))
    if _needs_a_passphrase(path, env):     # asked before the first probe: it would only fail (exit 4)
        env["IMGBACKUP_PASSPHRASE"] = getpass.getpass("repository passphrase: ")
    for _ in range(3):
        probe = _imgbackup(["list", "--json"], env)
        if probe.returncode == 0:
            return env, device, probe.stdout
        if probe.returncode != 4:
            raise ImgBackupError(probe.stderr.strip().removeprefix("imgbackup: error: "))
        env["IMGBACKUP_PASSPHRASE"] = getpass.getpass("repository passphrase: ")
    raise ImgBackupError("wrong passphrase three times")


def _needs_a_passphrase(path: Path, env: dict[str, str]) -> bool:
    """True when the repository is encrypted (its config says so: a hint only, the child that opens it
    checks everything) and no passphrase is known yet. Saves one imgbackup start (seconds under
    emulation) whose only outcome is 'wrong or missing passphrase'."""
    if env.get("IMGBACKUP_PASSPHRASE") or env.get("IMGBACKUP_PASSPHRASE_FILE"):
        return False
    try:
        config = json.loads((path / "config").read_text())
    except (OSError, ValueError):
        return False                    # the probe says what is wrong
    return isinstance(config, dict) and config.get("encryption", "none") != "none"


def _choose(title: str, rows: list[str]) -> int:
    _say(title)
    for i, row in enumerate(rows, 1):
        _say(f"  {i}) {row}")
    while True:
        answer = _ask("number")
        if answer.isdigit() and 1 <= int(answer) <= len(rows):
            return int(answer) - 1
        _say(f"  1..{len(rows)}")


def _image(listing: str) -> dict:
    images = [i for i in json.loads(listing)["images"] if "error" not in i]
    if not images:
        raise ImgBackupError("the repository holds no images")
    images.sort(key=lambda i: i["created"], reverse=True)
    rows = [f"{i['name']:<16} {time.strftime('%Y-%m-%d %H:%M', time.localtime(i['created']))}  "
            f"{i['type']:<12} {human_size(i['source_size'])}  {i['id'][:12]}" for i in images]
    return images[_choose("images (newest first):", rows)]


def _target(exclude: set[str]) -> str:
    disks = [d for d in list_devices() if d.kind == "disk" and d.path not in exclude]
    if not disks:
        raise ImgBackupError("no disk to restore onto (the repository's and the medium's disks are excluded)")
    rows = [f"{d.path:<12} {human_size(d.size):<24} model {d.model or '-'}  serial {d.serial or '-'}" for d in disks]
    return disks[_choose("disks:", rows)].path


def _guided_restore() -> None:
    mounts = Mounts()
    try:
        env, repo_dev, listing = _open_repository(mounts)
        image = _image(listing)
        exclude = {x for x in (whole_disk_of(repo_dev) if repo_dev else None, _medium_disk()) if x}
        target = _target(exclude)
        args = ["restore", image["id"], target, "--yes"]
        size = next(d.size for d in list_devices() if d.path == target)
        if size > image["source_size"] and _ask("the disk is larger: grow the last partition? (yes/no)",
                                                "yes").lower().startswith("y"):
            args.append("--grow")
        plan = _imgbackup([*args, "--dry-run"], env)
        _say(plan.stdout.rstrip() or plan.stderr.rstrip())
        if plan.returncode != 0:
            return
        name = os.path.basename(target)
        if _ask(f"type '{name}' to OVERWRITE {target}") != name:
            _say("not confirmed; nothing was written")
            return
        code = _imgbackup_here(args, env)
        _say("restore finished" if code == 0 else f"restore FAILED (exit {code})")
    finally:
        for problem in mounts.close():
            _say(f"warning: {problem}")


def _medium_disk() -> str | None:
    dev = medium_device()
    return whole_disk_of(dev) if dev else None


def guided() -> int:
    """The menu loop; returns when the user picks the shell."""
    while True:
        _say()
        _say("imgbackup rescue menu")
        for line in MENU:
            _say(f"  {line}")
        try:
            choice = _ask("choose", "1")
            if choice == "1":
                _guided_restore()
            elif choice == "2":
                _imgbackup_here(["devices"], dict(os.environ))
            elif choice == "3":
                _say("shell: imgbackup is on PATH; 'imgbackup rescue menu' brings the menu back")
                return 0
            elif choice in ("4", "5"):
                tools.run(["systemctl", "poweroff" if choice == "4" else "reboot"], timeout=60)
                return 0
        except ImgBackupError as exc:
            _say(f"error: {exc}")
        except KeyboardInterrupt:
            _say("\n(back to the menu)")
        except EOFError:              # the console went away: nothing more to ask
            return 0
