"""The catalog log and legal holds: tampering is detected, holds survive every removal path.

Real repositories in directories, real processes (the CLI, concurrent writers), real kills
(strace's fault injection SIGKILLs a backup at one exact system call).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from tests.disks import random_image
from tests.support import MIB, cli, cli_env, cli_json, need_tool

from imgbackup.engine.backup.run import BackupRequest, run_backup
from imgbackup.engine.verify.catalog import check_catalog
from imgbackup.format.imageindex import ImageIndex
from imgbackup.repository.catalog import Catalog, entry_name
from imgbackup.repository.images import ImageStore
from imgbackup.repository.repo import Repository

PASS = b"test-pass"


@pytest.fixture
def source(tmp_path: Path) -> Path:
    return random_image(tmp_path / "disk.img", 4 * MIB, data_fraction=0.5)


def _repo(tmp_path: Path) -> Repository:
    return Repository.init(tmp_path / "repo", lambda: PASS)


def _backup(repo: Repository, source: Path, name: str = "disk") -> str:
    return run_backup(repo, BackupRequest(str(source), name)).id


def _reopen(tmp_path: Path) -> Repository:
    return Repository.open(tmp_path / "repo", lambda: PASS)


def test_log_records_each_image_and_removal(tmp_path: Path, source: Path) -> None:
    repo = _repo(tmp_path)
    first, second = _backup(repo, source), _backup(repo, source)
    repo.remove_images([first], "deleted")
    view = _reopen(tmp_path).catalog.view()
    assert not view.problems and view.rollback is None
    images = view.state.images
    assert images[first]["status"] == "removed" and images[first]["removed"] == "deleted"
    assert images[second]["status"] == "added" and images[second]["name"] == "disk"
    catalog = repo.catalog
    kinds = [[e["event"] for e in catalog.read(seq).events] for seq in range(view.state.seq + 1)]
    assert kinds == [["created", "append_only"], ["adding"], ["added"], ["adding"], ["added"], ["deleted"]]
    for seq in range(1, view.state.seq + 1):     # each entry names its predecessor's hash
        assert catalog.read(seq).prev == catalog.read(seq - 1).hash
    assert check_catalog(repo).ok


WRITER = """
import sys, time
from pathlib import Path
from imgbackup.repository.repo import Repository
repo = Repository.open(sys.argv[1], lambda: b"test-pass")
while not Path(sys.argv[2]).exists():
    time.sleep(0.001)
for i in range(int(sys.argv[3])):
    repo.catalog.append([{"event": "lock_probe", "result": {"writer": sys.argv[4], "n": i}}])
