"""``imgbackup verify [IMAGE]``."""

from __future__ import annotations

from typing import Annotated

import typer

from imgbackup import audit
from imgbackup.cli.common import JsonOption, NameOption, ProgressBar, RepoOption, emit_json, human, open_repo
from imgbackup.engine.verify.chunks import run_verify
from imgbackup.engine.verify.record import record_verify
from imgbackup.errors import UsageError, VerificationFailed


def verify(
    image: Annotated[str | None, typer.Argument(help="Image id prefix or 'latest'; default: all images.")] = None,
    repo: RepoOption = None,
    name: NameOption = None,
    json_out: JsonOption = False,
    filesystems: Annotated[bool, typer.Option("--filesystems", help="Also run each partition's filesystem "
                                              "checker on the mounted image and count its files.")] = False,
    boot: Annotated[bool, typer.Option("--boot", help="Boot the image read-only in QEMU (TCG) and wait for "
                                       "--expect on the serial console; exit 11 if it does not boot.")] = False,
    expect: Annotated[str | None, typer.Option(help="Text the booted system prints on the serial console.")]
    = None,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for --expect.")] = 120,
    firmware: Annotated[str, typer.Option(help="bios or uefi (OVMF).")] = "bios",
    sample: Annotated[float, typer.Option(help="Read only this percentage of each image's chunks, chosen at "
                                          "random anew each run (indexes are always read whole).")] = 100.0,
    accept_rollback: Annotated[bool, typer.Option(
        "--accept-rollback", help="Take the repository's catalog as it is now as the newest seen (after "
                                  "restoring the repository from an older copy on purpose).")] = False,
) -> None:
    """Read and authenticate every chunk an image references (or all images). Without IMAGE also check
    the catalog log (missing, unrecorded images; a rollback) and, on an Object-Lock bucket, that the
    server still enforces the lock (a probe)."""
    r = open_repo(repo, needs_full_key="verify images (that reads their data)")
    if boot:
        _verify_boot(r, image, name, expect, timeout, firmware, json_out)
        return
    if filesystems and not image:
        raise UsageError("--filesystems needs an IMAGE (an id prefix or 'latest')")
    if not 0 < sample <= 100:
        raise UsageError("--sample must be a percentage above 0 and at most 100")
    ids = [r.images.resolve(image, name)] if image else None
    bar = ProgressBar("verify", not json_out)
    try:
        report = run_verify(r, ids, progress=bar.update, progress_total=bar.start, sample_percent=sample)
    finally:
        bar.close()
    fs = _check_filesystems(r, ids[0]) if filesystems else None
    report.warnings.extend(r.access_warnings())
    records, warnings = record_verify(r, report, fs)
    for warning in report.warnings + warnings:
        typer.echo(f"imgbackup: warning: {warning}", err=True)
    catalog, probe = (None, None) if image else _check_catalog(r, accept_rollback)
    if json_out:
        emit_json(report.to_dict() | ({"filesystems": fs.to_dict()} if fs else {})
                  | {"records": [rec.id for rec in records]}
                  | ({"catalog": catalog.to_dict(), "lock_probe": probe} if catalog else {}))
    else:
        for check in report.images:
            state = "ok" if check.ok else f"DAMAGED ({check.bad_chunks} bad chunks)"
            checked = f"{check.checked} of {check.chunks}" if check.checked < check.chunks else str(check.chunks)
            typer.echo(f"{check.id[:12]}  {check.name or '?':<20} {checked} chunks  {state}")
            if check.bad_ranges:
                typer.echo(f"    warning: made with --rescue: {sum(n for _, n in check.bad_ranges)} bytes of the source "
                           f"were unreadable ({len(check.bad_ranges)} ranges), stored as zeros")
            for err in check.errors[:10]:
                typer.echo(f"    {err}")
            if len(check.errors) > 10:
                typer.echo(f"    ... and {len(check.errors) - 10} more (--json lists up to 50)")
        typer.echo(f"checked {report.chunks_checked} chunks, {human(report.bytes_checked)}")
        if report.copies_recorded:
            typer.echo(f"recorded {report.copies_recorded} damaged or missing chunk copies: no backup uses them "
                       "again, and the next backup of a source that still holds their content stores them anew; "
                       "'imgbackup repair' shows which byte ranges of which images they affect")
        if fs:
            _print_filesystems(fs)
        if catalog:
            _print_catalog(catalog, probe)
    if not report.ok:
        raise VerificationFailed(f"{sum(not c.ok for c in report.images)} image(s) damaged")
    if catalog and not catalog.ok:
        raise VerificationFailed(f"the catalog check found {len(catalog.problems)} problem(s): {catalog.problems[0]}")
    if probe is not None and not probe["passed"]:
        raise VerificationFailed("the S3 server no longer enforces Object Lock (the lock probe failed): "
                                 "the backups are not immutable")
    if fs and not fs.ok:
        raise VerificationFailed(f"{sum(not p.ok for p in fs.partitions)} filesystem check(s) failed")


