"""The CLI contract scripts rely on: JSON documents, exit codes, passphrase sources, refusals."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from tests.disks import loop_device, mounted, random_image
from tests.support import MIB, cli, cli_env, cli_json, need, need_root, run

BACKUP_FIELDS = {"id", "type", "parent", "source_size", "bytes_read", "bytes_stored", "duration_s"}


def test_help_lists_commands_and_exit_codes() -> None:
    out = cli("--help").stdout
    for command in ("init", "backup", "list", "info", "restore", "verify", "devices", "delete", "diff", "mount"):
        assert f"  {command}" in out
    assert "Exit status" in out and "130" in out and "wrong or missing passphrase" in out


def test_usage_errors_exit_2_with_clicks_message_not_a_traceback() -> None:
    for args, words in ((("backup", "--bogus", "x.img"), "No such option: --bogus"),
                        (("no-such-command",), "No such command"),
                        (("backup",), "Missing argument")):
        proc = cli(*args)
        assert proc.returncode == 2, (args, proc.stderr)
        assert words in proc.stderr and "Traceback" not in proc.stderr


def test_backup_json_contract_list_and_info(tmp_path: Path) -> None:
    src = random_image(tmp_path / "src.img", 8 * MIB, data_fraction=0.5)
    repo = tmp_path / "repo"
    cli_json("init", repo=repo)
    doc = cli_json("backup", src, repo=repo)
    assert doc.keys() >= BACKUP_FIELDS
    assert doc["type"] == "full" and doc["parent"] is None and doc["source_size"] == 8 * MIB
    second = cli_json("backup", src, repo=repo)
    assert second["type"] == "incremental" and second["parent"] == doc["id"]
    listed = cli_json("list", repo=repo)["images"]
    assert [i["id"] for i in listed] == [doc["id"], second["id"]]
    info = cli_json("info", doc["id"][:8], repo=repo)
    assert info["id"] == doc["id"] and info["source"]["size"] == 8 * MIB and info["name"] == "src.img"
    assert cli_json("info", "latest", "--name", "src.img", repo=repo)["id"] == second["id"]
    missing = cli("info", "ffffffff", repo=repo)
    assert missing.returncode == 9 and "no image matches" in missing.stderr


def test_passphrase_file_and_no_passphrase_anywhere_in_argv(tmp_path: Path) -> None:
    secret = tmp_path / "pass"
    secret.write_text("file-secret\n")
    repo = tmp_path / "repo"
    assert cli("init", repo=repo, passphrase=None, IMGBACKUP_PASSPHRASE_FILE=str(secret)).returncode == 0
    assert cli("list", repo=repo, passphrase="file-secret").returncode == 0  # trailing newline stripped
    nothing = cli("list", repo=repo, passphrase=None)
    assert nothing.returncode == 4 and "no terminal" in nothing.stderr
    wrong = cli("list", repo=repo, passphrase=None, IMGBACKUP_PASSPHRASE_FILE=str(tmp_path / "absent"))
    assert wrong.returncode == 4


def test_init_refusals(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    assert cli("init", "--encryption", "rot13", repo=repo).returncode == 2
    assert cli("init", "--chunk-size", "12345", repo=repo).returncode == 2
    cli_json("init", repo=repo)
    again = cli("init", repo=repo)
    assert again.returncode == 3 and "already holds a repository" in again.stderr
    assert cli("list").returncode == 2  # no repository given at all


def test_break_lock(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    cli_json("init", repo=repo)
    lock = repo / "locks" / "exclusive"
    lock.write_text(json.dumps({"kind": "exclusive", "id": "1" * 32, "host": "elsewhere", "pid": 1,
                                "command": "compact", "started": time.time(), "started_local": 0.0,
                                "ttl": 3600.0}))
    src = random_image(tmp_path / "s.img", MIB)
    assert cli("backup", src, repo=repo).returncode == 0      # backups never wait for a remover
    image = cli_json("list", repo=repo)["images"][0]["id"]
    held = cli("delete", image, "--yes", repo=repo)
    assert held.returncode == 5 and "elsewhere" in held.stderr and "break-lock" in held.stderr
    assert "--lock-wait" in held.stderr
    assert [r["host"] for r in cli_json("break-lock", repo=repo)["removed"]] == ["elsewhere"]
    assert cli("delete", image, "--yes", repo=repo).returncode == 0


BRIEF_HOLDER = """
import sys, time
from imgbackup.repository.lock import take_exclusive
from imgbackup.repository.backends.directory import DirectoryStorage
with take_exclusive(DirectoryStorage(sys.argv[1]), "test holder"):
    print("locked", flush=True)
    sys.stdin.readline()
