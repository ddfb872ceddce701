"""Keeping what a verify found: one check record per source name (for ``status`` and metrics) and,
when something is damaged, a ``verify_failed`` audit event."""

from __future__ import annotations

from typing import TYPE_CHECKING

from imgbackup import audit
from imgbackup.engine.verify.chunks import VerifyReport
from imgbackup.errors import ImgBackupError
from imgbackup.repository.records import CheckRecord, write_record
from imgbackup.repository.repo import Repository

if TYPE_CHECKING:   # the filesystem checks load the FUSE code: only when asked for
    from imgbackup.engine.verify.filesystems import FilesystemReport


def record_verify(repo: Repository, report: VerifyReport, filesystems: FilesystemReport | None = None,
                  now: float | None = None) -> tuple[list[CheckRecord], list[str]]:
    """Write one ``verify`` record per source name the report covers; (records, warnings).

    A record that cannot be written (a read-only repository) is a warning, never a failed verify.
    """
    by_name: dict[str, list] = {}
    for check in report.images:
        by_name.setdefault(check.name or "", []).append(check)
    records, warnings = [], []
    for name, checks in by_name.items():
        fs = filesystems if filesystems and any(c.id == filesystems.image for c in checks) else None
        ok = all(c.ok for c in checks) and (fs is None or fs.ok)
        data = {"sample_percent": report.sample_percent, "chunks_checked": sum(c.checked for c in checks),
                "bad_chunks": sum(c.bad_chunks for c in checks), "duration_s": report.duration_s,
                "errors": [e for c in checks for e in c.errors][:20],
                "filesystems": None if fs is None else {"image": fs.image, "ok": fs.ok, "failed": [
                    p.name for p in fs.partitions if not p.ok]}}
        try:
            records.append(write_record(repo, "verify", name, ok, [c.id for c in checks], data, now))
        except ImgBackupError as exc:
            warnings.append(f"the verify result of {name or '?'} was not recorded: {exc}")
        if not ok:
            audit.emit("verify_failed", "failed", repository=repo.config.id, location=repo.location,
                       image=",".join(c.id for c in checks if not c.ok) or (fs.image if fs else None), name=name,
                       bad_chunks=data["bad_chunks"], filesystems_failed=(data["filesystems"] or {}).get("failed"),
                       error="; ".join(data["errors"][:3]) or "filesystem check failed")
    return records, warnings
