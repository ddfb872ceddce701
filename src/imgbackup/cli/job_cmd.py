"""``imgbackup job run|install|uninstall|list|check|restore``: scheduled image jobs from job files."""

from __future__ import annotations

import json
import os
from typing import Annotated

import typer

from imgbackup.cli.common import JsonOption, YesOption, confirm_overwrite, emit_json, human
from imgbackup.engine.job.config import DEFAULT_CONFIG_DIR, list_jobs, load_job, load_job_file
from imgbackup.engine.job.state import DEFAULT_STATE_DIR, load_state
from imgbackup.engine.job.units import DEFAULT_UNIT_DIR, installed_units, unit_names
from imgbackup.errors import ImgBackupError

ConfigDir = Annotated[str, typer.Option("--config-dir", envvar="IMGBACKUP_CONFIG_DIR", show_envvar=True,
                                        help="Folder of the job files NAME.toml.")]
StateDir = Annotated[str, typer.Option("--state-dir", envvar="IMGBACKUP_STATE_DIR", show_envvar=True,
                                       help="Folder of the jobs' recorded state.")]
UnitDir = Annotated[str, typer.Option("--unit-dir", help="Where the systemd units go.")]
JobName = Annotated[str, typer.Argument(help="The job: its file is CONFIG_DIR/NAME.toml.")]

job_app = typer.Typer(help="Scheduled image jobs: job files, systemd units, runs.", no_args_is_help=True)


@job_app.command("run")
def run(
    name: JobName,
    config_dir: ConfigDir = DEFAULT_CONFIG_DIR,
    state_dir: StateDir = DEFAULT_STATE_DIR,
    accept_source_change: Annotated[bool, typer.Option(
        help="The source disk was replaced or re-partitioned on purpose: record its new identity and start "
             "its history with a full backup.")] = False,
    metrics_dir: Annotated[str | None, typer.Option(
        help="Write the node_exporter textfile here (instead of the job file's metrics_dir).")] = None,
    json_out: JsonOption = False,
) -> None:
    """Run a job once: backup, prune, copy, verify sample, drill when due; one summary.

    Exit 0 when every step succeeded, 15 when the backup was stored but a later step failed, else
    the failing step's own code (17: the source is not the disk the job recorded)."""
    from imgbackup.engine.job.run import run_job

    cfg = load_job(config_dir, name)
    if metrics_dir:
        cfg.metrics_dir = os.path.abspath(metrics_dir)
    summary = run_job(cfg, state_dir, accept_source_change=accept_source_change)
    doc = summary.to_dict()
    _save_last(state_dir, name, doc)
    if json_out:
        emit_json(doc)
    else:
        _print_summary(doc)
    if summary.exit_code:
        raise _failure(summary)


def _failure(summary) -> ImgBackupError:
    """The one error line of a run that did not fully succeed, with the run's exit code."""
    from imgbackup.errors import Interrupted, PartialSuccess

    failed = [s for s in summary.steps if s.status == "failed"]
    what = "; ".join(f"{s.step}: {s.error}" for s in failed) or summary.result
    if summary.exit_code == Interrupted.exit_code:
        done = [s.step for s in summary.steps if s.status == "ok"]
        return Interrupted(f"job {summary.job} interrupted ({what}); steps done: {', '.join(done) or 'none'}"
                           + (f"; image {summary.image[:12]} was stored" if summary.image else ""))
    if summary.exit_code == PartialSuccess.exit_code:
        return PartialSuccess(f"job {summary.job}: image {summary.image[:12]} stored, but {what}")
    err = ImgBackupError(f"job {summary.job} failed: {what}")
    err.exit_code = summary.exit_code
    return err


def _save_last(state_dir: str, name: str, doc: dict) -> None:
    """The whole summary of the last run beside the state (``NAME.last.json``), for a look afterwards."""
    path = os.path.join(state_dir, f"{name}.last.json")
    try:
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(doc, f, indent=1, sort_keys=True, default=str)
        os.replace(tmp, path)
    except OSError as exc:
        typer.echo(f"imgbackup: warning: cannot write {path}: {exc.strerror}", err=True)


def _print_summary(doc: dict) -> None:
    typer.echo(f"job {doc['job']}: {doc['result']} (exit {doc['exit_code']}) in {doc['duration_s']:.1f} s"
               + (f", image {doc['image'][:12]}" if doc.get("image") else ""))
    for step in doc["steps"]:
        detail = step.get("error") or step.get("note") or ""
        typer.echo(f"  {step['step']:<7} {step['status']:<8} {detail}")
    for warning in doc.get("warnings", []):
        typer.echo(f"imgbackup: warning: {warning}", err=True)


@job_app.command("install")
def install(
    name: JobName,
    unit_dir: UnitDir = DEFAULT_UNIT_DIR,
    config_dir: ConfigDir = DEFAULT_CONFIG_DIR,
    state_dir: StateDir = DEFAULT_STATE_DIR,
    enable: Annotated[bool, typer.Option(help="Enable and start the timer (when systemd runs here).")] = True,
    json_out: JsonOption = False,
) -> None:
    """Write the job's systemd .service and .timer (checked with systemd-analyze verify)."""
    from imgbackup.engine.job.install import install_job
    from imgbackup.engine.job.units import imgbackup_command

    cfg = load_job(config_dir, name)
    result = install_job(cfg, imgbackup_command(), os.path.abspath(config_dir), os.path.abspath(state_dir),
                         unit_dir, enable)
    if json_out:
        emit_json(result.__dict__)
        return
    typer.echo(f"installed job {name}: {', '.join(result.units)}; next run {result.next_elapse or '?'}")
    for note in result.notes:
        typer.echo(f"  {note}")


