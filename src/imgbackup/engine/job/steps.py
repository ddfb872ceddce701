"""The steps of ``job run``, each a call into the engine that does the work.

``run.py`` orders them and turns their errors into the summary; here each step only does its
work and returns what the summary shows.
"""

from __future__ import annotations

import importlib.util
import random
from collections.abc import Callable
from dataclasses import asdict

from imgbackup import audit
from imgbackup.device.stable import ResolvedSource, fingerprint_differences
from imgbackup.engine.backup.run import BackupRequest, run_backup
from imgbackup.engine.drill.run import DrillRequest, run_drill
from imgbackup.engine.job.config import JobConfig
from imgbackup.engine.job.periods import is_due
from imgbackup.engine.verify.chunks import run_verify
from imgbackup.engine.verify.record import record_verify
from imgbackup.errors import ImgBackupError, SourceIdentityChanged, UsageError, VerificationFailed
from imgbackup.repository.records import latest_record
from imgbackup.repository.repo import Repository


class DrillFailed(VerificationFailed):
    """A scheduled drill ran and found the image does not restore (or boot) as it should."""


def open_repository(location: str, passphrase: Callable[[], bytes], for_writing: bool = True) -> Repository:
    """The job's repository (a path, file:// or s3:// URL); a job writes, so S3 servers are probed."""
    return Repository.open(location, passphrase, for_writing=for_writing)


def _images_of(repo: Repository, name: str) -> list[dict]:
    """Readable images of one source name, oldest first (their header metadata)."""
    return [e.meta for e in repo.images.entries() if e.meta and e.meta.get("name") == name]


def check_history(repo: Repository, cfg: JobConfig, current: dict) -> None:
    """Without a recorded identity (a new state directory), the repository's own history decides:
    the newest image this job made names the disk it came from."""
    for meta in reversed(_images_of(repo, cfg.image_name)):
        recorded = meta.get("source_fingerprint")
        if not isinstance(recorded, dict):
            continue
        differences = fingerprint_differences(recorded, current)
        if differences:
            audit.emit("source_refused", "refused", job=cfg.name, name=cfg.image_name, source=cfg.source,
                       image=meta["id"], differences="; ".join(differences))
            raise SourceIdentityChanged(
                f"job {cfg.name}: {cfg.source} is not the disk image {meta['id'][:12]} of {cfg.image_name!r} "
                "came from: " + "; ".join(differences),
                f"if that is on purpose, run 'imgbackup job run {cfg.name} --accept-source-change' once")
        return


def backup_type(repo: Repository, cfg: JobConfig, now: float) -> str:
    """``full`` when the policy says one is due, else the job's type (the first backup is full anyway)."""
    images = _images_of(repo, cfg.image_name)
    if not images:
        return "auto"
    fulls = [m for m in images if m.get("type") == "full"]
    if is_due(cfg.full, fulls[-1]["created"] if fulls else None, now, cfg.tz):
        return "full"
    if cfg.backup_type == "differential" and not fulls:
        return "full"
    return cfg.backup_type


def backup(repo: Repository, cfg: JobConfig, source: ResolvedSource, btype: str, fp: dict) -> dict:
    result = run_backup(repo, BackupRequest(
        source.path, cfg.image_name, btype, cfg.allow_mounted, all_blocks=cfg.all_blocks, snapshot=cfg.snapshot,
        extra_meta={"job": cfg.name, "source_spec": cfg.source, "source_fingerprint": fp}))
    return asdict(result)


def has_engine(module: str) -> bool:
    """Whether this build has the engine module (prune and copy arrive from their own issues): a
    missing one makes its step fail as "not available", a present one is called as below."""
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:     # its package is missing too
        return False


PRUNE_ENGINE, COPY_ENGINE = "imgbackup.engine.prune", "imgbackup.engine.copy.run"


def prune(repo: Repository, cfg: JobConfig) -> dict:
    """``imgbackup prune`` with the job's [retention] rules, for this job's source name only."""
    if not has_engine(PRUNE_ENGINE):
        raise UsageError("[retention] needs 'imgbackup prune' (issue 14), which this imgbackup does not have yet",
                         "remove [retention] from the job file, or update imgbackup")
    from imgbackup.engine.prune import run_prune
    from imgbackup.engine.retention import RetentionPolicy

    result = run_prune(repo, RetentionPolicy.from_mapping(cfg.prune_policy()), name=cfg.image_name)
    return {"removed": result.removed, "kept": len(result.images) - len(result.removed),
            "bytes_freed": result.bytes_freed, "warnings": result.warnings}


