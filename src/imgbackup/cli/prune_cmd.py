"""``imgbackup prune``: keep what a retention policy says, remove the rest (README "Retention")."""

from __future__ import annotations

from typing import Annotated

import typer

from imgbackup.cli.common import JsonOption, LockWaitOption, RepoOption, emit_json, human, open_repo
from imgbackup.errors import UsageError

Span = Annotated[str | None, typer.Option(metavar="DURATION", show_default=False)]


def prune(
    repo: RepoOption = None,
    keep_last: Annotated[str | None, typer.Option(metavar="N", help="Keep the N newest images.")] = None,
    keep_hourly: Annotated[str | None, typer.Option(metavar="N", help="Keep the newest image of each of the last "
                                                    "N hours that have one ('unlimited': every hour).")] = None,
    keep_daily: Annotated[str | None, typer.Option(metavar="N", help="… of each of the last N days.")] = None,
    keep_weekly: Annotated[str | None, typer.Option(metavar="N", help="… of each of the last N ISO weeks.")] = None,
    keep_monthly: Annotated[str | None, typer.Option(metavar="N", help="… of each of the last N months.")] = None,
    keep_yearly: Annotated[str | None, typer.Option(metavar="N", help="… of each of the last N years.")] = None,
    keep_within: Annotated[str | None, typer.Option(
        metavar="DURATION", help="Keep every image newer than the newest minus DURATION (1y2m3d4h: years, months, "
                                 "days, hours).")] = None,
    keep_within_hourly: Span = None,
    keep_within_daily: Span = None,
    keep_within_weekly: Span = None,
    keep_within_monthly: Span = None,
    keep_within_yearly: Span = None,
    timezone: Annotated[str | None, typer.Option(
        help="IANA time zone of the hour/day/week/month/year boundaries (default: this machine's).")] = None,
    name: Annotated[str | None, typer.Option(help="Only the images of this source name.")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Show every image, keep or remove and why, and the "
                                          "bytes a real run frees; change nothing.")] = False,
    lock_wait: LockWaitOption = 0.0,
    json_out: JsonOption = False,
) -> None:
    """Apply a retention policy to each source's images: keep what a rule (or a hold) keeps, remove the
    rest and every chunk only they needed. The --keep-within-hourly/daily/weekly/monthly/yearly DURATION
    options keep one image per hour/day/… among the images newer than the newest minus DURATION."""
    from imgbackup.engine.prune import run_prune
    from imgbackup.engine.retention import RetentionPolicy

    rules = {"keep_last": keep_last, "keep_hourly": keep_hourly, "keep_daily": keep_daily, "keep_weekly": keep_weekly,
             "keep_monthly": keep_monthly, "keep_yearly": keep_yearly, "keep_within": keep_within,
             "keep_within_hourly": keep_within_hourly, "keep_within_daily": keep_within_daily,
             "keep_within_weekly": keep_within_weekly, "keep_within_monthly": keep_within_monthly,
             "keep_within_yearly": keep_within_yearly, "timezone": timezone}
    policy = RetentionPolicy.from_mapping({k: v for k, v in rules.items() if v is not None})
    if policy.empty:
        raise UsageError("prune needs a retention policy: it would keep nothing",
                         "give at least one --keep-… option (e.g. --keep-daily 7 --keep-weekly 4)")
    result = run_prune(open_repo(repo, for_writing=not dry_run, needs_full_key="prune images"), policy, name,
                       dry_run, lock_wait)
    for warning in result.warnings:
        typer.echo(f"imgbackup: warning: {warning}", err=True)
    if json_out:
        emit_json(result.to_dict())
        return
    typer.echo(f"policy: {policy.describe()} (time zone {result.timezone})")
    group = object()
    for image in result.images:
        if image.name != group:
            group = image.name
            typer.echo(f"source {image.name}:" if image.name is not None else "images whose index cannot be read:")
        typer.echo(f"  {image.action:<6}  {image.id[:12]}  {image.time or '?':<25}  {image.type or '?':<12}  "
                   f"{', '.join(image.reasons)}")
    removing = sum(not i.keep for i in result.images)
    if dry_run:
        typer.echo(f"would remove {removing} of {len(result.images)} image(s) and free {human(result.bytes_freed)}; "
                   "nothing was changed (dry run)")
    else:
        typer.echo(f"removed {removing - len(result.retained)} of {len(result.images)} image(s), freed "
                   f"{human(result.bytes_freed)}" + (f"; {len(result.retained)} retained by S3 Object Lock until their "
                                                     "lock date" if result.retained else ""))


def register(app: typer.Typer) -> None:
    app.command("prune")(prune)