def _verify_boot(r, image: str | None, name: str | None, expect: str | None, timeout: float, firmware: str,
                 json_out: bool) -> None:
    from imgbackup.engine.verify.boot import boot_verify

    if not image or not expect:
        raise UsageError("--boot needs an IMAGE and --expect TEXT")
    if firmware not in ("bios", "uefi"):
        raise UsageError("--firmware must be bios or uefi")
    result = boot_verify(r, r.images.resolve(image, name), expect, timeout, firmware)
    if json_out:
        emit_json(result.to_dict())
    else:
        state = "booted" if result.booted else f"NOT booted ({result.reason})"
        typer.echo(f"{result.image[:12]}: {state} after {result.seconds:.1f} s ({firmware})")
        typer.echo("console tail:\n" + "\n".join(result.console_tail.splitlines()[-20:]))
    if not result.booted:
        audit.emit("verify_failed", "failed", repository=r.config.id, location=r.location, image=result.image,
                   check="boot", error=f"did not boot: {result.reason}")
        raise VerificationFailed(f"image {result.image[:12]} did not boot: {result.reason}")


def _check_catalog(r, accept_rollback: bool):
    from imgbackup.engine.objectlock import run_probe
    from imgbackup.engine.verify.catalog import check_catalog

    probe = run_probe(r)
    return check_catalog(r, accept_rollback), probe


def _print_catalog(catalog, probe: dict | None) -> None:
    typer.echo(f"catalog: {catalog.entries} entries, {catalog.entries_read} read now; "
               + ("ok" if catalog.ok else f"{len(catalog.problems)} PROBLEM(S)"))
    for problem in catalog.problems:
        typer.echo(f"    PROBLEM: {problem}")
    for note in catalog.notes:
        typer.echo(f"    note: {note}")
    if catalog.interrupted_backups:
        typer.echo(f"    note: {catalog.interrupted_backups} backup(s) were interrupted before storing their image")
    if probe is not None:
        failed = [k for k, ok in probe["checks"].items() if not ok]
        typer.echo("S3 Object Lock probe: " + ("passed (the server enforces retention and legal holds)" if probe["passed"]
                                               else f"FAILED ({', '.join(failed)})"))


def _check_filesystems(r, image_id: str):
    from imgbackup.engine.verify.filesystems import check_filesystems

    return check_filesystems(r, image_id)


def _print_filesystems(fs) -> None:
    for p in fs.partitions:
        counted = f", {p.files} files, {p.directories} directories" if p.files is not None else ""
        state = "ok" if p.ok else "FAILED: " + "; ".join(p.errors)
        typer.echo(f"  {p.name}: {p.fstype or '-'}{counted}  {state}{'  (' + p.note + ')' if p.note else ''}")


def register(app: typer.Typer) -> None:
    app.command("verify")(verify)
