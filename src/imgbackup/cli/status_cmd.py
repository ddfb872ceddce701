"""``imgbackup status``: per job (or per source of one repository) RPO state, last verify and drill."""

from __future__ import annotations

import time
from typing import Annotated

import typer

from imgbackup.cli.common import JsonOption, emit_json, human, open_repo
from imgbackup.cli.job_cmd import ConfigDir, StateDir
from imgbackup.engine.job.config import DEFAULT_CONFIG_DIR, list_jobs, load_job
from imgbackup.engine.job.periods import format_duration, parse_duration
from imgbackup.engine.job.state import DEFAULT_STATE_DIR, JobState, load_state
from imgbackup.engine.job.status import SourceStatus, job_status, source_status
from imgbackup.errors import ImgBackupError, RpoBreached, UsageError


def status(
    jobs: Annotated[list[str] | None, typer.Argument(help="Jobs to show (default: every job file).")] = None,
    config_dir: ConfigDir = DEFAULT_CONFIG_DIR,
    state_dir: StateDir = DEFAULT_STATE_DIR,
    repo: Annotated[str | None, typer.Option("-r", "--repo", help="Instead of jobs: every source name in this "
                                             "repository.")] = None,
    rpo: Annotated[str | None, typer.Option(help="With --repo: the RPO to judge each source by (e.g. 24h).")]
    = None,
    json_out: JsonOption = False,
) -> None:
    """Each job's newest image and its age, RPO state (OK, LATE, MISSED), last verify, last drill and
    its RTO, repository size. Exit 16 when any RPO is breached (LATE or MISSED)."""
    now = time.time()
    if repo:
        rows = _repository_rows(repo, rpo, now)
    else:
        if rpo:
            raise UsageError("--rpo goes with --repo; a job's RPO is in its job file")
        rows = _job_rows(jobs or list_jobs(config_dir), config_dir, state_dir, now)
    breached = [r for r in rows if r.rpo.breached]
    if json_out:
        emit_json({"time": now, "breached": len(breached), "sources": [r.to_dict() for r in rows]})
    else:
        _print(rows)
    if breached:
        raise RpoBreached(f"{len(breached)} RPO(s) breached: " + ", ".join(
            f"{r.job or r.name} {r.rpo.state}" + (f" by {format_duration(r.rpo.late_by_s)}"
                                                   if r.rpo.late_by_s is not None else "") for r in breached))


def _repository_rows(location: str, rpo: str | None, now: float) -> list[SourceStatus]:
    try:
        target = parse_duration(rpo) if rpo else None
    except ValueError as exc:
        raise UsageError(f"--rpo: {exc}") from None
    r = open_repo(location)
    names = sorted({e.meta.get("name") for e in r.images.entries() if e.meta and e.meta.get("name")})
    sizes: dict = {}
    return [source_status(r, name, target, now, sizes=sizes) for name in names]


def _job_rows(names: list[str], config_dir: str, state_dir: str, now: float) -> list[SourceStatus]:
    from imgbackup.engine.job.run import read_passphrase_file
    from imgbackup.engine.job.steps import open_repository

    rows, repos, sizes = [], {}, {}
    for name in names:
        cfg = load_job(config_dir, name)
        try:
            state = load_state(state_dir, name)
        except ImgBackupError as exc:
            state = JobState()
            state_error = str(exc)
        else:
            state_error = None
        repo, error = repos.get(cfg.repository, (None, None))
        if repo is None and error is None:
            try:
                repo = open_repository(cfg.repository, read_passphrase_file(cfg.passphrase_file), for_writing=False)
            except ImgBackupError as exc:
                error = str(exc)
            repos[cfg.repository] = (repo, error)
        row = job_status(cfg, state, repo, now, error, sizes)
        if state_error:
            row.errors.append(state_error)
        rows.append(row)
    return rows


def _age(seconds: float | None) -> str:
    return "-" if seconds is None else format_duration(seconds) + " ago"


def _print(rows: list[SourceStatus]) -> None:
    if not rows:
        typer.echo("no jobs")
    for r in rows:
        state = r.rpo.state or "-"
        if r.rpo.late_by_s:
            state += f" (late by {format_duration(r.rpo.late_by_s)})"
        last = r.last_image
        typer.echo(f"{r.job or r.name}: RPO {format_duration(r.rpo.target_s) if r.rpo.target_s else '-'} {state}")
        typer.echo(f"  last image   {last['id'][:12] + ' ' + _age(last.get('age_s')) if last else 'none'}")
        v, d = r.last_verify, r.last_drill
        typer.echo(f"  last verify  {('ok' if v['ok'] else 'FAILED') + ' ' + _age(v['age_s']) if v else 'never'}")
        typer.echo(f"  last drill   {('ok' if d['ok'] else 'FAILED') + ' ' + _age(d['age_s']) if d else 'never'}"
                   + (f", RTO {d['rto_s']:.1f} s" if d and d.get("rto_s") is not None else ""))
        if r.repository_bytes is not None:
            reclaim = f", {human(r.reclaimable_bytes)} reclaimable" if r.reclaimable_bytes is not None else ""
            typer.echo(f"  repository   {r.repository}: {human(r.repository_bytes)}{reclaim}")
        if r.last_run:
            typer.echo(f"  last run     exit {r.last_run['exit_code']} ({r.last_run['result']})"
                       + (f": {r.last_run['error']}" if r.last_run.get("error") else ""))
        for error in r.errors:
            typer.echo(f"  error        {error}")


def register(app: typer.Typer) -> None:
    app.command("status")(status)
