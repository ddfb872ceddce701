"""Output a person reads (issue 9 §6) and the one JSON error document: help, usage errors, init,
info, list, devices, passphrase prompts, exit codes and the README's table of them."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from tests.disks import loop_device, make_gpt_disk, mounted, random_image
from tests.support import MIB, cli, cli_json, need_root, run
from tests.terminal import Terminal

from imgbackup.errors import EXIT_CODES

ROOT = Path(__file__).resolve().parents[1]


def test_readme_exit_code_table_is_generated_from_errors_py() -> None:
    proc = subprocess.run([sys.executable, ROOT / "scripts" / "exit-codes.py", "--check"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    readme = (ROOT / "README.md").read_text()
    table = {int(m[1]): m[2] for m in re.finditer(r"^\| (\d+) \| (.+) \|$", readme, re.M)}
    assert sorted(table) == [code for code, _ in EXIT_CODES]
    # "not confirmed" is exit 2 in the code (UsageError) and in both tables, never 8
    assert "not confirmed" in table[2] and "confirmed" not in table[8]
    assert "not confirmed" in dict(EXIT_CODES)[2] and "confirmed" not in dict(EXIT_CODES)[8]


def test_not_confirmed_exits_2_as_documented(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    cli_json("init", repo=repo)
    image = cli_json("backup", random_image(tmp_path / "s.img", MIB), repo=repo)["id"]
    target = random_image(tmp_path / "t.img", MIB, seed=9)
    with Terminal("restore", image, target, repo=repo) as term:
        term.expect(r"Type '.*' to continue: ")
        term.send("no\r")
        assert term.wait() == 2
    assert "not confirmed" in term.text
    with Terminal("delete", image, repo=repo) as term:
        term.expect(r"\[y/N\]: ")
        term.send("n\r")
        assert term.wait() == 2
    assert "not confirmed; nothing was deleted" in term.text
    assert cli("restore", image, target, repo=repo).returncode == 2   # no terminal, no --yes


def test_top_level_help_full_summaries_h_and_environment() -> None:
    out = cli("-h").stdout
    assert out == cli("--help").stdout
    assert "..." not in out.split("Commands:")[1]   # click cut summaries at 45 characters
    assert "Remove the exclusive lease of delete/compact/repair (and" in out and "whoever holds it." in out
    for var in ("IMGBACKUP_REPO", "IMGBACKUP_PASSPHRASE", "IMGBACKUP_PASSPHRASE_FILE"):
        assert var in out
    for command in ("backup", "restore", "verify", "mount", "restore-files", "list", "info", "init"):
        sub = cli(command, "-h")
        assert sub.returncode == 0 and "Usage: imgbackup " + command in sub.stdout, command


def test_usage_errors_are_one_documented_line_and_json_documents(tmp_path: Path) -> None:
    for args, words in ((("backup", "--bogus", "x.img"), "No such option: --bogus"),
                        (("no-such-command",), "No such command"),
                        (("backup",), "Missing argument")):
        proc = cli(*args)
        assert proc.returncode == 2
        assert proc.stderr.count("\n") == 1 and proc.stderr.startswith(f"imgbackup: error: {words}"), proc.stderr
        assert "--help'" in proc.stderr
        doc = json.loads(cli(*args, "--json").stdout)["error"]
        assert doc["exit_code"] == 2 and doc["kind"] == "usage_error" and words in doc["message"]


def test_every_error_with_json_is_one_error_document(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    missing = cli("list", "--json", repo=tmp_path / "nothing")
    assert missing.returncode == 3
    assert json.loads(missing.stdout) == {"error": {
        "kind": "repository_not_found", "exit_code": 3, "message": f"no imgbackup repository at {tmp_path}/nothing",
        "hint": "check -r/--repo or IMGBACKUP_REPO, or create one with 'imgbackup init'"}}
    cli_json("init", repo=repo)
    not_found = cli("info", "ffff", "--json", repo=repo)
    assert not_found.returncode == 9 and json.loads(not_found.stdout)["error"]["kind"] == "image_not_found"
    wrong = cli("list", "--json", repo=repo, passphrase="not-the-passphrase")
    assert wrong.returncode == 4 and json.loads(wrong.stdout)["error"]["kind"] == "wrong_passphrase"
    assert wrong.stderr.startswith("imgbackup: error: wrong passphrase")
    for args, code, kind in ((("repair", "--yes"), 4, "wrong_passphrase"), (("compact",), 4, "wrong_passphrase"),
                             (("backup", "x.img", "--retries", "1"), 2, "usage_error"),
                             (("restore-files", "ffff", "/etc", "--to", str(tmp_path / "out")), 9, "image_not_found")):
        proc = cli(*args, "--json", repo=repo, passphrase="test-pass" if code != 4 else "not-the-passphrase")
        assert proc.returncode == code, (args, proc.stderr)
        assert json.loads(proc.stdout)["error"]["kind"] == kind, args


def test_repo_option_naming_a_file_is_exit_3(tmp_path: Path) -> None:
    a_file = random_image(tmp_path / "file.img", MIB)
    for command in (("list",), ("info", "latest"), ("backup", str(a_file))):
        proc = cli(*command, repo=a_file)
        assert proc.returncode == 3, (command, proc.stderr)
        assert "is a file, not a repository directory" in proc.stderr


def test_init_refuses_short_passphrases_and_says_to_keep_it_safe(tmp_path: Path) -> None:
    short = cli("init", repo=tmp_path / "r1", passphrase="seven77")
    assert short.returncode == 2 and "shorter than 8 characters" in short.stderr and "--weak-passphrase" in short.stderr
    assert not (tmp_path / "r1" / "config").exists()
    weak = cli("init", "--weak-passphrase", repo=tmp_path / "r1", passphrase="seven77")
    assert weak.returncode == 0 and "Keep the passphrase safe" in weak.stdout
    assert "without it no image can ever be read" in weak.stdout
    assert cli("list", repo=tmp_path / "r1", passphrase="seven77").returncode == 0
    doc = cli_json("init", repo=tmp_path / "r2", passphrase="long enough")
    assert "keep the passphrase safe" in doc["note"]
    none = cli_json("init", "--encryption", "none", repo=tmp_path / "r3", passphrase=None)
    assert "not encrypted" in none["note"]


def test_a_wrong_passphrase_at_the_prompt_gets_three_tries(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    cli_json("init", repo=repo)
    with Terminal("list", repo=repo, passphrase=None) as term:
        for wrong in ("first-wrong", "second-wrong"):
            term.expect(r"Repository passphrase: $")
            term.send(wrong + "\r")
            term.expect(r"wrong passphrase, try again")
        term.expect(r"Repository passphrase: $")
        term.send("test-pass\r")
        assert term.wait() == 0
    assert "ID" in term.text and "CREATED" in term.text
    with Terminal("list", repo=repo, passphrase=None) as term:
        for attempt in range(3):
            term.expect(r"Repository passphrase: $")
            term.send(f"wrong-{attempt}\r")
        assert term.wait() == 4
    assert "wrong passphrase (3 tries)" in term.text


def _columns(header: str, line: str) -> dict[str, str]:
    """A table row by column name: columns are two or more spaces apart, empty cells only at the end."""
    names, cells = re.split(r"\s{2,}", header.strip()), re.split(r"\s{2,}", line.strip())
    return dict(zip(names, cells + [""] * (len(names) - len(cells)), strict=True))


def _aligned(header: str, lines: list[str], right: set[str]) -> None:
    """Every cell starts where its header starts (ends, for right-aligned columns)."""
    spans = [(m.group(), m.start(), m.end()) for m in re.finditer(r"\S+(?: \S+)*", header)]
    for line in lines:
        cells = [(m.start(), m.end()) for m in re.finditer(r"\S+(?: \S+)*", line)]
        for (name, start, end), (c_start, c_end) in zip(spans, cells, strict=False):
            assert (c_end == end) if name in right else (c_start == start), (name, header, line)


def test_info_is_readable_and_json_complete(tmp_path: Path) -> None:
    disk = make_gpt_disk(tmp_path / "disk.img", 64)
    repo = tmp_path / "repo"
    cli_json("init", repo=repo)
    backup = cli_json("backup", disk["path"], repo=repo)
    out = cli("info", "latest", repo=repo, TZ="Europe/Berlin").stdout
    assert "{" not in out and "'" not in out   # no Python dicts
    assert re.search(r"created\s+20\d\d-\d\d-\d\d \d\d:\d\d:\d\d CES?T on ", out), out
    assert "64.0 MiB" in out and "1.0 MiB" in out and "67108864 bytes" in out
    lines = out.splitlines()
    header = next(line for line in lines if line.split()[:2] == ["START", "SIZE"])
    rows = [_columns(header, line) for line in lines[lines.index(header) + 1:]]
    by_part = {r["PART"]: r for r in rows}
    assert by_part["1"]["FS"] == "ext" and by_part["1"]["IMAGED"] == "used blocks"
    assert by_part["2"]["FS"] == "vfat" and by_part["1"]["START"] == str(disk["partitions"][0]["offset"])
    doc = cli_json("info", "latest", repo=repo)
    assert doc["id"] == backup["id"] and doc["used_map"]["regions"] and doc["content_digest"]
    # what the first image stores is what its backup wrote, but for pack trailers and the chunk-index file
    assert 0.95 * backup["bytes_stored"] < doc["stats"]["stored_bytes"] <= backup["bytes_stored"]
    assert doc["stats"]["data_slots"] + doc["stats"]["zero_slots"] + doc["stats"]["unused_slots"] == doc["slots"]


def test_list_header_stats_and_json(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    cli_json("init", repo=repo)
    src = random_image(tmp_path / "src.img", 8 * MIB)
    first = cli_json("backup", src, repo=repo)
    with open(src, "r+b") as f:   # change 2 of 8 chunks
        f.write(b"\x01" * MIB)
        f.seek(5 * MIB)
        f.write(b"\x02" * MIB)
    second = cli_json("backup", src, repo=repo)
    out = cli("list", repo=repo)
    assert out.returncode == 0
    header, *lines = out.stdout.splitlines()
    assert header.split() == ["ID", "CREATED", "TYPE", "NAME", "PARENT", "SOURCE", "STORED", "UNIQUE", "NOTE"]
    _aligned(header, lines, {"SOURCE", "STORED", "UNIQUE"})
    rows = [_columns(header, line) for line in lines[:2]]
    assert rows[0]["ID"] == first["id"][:12] and rows[1]["PARENT"] == first["id"][:12]
    assert rows[1]["TYPE"] == "incremental" and rows[0]["SOURCE"] == "8.0 MiB"
    doc = {i["id"]: i for i in cli_json("list", repo=repo)["images"]}
    a, b = doc[first["id"]]["stats"], doc[second["id"]]["stats"]
    assert a["chunks"] == 8 and b["chunks"] == 8
    assert a["unique_chunks"] == 2 and b["unique_chunks"] == 2    # 6 chunks shared
    assert a["stored_bytes"] > a["unique_bytes"] > 2 * MIB - 1   # random data does not compress
    # stored bytes of one image = what it added + what it shares with the other
    assert b["unique_bytes"] - b["index_bytes"] < second["bytes_stored"]


def test_list_exits_6_when_it_shows_damaged_images(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    cli_json("init", repo=repo)
    good = cli_json("backup", random_image(tmp_path / "a.img", 2 * MIB), repo=repo)
    good_packs = sorted((repo / "packs").rglob("*"))
    bad = cli_json("backup", random_image(tmp_path / "b.img", 2 * MIB, seed=3), repo=repo)
    path = repo / "images" / bad["id"]
    data = bytearray(path.read_bytes())
    data[40] ^= 0x01          # a flipped bit in the sealed header
    path.write_bytes(bytes(data))
    out = cli("list", repo=repo)
    assert out.returncode == 6, out.stderr
    assert "DAMAGED" in out.stdout and good["id"][:12] in out.stdout
    assert "1 of 2 images are DAMAGED" in out.stderr
    listed = cli("list", "--json", repo=repo)
    assert listed.returncode == 6
    doc = json.loads(listed.stdout)          # the listing itself, not a second (error) document
    assert doc["damaged"] == 1 and [i["id"] for i in doc["images"] if "error" in i] == [bad["id"]]

    pack = next(p for p in good_packs if p.is_file())        # then a chunk of the other image, found by verify
    data = bytearray(pack.read_bytes())
    data[100] ^= 0x01
    pack.write_bytes(bytes(data))
    assert cli("verify", good["id"], repo=repo).returncode == 11
    out = cli("list", repo=repo)
    assert out.returncode == 6 and "2 of 2 images are DAMAGED" in out.stderr
    doc = json.loads(cli("list", "--json", repo=repo).stdout)
    assert "no usable copy (in no pack, or recorded damaged)" in next(i for i in doc["images"]
                                                                       if i["id"] == good["id"])["error"]


def test_devices_columns_align_with_label_and_ro_rw(tmp_path: Path) -> None:
    need_root()
    deep = tmp_path / ("a-rather-long-directory-name-" * 3) / "for-a-loop-device"
    deep.mkdir(parents=True)
    fs = deep / "fs.img"
    with open(fs, "wb") as f:
        f.truncate(16 * MIB)
    run("mkfs.ext4", "-q", "-F", "-L", "devlabel", fs)
    with loop_device(fs) as dev, mounted(dev, tmp_path / "mnt", "ro"):
        header, *lines = cli("devices").stdout.splitlines()
        line = next(x for x in lines if x.startswith(dev + " "))
        row = _columns(header, line)
        assert row["DEVICE"] == dev and row["FS"] == "ext4" and row["LABEL"] == "devlabel"
        assert row["MOUNTED"] == f"{tmp_path / 'mnt'} (ro)"
        assert row["SIZE"] == "16.0 MiB" and str(fs) in row["MODEL"]
        _aligned(header, lines, {"SIZE"})


@pytest.mark.parametrize("kind", ["luks", "lvm", "random"])
def test_unknown_partitions_are_imaged_in_full_with_a_warning(tmp_path: Path, kind: str) -> None:
    disk = make_gpt_disk(tmp_path / "disk.img", 64)
    part = disk["partitions"][1]
    content = bytearray(random_image(tmp_path / "junk", 4 * MIB, seed=11).read_bytes())
    if kind == "luks":
        content[0:6] = b"LUKS\xba\xbe"
    elif kind == "lvm":
        content[512:520] = b"LABELONE"
    with open(disk["path"], "r+b") as f:
        f.seek(part["offset"])
        f.write(bytes(content) + bytes(part["size"] - len(content)))
    repo = tmp_path / "repo"
    cli_json("init", repo=repo)
    proc = cli("backup", disk["path"], "--json", repo=repo)
    assert proc.returncode == 0
    expected = {"luks": "LUKS-encrypted", "lvm": "an LVM physical volume",
                "random": "no filesystem imgbackup can map"}[kind]
    assert f"imgbackup: warning: partition 2: {expected}: imaged in full" in proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["bytes_read"] >= part["size"]
    info = cli_json("info", "latest", repo=repo)
    region = next(r for r in info["used_map"]["regions"] if r["partition"] == 2)
    assert region["mode"] == "full" and expected in region["warning"]
    assert any(expected in w for w in info["warnings"])
    listed = cli("list", repo=repo).stdout
    assert "in full: 2" in listed


def test_backup_progress_total_is_what_will_be_read(tmp_path: Path) -> None:
    disk = make_gpt_disk(tmp_path / "disk.img", 64)
    repo = tmp_path / "repo"
    cli_json("init", repo=repo)
    with Terminal("backup", disk["path"], repo=repo) as term:
        assert term.wait() == 0
    read = re.search(r"read ([\d.]+) MiB of 64.0 MiB", term.text)
    assert read and float(read[1]) < 32, term.text         # used blocks only: far less than the disk
    bars = re.findall(r"backup: +(\d+)%\|[^|]*\| *([\d.]+)M/([\d.]+)M ", term.text)
    assert bars, term.text
    percent, done, total = bars[-1]
    assert (percent, done, total) == ("100", read[1], read[1])   # it ends at 100 %, not at 23 %


def test_dirty_journal_fall_back_is_recorded_shown_and_marked(tmp_path: Path) -> None:
    disk = make_gpt_disk(tmp_path / "disk.img", 64)
    ext = disk["partitions"][0]
    with open(disk["path"], "r+b") as f:   # set needs_recovery (incompat 0x4), as a crash mid-journal leaves it
        f.seek(ext["offset"] + 1024 + 96)
        incompat = int.from_bytes(f.read(4), "little")
        f.seek(ext["offset"] + 1024 + 96)
        f.write((incompat | 0x4).to_bytes(4, "little"))
    repo = tmp_path / "repo"
    cli_json("init", repo=repo)
    backup = cli("backup", disk["path"], repo=repo)
    assert backup.returncode == 0 and "partition 1: ext journal needs recovery" in backup.stderr
    info = cli_json("info", "latest", repo=repo)
    assert any("partition 1: ext journal needs recovery" in w for w in info["warnings"])
    region = next(r for r in info["used_map"]["regions"] if r["partition"] == 1)
    assert region["mode"] == "full" and "journal needs recovery" in region["warning"]
    text = cli("info", "latest", repo=repo).stdout
    assert re.search(r"^warning +partition 1: ext journal needs recovery", text, re.M)
    header = next(line for line in text.splitlines() if line.split()[:2] == ["START", "SIZE"])
    row = next(_columns(header, line) for line in text.splitlines() if _columns(header, line).get("PART") == "1")
    assert row["IMAGED"] == "in full" and "journal needs recovery" in row["WHY IN FULL"]
    listed = cli("list", repo=repo).stdout
    assert "in full: 1" in listed and "'imgbackup info ID' says why" in listed
    assert cli_json("list", repo=repo)["images"][0]["imaged_in_full"][0]["partition"] == 1


def test_mount_refuses_a_non_empty_mount_point(tmp_path: Path) -> None:
    need_root()
    repo = tmp_path / "repo"
    cli_json("init", repo=repo)
    cli_json("backup", random_image(tmp_path / "s.img", MIB), repo=repo)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    (mnt / "precious.txt").write_text("do not hide me")
    proc = cli("mount", "latest", mnt, repo=repo)
    assert proc.returncode == 2 and "is not empty" in proc.stderr, proc.stderr
    assert str(mnt) not in Path("/proc/mounts").read_text()
    doc = json.loads(cli("mount", "latest", mnt, "--json", repo=repo).stdout)["error"]
    assert doc["kind"] == "usage_error" and doc["exit_code"] == 2
    foreground = cli("mount", "latest", mnt, "--foreground", repo=repo)
    assert foreground.returncode == 2 and "is not empty" in foreground.stderr
    assert (mnt / "precious.txt").read_text() == "do not hide me"