"""


def test_every_remover_takes_the_same_lock_wait_option() -> None:
    import importlib

    import typer
    import typer.main
    app = typer.Typer()
    for module in ("images_cmd", "prune_cmd", "maintain_cmd"):
        importlib.import_module(f"imgbackup.cli.{module}").register(app)
    group = typer.main.get_command(app)
    options = {}
    for name in ("delete", "prune", "compact", "repair"):
        param = next(p for p in group.commands[name].params if "--lock-wait" in p.opts)
        options[name] = (param.envvar, param.help, param.type.name, param.default)
    assert len(set(options.values())) == 1, options
    assert options["repair"][0] == "IMGBACKUP_LOCK_WAIT"


def test_repair_lock_wait_waits_for_the_holder(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    cli_json("init", repo=repo)
    assert cli("backup", random_image(tmp_path / "s.img", MIB), repo=repo).returncode == 0
    holder = subprocess.Popen([sys.executable, "-c", BRIEF_HOLDER, str(repo)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        refused = cli("repair", "--yes", "--quick", repo=repo)
        assert refused.returncode == 5 and "--lock-wait" in refused.stderr
        started = time.monotonic()
        gave_up = cli("repair", "--yes", "--quick", "--lock-wait", "1.5", repo=repo)
        assert gave_up.returncode == 5 and time.monotonic() - started >= 1.4
        waiter = subprocess.Popen([sys.executable, "-m", "imgbackup", "repair", "--yes", "--quick", "--json",
                                   "--lock-wait", "120"], env=cli_env(repo),
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(1.0)
        assert waiter.poll() is None              # still waiting for the holder
        holder.stdin.close()                      # the holder releases its lease
        out, err = waiter.communicate(timeout=120)
        assert waiter.returncode == 0, err
        assert json.loads(out)["dry_run"] is False
    finally:
        holder.kill()
        holder.wait(timeout=10)
    assert [p.name for p in (repo / "locks").iterdir()] == ["reserve"]   # no lease left behind


def test_mounted_read_write_source_is_refused_unless_allowed(tmp_path: Path) -> None:
    need_root()
    fs = tmp_path / "fs.img"
    with open(fs, "wb") as f:
        f.truncate(32 * MIB)
    run("mkfs.ext4", "-q", "-F", fs)
    repo = tmp_path / "repo"
    cli_json("init", repo=repo)
    with loop_device(fs) as dev, mounted(dev, tmp_path / "mnt", "rw"):
        refused = cli("backup", dev, repo=repo)
        assert refused.returncode == 7
        assert "inconsistent" in refused.stderr and "--allow-mounted" in refused.stderr
        allowed = cli("backup", dev, "--allow-mounted", "--json", repo=repo)
        assert allowed.returncode == 0 and "live filesystem" in allowed.stderr
    assert cli_json("list", repo=repo)["images"][0]["id"] == json.loads(allowed.stdout)["id"]


def test_devices_lists_a_loop_device_with_its_filesystem(tmp_path: Path) -> None:
    need_root()
    fs = tmp_path / "fs.img"
    with open(fs, "wb") as f:
        f.truncate(16 * MIB)
    run("mkfs.ext4", "-q", "-F", "-L", "devtest", fs)
    with loop_device(fs) as dev:
        found = {d["path"]: d for d in cli_json("devices")["devices"]}
        assert dev in found
        entry = found[dev]
        assert entry["size"] == 16 * MIB and entry["fstype"] == "ext4"
        assert os.path.samefile(entry["backing_file"], fs)
        text = cli("devices").stdout
        assert dev in text


def test_missing_compiled_core_is_one_line_not_a_traceback() -> None:
    code = ("import sys; sys.modules['imgbackup._core.scan'] = None\n"
            "from imgbackup.cli.main import run; run(['--version'])")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert "compiled core is missing" in proc.stderr and "pip install" in proc.stderr
    assert "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1


def test_mount_and_umount_json(tmp_path: Path) -> None:
    need_root()
    need(Path("/dev/fuse").exists(), "needs /dev/fuse")
    src = random_image(tmp_path / "d.img", 4 * MIB)
    repo = tmp_path / "repo"
    cli_json("init", repo=repo)
    cli_json("backup", src, repo=repo)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    try:
        doc = cli_json("mount", "latest", mnt, repo=repo)
        assert doc["mountpoint"] == str(mnt) and doc["files"] == ["disk.img"]
        assert (mnt / "disk.img").read_bytes() == src.read_bytes()
    finally:
        done = cli("umount", mnt, "--json")
    assert done.returncode == 0 and json.loads(done.stdout)["unmounted"] is True
    assert str(mnt) not in Path("/proc/mounts").read_text()


def test_command_modules_table_names_every_command_its_module_registers() -> None:
    import importlib

    import typer

    from imgbackup.cli.main import COMMAND_MODULES

    for module, names in COMMAND_MODULES.items():
        probe = typer.Typer()
        importlib.import_module(f"imgbackup.cli.{module}").register(probe)
        registered = [c.name for c in probe.registered_commands] + [g.name for g in probe.registered_groups]
        assert tuple(registered) == names, module
    listed = cli("--help").stdout
    assert all(f"  {name}" in listed for names in COMMAND_MODULES.values() for name in names)
