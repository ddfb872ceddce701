"""The tools under test: each says how to init, back up, back up again and restore, as shell commands.

A command is a string for ``bash -c``; paths are quoted with ``shlex.quote``.  Passphrases travel in the
environment (BORG_PASSPHRASE, RESTIC_PASSWORD, IMGBACKUP_PASSPHRASE), never in argv.  ``Ctx`` carries what a
step needs: the disk, its partitions' loop devices (partclone), the repository and the restore target.
"""

from __future__ import annotations

import os
import shlex
from dataclasses import dataclass, field
from pathlib import Path

q = shlex.quote
PASSPHRASE = "benchmark-passphrase-not-secret"


@dataclass
class Part:
    """One partition of a disk: where it is and which partclone module reads it."""
    number: int
    offset: int
    size: int
    fs: str  # "ext4", "fat" or "" (no partclone module)
    loop: str = ""


@dataclass
class Ctx:
    disk: Path            # the state being backed up (a hard link named disk.img in a staging dir)
    label: str            # "s1", "s2": the backup's name in the repository
    repo: Path
    target: Path          # restore target file (created by the harness)
    size: int
    parts: list[Part] = field(default_factory=list)
    head: int = 0         # bytes before the first partition (GPT header, protective MBR)
    tail: int = 0         # offset where the bytes after the last partition start (backup GPT)
    changes: Path | None = None


class Tool:
    name = ""
    encrypted = False
    incremental = False   # the second backup stores only what changed
    used_blocks = False   # restores only used blocks: judged per filesystem, not by the disk hash
    reads_all = True      # reads every byte of the disk (skipped on the 1 TiB sparse disk)
    restore_walks_all = False  # restore handles every byte, holes too (restore skipped on the 1 TiB disk)
    needs_parts = False
    needs_changes = False

    def env(self, ctx: Ctx) -> dict[str, str]:
        return dict(os.environ)

    def init(self, ctx: Ctx) -> str:
        return f"mkdir -p {q(str(ctx.repo))}"

    def backup(self, ctx: Ctx, second: bool) -> str | None:
        raise NotImplementedError

    def restore(self, ctx: Ctx) -> str | None:
        """Restore the newest backup into ``ctx.target`` (already created, of the disk's size)."""
        raise NotImplementedError


class Cat(Tool):
    name = "cat (ceiling)"

    def backup(self, ctx: Ctx, second: bool) -> str | None:
        return None if second else f"cat {q(str(ctx.disk))} > /dev/null"

    def restore(self, ctx: Ctx) -> str | None:
        return None


HERE = Path(__file__).resolve().parent


def imgbackup_python() -> str:
    """The interpreter of the imgbackup on PATH (its venv), for the helpers that import imgbackup."""
    import shutil
    import sys

    exe = shutil.which("imgbackup")
    if exe:
        with open(exe, "rb") as f:
            first = f.readline().decode(errors="replace")
        if first.startswith("#!") and "python" in first:
            return first[2:].strip().split()[0]
    return sys.executable


class ReadUsed(Tool):
    """The read ceiling of an incremental by hash: the used blocks imgbackup must read, cold."""
    name = "read used blocks (ceiling)"
    reads_all = False

    def backup(self, ctx: Ctx, second: bool) -> str:
        return f"{q(imgbackup_python())} {q(str(HERE / 'read_used.py'))} {q(str(ctx.disk))}"

    def restore(self, ctx: Ctx) -> str | None:
        return None


class TrueChange(Tool):
    """What the second state really changed: zstd -3 of the changed 4 KiB blocks (the change list)."""
    name = "true change (zstd -3 of changed blocks)"
    reads_all = False
    needs_changes = True

    def backup(self, ctx: Ctx, second: bool) -> str:
        if not second:
            return "true"
        return (f"python3 {q(str(HERE / 'changed_blocks.py'))} {q(str(ctx.disk))} {q(str(ctx.changes))} "
                f"| zstd -3 -q -c > {q(str(ctx.repo / 'true-change.zst'))}")

    def restore(self, ctx: Ctx) -> str | None:
        return None


class Zstd(Tool):
    name = "zstd -T0 -3"

    def backup(self, ctx: Ctx, second: bool) -> str:
        return f"zstd -T0 -3 -q -f {q(str(ctx.disk))} -o {q(str(ctx.repo / ctx.label))}.zst"

    def restore(self, ctx: Ctx) -> str:
        return f"zstd -d -q -f --sparse {q(str(ctx.repo / ctx.label))}.zst -o {q(str(ctx.target))}"


class Borg(Tool):
    name = "borg"
    encrypted = incremental = True
    reads_all = False  # --sparse with the fixed chunker skips holes
    restore_walks_all = True  # extract --sparse still runs through every hole chunk: ~0.8 GB/s, 23 min per TiB

    def env(self, ctx: Ctx) -> dict[str, str]:
        return {**os.environ, "BORG_PASSPHRASE": PASSPHRASE, "BORG_BASE_DIR": str(ctx.repo) + ".base",
                "BORG_RELOCATED_REPO_ACCESS_IS_OK": "yes"}

    def init(self, ctx: Ctx) -> str:
        return f"borg init -e repokey {q(str(ctx.repo))}"

    def backup(self, ctx: Ctx, second: bool) -> str:
        return (f"cd {q(str(ctx.disk.parent))} && borg create --read-special --sparse --chunker-params "
                f"fixed,4194304 --compression zstd,3 {q(str(ctx.repo))}::{ctx.label} {q(ctx.disk.name)}")

    def restore(self, ctx: Ctx) -> str:
        out = ctx.target.parent / "borg-extract"
        return (f"mkdir -p {q(str(out))} && cd {q(str(out))} && borg extract --sparse {q(str(ctx.repo))}::"
                f"{ctx.label} && mv -f {q(str(out / ctx.disk.name))} {q(str(ctx.target))} && rmdir {q(str(out))}")


