"""``imgbackup prune`` end to end: images made at chosen times (faketime), a hand-computed verdict table,
the dry run changing nothing, a real run removing exactly the table's images, held images surviving,
and kill -9 at several points of a real prune (strace fault injection) leaving every image whole or gone.

The policy below, ``--keep-last 1 --keep-daily 2 --keep-weekly 3`` in UTC, over source ``d``, newest
first (worked out by hand; 2023-01-01 is a Sunday, so in ISO week 2022-W52):

    F 2023-01-09 12:00 (Mon, 2023-W02)  keep-last, keep-daily, keep-weekly
    E 2023-01-08 12:00 (Sun, 2023-W01)  keep-daily, keep-weekly            (daily now spent)
    D 2023-01-02 09:00 (Mon, 2023-W01)  remove: its week kept E already
    C 2023-01-01 18:00 (Sun, 2022-W52)  keep-weekly                        (weekly now spent)
    B 2023-01-01 10:00 (Sun, 2022-W52)  held (a legal hold; no rule keeps it)
    A 2022-12-20 09:00 (Tue, 2022-W51)  remove
Source ``o`` (one image G, 2023-01-01 12:00) is judged on its own: as its newest image, every rule keeps it.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from tests.disks import random_image
from tests.support import MIB, cli, cli_env, cli_json, need_tool

POLICY = ("--keep-last", "1", "--keep-daily", "2", "--keep-weekly", "3", "--timezone", "UTC")
TIMES = {"A": "2022-12-20 09:00:00", "B": "2023-01-01 10:00:00", "C": "2023-01-01 18:00:00",
         "D": "2023-01-02 09:00:00", "E": "2023-01-08 12:00:00", "F": "2023-01-09 12:00:00"}
EXPECTED = {"F": ["keep-last", "keep-daily", "keep-weekly"], "E": ["keep-daily", "keep-weekly"], "D": [],
            "C": ["keep-weekly"], "B": ["held"], "A": []}
REMOVED = {"A", "D"}


def _at(when: str, *args: str, repo: Path, state: Path) -> None:
    """One CLI command run with the clock at ``when`` (UTC)."""
    env = cli_env(repo, XDG_STATE_HOME=str(state), TZ="UTC")
    proc = subprocess.run(["faketime", "-f", f"@{when}", sys.executable, "-m", "imgbackup", *args], env=env,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """A repository with the images of the table (each with chunks of its own) and a hold on B;
    tests work on copies of it (with their own client state)."""
    need_tool("faketime")
    base = tmp_path_factory.mktemp("prune")
    repo, state = base / "repo", base / "state"
    assert cli("init", repo=repo, XDG_STATE_HOME=str(state)).returncode == 0
    for seed, (_label, when) in enumerate(sorted(TIMES.items(), key=lambda kv: kv[1])):
        source = random_image(base / "src.img", 2 * MIB, seed=100 + seed, data_fraction=0.5)
        _at(when, "backup", str(source), "--name", "d", repo=repo, state=state)
    _at("2023-01-01 12:00:00", "backup", str(random_image(base / "src.img", 2 * MIB, seed=99)), "--name", "o",
        repo=repo, state=state)
    (base / "src.img").unlink()
    rows = cli_json("list", repo=repo, XDG_STATE_HOME=str(state))["images"]
    ids = {label: row["id"] for row in rows if row["name"] == "d"
           for label, when in TIMES.items() if abs(row["created"] - _stamp(when)) < 60}
    ids["G"] = next(row["id"] for row in rows if row["name"] == "o")
    assert len(ids) == 7
    assert cli("hold", ids["B"], "--reason", "case 4711", repo=repo, XDG_STATE_HOME=str(state)).returncode == 0
    return repo, ids


def _stamp(when: str) -> float:
    import datetime

    return datetime.datetime.fromisoformat(when).replace(tzinfo=datetime.UTC).timestamp()


def _copy(made, tmp_path: Path) -> tuple[Path, dict[str, str]]:
    repo, ids = made
    shutil.copytree(repo, tmp_path / "repo", symlinks=True)
    return tmp_path / "repo", {"XDG_STATE_HOME": str(tmp_path / "state")}


def _verdicts(doc: dict, ids: dict[str, str]) -> dict[str, list[str]]:
    label = {v: k for k, v in ids.items()}
    return {label[row["id"]]: row["reasons"] for row in doc["images"]}


def test_dry_run_lists_reasons_and_bytes_and_changes_nothing_then_prune_removes_them(made, tmp_path) -> None:
    repo, env = _copy(made, tmp_path)
    ids = made[1]
    before = sorted(p.relative_to(repo).as_posix() for p in repo.rglob("*") if p.is_file())
    doc = cli_json("prune", *POLICY, "--dry-run", repo=repo, **env)
    assert _verdicts(doc, ids) == EXPECTED | {"G": ["keep-last", "keep-daily", "keep-weekly"]}
    assert {row["action"] for row in doc["images"] if row["reasons"]} == {"keep"}
    assert doc["would_remove"] == 2 and doc["kept"] == 5 and doc["bytes_freed"] > 2 * MIB // 2
    assert sorted(p.relative_to(repo).as_posix() for p in repo.rglob("*") if p.is_file()) == before
    text = cli("prune", *POLICY, "--dry-run", repo=repo, **env)
    assert text.returncode == 0 and "would remove 2 of 7 image(s)" in text.stdout
    assert "held" in next(line for line in text.stdout.splitlines() if ids["B"][:12] in line)
    only = cli_json("prune", *POLICY, "--dry-run", "--name", "o", repo=repo, **env)
    assert [row["id"] for row in only["images"]] == [ids["G"]]

    done = cli_json("prune", *POLICY, repo=repo, **env)
    assert sorted(done["removed"]) == sorted(ids[k] for k in REMOVED)
    assert done["bytes_freed"] == pytest.approx(doc["bytes_freed"], rel=0.05)
    left = {row["id"] for row in cli_json("list", repo=repo, **env)["images"]}
    assert left == {ids[k] for k in "BCEFG"}
    report = cli_json("verify", repo=repo, **env)
    assert report["ok"] and report["catalog"]["ok"], report["catalog"]
    again = cli_json("prune", *POLICY, repo=repo, **env)     # a second run finds nothing more to do
    assert again["removed"] == [] and again["bytes_freed"] == 0


def test_append_only_and_an_empty_policy_are_refused(made, tmp_path) -> None:
    repo, env = _copy(made, tmp_path)
    assert cli("prune", repo=repo, **env).returncode == 2
    assert cli("append-only", "on", repo=repo, **env).returncode == 0
    refused = cli("prune", *POLICY, repo=repo, **env)
    assert refused.returncode == 14 and "append-only" in refused.stderr and "Traceback" not in refused.stderr
    assert len(cli_json("list", repo=repo, **env)["images"]) == 7
    assert cli("prune", *POLICY, "--dry-run", repo=repo, **env).returncode == 0   # looking is allowed


def _calls(trace: Path) -> list[tuple[str, str]]:
    """(syscall, first path) of each traced call, in order."""
    out = []
    for line in trace.read_text().splitlines():
        parts = line.split(None, 1)
        if len(parts) < 2 or "(" not in parts[1] or "resumed" in parts[1]:
            continue
        call, args = parts[1].split("(", 1)
        paths = [p for p in args.split('"')[1::2]]
        out.append((call, " ".join(paths)))
    return out


SYSCALLS = "link,linkat,unlink,unlinkat,rename,renameat,renameat2"
POINTS = {   # where to kill: the first call (or the last, for the commit) that matches
    "commit": lambda c, p: "link" in c and "/catalog/" in p,            # the entry naming the pruned images
    "image index": lambda c, p: c.startswith("unlink") and "/images/" in p,
    "pack": lambda c, p: c.startswith("unlink") and "/packs/" in p,      # the collection
    "chunk index": lambda c, p: c.startswith("rename") and "/index/" in p,
}


@pytest.fixture(scope="module")
def prune_calls(made, tmp_path_factory) -> list[tuple[str, str]]:
    """The file-system calls of one real prune of a copy, traced."""
    need_tool("strace")
    work = tmp_path_factory.mktemp("prune-trace")
    repo = work / "repo"
    shutil.copytree(made[0], repo, symlinks=True)
    trace = work / "trace"
    subprocess.run(["strace", "-f", "-qq", "-o", str(trace), "-e", f"trace={SYSCALLS}", sys.executable, "-m",
                    "imgbackup", "prune", *POLICY], check=True, capture_output=True,
                   env=cli_env(repo, XDG_STATE_HOME=str(work / "state")))
    return _calls(trace)


@pytest.mark.parametrize("point", list(POINTS))
def test_prune_killed_at_any_point_leaves_every_image_whole_or_gone(made, prune_calls, tmp_path, point) -> None:
    """kill -9 at the chosen syscall of a real prune: verify passes, each image is listed whole or
    counted as removed, and the next prune ends with exactly the table's images."""
    repo, env = _copy(made, tmp_path)
    ids = made[1]
    hits = [i for i, (c, p) in enumerate(prune_calls) if POINTS[point](c, p)]
    assert hits, f"no {point} call in {prune_calls}"
    at = hits[-1] if point == "commit" else hits[0]
    syscall = prune_calls[at][0]
    nth = sum(1 for c, _ in prune_calls[: at + 1] if c == syscall)
    killed = subprocess.run(["strace", "-f", "-qq", "-o", "/dev/null", "-e", f"trace={syscall}",
                             "-e", f"inject={syscall}:signal=KILL:when={nth}", sys.executable, "-m", "imgbackup",
                             "prune", *POLICY], env=cli_env(repo, **env), capture_output=True, text=True)
    assert killed.returncode != 0, killed.stdout
    report = cli_json("verify", repo=repo, **env)
    assert report["ok"] and report["catalog"]["ok"], report
    rows = {row["id"]: row for row in cli_json("list", repo=repo, **env)["images"]}
    for label, image_id in ids.items():
        assert label in REMOVED or (image_id in rows and not rows[image_id]["removed"]), (point, label)
    finish = cli("prune", *POLICY, "--json", repo=repo, **env)
    assert finish.returncode == 0, finish.stderr
    assert {row["id"] for row in cli_json("list", repo=repo, **env)["images"]} == {ids[k] for k in "BCEFG"}
    final = cli_json("verify", repo=repo, **env)
    assert final["ok"] and final["catalog"]["ok"] and not final["catalog"]["notes"], final["catalog"]
    assert json.loads(finish.stdout)["images"]
