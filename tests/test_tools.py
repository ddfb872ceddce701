"""device/tools.py: the one way imgbackup runs outside programs, and what a user sees when one is missing."""

from __future__ import annotations

import ast
import os
import shutil
import time
from pathlib import Path

import pytest
from tests.disks import loop_device
from tests.support import MIB, cli, cli_json, need, need_root, need_tool, run

from imgbackup.device import tools
from imgbackup.engine.verify.filesystems import CHECKERS
from imgbackup.engine.verify.qemu import QEMU
from imgbackup.errors import EXIT_CODES, StorageError, ToolMissing, ToolTimeout

SRC = Path(__file__).resolve().parents[1] / "src" / "imgbackup"
TOOL_CALLS = {"run", "retry", "spawn", "_copy"}   # _copy: restore-files' wrapper around run


def _programs_run_by_src() -> set[str]:
    """Every program named as the first word of a literal command passed to run/retry/spawn."""
    found = {QEMU, *(cmd[0] for cmd in CHECKERS.values())}
    for path in SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.List | ast.Tuple)):
                continue
            name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            first = node.args[0].elts[0] if node.args[0].elts else None
            if name in TOOL_CALLS and isinstance(first, ast.Constant) and isinstance(first.value, str):
                found.add(first.value)
    return found


def test_every_program_run_has_a_package() -> None:
    programs = _programs_run_by_src()
    assert {"losetup", "blkid", "e2fsck", "resize2fs", "mount", "fusermount3", "cp", "mcopy"} <= programs
    assert programs <= set(tools.PACKAGES), f"no apt package known for {programs - set(tools.PACKAGES)}"


@pytest.mark.parametrize("program", sorted(tools.PACKAGES))
def test_package_table_matches_dpkg(program: str) -> None:
    """The table is what Debian says: ``dpkg -S`` names the package owning the installed program."""
    need_tool("dpkg", program)
    owners = run("dpkg", "-S", f"bin/{program}", check=False).stdout.splitlines()
    packages = {line.split(":")[0] for line in owners if line.endswith(f"/{program}")}
    assert tools.PACKAGES[program] in packages, f"{program}: dpkg says {packages}"


def test_missing_program_names_its_package(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ToolMissing) as err:
        tools.run(["e2fsck", "-fn", "/nonexistent"])
    assert str(err.value) == "e2fsck is not installed (apt install e2fsprogs)"
    assert err.value.exit_code == 12 and "outside program is missing" in dict(EXIT_CODES)[12]


def test_run_times_out_with_a_clear_error() -> None:
    started = time.monotonic()
    with pytest.raises(ToolTimeout, match="sleep did not finish within 0.2 s"):
        tools.run(["sleep", "30"], timeout=0.2)
    assert time.monotonic() - started < 20      # killed, not waited for
    assert issubclass(ToolTimeout, StorageError)


def test_retry_is_bounded_and_returns_the_last_failure(tmp_path: Path) -> None:
    calls = tmp_path / "calls"
    res = tools.retry(["sh", "-c", f"echo x >> {calls}; echo nope >&2; exit 3"], attempts=4, delay=0.01)
    assert res.returncode == 3 and res.stderr.strip() == "nope"
    assert calls.read_text().count("x") == 4
    ok = tools.retry(["sh", "-c", f"echo y >> {calls}"], attempts=4, delay=0.01)
    assert ok.returncode == 0 and calls.read_text().count("y") == 1


def test_wait_until_gives_up_after_its_timeout() -> None:
    started = time.monotonic()
    assert not tools.wait_until(lambda: False, 0.3, interval=0.05)
    assert time.monotonic() - started >= 0.3
    assert tools.wait_until(lambda: True, 0)


def test_detach_of_a_missing_device_reports() -> None:
    """A detach that keeps failing gives up after its attempts with losetup's own message."""
    need_tool("losetup")
    problem = tools.detach_loop("/dev/loop-imgbackup-never-exists")
    assert problem is not None and problem.startswith("cannot detach /dev/loop-imgbackup-never-exists:")


def test_loop_over_attaches_exactly_the_range_and_detaches(tmp_path: Path) -> None:
    need_root()
    need(Path("/dev/loop-control").exists(), "needs loop devices")
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(MIB) + b"\xab" * MIB + bytes(MIB))
    with tools.loop_over(str(image), MIB, MIB) as dev, open(dev, "rb") as f:
        assert f.read() == b"\xab" * MIB
    assert str(image) not in run("losetup", "-a").stdout


def test_loop_over_reports_a_device_left_attached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No more silent give-up: when the detach fails after the body succeeded, the caller hears it.

    The device is really detached; only the failure is forced, since making the kernel refuse a
    detach on purpose is not possible without another process holding the device.
    """
    need_root()
    need(Path("/dev/loop-control").exists(), "needs loop devices")
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(MIB))
    real = tools.detach_loop
    monkeypatch.setattr(tools, "detach_loop", lambda dev: (real(dev), f"cannot detach {dev}: busy")[1])
    with pytest.raises(StorageError, match=r"cannot detach /dev/loop\d+: busy \(detach it with"), \
            tools.loop_over(str(image)):
        pass
    assert str(image) not in run("losetup", "-a").stdout


def test_blkid_probes_a_filesystem_in_a_file(tmp_path: Path) -> None:
    need_tool("mkfs.ext4", "blkid")
    image = tmp_path / "fs.img"
    image.write_bytes(bytes(8 * MIB))
    assert tools.probe_fstype(str(image)) is None
    run("mkfs.ext4", "-q", "-L", "probe-me", str(image))
    assert tools.probe_fstype(str(image)) == "ext4"
    assert tools.blkid(str(image))["LABEL"] == "probe-me"


def _path_without(tmp_path: Path, *programs: str) -> str:
    """A PATH holding every program of the system's PATH except ``programs`` (symlinks in one dir)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for d in os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin").split(os.pathsep):
        if not os.path.isdir(d):
            continue
        for entry in os.scandir(d):
            target = bin_dir / entry.name
            if entry.name not in programs and not target.exists() and os.access(entry.path, os.X_OK):
                target.symlink_to(entry.path)
    assert all(shutil.which(p, path=str(bin_dir)) is None for p in programs)
    return str(bin_dir)


def test_verify_filesystems_without_e2fsck_is_one_line_and_exit_12(tmp_path: Path, no_leaks) -> None:
    """The sysadmin's view: no traceback, no half-report — the program and its package, exit 12."""
    need_root()
    need_tool("mkfs.ext4", "e2fsck", "fusermount3")
    need(Path("/dev/fuse").exists(), "needs /dev/fuse")
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(16 * MIB))
    run("mkfs.ext4", "-q", "-F", str(disk))
    repo = tmp_path / "repo"
    cli_json("init", repo=repo)
    image = cli_json("backup", disk, "--name", "fs", repo=repo)["id"]
    proc = cli("verify", image, "--filesystems", repo=repo, PATH=_path_without(tmp_path, "e2fsck"))
    assert proc.returncode == 12, proc.stderr
    assert proc.stderr == "imgbackup: error: e2fsck is not installed (apt install e2fsprogs)\n"
    with loop_device(disk, read_only=True) as dev:   # the image itself is fine: with e2fsck it verifies
        assert run("e2fsck", "-fn", dev, check=False).returncode == 0
    assert cli("verify", image, "--filesystems", repo=repo).returncode == 0