def copy(repo: Repository, cfg: JobConfig, passphrase_of: Callable[[str | None], Callable[[], bytes]],
         out: dict) -> None:
    """``imgbackup copy --name NAME --to TARGET`` for each ``copy_to`` target: every image of the job's
    source the target lacks (images already there are skipped by id), so a run after a missed copy
    catches up. Every target is tried, each one's outcome put into ``out["targets"]``; the first
    failure is raised after the others ran."""
    if not has_engine(COPY_ENGINE):
        raise UsageError("copy_to needs 'imgbackup copy' (issue 12), which this imgbackup does not have yet",
                         "remove copy_to from the job file, or update imgbackup")
    from imgbackup.engine.copy.run import copy_images

    metas = _images_of(repo, cfg.image_name)
    out["targets"] = []
    failure: Exception | None = None
    for target in cfg.copy_to:
        doc: dict = {"repository": target.repository}
        try:
            dst = Repository.open(target.repository, passphrase_of(target.passphrase_file or cfg.passphrase_file),
                                  for_writing=True)
            result = copy_images(repo, dst, metas)
            doc.update(ok=True, copied=result.images_copied, skipped=len(result.images_skipped),
                       bytes_sent=result.bytes_sent, warnings=result.warnings)
        except ImgBackupError as exc:
            doc.update(ok=False, error=str(exc), exit_code=exc.exit_code)
            failure = failure or exc
        out["targets"].append(doc)
    if failure is not None:
        raise failure


def verify(repo: Repository, cfg: JobConfig, now: float, rng: random.Random | None = None) -> dict:
    """Authenticate every index of the job's images and ``sample_percent`` % of their chunks; the
    newest image's filesystems too when that is due. The result is kept as a check record."""
    images = _images_of(repo, cfg.image_name)
    if not images:
        return {"skipped": "no image of this job to verify"}
    report = run_verify(repo, [m["id"] for m in images], sample_percent=cfg.sample_percent, rng=rng)
    fs = None
    last_fs = latest_record(repo, "verify", cfg.image_name, where=lambda r: r.data.get("filesystems") is not None)
    if is_due(cfg.verify_filesystems, last_fs.time if last_fs else None, now, cfg.tz):
        from imgbackup.engine.verify.filesystems import check_filesystems

        fs = check_filesystems(repo, images[-1]["id"])
    records, warnings = record_verify(repo, report, fs, now)
    out = {"ok": report.ok and (fs is None or fs.ok), "sample_percent": cfg.sample_percent,
           "images": len(report.images), "chunks_checked": report.chunks_checked,
           "bytes_checked": report.bytes_checked, "bad_chunks": sum(c.bad_chunks for c in report.images),
           "filesystems": fs.to_dict() if fs else None, "record": records[0].id if records else None,
           "warnings": warnings}
    if not report.ok:
        raise VerificationFailed(f"{out['bad_chunks']} damaged chunk(s) in the images of {cfg.image_name!r}; "
                                 "run 'imgbackup verify' for details")
    if fs is not None and not fs.ok:
        raise VerificationFailed(f"filesystem check of image {fs.image[:12]} failed: "
                                 + "; ".join(f"{p.name}: {'; '.join(p.errors)}" for p in fs.partitions if not p.ok))
    return out


def drill_if_due(repo: Repository, cfg: JobConfig, image_id: str | None, now: float) -> dict | None:
    policy = cfg.drill
    last = latest_record(repo, "drill", cfg.image_name)
    if image_id is None or not is_due(policy.every, last.time if last else None, now, cfg.tz):
        return None
    req = DrillRequest(filesystems=policy.filesystems, restore_to=policy.restore_to, boot=policy.boot,
                       expect=policy.expect, timeout=policy.timeout, firmware=policy.firmware)
    return run_drill(repo, image_id, req, now).to_dict()


def write_job_metrics(cfg: JobConfig, state, repo: Repository | None, summary, now: float) -> str | None:
    """The node_exporter textfile for this job (None without ``metrics_dir``); a failure is a warning."""
    if not cfg.metrics_dir:
        return None
    from imgbackup.engine.job.metrics import write_metrics
    from imgbackup.engine.job.status import job_status
    from imgbackup.errors import ImgBackupError

    try:
        status = job_status(cfg, state, repo, now)
        run = {"exit_code": summary.exit_code, "duration_s": summary.duration_s, "finished_ts": now,
               "last_success": state.last_success}
        return write_metrics(cfg.metrics_dir, status, run)
    except (ImgBackupError, OSError) as exc:
        summary.warnings.append(f"metrics not written to {cfg.metrics_dir}: {exc}")
        return None
