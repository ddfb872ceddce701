"""scripts/install.sh: a plain install (no extras, no test tools) gives every documented feature.

One real install per module into a temporary prefix (the same script, only --prefix and --link
differ from the README's command): it builds imgbackup from this checkout in a venv of Debian's
/usr/bin/python3 and pulls its dependencies from the package index. Then the installed command — not
this test's interpreter — backs up a real GPT disk and runs mount --filesystems, verify --filesystems,
restore-files and verify --boot. Last, --uninstall must remove exactly what the install made.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path

import pytest
from tests.bootdisk import build_boot_disk
from tests.disks import loop_device, make_gpt_disk, mounted
from tests.support import cli_env, need_root, need_tool, run

ROOT = Path(__file__).resolve().parent.parent
INSTALL = ROOT / "scripts" / "install.sh"
BOOT_TIMEOUT = 150  # the tiny boot disk reaches its marker in 13-20 s under TCG here

def _tree(root: Path) -> dict[str, str]:
    """Relative path -> sha256 of every regular file under ``root``."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and not p.is_symlink()}


def _listing(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def install_sh(*args: str | os.PathLike, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(INSTALL), *map(str, args)], capture_output=True, text=True, timeout=1200,
                          stdin=subprocess.DEVNULL)
    if check:
        assert proc.returncode == 0, f"install.sh {args} exited {proc.returncode}:\n{proc.stderr[-4000:]}"
    return proc


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> dict:
    need_root()
    base = tmp_path_factory.mktemp("install")
    (base / "bin").mkdir()
    (base / "bin" / "other-tool").write_text("not ours\n")
    before = _listing(base)
    prefix, link = base / "opt" / "imgbackup", base / "bin" / "imgbackup"
    install_sh("--prefix", prefix, "--link", link)
    yield {"base": base, "prefix": prefix, "link": link, "before": before}
    if prefix.exists():
        install_sh("--prefix", prefix, "--uninstall", check=False)


