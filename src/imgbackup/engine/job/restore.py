"""``job restore``: a job's image back onto the job's own source — only if it is still the same disk.

The disk is checked against the identity the job recorded (or, without job state, the one the
image records): kind, size, model, serial, WWN, loop backing file. The partition table and
filesystem ids are not compared here: they are the content being replaced, and a damaged or
encrypted-by-ransomware disk may have lost them. A different disk under the job's name is
refused (exit 17); restoring onto another disk is what plain ``imgbackup restore`` is for.
"""

from __future__ import annotations

from imgbackup.device.stable import ResolvedSource, fingerprint, fingerprint_differences, resolve_source
from imgbackup.engine.job.config import JobConfig
from imgbackup.engine.job.state import JobState
from imgbackup.engine.restore.plan import DiskPlan, plan_disk_restore
from imgbackup.errors import SourceIdentityChanged
from imgbackup.repository.repo import Repository

HARDWARE = ("kind", "size", "model", "serial", "wwn", "backing_file")


def plan_job_restore(repo: Repository, cfg: JobConfig, state: JobState, image_id: str,
                     delta: bool = False) -> tuple[DiskPlan, ResolvedSource]:
    resolved = resolve_source(cfg.source)
    meta = repo.images.read_meta(image_id)
    recorded = state.identity or meta.get("source_fingerprint")
    if not isinstance(recorded, dict):
        raise SourceIdentityChanged(f"job {cfg.name} has no recorded identity of {cfg.source} to check the disk "
                                    "against", "restore with 'imgbackup restore IMAGE TARGET' after checking "
                                    "the target by hand")
    current = fingerprint(resolved.path)
    differences = fingerprint_differences({k: recorded.get(k) for k in HARDWARE}, current)
    if differences:
        from imgbackup import audit

        audit.emit("source_refused", "refused", job=cfg.name, name=cfg.image_name, source=cfg.source,
                   device=resolved.path, image=image_id, differences="; ".join(differences))
        raise SourceIdentityChanged(
            f"refusing to restore over {cfg.source} ({resolved.path}): it is not the disk job {cfg.name} backs "
            "up: " + "; ".join(differences), "to restore onto another disk use 'imgbackup restore IMAGE TARGET'")
    return plan_disk_restore(repo, image_id, resolved.path, delta=delta), resolved
