"""``status``: per job (or per source of a repository) the newest image, the RPO state, the last
verify and drill, and the repository's size.

RPO states, with ``age`` = now − creation time of the source's newest image:

- ``OK``: age ≤ RPO;
- ``LATE``: RPO < age ≤ 2 × RPO — the RPO is breached by less than one more RPO: the backup that was
  due has not happened yet (the machine was off, the timer's random delay, a run still going);
- ``MISSED``: age > 2 × RPO — at least one whole RPO window passed without any backup.

``late_by`` = age − RPO (0 when OK). A source without any image is measured from when its job was
installed or first ran (so a new job is OK until its RPO has passed); with neither known it is
MISSED with an unknown age. Both LATE and MISSED are breaches: ``status`` exits 16.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from imgbackup.engine.job.config import JobConfig
from imgbackup.engine.job.state import JobState
from imgbackup.engine.stats import repository_stats
from imgbackup.errors import ImgBackupError
from imgbackup.repository.records import latest_record
from imgbackup.repository.repo import Repository
from imgbackup.repository.storage import object_sizes

OK, LATE, MISSED = "OK", "LATE", "MISSED"


@dataclass
class RpoStatus:
    target_s: float | None
    state: str | None           # OK | LATE | MISSED; None without an RPO target
    age_s: float | None
    late_by_s: float | None

    @property
    def breached(self) -> bool:
        return self.state in (LATE, MISSED)


def rpo_state(target: float | None, last_image: float | None, since: float | None, now: float) -> RpoStatus:
    """The RPO state (module docstring) for a newest image at ``last_image`` (None: none yet)."""
    reference = last_image if last_image is not None else since
    age = None if reference is None else max(0.0, now - reference)
    if target is None:
        return RpoStatus(None, None, age, None)
    if age is None:
        return RpoStatus(target, MISSED, None, None)
    state = OK if age <= target else (LATE if age <= 2 * target else MISSED)
    return RpoStatus(target, state, round(age, 3), round(max(0.0, age - target), 3))


@dataclass
class SourceStatus:
    name: str
    job: str | None = None
    source: str | None = None
    repository: str | None = None
    repository_id: str | None = None
    last_image: dict | None = None
    rpo: RpoStatus = field(default_factory=lambda: RpoStatus(None, None, None, None))
    last_verify: dict | None = None
    last_drill: dict | None = None
    last_run: dict | None = None
    repository_bytes: int | None = None
    reclaimable_bytes: int | None = None
    errors: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        doc = asdict(self)
        doc["rpo"]["breached"] = self.rpo.breached
        return doc


def repository_size(repo: Repository, errors: list[str] | None = None) -> tuple[int, int | None]:
    """(bytes the repository's objects take, bytes 'imgbackup compact' would free) from
    ``repository_stats``; when that cannot be worked out (a damaged index), the objects' total and None,
    with the reason in ``errors``."""
    try:
        stats = repository_stats(repo)
        return stats.repository_bytes, stats.reclaimable_bytes
    except ImgBackupError as exc:
        if errors is not None:
            errors.append(f"reclaimable bytes not known: {exc}")
    return sum(object_sizes(repo.storage, "").values()), None


def _record_doc(record, now: float) -> dict:
    doc = {"time": record.time, "age_s": round(now - record.time, 3), "ok": record.ok, "images": record.images,
           "host": record.host}
    for key in ("sample_percent", "chunks_checked", "bad_chunks", "filesystems", "rto_s", "errors"):
        if key in record.data:
            doc[key] = record.data[key]
    if "steps" in record.data:
        doc["steps"] = [{"step": s.get("step"), "ok": s.get("ok"), "error": s.get("error")}
                        for s in record.data["steps"] if isinstance(s, dict)]
    return doc


def source_status(repo: Repository, name: str, rpo: float | None, now: float, since: float | None = None,
                  sizes: dict | None = None) -> SourceStatus:
    """What the repository says about one source name (``sizes`` caches repository_size per repository)."""
    st = SourceStatus(name, repository=repo.location, repository_id=repo.config.id)
    images = [e.meta for e in repo.images.entries() if e.meta and e.meta.get("name") == name]
    if images:
        m = images[-1]
        st.last_image = {"id": m["id"], "created": m["created"], "age_s": round(now - m["created"], 3),
                         "type": m.get("type"), "images": len(images)}
    st.rpo = rpo_state(rpo, images[-1]["created"] if images else None, since, now)
    errors: list[str] = []
    verify = latest_record(repo, "verify", name, errors)
    drill = latest_record(repo, "drill", name, errors)
    st.last_verify = _record_doc(verify, now) if verify else None
    st.last_drill = _record_doc(drill, now) if drill else None
    st.errors += errors
    key = repo.config.id
    if sizes is None or key not in sizes:
        value = repository_size(repo, st.errors)
        if sizes is not None:
            sizes[key] = value
    else:
        value = sizes[key]
    st.repository_bytes, st.reclaimable_bytes = value
    return st


def job_status(cfg: JobConfig, state: JobState, repo: Repository | None, now: float,
               open_error: str | None = None, sizes: dict | None = None) -> SourceStatus:
    """A job's status; without its repository (``open_error``) from the job's own state."""
    since = min((t for t in (state.installed, state.first_run) if t is not None), default=None)
    if repo is not None:
        try:
            st = source_status(repo, cfg.image_name, cfg.rpo, now, since, sizes)
        except ImgBackupError as exc:
            st, open_error = SourceStatus(cfg.image_name), str(exc)
    else:
        st = SourceStatus(cfg.image_name)
    if repo is None or open_error:
        last = (state.last_success or {}).get("time")
        st.rpo = rpo_state(cfg.rpo, last, since, now)
        if state.last_success:
            st.last_image = {"id": state.last_success.get("image"), "created": last,
                             "age_s": round(now - last, 3) if last else None, "from": "job state"}
        st.errors.append(f"repository not read: {open_error}" if open_error else "repository not read")
    st.job, st.source, st.repository = cfg.name, cfg.source, cfg.repository
    st.last_run = state.last_run
    return st