"""


def test_concurrent_writers_all_get_their_entries_in(tmp_path: Path) -> None:
    """Four processes append at once; every entry lands exactly once, in one unbroken chain."""
    _repo(tmp_path)
    go, per_writer = tmp_path / "go", 25
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path / "repo"), str(go), str(per_writer), str(w)],
                              env=cli_env(XDG_STATE_HOME=str(tmp_path / f"state{w}")), stderr=subprocess.PIPE, text=True)
             for w in range(4)]
    go.touch()
    for proc in procs:
        assert proc.wait(120) == 0, proc.stderr.read()
    fresh = Catalog((repo := _reopen(tmp_path)).storage, repo.envelope, repo.config.id, remember=False)
    view = fresh.view()
    assert not view.problems and view.state.seq == 4 * per_writer
    seen = [(e["result"]["writer"], e["result"]["n"]) for s in range(1, view.state.seq + 1)
            for e in fresh.read(s).events]
    assert sorted(seen) == sorted((str(w), n) for w in range(4) for n in range(per_writer))
    assert check_catalog(repo).ok


def test_tampered_entries_are_detected(tmp_path: Path, source: Path) -> None:
    repo = _repo(tmp_path)
    for _ in range(3):
        _backup(repo, source)
    entries = tmp_path / "repo" / "catalog"
    # A flipped bit: the entry no longer authenticates.
    victim = entries / entry_name(3).split("/")[1]
    original = victim.read_bytes()
    victim.write_bytes(original[:40] + bytes([original[40] ^ 1]) + original[41:])
    fresh = Catalog(repo.storage, repo.envelope, repo.config.id, remember=False)
    assert any("catalog entry 3" in p for p in fresh.view().problems)
    # Two entries swapped: each is bound to its place by the envelope.
    victim.write_bytes(original)
    a, b = entries / entry_name(2).split("/")[1], entries / entry_name(4).split("/")[1]
    a_bytes, b_bytes = a.read_bytes(), b.read_bytes()
    a.write_bytes(b_bytes)
    b.write_bytes(a_bytes)
    assert fresh.view().problems
    a.write_bytes(a_bytes)
    b.write_bytes(b_bytes)
    # An entry from the middle deleted: the log has a gap (and the chain stops there).
    (entries / entry_name(4).split("/")[1]).unlink()
    problems = check_catalog(_fresh_repo(tmp_path)).problems
    assert any("missing (first: 4)" in p for p in problems), problems


def _fresh_repo(tmp_path: Path) -> Repository:
    repo = _reopen(tmp_path)
    repo.catalog.remember = False
    return repo


def test_entry_sealed_with_the_key_but_off_the_chain_is_detected(tmp_path: Path, source: Path) -> None:
    """Someone with the key rewrites entry 2 (deleted, then created anew): its successor's link breaks."""
    repo = _repo(tmp_path)
    _backup(repo, source)
    _backup(repo, source)
    from imgbackup.format.layout import OBJ_CATALOG_ENTRY
    from imgbackup.repository.catalog import encode_entry

    plain = encode_entry(repo.config.id, 2, repo.catalog.read(1).hash, [{"event": "lock_probe", "result": {}}])
    (tmp_path / "repo" / entry_name(2)).unlink()
    repo.storage.create(entry_name(2), repo.envelope.seal(OBJ_CATALOG_ENTRY, (2).to_bytes(8, "big"), plain))
    problems = Catalog(repo.storage, repo.envelope, repo.config.id, remember=False).view().problems
    assert any("catalog entry 3 does not follow entry 2" in p for p in problems), problems


def test_verify_reports_a_removed_index_an_injected_one_and_a_rollback(tmp_path: Path, source: Path) -> None:
    repo_dir = tmp_path / "repo"
    cli_json("init", repo=repo_dir)
    first = cli_json("backup", source, repo=repo_dir)["id"]
    older = tmp_path / "older"
    shutil.copytree(repo_dir, older)
    second = cli_json("backup", source, repo=repo_dir)["id"]
    assert cli("verify", repo=repo_dir).returncode == 0

    # 1. An image index deleted behind imgbackup's back.
    index = repo_dir / "images" / second
    saved = index.read_bytes()
    index.unlink()
    gone = cli("verify", repo=repo_dir)
    assert gone.returncode == 11 and f"image {second[:12]}" in gone.stdout and "is missing" in gone.stdout
    index.write_bytes(saved)
    assert cli("verify", repo=repo_dir).returncode == 0

    # 2. An authentic image (sealed with the repository's key) that imgbackup never announced here.
    repo = _reopen(tmp_path)
    template = repo.images.load(first)
    meta = dict(template.meta, id="ab" * 16)
    ImageStore(repo.storage, repo.envelope).write(ImageIndex(meta, template.kinds, template.ids, template.changed))
    injected = cli("verify", "--json", repo=repo_dir)
    assert injected.returncode == 11
    problems = json.loads(injected.stdout)["catalog"]["problems"]
    assert any("image abababababab is not in the catalog" in p for p in problems), problems
    (repo_dir / "images" / meta["id"]).unlink()

    # 3. The whole directory replaced by an older copy: the log ends before the entry this client saw.
    shutil.rmtree(repo_dir)
    shutil.copytree(older, repo_dir)
    rolled = cli("verify", repo=repo_dir)
    assert rolled.returncode == 11 and "rolled back" in rolled.stdout
    # ... and writing on top of it (a forked history) does not hide it.
    cli_json("backup", source, repo=repo_dir)
    assert cli("verify", repo=repo_dir).returncode == 11
    accepted = cli("verify", "--accept-rollback", repo=repo_dir)
    assert accepted.returncode == 0, accepted.stdout + accepted.stderr
    assert cli("verify", repo=repo_dir).returncode == 0


