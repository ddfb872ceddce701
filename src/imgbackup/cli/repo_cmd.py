"""Repository commands: init, list, info, break-lock."""

from __future__ import annotations

from typing import Annotated

import typer

from imgbackup import interrupts
from imgbackup.cli.common import (
    JsonOption,
    NameOption,
    RepoOption,
    emit_json,
    human,
    open_repo,
    print_table,
    read_other_passphrase,
    read_passphrase,
    repo_path,
)
from imgbackup.cli.lifecycle_cmd import when
from imgbackup.errors import IntegrityError, UsageError
from imgbackup.repository.lock import break_lock
from imgbackup.repository.repo import DEFAULT_CHUNK_SIZE, MIN_PASSPHRASE_LENGTH, Repository
from imgbackup.repository.stats import ImageStats, image_stats
from imgbackup.repository.storage import open_storage
from imgbackup.units import local_time


def init(
    repo: RepoOption = None,
    encryption: Annotated[str | None, typer.Option(help="aes-256-gcm (default), or none (checksums only).")]
    = None,
    chunk_size: Annotated[int | None, typer.Option(
        help=f"Chunk size in bytes (power of two, 64 KiB..16 MiB; default {DEFAULT_CHUNK_SIZE}).")] = None,
    zstd_level: Annotated[int | None, typer.Option(help="zstd compression level for chunks (default 3).")]
    = None,
    related_to: Annotated[str | None, typer.Option(
        "--related-to", help="An existing repository whose keys and chunk size the new one shares, so "
        "'copy' between the two moves sealed chunks as they are (its passphrase: IMGBACKUP_PASSPHRASE2).")]
    = None,
    weak_passphrase: Annotated[bool, typer.Option(
        "--weak-passphrase", help=f"Accept a passphrase shorter than {MIN_PASSPHRASE_LENGTH} characters.")] = False,
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
    other = Repository.open(related_to, read_other_passphrase) if related_to else None
    if other is not None:
        encryption = encryption or other.config.encryption
        chunk_size = chunk_size or other.chunk_size
        zstd_level = zstd_level or other.config.zstd_level
    r = Repository.init(repo_path(repo), lambda: read_passphrase(confirm=True), encryption or "aes-256-gcm",
                        chunk_size or DEFAULT_CHUNK_SIZE, zstd_level or 3, related_to=other,
                        weak_passphrase=weak_passphrase, append_only=append_only, object_lock=lock)
    keep_safe = ("keep the passphrase safe, apart from the repository: without it no image can ever be read"
                 if r.config.encryption != "none"
                 else "this repository is not encrypted: anyone who can read it can read the images")
    doc = {"repository": r.location, "id": r.config.id, "encryption": r.config.encryption,
           "chunk_size": r.chunk_size, "zstd_level": r.config.zstd_level, "note": keep_safe,
           "append_only": r.config.append_only, "object_lock": r.config.object_lock,
           "related_to": other.location if other else None}
    if json_out:
        emit_json(doc)
    else:
        typer.echo(f"created repository {r.location} (id {r.config.id}, {r.config.encryption}, "
                   f"chunk size {human(r.chunk_size)}"
                   + (f", related to {other.location}: copies between them stay sealed" if other else "") + ")")
        typer.echo(keep_safe[0].upper() + keep_safe[1:] + ".")
        if r.config.object_lock:
            typer.echo(f"S3 Object Lock: {r.config.object_lock['mode']}, every object locked for "
                       f"{_period(r.config.object_lock['seconds'])}; the lock probe passed")
        if append_only:
            typer.echo("append-only: delete, prune and compact refuse until 'imgbackup append-only off'")


def _fallbacks(meta: dict) -> list[dict]:
    """Regions a backup imaged in full because it could not trust (or did not know) their content."""
    regions = (meta.get("used_map") or {}).get("regions") or []
    return [r for r in regions if isinstance(r, dict) and r.get("warning")]


def _row(meta: dict, stats: ImageStats | None) -> dict:
    source = meta.get("source") or {}
    return {"id": meta["id"], "name": meta.get("name"), "type": meta.get("type"), "parent": meta.get("parent"),
            "created": meta.get("created"), "hostname": meta.get("hostname"),
            "source": source.get("path"), "source_size": source.get("size"),
            "stats": stats.to_dict() if stats else None,
            "imaged_in_full": [{"partition": r.get("partition"), "reason": r["warning"]} for r in _fallbacks(meta)],
            "warnings": meta.get("warnings", [])}


def list_images(
    repo: RepoOption = None,
    name: Annotated[str | None, typer.Option(help="Only images of this source name.")] = None,
    json_out: JsonOption = False,
) -> None:
    """List the images in the repository, oldest first, with what each stores; exit 6 if any is DAMAGED."""
    r = open_repo(repo)
    entries = [e for e in r.images.entries() if not name or (e.meta or {}).get("name") == name]
    view = r.catalog.view()
    held = r.held_images(view)
    removed = set(r.pending_removals(view))
    stats = image_stats(r, [e.id for e in entries if e.meta])
    rows = []
    for e in entries:
        error = e.error or stats.errors.get(e.id)
        if error is None and e.id in stats.images and stats.images[e.id].missing_chunks:
            error = f"{stats.images[e.id].missing_chunks} referenced chunks have no usable copy (in no pack, or recorded damaged)"
        row = _row(e.meta, stats.images.get(e.id)) if e.meta else {"id": e.id}
        if error:
            row["error"] = error
        row["holds"] = [h.to_dict() for h in held.get(e.id, [])]
        row["removed"] = e.id in removed
        rows.append(row)
    damaged = [row for row in rows if "error" in row]
    if json_out:
        emit_json({"images": rows, "damaged": len(damaged)})
    else:
        _print_list(rows)
    if damaged:
        raise IntegrityError(f"{len(damaged)} of {len(rows)} images are DAMAGED",
                             "run 'imgbackup verify' for details")


def _print_list(rows: list[dict]) -> None:
    table = []
    notes = []
    for row in rows:
        if "error" in row and "stats" not in row:
            table.append([row["id"][:12], "-", "-", "-", "-", "-", "-", "-", "DAMAGED"])
            notes.append(f"{row['id'][:12]}: {row['error']}")
            continue
        st = row["stats"] or {}
        mark = [f"HELD: {row['holds'][0]['reason']}"] if row["holds"] else []
        if row["removed"]:
            mark.append("REMOVED (its index is still there: retained, or an interrupted removal)")
        if "error" in row:
            mark.append("DAMAGED")
            notes.append(f"{row['id'][:12]}: {row['error']}")
        if row["imaged_in_full"]:
            parts = ", ".join(str(f["partition"]) if f["partition"] is not None else "all"
                              for f in row["imaged_in_full"])
            mark.append(f"in full: {parts}")
        table.append([row["id"][:12], local_time(row["created"]) if row["created"] else "-", row["type"] or "-",
                      str(row["name"]), (row["parent"] or "-")[:12], human(row["source_size"] or 0),
                      human(st["stored_bytes"]) if st else "-", human(st["unique_bytes"]) if st else "-",
                      "; ".join(mark)])
    print_table(["ID", "CREATED", "TYPE", "NAME", "PARENT", "SOURCE", "STORED", "UNIQUE", "NOTE"], table,
                frozenset({"SOURCE", "STORED", "UNIQUE"}))
    if not rows:
        typer.echo("(no images)")
    if any(row.get("imaged_in_full") for row in rows):
        notes.append("'in full': partitions imaged without a used-block map; 'imgbackup info ID' says why")
    for note in notes:
        typer.echo(note)


def info(
    image: Annotated[str | None, typer.Argument(help="Image id prefix, or 'latest'; none: the repository.")]
    = None,
    repo: RepoOption = None,
    name: NameOption = None,
    json_out: JsonOption = False,
) -> None:
    """Show one image: source, time, type, what it stores, how each region of the disk was imaged, and its
    holds; without IMAGE, the repository: sizes, space used and reclaimable, append-only, S3 Object Lock
    and what its last lock probe found, the catalog head."""
    r = open_repo(repo)
    if image is None:
        _repository_info(r, json_out)
        return
    image_id = r.images.resolve(image, name)
    index = r.images.load(image_id)
    stats = image_stats(r, [image_id]).images[image_id]
    holds = [h.to_dict() for h in r.held_images().get(image_id, [])]
    if json_out:
        emit_json(index.meta | {"stats": stats.to_dict(), "holds": holds})
        return
    _print_info(index.meta, stats)
    for h in holds:
        typer.echo(f"hold: {h['reason']} (placed by {h['user'] or '?'} on {h['host'] or '?'}, {when(h['time'])}; "
                   f"record {h['id'][:12]}{', known from the catalog only' if h['source'] != 'record' else ''})")


def _print_info(meta: dict, stats: ImageStats) -> None:
    source = meta.get("source") or {}
    identity = ", ".join(f"{k} {source[k]}" for k in ("vendor", "model", "serial") if source.get(k))
    fields = [
        ("image", meta["id"]),
        ("name", str(meta.get("name"))),
        ("type", f"{meta.get('type')}" + (f", parent {meta['parent']}" if meta.get("parent") else "")),
        ("created", f"{local_time(meta['created'])} on {meta.get('hostname', '?')} "
                    f"(imgbackup {meta.get('tool_version', '?')})"),
        ("source", f"{source.get('path')} ({source.get('kind')}, {human(source.get('size', 0))}, "
                   f"{source.get('size')} bytes, {source.get('logical_sector_size')}-byte sectors)"),
    ]
    if identity:
        fields.append(("device", identity))
    fields.append(("chunks", f"{meta.get('slots')} of {human(meta.get('chunk_size', 0))}: {stats.data_slots} data, "
                             f"{stats.zero_slots} zero, {stats.unused_slots} unused by any filesystem"))
    fields.append(("stored", f"{human(stats.stored_bytes)} ({stats.chunks} distinct chunks and the index); "
                             f"only this image: {human(stats.unique_bytes)}"))
    if stats.missing_chunks:
        fields.append(("DAMAGED", f"{stats.missing_chunks} referenced chunks have no usable copy (in no pack, or recorded damaged)"))
    used_map = meta.get("used_map") or {}
    fields.append(("blocks", "used blocks only (filesystem maps)" if used_map.get("enabled")
                   else "every sector (--all-blocks)"))
    bad = meta.get("bad_ranges") or []
    if bad:
        unreadable = sum(n for _, n in bad)
        shown = ", ".join(f"{off}+{n}" for off, n in bad[:10]) + (f", … ({len(bad)} in all)" if len(bad) > 10 else "")
        fields.append(("unreadable", f"{human(unreadable)} ({unreadable} bytes) of the source could not be read "
                                     f"(backup --rescue): zeros in the image; bad_ranges (offset+length): {shown}"))
    if meta.get("changed_blocks"):
        fields.append(("change list", str(meta["changed_blocks"])))
    fields.append(("digest", str(meta.get("content_digest"))))
    width = max(len(k) for k, _ in fields)
    for key, value in fields:
        typer.echo(f"{key:<{width}}  {value}")
    for warning in meta.get("warnings", []):
        typer.echo(f"{'warning':<{width}}  {warning}")
    regions = used_map.get("regions") or []
    if regions:
        typer.echo("")
        rows = [[str(reg.get("start")), human(reg.get("size", 0)), str(reg.get("partition") or "-"),
                 reg.get("fstype") or "-", "used blocks" if reg.get("mode") == "bitmap" else "in full",
                 human(reg.get("used_bytes", 0)), reg.get("warning") or ""] for reg in regions]
        print_table(["START", "SIZE", "PART", "FS", "IMAGED", "USED", "WHY IN FULL"], rows,
                    frozenset({"START", "SIZE", "USED"}))


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


def break_lock_cmd(
    repo: RepoOption = None,
    sessions: Annotated[bool, typer.Option("--sessions", help="Also remove every backup's lease (a live "
                                           "backup then stops without committing).")] = False,
    json_out: JsonOption = False,
) -> None:
    """Remove the exclusive lease of delete/compact/repair (and takeover claims), whoever holds it.

    Not needed after a crash: a lease nobody refreshes clears itself once it expires."""
    with interrupts.deferred():   # a few deletes: each lease is gone or still there, and the status says so
        removed = break_lock(open_storage(repo_path(repo), for_writing=True), sessions=sessions)
        interrupts.set_status(f"{len(removed)} lease(s) removed" if removed else "it was not locked")
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
