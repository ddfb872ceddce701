"""Repository commands: init, list, info, break-lock."""

from __future__ import annotations

import time
from typing import Annotated

import typer

from imgbackup.cli.common import (
    JsonOption,
    NameOption,
    RepoOption,
    emit_json,
    human,
    open_repo,
    read_passphrase,
    repo_path,
)
from imgbackup.cli.lifecycle_cmd import when
from imgbackup.errors import UsageError
from imgbackup.repository.lock import break_lock
from imgbackup.repository.repo import DEFAULT_CHUNK_SIZE, Repository
from imgbackup.repository.storage import open_storage


def init(
    repo: RepoOption = None,
    encryption: Annotated[str, typer.Option(help="aes-256-gcm, or none (checksums only).")] = "aes-256-gcm",
    chunk_size: Annotated[int, typer.Option(help="Chunk size in bytes (power of two, 64 KiB..16 MiB).")]
    = DEFAULT_CHUNK_SIZE,
    zstd_level: Annotated[int, typer.Option(help="zstd compression level for chunks.")] = 3,
    append_only: Annotated[bool, typer.Option(
        "--append-only", help="delete, prune and compact refuse (exit 14) until 'imgbackup append-only off': a "
                              "guard against accidents, not against root.")] = False,
    object_lock: Annotated[str | None, typer.Option(
        "--object-lock", metavar="MODE", help="S3 only: compliance or governance. Every object is written with a "
                                              "retention date; the server must pass a lock probe first.")] = None,
    lock_days: Annotated[int | None, typer.Option(
        help="With --object-lock: how long each object stays locked (prune and compact extend it for what "
             "the images still need).")] = None,
    json_out: JsonOption = False,
) -> None:
    """Create a new repository."""
    from imgbackup.engine.objectlock import lock_seconds

    if (object_lock is None) != (lock_days is None):
        raise UsageError("--object-lock and --lock-days go together", "e.g. --object-lock compliance --lock-days 30")
    lock = (object_lock.lower(), lock_seconds(lock_days)) if object_lock and lock_days is not None else None
    r = Repository.init(repo_path(repo), lambda: read_passphrase(confirm=True), encryption, chunk_size, zstd_level,
                        append_only=append_only, object_lock=lock)
    doc = {"repository": r.location, "id": r.config.id, "encryption": r.config.encryption,
           "chunk_size": r.chunk_size, "zstd_level": r.config.zstd_level, "append_only": r.config.append_only,
           "object_lock": r.config.object_lock}
    if json_out:
        emit_json(doc)
    else:
        typer.echo(f"created repository {r.location} (id {r.config.id}, {r.config.encryption}, "
                   f"chunk size {human(r.chunk_size)})")
        if r.config.object_lock:
            typer.echo(f"S3 Object Lock: {r.config.object_lock['mode']}, every object locked for "
                       f"{r.config.object_lock['seconds'] / 86400:g} days; the lock probe passed")
        if append_only:
            typer.echo("append-only: delete, prune and compact refuse until 'imgbackup append-only off'")


def _row(meta: dict, holds: list) -> dict:
    return {"id": meta["id"], "name": meta.get("name"), "type": meta.get("type"), "parent": meta.get("parent"),
            "created": meta.get("created"), "source": meta.get("source", {}).get("path"),
            "source_size": meta.get("source", {}).get("size"), "stats": meta.get("stats", {}),
            "holds": [h.to_dict() for h in holds]}


def list_images(
    repo: RepoOption = None,
    name: Annotated[str | None, typer.Option(help="Only images of this source name.")] = None,
    json_out: JsonOption = False,
) -> None:
    """List the images in the repository, oldest first."""
    r = open_repo(repo)
    entries = r.images.entries()
    view = r.catalog.view()
    held = r.held_images(view)
    removed = set(r.pending_removals(view))
    rows = [_row(e.meta, held.get(e.id, [])) if e.meta else
            {"id": e.id, "error": e.error, "holds": [h.to_dict() for h in held.get(e.id, [])]}
            for e in entries if not name or (e.meta or {}).get("name") == name]
    for row in rows:
        row["removed"] = row["id"] in removed
    if json_out:
        emit_json({"images": rows})
        return
    for row in rows:
        mark = f"  HELD: {row['holds'][0]['reason']}" if row["holds"] else ""
        mark += "  REMOVED (its index is still there: retained, or an interrupted removal)" if row["removed"] else ""
        if "error" in row:
            typer.echo(f"{row['id'][:12]}  DAMAGED: {row['error']}{mark}")
            continue
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(row["created"]))
        typer.echo(f"{row['id'][:12]}  {when}  {row['type']:<12} {row['name']:<20} {human(row['source_size'])}{mark}")