def imgbackup(installed: dict, *args: str | os.PathLike, repo: Path, timeout: float = 300,
              check: bool = True) -> subprocess.CompletedProcess:
    """Run the installed command (through its link), as a user would, without a terminal."""
    proc = subprocess.run([str(installed["link"]), *map(str, args)], env=cli_env(repo), capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    if check:
        assert proc.returncode == 0, f"imgbackup {args} exited {proc.returncode}: {proc.stderr}"
    return proc


@pytest.mark.slow
def test_the_install_holds_imgbackup_and_its_run_time_dependencies_only(installed: dict) -> None:
    py = installed["prefix"] / "bin" / "python"
    assert os.readlink(installed["link"]) == str(installed["prefix"] / "bin" / "imgbackup")
    cfg = (installed["prefix"] / "pyvenv.cfg").read_text()
    assert "home = /usr/bin\n" in cfg                      # Debian's interpreter, not the first on PATH
    probe = ("import importlib.util as u, imgbackup, imgbackup._core.scan, mfusepy;"
             "print(imgbackup.__file__);"
             "print([m for m in ('pytest', 'hypothesis', 'Cython', 'ruff') if u.find_spec(m)])")
    where, extras = run(py, "-c", probe).stdout.splitlines()
    assert where.startswith(str(installed["prefix"])), where   # a copy, not an editable link to the checkout
    assert extras == "[]"
    manifest = (installed["prefix"] / "install-manifest.txt").read_text()
    assert f"link={installed['link']}\n" in manifest


@pytest.mark.slow
def test_mount_verify_and_restore_files_work_from_the_plain_install(installed: dict, tmp_path: Path) -> None:
    need_tool("sgdisk", "mkfs.ext4", "mkfs.vfat", "mcopy", "fusermount3")
    disk = make_gpt_disk(tmp_path / "disk.img", size_mib=64)
    ext4 = disk["partitions"][0]
    with loop_device(Path(disk["path"]), read_only=True, offset=ext4["offset"], sizelimit=ext4["size"]) as dev, \
            mounted(dev, tmp_path / "orig", "ro,noload") as orig:
        original = _tree(orig)
    repo = tmp_path / "repo"
    imgbackup(installed, "init", repo=repo)
    imgbackup(installed, "backup", disk["path"], repo=repo)

    mnt = tmp_path / "mnt"
    mnt.mkdir()
    imgbackup(installed, "mount", "latest", mnt, "--filesystems", repo=repo)
    try:
        assert _tree(mnt / "fs" / "part1") == original
    finally:
        imgbackup(installed, "umount", mnt, repo=repo)
    assert str(mnt) not in Path("/proc/mounts").read_text()

    checked = json.loads(imgbackup(installed, "verify", "latest", "--filesystems", "--json", repo=repo).stdout)
    parts = checked["filesystems"]["partitions"]
    assert [(p["fstype"], p["checker_exit"], p["ok"]) for p in parts] == [("ext4", 0, True), ("vfat", 0, True)]
    assert parts[0]["checker"].startswith("e2fsck") and parts[1]["checker"].startswith("fsck.vfat")

    out = tmp_path / "out"
    imgbackup(installed, "restore-files", "latest", "--partition", "1", "random.bin", "--to", out, repo=repo)
    assert hashlib.sha256((out / "random.bin").read_bytes()).hexdigest() == original["random.bin"]


@pytest.mark.slow
def test_verify_boot_works_from_the_plain_install(installed: dict, tmp_path: Path) -> None:
    need_tool("qemu-system-x86_64", "extlinux", "sgdisk", "mcopy")
    marker = "INSTALLED-BOOT-OK"
    disk = build_boot_disk(tmp_path / "boot.img", "bios-gpt", size_mib=64, marker=marker)
    repo = tmp_path / "repo"
    imgbackup(installed, "init", repo=repo)
    imgbackup(installed, "backup", disk, repo=repo)
    result = json.loads(imgbackup(installed, "verify", "latest", "--boot", "--expect", marker, "--timeout",
                                  str(BOOT_TIMEOUT), "--json", repo=repo, timeout=BOOT_TIMEOUT + 120).stdout)
    assert result["booted"] and result["reason"] == "found"


@pytest.mark.slow
def test_uninstall_removes_exactly_what_the_install_made(installed: dict, tmp_path: Path) -> None:
    prefix, link = installed["prefix"], installed["link"]
    proc = install_sh("--prefix", prefix, "--uninstall")
    assert f"removed {link}" in proc.stderr and f"removed {prefix}" in proc.stderr
    # Only the (now empty) parent of the prefix stays: the link's directory and its other file are intact.
    assert _listing(installed["base"]) == installed["before"] | {"opt"}
    assert (installed["base"] / "bin" / "other-tool").read_text() == "not ours\n"
    again = install_sh("--prefix", prefix, "--uninstall")
    assert "nothing installed" in again.stderr


def test_install_and_uninstall_leave_what_they_did_not_make_alone(tmp_path: Path) -> None:
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "data").write_text("keep me\n")
    refused = install_sh("--prefix", foreign, "--link", tmp_path / "imgbackup", check=False)
    assert refused.returncode != 0 and "not made by install.sh" in refused.stderr
    refused = install_sh("--prefix", foreign, "--uninstall", check=False)
    assert refused.returncode != 0 and "left alone" in refused.stderr
    other_link = tmp_path / "taken"
    other_link.symlink_to("/bin/true")
    refused = install_sh("--prefix", tmp_path / "new", "--link", other_link, check=False)
    assert refused.returncode != 0 and "is not this install's link" in refused.stderr
    assert (foreign / "data").read_text() == "keep me\n" and os.readlink(other_link) == "/bin/true"
    assert not (tmp_path / "new").exists() and not (tmp_path / "imgbackup").exists()