def test_an_index_put_back_after_its_removal_is_finished_off(tmp_path: Path, source: Path) -> None:
    repo_dir = tmp_path / "repo"
    cli_json("init", repo=repo_dir)
    first = cli_json("backup", source, repo=repo_dir)["id"]
    newest = cli_json("backup", source, repo=repo_dir)["id"]
    saved = (repo_dir / "images" / newest).read_bytes()
    assert cli("delete", newest, "--yes", repo=repo_dir).returncode == 0
    (repo_dir / "images" / newest).write_bytes(saved)      # an older copy of the index comes back
    back = cli_json("verify", repo=repo_dir)
    assert back["catalog"]["ok"] and any("was deleted" in n for n in back["catalog"]["notes"])
    listed = {row["id"]: row for row in cli_json("list", repo=repo_dir)["images"]}
    assert listed[newest]["removed"] is True
    assert cli_json("info", "latest", repo=repo_dir)["id"] == first      # a removed image is never 'latest'
    assert cli("delete", "latest", "--name", "disk.img", "--yes", repo=repo_dir).returncode == 0
    assert cli_json("list", repo=repo_dir)["images"] == []            # both: the pending one too


def _link_calls(trace: Path) -> list[str]:
    calls = []
    for line in trace.read_text().splitlines():
        if "link(" in line or "linkat(" in line or "rename(" in line or "renameat" in line:
            calls.append(line)
    return calls


def test_backup_killed_between_its_image_and_the_confirmation(tmp_path: Path, source: Path) -> None:
    """kill -9 right before the 'added' entry is created: the image is whole, verify passes with a note."""
    need_tool("strace")
    repo_dir = tmp_path / "repo"
    cli_json("init", repo=repo_dir)
    trace = tmp_path / "trace"
    env = cli_env(repo_dir)
    cmd = [sys.executable, "-m", "imgbackup", "backup", str(source)]
    rehearsal = tmp_path / "rehearsal"            # the same first backup into a repository of its own, traced:
    cli_json("init", repo=rehearsal)             # its links are the real run's
    subprocess.run(["strace", "-f", "-qq", "-o", str(trace), "-e", "trace=link,linkat,rename,renameat,renameat2",
                    *cmd], env=cli_env(rehearsal), check=True, capture_output=True)
    image_at = next(i for i, c in enumerate(_link_calls(trace)) if "/images/" in c and "rename" in c)
    after = [c for c in _link_calls(trace)[image_at:] if "link" in c.split("(")[0]]
    confirm = next(c for c in after if "/catalog/" in c)
    thread = confirm.split()[0]                  # strace counts `when` per thread (pack commits have their own)
    links = [c for c in _link_calls(trace) if "link" in c.split("(")[0] and c.split()[0] == thread]
    nth = links.index(confirm) + 1
    killed = subprocess.run(["strace", "-f", "-qq", "-o", "/dev/null", "-e", "trace=link,linkat",
                             "-e", f"inject=link,linkat:signal=KILL:when={nth}", *cmd], env=env, capture_output=True)
    assert killed.returncode != 0
    images = cli_json("list", repo=repo_dir)["images"]
    assert len(images) == 1
    report = cli_json("verify", repo=repo_dir)
    assert report["ok"] and report["catalog"]["ok"]
    assert any("never confirmed" in n for n in report["catalog"]["notes"]), report["catalog"]


