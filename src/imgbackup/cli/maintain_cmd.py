"""Repository upkeep: ``repair`` (rebuild the chunk index from the packs) and ``compact`` (reclaim space)."""

from __future__ import annotations

from dataclasses import asdict
from typing import Annotated

import typer

from imgbackup.cli.common import (
    JsonOption,
    LockWaitOption,
    ProgressBar,
    RepoOption,
    emit_json,
    human,
    open_repo,
)
from imgbackup.errors import VerificationFailed


def repair(
    repo: RepoOption = None,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Write the rebuilt index; without it: a dry run.")]
    = False,
    quick: Annotated[bool, typer.Option(
        "--quick", help="Trust the packs' authenticated trailers; check only chunks damage records name "
                        "(default: read and check every chunk of every pack).")] = False,
    lock_wait: LockWaitOption = 0.0,
    json_out: JsonOption = False,
) -> None:
    """Rebuild the chunk index from the packs, leaving out damaged and missing chunks; report the images
    that affects, which byte ranges, and whether the next backup heals them. Never deletes an image.

    Exit 0 when every image is whole, 11 when some are damaged (listed)."""
    from imgbackup.engine.repair.run import run_repair

    r = open_repo(repo, needs_full_key="repair the repository (it reads every chunk)")
    bar = ProgressBar("repair", not json_out)
    bar.start(None)   # the bytes to check are known only pack by pack
    try:
        plan, done = run_repair(r, act=yes, quick=quick, progress=bar.update, lock_wait=lock_wait)
    finally:
        bar.close()
    doc = plan.to_dict() | {"dry_run": not yes, "written": asdict(done) if done else None}
    for warning in done.warnings if done else []:
        typer.echo(f"imgbackup: warning: {warning}", err=True)
    if json_out:
        emit_json(doc)
    else:
        _print_repair(plan, doc, yes)
    broken = len(plan.images) + len(plan.unreadable_images)
    if broken:
        raise VerificationFailed(f"{broken} image(s) remain damaged (listed above)",
                                 "see each image's heal note; 'imgbackup delete' removes one you give up")


def _print_repair(plan, doc: dict, acted: bool) -> None:
    typer.echo(f"checked {plan.chunks_checked} chunks ({human(plan.bytes_checked)}) in {plan.packs} packs "
               f"({doc['mode']} check)")
    for name, error in plan.unreadable_index_files:
        typer.echo(f"  index file {name} unreadable: {error}")
    for name, error in plan.packs_without_trailer:
        typer.echo(f"  {name}: {error}; its chunks were taken from the old index and checked one by one, "
                   "and are copied into new packs ('imgbackup compact' then removes this one)")
    reasons = {k: v for k, v in doc["bad_copies"].items() if k != "total"}
    if plan.bad:
        typer.echo(f"  {len(plan.bad)} bad chunk copies: " + ", ".join(f"{v} {k}" for k, v in sorted(reasons.items())))
    if plan.cleared:
        typer.echo(f"  {len(plan.cleared)} chunk copies recorded as damaged read intact now: used again")
    if plan.recovered:
        typer.echo(f"  {plan.recovered} chunks found in packs that no index file listed")
    for note in plan.notes:
        typer.echo(f"  note: {note}")
    for image in plan.images:
        typer.echo(f"image {image.id[:12]} {image.name or '?'}: DAMAGED, {image.chunks} chunks, {human(image.bytes)} "
                   f"in {len(image.ranges)} range(s)")
        for offset, length in image.ranges[:10]:
            typer.echo(f"    bytes {offset}-{offset + length - 1} ({human(length)})")
        if len(image.ranges) > 10:
            typer.echo(f"    ... and {len(image.ranges) - 10} more (--json lists them)")
        typer.echo(f"    heal: {image.heal}")
    for image_id, error in plan.unreadable_images:
        typer.echo(f"image {image_id[:12]}: index unreadable ({error}); repair cannot rebuild an image index")
    typer.echo(f"{plan.images_ok} image(s) whole, {len(plan.images)} damaged, {len(plan.unreadable_images)} unreadable")
    if not plan.changes:
        typer.echo("the chunk index and damage records are correct: nothing to write")
    elif acted:
        typer.echo(f"wrote the rebuilt index ({len(plan.rows)} entries) and removed the old index files"
                   + ("; 'imgbackup compact' reclaims the space of the dropped chunks" if plan.dropped else ""))
    else:
        typer.echo(f"dry run: nothing was written; 'imgbackup repair --yes' writes the rebuilt index "
                   f"({len(plan.rows)} entries, {plan.dropped} dropped) and removes the old index files")


def compact(
    repo: RepoOption = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Show what would be freed; change nothing.")] = False,
    lock_wait: LockWaitOption = 0.0,
    json_out: JsonOption = False,
) -> None:
    """Reclaim space: leftovers of interrupted runs, packs no image needs, and the dead part of partly
    used packs (rewritten). Frees before it writes, so it works on a full repository disk.

    Backups may run meanwhile: what is first found unneeded is marked and freed by a later compact,
    once the grace period (IMGBACKUP_GC_GRACE_SECONDS, default 3600) has passed and no backup that
    began before the mark still runs."""
    from imgbackup.engine.compact import run_compact

    result = run_compact(open_repo(repo, needs_full_key="compact the repository"), dry_run, lock_wait)
    for warning in result.warnings:
        typer.echo(f"imgbackup: warning: {warning}", err=True)
    if json_out:
        emit_json(asdict(result))
        return
    verb = "would free" if dry_run else "freed"
    typer.echo(f"{verb} {human(result.bytes_freed)}: {result.packs_deleted} pack(s) removed "
               f"({result.packs_rewritten} rewritten, {human(result.bytes_written)} copied), "
               f"{result.temp_files_removed} leftover temp file(s), {result.chunks_removed} unneeded chunk(s)"
               + ("; nothing was changed (dry run)" if dry_run else "")
               + (f"; {result.candidates_held} unneeded item(s) marked, freed by a later compact after the grace "
                  "period" if result.candidates_held else ""))


def register(app: typer.Typer) -> None:
    app.command("repair")(repair)
    app.command("compact")(compact)