@job_app.command("uninstall")
def uninstall(name: JobName, unit_dir: UnitDir = DEFAULT_UNIT_DIR, json_out: JsonOption = False) -> None:
    """Stop the job's timer and remove its units (the job file, state and images stay)."""
    from imgbackup.engine.job.install import uninstall_job

    removed = uninstall_job(name, unit_dir)
    if json_out:
        emit_json({"job": name, "removed": removed})
    elif removed:
        typer.echo(f"removed {', '.join(removed)}")
    else:
        typer.echo(f"job {name} has no units in {unit_dir}")


@job_app.command("list")
def list_cmd(
    config_dir: ConfigDir = DEFAULT_CONFIG_DIR,
    state_dir: StateDir = DEFAULT_STATE_DIR,
    unit_dir: UnitDir = DEFAULT_UNIT_DIR,
    json_out: JsonOption = False,
) -> None:
    """The job files, whether each is valid and installed, and its last run."""
    units = installed_units(unit_dir)
    rows = []
    for name in sorted(set(list_jobs(config_dir)) | set(units)):
        row: dict = {"job": name, "units": units.get(name, []), "installed": bool(units.get(name))}
        try:
            cfg = load_job(config_dir, name)
            row.update(valid=True, source=cfg.source, repository=cfg.repository, schedule=cfg.schedule,
                       rpo=cfg.rpo_text)
        except ImgBackupError as exc:
            row.update(valid=False, error=str(exc))
        try:
            row["last_run"] = load_state(state_dir, name).last_run
        except ImgBackupError as exc:
            row["state_error"] = str(exc)
        rows.append(row)
    if json_out:
        emit_json({"jobs": rows})
        return
    for row in rows:
        last = row.get("last_run")
        run_text = f"last run exit {last['exit_code']} ({last['result']})" if last else "never run"
        if not row.get("valid", False):
            typer.echo(f"{row['job']:<20} INVALID: {row.get('error', 'no job file')}")
            continue
        typer.echo(f"{row['job']:<20} {row['schedule']:<18} {'installed' if row['installed'] else 'not installed':<14}"
                   f" {run_text}  {row['source']} -> {row['repository']}")


@job_app.command("check")
def check(
    name: Annotated[str, typer.Argument(help="A job name, or the path of a job file.")],
    config_dir: ConfigDir = DEFAULT_CONFIG_DIR,
    json_out: JsonOption = False,
) -> None:
    """Check a job file completely (keys, values, schedule) and where its source is today."""
    from dataclasses import asdict

    from imgbackup.device.stable import resolve_source
    from imgbackup.engine.job.install import check_schedule

    cfg = load_job_file(name) if name.endswith(".toml") else load_job(config_dir, name)
    doc = {"job": cfg.name, "file": cfg.path, "config": asdict(cfg), "next_run": check_schedule(cfg),
           "units": list(unit_names(cfg.name))}
    try:
        resolved = resolve_source(cfg.source)
        doc["source_now"] = {"path": resolved.path, "kind": resolved.kind}
    except ImgBackupError as exc:
        doc["source_now"] = {"error": str(exc)}
    if json_out:
        emit_json(doc)
        return
    typer.echo(f"{cfg.path}: valid; next run {doc['next_run'] or '?'}")
    now = doc["source_now"]
    typer.echo(f"  source {cfg.source}: " + (now.get("path") or f"not found: {now.get('error')}"))


@job_app.command("restore")
def restore(
    name: JobName,
    image: Annotated[str, typer.Argument(help="Image id prefix, or 'latest'.")] = "latest",
    config_dir: ConfigDir = DEFAULT_CONFIG_DIR,
    state_dir: StateDir = DEFAULT_STATE_DIR,
    delta: Annotated[bool, typer.Option(help="Write only the chunks that differ from the disk's content.")]
    = False,
    dry_run: Annotated[bool, typer.Option(help="Show what would happen, write nothing.")] = False,
    yes: YesOption = False,
    json_out: JsonOption = False,
) -> None:
    """Restore a job's image onto the job's own source, refused (17) if it is not the same disk."""
    from dataclasses import asdict

    from imgbackup.engine.job.restore import plan_job_restore
    from imgbackup.engine.job.run import read_passphrase_file
    from imgbackup.engine.job.steps import open_repository
    from imgbackup.engine.restore.run import run_disk_restore

    cfg = load_job(config_dir, name)
    repo = open_repository(cfg.repository, read_passphrase_file(cfg.passphrase_file))
    image_id = repo.images.resolve(image, cfg.image_name)
    plan, resolved = plan_job_restore(repo, cfg, load_state(state_dir, name), image_id, delta)
    if dry_run:
        emit_json(plan.to_dict()) if json_out else typer.echo(
            f"would restore image {image_id[:12]} onto {plan.target.description}; nothing written")
        return
    confirm_overwrite(plan.target.description, resolved.path, yes)
    result = run_disk_restore(repo, plan)
    if json_out:
        emit_json(asdict(result))
    else:
        typer.echo(f"restored image {image_id[:12]} onto {resolved.path}: wrote {human(result.bytes_written)}, "
                   f"{result.duration_s:.1f} s")


def register(app: typer.Typer) -> None:
    app.add_typer(job_app, name="job")
