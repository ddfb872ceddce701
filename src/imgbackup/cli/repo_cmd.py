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
from imgbackup.repository.lock import break_lock
from imgbackup.repository.repo import DEFAULT_CHUNK_SIZE, Repository
from imgbackup.repository.storage import open_storage


def init(
    repo: RepoOption = None,
    encryption: Annotated[str, typer.Option(help="aes-256-gcm, or none (checksums only).")] = "aes-256-gcm",
    chunk_size: Annotated[int, typer.Option(help="Chunk size in bytes (power of two, 64 KiB..16 MiB).")]
    = DEFAULT_CHUNK_SIZE,
    zstd_level: Annotated[int, typer.Option(help="zstd compression level for chunks.")] = 3,
    json_out: JsonOption = False,
) -> None:
    """Create a new repository."""
    r = Repository.init(repo_path(repo), lambda: read_passphrase(confirm=True), encryption, chunk_size, zstd_level)
    doc = {"repository": r.location, "id": r.config.id, "encryption": r.config.encryption,
           "chunk_size": r.chunk_size, "zstd_level": r.config.zstd_level}
    if json_out:
        emit_json(doc)
    else:
        typer.echo(f"created repository {r.location} (id {r.config.id}, {r.config.encryption}, "
                   f"chunk size {human(r.chunk_size)})")


def _row(meta: dict) -> dict:
    return {"id": meta["id"], "name": meta.get("name"), "type": meta.get("type"), "parent": meta.get("parent"),
            "created": meta.get("created"), "hostname": meta.get("hostname"), "source": meta.get("source", {}).get("path"),
            "source_size": meta.get("source", {}).get("size"), "stats": meta.get("stats", {})}


def list_images(
    repo: RepoOption = None,
    name: Annotated[str | None, typer.Option(help="Only images of this source name.")] = None,
    json_out: JsonOption = False,
) -> None:
    """List the images in the repository, oldest first."""
    r = open_repo(repo)
    entries = r.images.entries()
    rows = [dict(_row(e.meta)) if e.meta else {"id": e.id, "error": e.error} for e in entries
            if not name or (e.meta or {}).get("name") == name]
    if json_out:
        emit_json({"images": rows})
        return
    for row in rows:
        if "error" in row:
            typer.echo(f"{row['id'][:12]}  DAMAGED: {row['error']}")
            continue
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(row["created"]))
        typer.echo(f"{row['id'][:12]}  {when}  {row['type']:<12} {row['hostname'] or '?':<16} {row['name']:<20} "
                   f"{human(row['source_size'])}")


def info(
    image: Annotated[str | None, typer.Argument(help="Image id prefix, or 'latest'; none: the repository.")]
    = None,
    repo: RepoOption = None,
    name: NameOption = None,
    json_out: JsonOption = False,
) -> None:
    """Show one image's metadata, or (without IMAGE) the repository's: sizes, space used and reclaimable."""
    r = open_repo(repo)
    if image is None:
        _repository_info(r, json_out)
        return
    meta = r.images.read_meta(r.images.resolve(image, name))
    if json_out:
        emit_json(meta)
        return
    for key in sorted(meta):
        typer.echo(f"{key}: {meta[key]}")


def _repository_info(r: Repository, json_out: bool) -> None:
    from imgbackup.engine.stats import repository_stats

    stats = repository_stats(r)
    doc = {"repository": r.location, "id": r.config.id, "encryption": r.config.encryption,
           "chunk_size": r.chunk_size, "zstd_level": r.config.zstd_level, "created": r.config.created,
           **stats.to_dict()}
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


def break_lock_cmd(
    repo: RepoOption = None,
    sessions: Annotated[bool, typer.Option("--sessions", help="Also remove every backup's lease (a live "
                                           "backup then stops without committing).")] = False,
    json_out: JsonOption = False,
) -> None:
    """Remove the exclusive lease of delete/compact/repair (and takeover claims), whoever holds it.

    Not needed after a crash: a lease nobody refreshes clears itself once it expires."""
    removed = break_lock(open_storage(repo_path(repo), for_writing=True), sessions=sessions)
    if json_out:
        emit_json({"removed": [{"name": s.name, "age_s": round(s.age, 1), **(s.info.__dict__ if s.info else {})}
                               for s in removed]})
        return
    for state in removed:
        typer.echo(f"removed {state.name}: {state.describe()}")
    if not removed:
        typer.echo("repository was not locked")


def register(app: typer.Typer) -> None:
    app.command("init")(init)
    app.command("list")(list_images)
    app.command("info")(info)
    app.command("break-lock")(break_lock_cmd)