def test_hold_blocks_delete_and_shows_who_why_when(tmp_path: Path, source: Path) -> None:
    repo_dir = tmp_path / "repo"
    cli_json("init", repo=repo_dir)
    image = cli_json("backup", source, repo=repo_dir)["id"]
    assert cli("hold", image, repo=repo_dir).returncode == 2                 # a hold needs a reason
    held = cli_json("hold", image[:8], "--reason", "case 2024-117 (legal)", repo=repo_dir)
    assert list(held["holds"]) == [image]
    row = cli_json("list", repo=repo_dir)["images"][0]
    (hold,) = row["holds"]
    assert hold["reason"] == "case 2024-117 (legal)" and hold["user"] and hold["host"] and hold["time"] > 0
    assert "case 2024-117" in cli("info", image, repo=repo_dir).stdout
    refused = cli("delete", image, "--yes", repo=repo_dir)
    assert refused.returncode == 14 and "legal hold" in refused.stderr and "case 2024-117" in refused.stderr
    assert (repo_dir / "images" / image).exists()
    assert _reopen(tmp_path).catalog.view().state.images[image]["status"] == "added"   # nothing recorded either
    released = cli_json("release", image, "--reason", "case closed", repo=repo_dir)
    assert released["holds"][image] == [hold["id"]]
    assert cli_json("list", repo=repo_dir)["images"][0]["holds"] == []
    assert cli("delete", image, "--yes", repo=repo_dir).returncode == 0
    assert cli("verify", repo=repo_dir).returncode == 0


def test_deleting_a_hold_record_does_not_release_the_hold(tmp_path: Path, source: Path) -> None:
    repo_dir = tmp_path / "repo"
    cli_json("init", repo=repo_dir)
    image = cli_json("backup", source, repo=repo_dir)["id"]
    hold_id = cli_json("hold", image, "--reason", "audit", repo=repo_dir)["holds"][image][0]
    shutil.rmtree(repo_dir / "holds" / image)
    assert cli("delete", image, "--yes", repo=repo_dir).returncode == 14
    report = cli("verify", "--json", repo=repo_dir)
    assert report.returncode == 11
    assert any(f"hold {hold_id[:12]}" in p and "record is gone" in p
               for p in json.loads(report.stdout)["catalog"]["problems"])
    assert cli_json("list", repo=repo_dir)["images"][0]["holds"][0]["source"] == "catalog"


def test_a_held_image_whose_index_is_gone_stops_every_collection(tmp_path: Path, source: Path) -> None:
    """Its chunks can no longer be told from dead ones: compact, prune and delete remove nothing."""
    repo_dir = tmp_path / "repo"
    cli_json("init", repo=repo_dir)
    held = cli_json("backup", source, repo=repo_dir)["id"]
    other = cli_json("backup", random_image(tmp_path / "other.img", 2 * MIB, seed=5), repo=repo_dir)["id"]
    cli_json("hold", held, "--reason", "evidence", repo=repo_dir)
    (repo_dir / "images" / held).unlink()                        # tampering: the held index is deleted
    packs = sorted(p.name for p in (repo_dir / "packs").rglob("*") if p.is_file())
    for args in (("compact",), ("prune", "--keep-last", "1"), ("delete", other, "--yes")):
        proc = cli(*args, repo=repo_dir)
        assert proc.returncode == 14 and "legal hold" in proc.stderr and "missing" in proc.stderr, args
    assert sorted(p.name for p in (repo_dir / "packs").rglob("*") if p.is_file()) == packs
    assert (repo_dir / "images" / other).exists()