class Restic(Tool):
    name = "restic --stdin"
    encrypted = incremental = True

    def env(self, ctx: Ctx) -> dict[str, str]:
        return {**os.environ, "RESTIC_PASSWORD": PASSPHRASE, "RESTIC_CACHE_DIR": str(ctx.repo) + ".cache",
                "RESTIC_REPOSITORY": str(ctx.repo)}

    def init(self, ctx: Ctx) -> str:
        return "restic init -q"

    def backup(self, ctx: Ctx, second: bool) -> str:
        return f"restic backup -q --stdin --stdin-filename disk.img < {q(str(ctx.disk))}"

    def restore(self, ctx: Ctx) -> str:
        return f"restic dump -q latest disk.img > {q(str(ctx.target))}"


class Partclone(Tool):
    """partclone.{fat,ext4} -c | zstd per partition, plus the bytes outside the partitions (the GPT)."""
    name = "partclone|zstd"
    used_blocks = needs_parts = True
    reads_all = False

    def backup(self, ctx: Ctx, second: bool) -> str | None:
        if not ctx.parts or not all(p.fs for p in ctx.parts):
            return None
        r, d = str(ctx.repo / ctx.label), q(str(ctx.disk))
        cmds = [f"head -c {ctx.head} {d} > {q(r + '.head')}",
                f"tail -c {ctx.size - ctx.tail} {d} > {q(r + '.tail')}"]
        for p in ctx.parts:
            cmds.append(f"partclone.{p.fs} -q -c -s {p.loop} -o - -L /dev/null | zstd -T0 -3 -q "
                        f"> {q(f'{r}.p{p.number}.zst')}")
        return " && ".join(cmds)

    def restore(self, ctx: Ctx) -> str | None:
        if not ctx.parts or not all(p.fs for p in ctx.parts):
            return None
        r, t = str(ctx.repo / ctx.label), q(str(ctx.target))
        cmds = [f"dd if={q(r + '.head')} of={t} conv=notrunc status=none",
                f"dd if={q(r + '.tail')} of={t} bs=512 seek={ctx.tail // 512} conv=notrunc status=none"]
        for p in ctx.parts:
            cmds.append(f"zstd -d -q -c {q(f'{r}.p{p.number}.zst')} | partclone.{p.fs} -q -r -s - -o {p.loop} "
                        "-L /dev/null")
        return " && ".join(cmds)


class QemuImg(Tool):
    name = "qemu-img qcow2 zstd"
    reads_all = False  # skips holes of a sparse file

    def backup(self, ctx: Ctx, second: bool) -> str:
        return (f"qemu-img convert -c -f raw -O qcow2 -o compression_type=zstd {q(str(ctx.disk))} "
                f"{q(str(ctx.repo / ctx.label))}.qcow2")

    def restore(self, ctx: Ctx) -> str:
        return f"qemu-img convert -f qcow2 -O raw {q(str(ctx.repo / ctx.label))}.qcow2 {q(str(ctx.target))}"


class Imgbackup(Tool):
    name = "imgbackup"
    encrypted = incremental = used_blocks = True
    reads_all = False

    def env(self, ctx: Ctx) -> dict[str, str]:
        return {**os.environ, "IMGBACKUP_PASSPHRASE": PASSPHRASE, "IMGBACKUP_REPO": str(ctx.repo)}

    def init(self, ctx: Ctx) -> str:
        return "imgbackup init --json > /dev/null"

    def extra(self, ctx: Ctx, second: bool) -> str:
        return ""

    def backup(self, ctx: Ctx, second: bool) -> str:
        return (f"imgbackup backup --name bench {self.extra(ctx, second)}{q(str(ctx.disk))} --json "
                f"> {q(str(ctx.repo))}.{ctx.label}.json")

    def restore(self, ctx: Ctx) -> str:
        return f"imgbackup restore --name bench --yes latest {q(str(ctx.target))} --json > /dev/null"


class ImgbackupChanges(Imgbackup):
    name = "imgbackup --changed-blocks"
    needs_changes = True

    def extra(self, ctx: Ctx, second: bool) -> str:
        return f"--changed-blocks {q(str(ctx.changes))} " if second and ctx.changes else ""


class ImgbackupFast(Imgbackup):
    """The speed setting: zstd level 1 for the repository's chunks (``init --zstd-level 1``)."""

    name = "imgbackup zstd-1"

    def init(self, ctx: Ctx) -> str:
        return "imgbackup init --zstd-level 1 --json > /dev/null"


ALL_TOOLS: list[Tool] = [Cat(), ReadUsed(), TrueChange(), Zstd(), Borg(), Restic(), Partclone(), QemuImg(), Imgbackup(), ImgbackupChanges(),
                         ImgbackupFast()]