def info(
    image: Annotated[str | None, typer.Argument(help="Image id prefix, or 'latest'; none: the repository.")]
    = None,
    repo: RepoOption = None,
    name: NameOption = None,
    json_out: JsonOption = False,
) -> None:
    """Show one image's metadata and holds, or (without IMAGE) the repository's: sizes, space used and
    reclaimable, append-only, S3 Object Lock and what its last lock probe found, the catalog head."""
    r = open_repo(repo)
    if image is None:
        _repository_info(r, json_out)
        return
    image_id = r.images.resolve(image, name)
    meta = r.images.read_meta(image_id)
    holds = [h.to_dict() for h in r.held_images().get(image_id, [])]
    if json_out:
        emit_json(meta | {"holds": holds})
        return
    for key in sorted(meta):
        typer.echo(f"{key}: {meta[key]}")
    for h in holds:
        typer.echo(f"hold: {h['reason']} (placed by {h['user'] or '?'} on {h['host'] or '?'}, {when(h['time'])}; "
                   f"record {h['id'][:12]}{', known from the catalog only' if h['source'] != 'record' else ''})")


def _repository_info(r: Repository, json_out: bool) -> None:
    from imgbackup.engine.objectlock import lock_status
    from imgbackup.engine.stats import repository_stats

    stats = repository_stats(r)
    view = r.catalog.view()
    lock = lock_status(r, view)
    held = r.held_images(view)
    doc = {"repository": r.location, "id": r.config.id, "encryption": r.config.encryption,
           "chunk_size": r.chunk_size, "zstd_level": r.config.zstd_level, "created": r.config.created,
           **stats.to_dict(), "append_only": r.config.append_only, "object_lock": lock,
           "catalog": {"head": view.state.seq, "rollback": view.rollback, "problems": view.problems},
           "held_images": sorted(held)}
    doc["image_stats"] = doc.pop("images")      # per image: stored_bytes, unique_bytes
    doc["images"] = len(stats.images) + len(stats.unreadable_images)
    if json_out:
        emit_json(doc)
        return
    typer.echo(f"repository {r.location} (id {r.config.id}, {r.config.encryption}, chunk size {human(r.chunk_size)})")
    typer.echo(f"  images: {doc['images']}, packs: {stats.packs}, index files: {stats.index_files}")
    typer.echo(f"  repository bytes: {human(stats.repository_bytes)}; unique data images need: "
               f"{human(stats.unique_bytes)}; reclaimable by 'imgbackup compact': {human(stats.reclaimable_bytes)}")
    if stats.damaged_copies:
        typer.echo(f"  {stats.damaged_copies} damaged chunk copies on record ('imgbackup repair' reports them)")
    typer.echo(f"  append-only: {'on' if r.config.append_only else 'off'}")
    if lock is None:
        typer.echo("  S3 Object Lock: none (objects can be deleted by anyone with write access to the storage)")
    else:
        probe = lock["last_probe"]
        state = ("enforced by the server" if lock["enforced"] else "NOT enforced by the server: do not rely on it")
        typer.echo(f"  S3 Object Lock: {lock['mode']}, {_period(lock['seconds'])}, {state} (last probe "
                   f"{when(probe.get('time')) if probe else 'never'})" + (
                       "; governance mode can be bypassed by accounts allowed s3:BypassGovernanceRetention"
                       if lock["bypassable"] else ""))
    typer.echo(f"  catalog: {view.state.seq + 1} entries" + (f"; ROLLBACK: {view.rollback}" if view.rollback else "")
               + ("".join(f"; PROBLEM: {p}" for p in view.problems)))
    typer.echo(f"  held images: {len(held)}")


def _period(seconds: int) -> str:
    return f"{seconds / 86400:g} days" if seconds >= 86400 else f"{seconds} s"


def break_lock_cmd(repo: RepoOption = None, json_out: JsonOption = False) -> None:
    """Remove a repository lock left behind by a process that is gone."""
    held = break_lock(open_storage(repo_path(repo), for_writing=True))
    if json_out:
        emit_json({"removed": held.__dict__ if held else None})
    else:
        typer.echo(f"removed lock held by {held.describe()}" if held else "repository was not locked")


def register(app: typer.Typer) -> None:
    app.command("init")(init)
    app.command("list")(list_images)
    app.command("info")(info)
    app.command("break-lock")(break_lock_cmd)
