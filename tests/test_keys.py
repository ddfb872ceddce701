"""Key slots and backup-only keys (issue 15), through the CLI as a sysadmin runs it.

Two passphrases open one repository; ``remove`` refuses the last full key; ``passwd`` killed with
SIGKILL at random moments never locks anyone out; a backup-only host backs up incrementally, cannot
read, mount, verify, delete or prune, and the full key restores what it wrote byte for byte.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tests.support import MIB, cli, cli_env, cli_json
from tests.terminal import Terminal

FULL, SECOND, HOST = "test-pass", "second-pass", "host-pass-1"


@pytest.fixture
def source(tmp_path: Path) -> Path:
    path = tmp_path / "disk.img"
    path.write_bytes(os.urandom(4 * MIB) + bytes(2 * MIB) + os.urandom(2 * MIB))
    return path


def _rewrite(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def test_two_passphrases_open_one_repository_and_remove_refuses_the_last_full_key(tmp_path: Path, source: Path
                                                                                  ) -> None:
    repo = tmp_path / "repo"
    audit_log = tmp_path / "audit.jsonl"
    env = {"IMGBACKUP_AUDIT": f"file:{audit_log}"}
    cli_json("init", repo=repo)
    image = cli_json("backup", source, repo=repo)["id"]
    (tmp_path / "new-pass").write_text(SECOND + "\n")                       # a file's trailing newline is not part
    added = cli_json("key", "add", "--label", "admin laptop", repo=repo,
                     IMGBACKUP_NEW_PASSPHRASE_FILE=str(tmp_path / "new-pass"), **env)
    assert added["kind"] == "full" and added["label"] == "admin laptop" and added["signed"]
    for passphrase in (FULL, SECOND):
        assert [i["id"] for i in cli_json("list", repo=repo, passphrase=passphrase)["images"]] == [image]
    listed = cli_json("key", "list", repo=repo, passphrase=SECOND)
    assert sorted(s["label"] for s in listed["slots"]) == ["admin laptop", "init"]
    assert [s["label"] for s in listed["slots"] if s["current"]] == ["admin laptop"]
    first = next(s["slot"] for s in listed["slots"] if s["label"] == "init")
    assert cli("key", "list", repo=repo, passphrase="not-a-key").returncode == 4

    removed = cli_json("key", "remove", first[:6], repo=repo, passphrase=SECOND, **env)
    assert removed["slot"] == first
    assert cli("list", repo=repo, passphrase=FULL).returncode == 4          # that passphrase opens nothing now
    last = cli("key", "remove", "admin laptop", repo=repo, passphrase=SECOND)
    assert last.returncode == 2 and "last full key" in last.stderr
    assert cli("list", repo=repo, passphrase=SECOND).returncode == 0
    weak = cli("key", "add", repo=repo, passphrase=SECOND, IMGBACKUP_NEW_PASSPHRASE="short")
    assert weak.returncode == 2 and "shorter than 8" in weak.stderr

    events = [json.loads(line) for line in audit_log.read_text().splitlines()]
    changes = [(e["action"], e["result"], e["slot"]) for e in events if e["event"] == "key_change"]
    assert changes == [("add", "ok", added["slot"]), ("remove", "ok", first)]
    text = audit_log.read_text() + json.dumps(listed)
    assert not any(secret in text for secret in (FULL, SECOND, '"wrapped"', '"salt"'))


def _passwd(repo: Path, old: str, new: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "imgbackup", "key", "passwd"],
                            env=cli_env(repo, old, IMGBACKUP_NEW_PASSPHRASE=new),
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _opens(repo: Path, passphrase: str) -> bool:
    return cli("key", "list", repo=repo, passphrase=passphrase).returncode == 0


def test_passwd_killed_at_random_moments_never_locks_you_out(tmp_path: Path) -> None:
    """SIGKILL at a random moment of a whole ``passwd`` run: the old or the new passphrase opens it."""
    repo = tmp_path / "repo"
    cli_json("init", repo=repo)
    started = time.monotonic()
    whole = _passwd(repo, FULL, "warm-up-pass")
    assert whole.wait(60) == 0
    duration = time.monotonic() - started
    current, outcomes = "warm-up-pass", []
    rng = random.Random(15)
    for round_ in range(6):
        new = f"round-{round_}-pass"
        proc = _passwd(repo, current, new)
        time.sleep(rng.uniform(0.3, 1.0) * duration)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        old_opens, new_opens = _opens(repo, current), _opens(repo, new)
        assert old_opens != new_opens, f"round {round_}: old opens {old_opens}, new opens {new_opens}"
        outcomes.append("new" if new_opens else "old")
        current = new if new_opens else current
        assert len([p for p in (repo / "keys").iterdir() if ".tmp-" not in p.name]) == 1
    print(f"passwd killed after {duration:.2f} s runs: {outcomes}")


def test_backup_only_host_adds_images_but_cannot_read_or_remove_them(tmp_path: Path, source: Path) -> None:
    repo = tmp_path / "repo"
    cli_json("init", repo=repo)
    first = cli_json("backup", source, repo=repo)["id"]
    host_slot = cli_json("key", "add", "--backup-only", "--label", "web1", repo=repo, IMGBACKUP_NEW_PASSPHRASE=HOST)
    assert host_slot["kind"] == "backup-only" and host_slot["signed"]

    _rewrite(source, 5 * MIB + 4096, os.urandom(8192))                      # one changed chunk
    second = cli_json("backup", source, repo=repo, passphrase=HOST)
    assert second["type"] == "incremental" and second["parent"] == first
    assert second["chunks_new"] == 1 and second["chunks_delta"] == 0, second  # dedup works; no delta (no reader)
    expected = source.read_bytes()
    assert cli("list", repo=repo, passphrase=HOST).returncode == 0          # metadata is readable
    out = tmp_path / "out.img"
    refusals = {
        "restore": ("restore", second["id"], out, "--yes"),
        "verify": ("verify",),
        "delete": ("delete", first, "--yes"),
        "prune": ("prune", "--keep-last", "1"),
        "compact": ("compact",),
        "restore-files": ("restore-files", second["id"], "/etc", "--to", tmp_path / "files"),
        "mount": ("mount", second["id"], tmp_path / "mnt"),
        "key add": ("key", "add"),
    }
    for what, args in refusals.items():
        proc = cli(*args, repo=repo, passphrase=HOST, IMGBACKUP_NEW_PASSPHRASE="another-pass")
        assert proc.returncode == 4, (what, proc.returncode, proc.stderr)
        assert "backup-only" in proc.stderr and proc.stderr.count("\n") == 1, (what, proc.stderr)
    assert not out.exists()
    assert len(cli_json("list", repo=repo)["images"]) == 2                 # nothing was removed

    restored = cli_json("restore", second["id"], out, "--yes", repo=repo)  # the full key reads it
    assert restored["image"] == second["id"] and out.read_bytes() == expected
    assert cli_json("verify", repo=repo)["ok"]


def test_paper_sheet_through_the_cli_when_every_slot_is_lost(tmp_path: Path, source: Path) -> None:
    """key export --paper; every slot deleted; key import --paper: a typo is refused naming its line,
    the right sheet adds a slot with a new passphrase that restores byte-exact."""
    repo = tmp_path / "repo"
    cli_json("init", repo=repo)
    image = cli_json("backup", source, repo=repo)["id"]
    exported = cli("key", "export", "--paper", "--png", tmp_path / "sheet.png", repo=repo)
    assert exported.returncode == 0, exported.stderr
    assert (tmp_path / "sheet.png").stat().st_mode & 0o777 == 0o600
    assert cli("key", "export", repo=repo).returncode == 2                   # --paper is the only form
    for slot in (repo / "keys").iterdir():
        slot.unlink()
    assert cli("list", repo=repo).returncode == 6
    lines = exported.stdout.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("03 "))
    typo = lines[at][:5] + ("B" if lines[at][5] != "B" else "C") + lines[at][6:]
    (tmp_path / "typo.txt").write_text("\n".join([*lines[:at], typo, *lines[at + 1:]]))
    refused = cli("key", "import", "--paper", tmp_path / "typo.txt", repo=repo, passphrase=None,
                  IMGBACKUP_NEW_PASSPHRASE=SECOND)
    assert refused.returncode == 4 and "line 3" in refused.stderr, refused.stderr
    (tmp_path / "sheet.txt").write_text(exported.stdout.lower())
    added = cli_json("key", "import", "--paper", tmp_path / "sheet.txt", repo=repo, passphrase=None,
                     IMGBACKUP_NEW_PASSPHRASE=SECOND)
    assert added["kind"] == "full" and added["label"] == "paper"
    out = tmp_path / "out.img"
    assert cli_json("restore", image, out, "--yes", repo=repo, passphrase=SECOND)["image"] == image
    assert out.read_bytes() == source.read_bytes()


def test_verify_warns_about_a_key_slot_others_can_read(tmp_path: Path, source: Path) -> None:
    repo = tmp_path / "repo"
    cli_json("init", repo=repo)
    cli_json("backup", source, repo=repo)
    assert "keys/" not in cli("verify", repo=repo).stderr
    slot = next((repo / "keys").iterdir())
    slot.chmod(0o644)
    proc = cli("verify", repo=repo)
    assert proc.returncode == 0 and f"keys/{slot.name} is open to group and others" in proc.stderr, proc.stderr


def test_key_rotate_gives_new_data_new_keys_and_retires_every_older_key(tmp_path: Path, source: Path) -> None:
    repo = tmp_path / "repo"
    cli_json("init", repo=repo)
    before = cli_json("backup", source, repo=repo)["id"]
    cli_json("key", "add", "--backup-only", repo=repo, IMGBACKUP_NEW_PASSPHRASE=HOST)
    old_sheet = cli("key", "export", "--paper", repo=repo).stdout
    assert cli("key", "rotate", repo=repo, IMGBACKUP_NEW_PASSPHRASE=SECOND).returncode == 2   # needs --yes
    rotated = cli_json("key", "rotate", "--yes", repo=repo, IMGBACKUP_NEW_PASSPHRASE=SECOND)
    assert rotated["generation"] == 2 and len(rotated["removed"]) == 2
    for old in (FULL, HOST):
        assert cli("list", repo=repo, passphrase=old).returncode == 4
    (tmp_path / "old-sheet.txt").write_text(old_sheet)
    stale = cli("key", "import", "--paper", tmp_path / "old-sheet.txt", repo=repo, passphrase=None,
                IMGBACKUP_NEW_PASSPHRASE="sheet-pass")
    assert stale.returncode == 6 and "predates a key rotation" in stale.stderr, stale.stderr

    _rewrite(source, 0, os.urandom(MIB))
    after = cli_json("backup", source, repo=repo, passphrase=SECOND)["id"]
    head = (repo / "images" / after).read_bytes()
    assert int.from_bytes(head[16 + 4:16 + 12], "little") == 2               # sealed with generation 2's key
    generations = {int.from_bytes(p.read_bytes()[12:16], "little") for p in (repo / "datakeys").iterdir()}
    assert generations == {1, 2}
    for image in (before, after):                                            # both generations stay readable
        out = tmp_path / f"{image}.img"
        cli_json("restore", image, out, "--yes", repo=repo, passphrase=SECOND)
    assert (tmp_path / f"{after}.img").read_bytes() == source.read_bytes()
    assert cli_json("verify", repo=repo, passphrase=SECOND)["ok"]


def test_a_process_holding_keys_cannot_dump_core(tmp_path: Path) -> None:
    """prctl(PR_SET_DUMPABLE, 0) once keys are unwrapped: no core file, no ptrace or /proc/PID/mem by others."""
    repo = tmp_path / "repo"
    cli_json("init", repo=repo)
    code = ("import sys; from imgbackup.crypto.protect import dumpable; from imgbackup.repository.repo import "
            "Repository; before = dumpable(); Repository.open(sys.argv[1], lambda: b'test-pass'); "
            "print(before, dumpable())")
    proc = subprocess.run([sys.executable, "-c", code, str(repo)], env=cli_env(), capture_output=True, text=True)
    assert proc.stdout.split() == ["1", "0"], proc.stderr


def _typed_key_add(repo: Path, first: str, repeated: str) -> Terminal:
    """`key add` at a pty, the new passphrase typed at its two prompts; returns the ended terminal."""
    with Terminal("key", "add", "--label", "typed", repo=repo) as term:
        term.expect(r"New passphrase: $")
        term.send(first + "\r")
        term.expect(r"Repeat passphrase: $")
        term.send(repeated + "\r")
        term.wait()
    return term


def test_key_add_at_a_terminal_asks_twice_and_a_mismatch_adds_nothing(tmp_path: Path) -> None:
    """The new passphrase typed at a real terminal (a pty): asked twice, echo off; two different
    answers add no slot, two equal ones add one that opens the repository."""
    repo = tmp_path / "repo"
    cli_json("init", repo=repo)
    term = _typed_key_add(repo, "typed-passphrase-1", "typed-passphrase-2")
    assert term.returncode == 2
    assert "do not match" in term.text and "typed-passphrase" not in term.text      # never echoed
    assert len(cli_json("key", "list", repo=repo)["slots"]) == 1
    term = _typed_key_add(repo, "typed-passphrase-1", "typed-passphrase-1")
    assert term.returncode == 0 and "typed-passphrase" not in term.text
    assert sorted(s["label"] for s in cli_json("key", "list", repo=repo)["slots"]) == ["init", "typed"]
    assert cli_json("list", repo=repo, passphrase="typed-passphrase-1")["images"] == []
