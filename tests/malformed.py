"""Shared by the malformed-metadata tests (issue 9 §8): a small repository pair built once, and the
real CLI run in this process (its own entry point, ``imgbackup.cli.main.run``) so that hundreds of
damaged-repository commands stay cheap. Anything but a documented exit code with one error line —
an exception escaping ``run`` is the traceback a user would see — fails the test.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import signal
import traceback
from dataclasses import dataclass
from pathlib import Path

from tests.disks import random_image
from tests.support import MIB, cli_json

from imgbackup.errors import EXIT_CODES

CHUNK = 64 << 10
SOURCE_SIZE = 1 * MIB
DOCUMENTED = {code for code, _ in EXIT_CODES}
# The commands run against each damaged repository: every reader of image indexes, chunk index and
# config. ``{out}`` is a restore target (a new file), ``{id}`` the image under test.
COMMANDS = (("list",), ("info", "{id}"), ("verify", "{id}"), ("restore", "{id}", "{out}"))


@dataclass
class Outcome:
    code: int
    stdout: str
    stderr: str
    crash: str | None = None     # the traceback, when an exception escaped the CLI
    args: tuple = ()

    def check(self, args) -> None:
        assert self.crash is None, f"{args}: traceback\n{self.crash}"
        assert self.code in DOCUMENTED, f"{args}: undocumented exit {self.code}: {self.stderr}"
        assert "Traceback" not in self.stderr, f"{args}: {self.stderr}"
        if self.code:
            errors = [ln for ln in self.stderr.splitlines() if ln.startswith("imgbackup: error: ")]
            assert len(errors) == 1, f"{args}: wanted one error line: {self.stderr!r}"


def run_cli(args, repo: Path, passphrase: str | None = None, index_cache: bool = False) -> Outcome:
    """One command through the CLI's own entry point, in this process. Without the local chunk-index
    cache unless asked: these tests are about the repository's own objects (a cache built before a
    forgery would serve the authentic entries; test_malformed checks that case on its own)."""
    from imgbackup.cli.main import run

    saved = dict(os.environ)
    on_sigterm = signal.getsignal(signal.SIGTERM)     # run() installs its own; this process keeps pytest's
    os.environ.update(IMGBACKUP_REPO=str(repo), IMGBACKUP_TEST_CHEAP_KDF="1",
                      IMGBACKUP_INDEX_CACHE="1" if index_cache else "0")
    os.environ.pop("IMGBACKUP_PASSPHRASE", None)
    if passphrase is not None:
        os.environ["IMGBACKUP_PASSPHRASE"] = passphrase
    out, err = io.StringIO(), io.StringIO()
    code, crash = 0, None
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            run([str(a) for a in args])
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:   # noqa: BLE001 - exactly what the test is looking for
        crash = traceback.format_exc()
        code = -1
    finally:
        os.environ.clear()
        os.environ.update(saved)
        signal.signal(signal.SIGTERM, on_sigterm)
    return Outcome(code, out.getvalue(), err.getvalue(), crash, tuple(map(str, args)))


def build_base(root: Path, encryption: str = "none") -> dict:
    """A repository with a full image and an incremental one holding delta chunks."""
    source = random_image(root / f"source-{encryption}.img", SOURCE_SIZE, seed=11, data_fraction=0.8)
    repo = root / f"repo-{encryption}"
    cli_json("init", "--encryption", encryption, "--chunk-size", str(CHUNK), repo=repo)
    full = cli_json("backup", source, repo=repo)["id"]
    first = source.read_bytes()
    with open(source, "r+b") as f:           # a few bytes changed in several chunks: deltas
        for off in range(0, SOURCE_SIZE, 3 * CHUNK):
            f.seek(off + 100)
            f.write(b"changed!")
    incr = cli_json("backup", "--type", "incremental", source, repo=repo)["id"]
    return {"repo": repo, "full": full, "incremental": incr, "full_bytes": first,
            "incremental_bytes": source.read_bytes(), "bytes": {full: first, incr: source.read_bytes()},
            "source": source}


def copy_repo(base: dict, where: Path) -> Path:
    return Path(shutil.copytree(base["repo"], where))


def run_all(repo: Path, image_id: str, tmp: Path, passphrase: str | None = None,
            expect: dict[str, bytes] | None = None, commands=COMMANDS, index_cache: bool = False) -> list[Outcome]:
    """Every command against one repository: each ends cleanly; a restore that succeeds wrote exactly
    the bytes ``expect`` gives for its image id (never wrong bytes silently)."""
    outcomes = []
    for n, template in enumerate(commands):
        out = tmp / f"restored-{n}.img"
        args = [a.format(id=image_id, out=out) for a in template]
        result = run_cli(args, repo, passphrase, index_cache)
        result.check(args)
        if args[0] == "restore" and result.code == 0:
            assert args[1] in (expect or {}), f"{args}: exit 0 restoring a damaged image"
            same = out.read_bytes() == expect[args[1]]      # a bool: no megabyte diff on failure
            assert same, f"{args}: wrong bytes, exit 0"
        if out.exists():
            out.unlink()
        outcomes.append(result)
    return outcomes