def test_append_only_refuses_removal_until_turned_off(tmp_path: Path, source: Path) -> None:
    repo_dir = tmp_path / "repo"
    assert cli_json("init", "--append-only", repo=repo_dir)["append_only"] is True
    image = cli_json("backup", source, repo=repo_dir)["id"]           # adding works
    refused = cli("delete", image, "--yes", repo=repo_dir)
    assert refused.returncode == 14 and "append-only" in refused.stderr
    assert cli("compact", repo=repo_dir).returncode == 14
    assert cli_json("hold", image, "--reason", "x", repo=repo_dir)["holds"]     # holds are additions too
    assert cli("append-only", "off", repo=repo_dir).returncode == 2             # no terminal, no --yes
    assert cli_json("append-only", "off", "--yes", repo=repo_dir)["append_only"] is False   # (+ requests)
    cli_json("release", image, repo=repo_dir)
    assert cli("delete", image, "--yes", repo=repo_dir).returncode == 0
    assert cli_json("append-only", "on", repo=repo_dir)["append_only"] is True
    # Turning it off by rewriting the config (with the key, but outside imgbackup) is noticed.
    repo = _reopen(tmp_path)
    repo.config.append_only = False
    repo.storage.put("config", repo.config.to_bytes(repo.keys))
    report = cli("verify", "--json", repo=repo_dir)
    assert report.returncode == 11 and "append-only" in json.loads(report.stdout)["catalog"]["problems"][0]


def test_catalog_state_is_remembered_per_repository(tmp_path: Path, source: Path) -> None:
    repo = _repo(tmp_path)
    _backup(repo, source)
    remembered = json.loads(repo.catalog.state_file.read_text())
    assert remembered["repository"] == repo.config.id and remembered["state"]["seq"] == 2
    assert str(repo.catalog.state_file).startswith(os.environ["XDG_STATE_HOME"])
    # A second process reads only the entries after the remembered one.
    again = _reopen(tmp_path).catalog.view()
    assert again.entries_read == 0 and again.state.seq == 2


def test_entries_name_the_command_line_without_importing_the_catalog_at_start_up(monkeypatch) -> None:
    """The command an entry names comes from audit.set_command (what cli.main calls at every start);
    a command that opens no repository does not import the catalog and its crypto stack at all."""
    from imgbackup import audit
    from imgbackup.repository.catalog import decode_entry, encode_entry

    monkeypatch.setattr(audit._Config, "argv", None)
    plain = encode_entry("r" * 32, 0, "0" * 64, [{"event": "created"}])
    assert decode_entry(plain, "r" * 32, 0, "d").command == ""              # used as a library: none
    audit.set_command(["backup", "/dev/sdb", "--name", "sdb"])
    plain = encode_entry("r" * 32, 0, "0" * 64, [{"event": "created"}])
    assert decode_entry(plain, "r" * 32, 0, "d").command == "imgbackup backup /dev/sdb --name sdb"
    probe = ("import runpy, sys; sys.argv = ['imgbackup', 'rescue', 'params', 'imgbackup.action=menu']\n"
             "try:\n    runpy.run_module('imgbackup', run_name='__main__')\nexcept SystemExit:\n    pass\n"
             "print(sorted(m for m in sys.modules if m.startswith(('cryptography', 'imgbackup.repository'))))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, stdin=subprocess.DEVNULL)
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout + out.stderr


def test_an_id_stored_again_after_its_removal_is_adding_again_not_removed() -> None:
    """FORMAT.md section 13: the status after `adding` is `adding`. A copy that sends an image the
    destination had removed (and is killed before its `added`) must not leave an image the log
    calls removed — the next collection would delete its index as an unfinished removal."""
    from imgbackup.repository.catalog import CatalogState, Entry

    image = "ab" * 16
    state = CatalogState()
    events = [{"event": "adding", "image": image, "name": "sda"},
              {"event": "added", "image": image, "name": "sda", "created": 1.0, "type": "full"},
              {"event": "deleted", "image": image, "name": "sda"},
              {"event": "adding", "image": image, "name": "sda"}]
    statuses = []
    for seq, event in enumerate(events, start=1):
        state.apply(Entry(seq, "", 0.0, "host", "root", "copy", (event,), f"h{seq}"))
        statuses.append(state.images[image]["status"])
    assert statuses == ["adding", "added", "removed", "adding"]
    assert image in state.live() and "removed" not in state.images[image]
