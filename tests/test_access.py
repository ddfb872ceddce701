"""Access on disk (FORMAT.md 2.7): owner-only modes whatever the umask, unsafe places refused, exposed
key slots found, and no core dump while keys are in memory."""

from __future__ import annotations

import os
import resource
import secrets
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from imgbackup.repository.backends.directory_access import key_file_exposure
from support import cli, cli_env, need, need_root


def _cli_with_umask(umask: int, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "imgbackup", *map(str, args)], env=cli_env(),
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300,
                          preexec_fn=lambda: os.umask(umask))


def _modes(root: Path) -> dict[str, int]:
    found = {".": stat.S_IMODE(root.stat().st_mode)}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(dirpath, name)
            found[str(path.relative_to(root))] = stat.S_IMODE(path.lstat().st_mode)
    return found


@pytest.mark.parametrize("umask", [0o000, 0o277])  # the widest and the narrowest
def test_every_object_0600_and_every_folder_0700_after_init_and_backups(tmp_path, umask) -> None:
    source = tmp_path / "disk.img"
    source.write_bytes(secrets.token_bytes(3 << 20) + bytes(1 << 20))
    repo = tmp_path / "new" / "repo"           # its parent is created too
    for args in (("init", "-r", repo), ("backup", "-r", repo, source)):
        done = _cli_with_umask(umask, *args)
        assert done.returncode == 0, done.stderr
    with open(source, "r+b") as f:             # an incremental: a second pack, index file, data key
        f.write(secrets.token_bytes(1 << 20))
    done = _cli_with_umask(umask, "backup", "-r", repo, source)
    assert done.returncode == 0, done.stderr
    modes = _modes(repo)
    files = {n for n in modes if (repo / n).is_file()}
    for folder in ("config", "keys/", "packs/", "index/", "images/"):
        assert any(n == folder.rstrip("/") or n.startswith(folder) for n in files), (folder, sorted(files))
    wrong = {n: f"{m:04o}" for n, m in modes.items() if m != (0o600 if n in files else 0o700)}
    assert not wrong, wrong
    assert stat.S_IMODE((tmp_path / "new").stat().st_mode) == 0o700


def _refused(proc: subprocess.CompletedProcess, *words: str) -> None:
    assert proc.returncode == 8, (proc.returncode, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    for word in words:
        assert word in lines[0], lines[0]


def test_init_refuses_a_world_writable_parent(tmp_path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    _refused(cli("init", "-r", shared / "repo"), str(shared), "writable by every user", "chmod o-w")
    assert not (shared / "repo").exists()
    # further up counts too
    (shared / "team").mkdir(mode=0o755)
    _refused(cli("init", "-r", shared / "team" / "repo"), str(shared))
    assert not (shared / "team" / "repo").exists()
    # the sticky bit stops others renaming what is not theirs: accepted, as in /tmp
    shared.chmod(0o1777)
    done = cli("init", "-r", shared / "repo")
    assert done.returncode == 0, done.stderr


def test_init_in_tmp_itself_is_accepted() -> None:
    assert os.stat("/tmp").st_mode & stat.S_ISVTX and os.stat("/tmp").st_mode & stat.S_IWOTH
    repo = Path("/tmp") / f"imgbackup-test-access-{secrets.token_hex(6)}"
    try:
        done = cli("init", "-r", repo)
        assert done.returncode == 0, done.stderr
        assert stat.S_IMODE(repo.stat().st_mode) == 0o700
    finally:
        shutil.rmtree(repo, ignore_errors=True)


def test_init_refuses_an_empty_folder_others_own_or_can_write(tmp_path) -> None:
    need_root()
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    os.chown(theirs, 65534, 65534)
    _refused(cli("init", "-r", theirs), "belongs to user id 65534")
    assert list(theirs.iterdir()) == []
    group = tmp_path / "group"
    group.mkdir()
    group.chmod(0o770)
    _refused(cli("init", "-r", group), "other users can write", "0770")
    assert list(group.iterdir()) == []
    link = tmp_path / "link"
    link.symlink_to(group)
    _refused(cli("init", "-r", link), "symbolic link", str(group))
    mine = tmp_path / "mine"                   # an empty folder of one's own is used, and made 0700
    mine.mkdir(mode=0o755)
    done = cli("init", "-r", mine)
    assert done.returncode == 0, done.stderr
    assert stat.S_IMODE(mine.stat().st_mode) == 0o700


def test_key_file_exposure_names_each_open_slot(tmp_path) -> None:
    repo = tmp_path / "repo"
    assert cli("init", "-r", repo).returncode == 0
    assert key_file_exposure(repo) == []
    assert key_file_exposure(tmp_path / "missing") == []
    slot = next((repo / "keys").iterdir())
    slot.chmod(0o644)
    (repo / "keys").chmod(0o750)
    warnings = key_file_exposure(repo)
    assert len(warnings) == 2, warnings
    assert warnings[0].startswith("keys/ is open to group (mode 0750)")
    assert warnings[1].startswith(f"keys/{slot.name} is open to group and others (mode 0644)")
    assert all("\n" not in w and "chmod go=" in w for w in warnings)


def _crash(program: str, where: Path) -> subprocess.CompletedProcess:
    """Run ``program`` then abort (SIGABRT) in ``where`` with core files allowed."""
    where.mkdir()

    def allow_cores() -> None:
        resource.setrlimit(resource.RLIMIT_CORE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))

    return subprocess.run([sys.executable, "-c", program + "\nimport os; os.abort()"], cwd=where, env=cli_env(),
                          capture_output=True, text=True, timeout=120, preexec_fn=allow_cores)


def test_a_process_holding_keys_leaves_no_core_dump(tmp_path) -> None:
    repo = tmp_path / "repo"
    assert cli("init", "-r", repo).returncode == 0
    pattern = Path("/proc/sys/kernel/core_pattern").read_text().strip()
    need(not pattern.startswith("|") and "/" not in pattern,
         f"core files written to the crashing process's folder (core_pattern is {pattern!r})")
    # the control: the same interpreter, no keys, dumps a core where it crashed
    control = _crash("from imgbackup.crypto.protect import dumpable; print(dumpable())", tmp_path / "control")
    assert control.returncode == -signal.SIGABRT and control.stdout.split() == ["1"]
    need(any(p.name.startswith("core") for p in (tmp_path / "control").iterdir()), "the kernel writes core files")
    opened = _crash(textwrap.dedent(f"""
        from imgbackup.crypto.protect import dumpable
        from imgbackup.repository.repo import Repository
        Repository.open({str(repo)!r}, lambda: b"test-pass")
        print(dumpable(), flush=True)
    """), tmp_path / "opened")
    assert opened.returncode == -signal.SIGABRT, opened.stderr
    assert opened.stdout.split() == ["0"]
    assert list((tmp_path / "opened").iterdir()) == []
