"""``job run``: source check → backup → prune → copy → verify sample → drill when due, one summary.

Exit code (``JobSummary.exit_code``): 0 when every step that ran succeeded; 15 (partial success)
when the backup was stored but a later step failed; otherwise the failing step's own code (a
refused source identity 17, a locked repository 5, a wrong passphrase 4…); 130 when interrupted.
After a failed backup no later step runs: prune, copy and verify act on the job's history, and a
history that just failed to grow is no time to remove from it. Whatever happens, the summary is
written to the job's state, the metrics file is rewritten and the audit trail has its events.
"""

from __future__ import annotations

import datetime
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from imgbackup import audit
from imgbackup.device.stable import ResolvedSource, fingerprint, fingerprint_differences, resolve_source
from imgbackup.engine.job import steps
from imgbackup.engine.job.config import JobConfig
from imgbackup.engine.job.inhibit import sleep_inhibited
from imgbackup.engine.job.state import JobState, job_lock, load_state, save_state
from imgbackup.engine.passphrase import passphrase_file_source
from imgbackup.errors import ImgBackupError, Interrupted, SourceIdentityChanged
from imgbackup.repository.repo import Repository

PARTIAL = 15
STEP_ORDER = ("source", "backup", "prune", "copy", "verify", "drill")


@dataclass
class StepResult:
    step: str
    status: str                 # ok | failed | skipped | not_run
    duration_s: float = 0.0
    exit_code: int = 0
    error: str | None = None
    note: str | None = None
    result: dict = field(default_factory=dict)


@dataclass
class JobSummary:
    job: str
    job_file: str
    source: str
    repository: str
    started: str
    device: str | None = None
    repository_id: str | None = None
    image: str | None = None
    finished: str | None = None
    duration_s: float = 0.0
    result: str = "ok"          # ok | partial | failed | interrupted
    exit_code: int = 0
    steps: list[StepResult] = field(default_factory=list)
    sleep: dict = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    metrics_file: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    def step(self, name: str) -> StepResult | None:
        return next((s for s in self.steps if s.step == name), None)


def _iso(t: float) -> str:
    return datetime.datetime.fromtimestamp(t, datetime.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def read_passphrase_file(path: str | None) -> Callable[[], bytes]:
    """The job's passphrase source: its file, read only when the repository asks."""
    return passphrase_file_source(path, f"the job's passphrase_file {path}",
                                  "the repository needs a passphrase and the job file names no passphrase_file")


class _Run:
    """One run under way: the config, its state, the summary it fills, the steps' shared values."""

    def __init__(self, cfg: JobConfig, state: JobState, now: Callable[[], float], accept_change: bool) -> None:
        self.cfg, self.state, self.now, self.accept_change = cfg, state, now, accept_change
        self.started = now()
        self.summary = JobSummary(cfg.name, cfg.path, cfg.source, cfg.repository, _iso(self.started))
        self.repo: Repository | None = None
        self.resolved: ResolvedSource | None = None
        self.current_fp: dict | None = None
        self.image_id: str | None = None

    def step(self, name: str, fn: Callable[[StepResult], None]) -> StepResult:
        """Run one step; an ImgBackupError fails it with the error's exit code, Ctrl-C/SIGTERM too (130)."""
        res = StepResult(name, "ok")
        t0 = time.monotonic()
        try:
            fn(res)
        except ImgBackupError as exc:
            res.status, res.exit_code, res.error = "failed", exc.exit_code, str(exc)
        except KeyboardInterrupt:
            res.status, res.exit_code, res.error = "failed", Interrupted.exit_code, "interrupted (SIGINT/SIGTERM)"
        res.duration_s = round(time.monotonic() - t0, 3)
        self.summary.steps.append(res)
        return res

    # ---- the steps ----

    def check_source(self, res: StepResult) -> None:
        cfg = self.cfg
        self.resolved = resolve_source(cfg.source)
        self.summary.device = self.resolved.path
        current = fingerprint(self.resolved.path)
        self.current_fp = current
        res.result = {"device": self.resolved.path, "fingerprint": current}
        recorded = self.state.identity
        if recorded is None:
            res.note = "no identity recorded yet: it is recorded at the first successful backup"
            return
        differences = fingerprint_differences(recorded, current)
        if not differences:
            return
        if self.accept_change:
            res.note = "source identity changed and accepted (--accept-source-change): " + "; ".join(differences)
            res.result["differences"] = differences
            return
        audit.emit("source_refused", "refused", job=cfg.name, name=cfg.image_name, source=cfg.source,
                   device=self.resolved.path, differences="; ".join(differences))
        raise SourceIdentityChanged(
            f"job {cfg.name}: {cfg.source} ({self.resolved.path}) is not the disk this job backs up: "
            + "; ".join(differences),
            "if the disk was replaced or re-partitioned on purpose, run "
            f"'imgbackup job run {cfg.name} --accept-source-change' once")

    def backup(self, res: StepResult) -> None:
        self.repo = steps.open_repository(self.cfg.repository, read_passphrase_file(self.cfg.passphrase_file))
        self.summary.repository_id = self.repo.config.id
        if self.state.identity is None and not self.accept_change:
            steps.check_history(self.repo, self.cfg, self.current_fp or {})
        btype = "full" if self.accept_change else steps.backup_type(self.repo, self.cfg, self.now())
        result = steps.backup(self.repo, self.cfg, self.resolved, btype, self.current_fp or {})
        self.image_id = self.summary.image = result["id"]
        res.result = result
        if self.state.identity is None or self.accept_change:
            self.state.identity, self.state.identity_recorded = self.current_fp, self.now()
        self.state.last_success = {"time": self.now(), "image": result["id"], "bytes_read": result["bytes_read"],
                                   "bytes_stored": result["bytes_stored"]}

    def prune(self, res: StepResult) -> None:
        if not self.cfg.retention:
            res.status, res.note = "skipped", "no [retention] in the job file"
            return
        res.result = steps.prune(self.repo, self.cfg)

    def copy(self, res: StepResult) -> None:
        if not self.cfg.copy_to:
            res.status, res.note = "skipped", "no copy_to in the job file"
            return
        res.result = {}
        steps.copy(self.repo, self.cfg, read_passphrase_file, res.result)

    def verify(self, res: StepResult) -> None:
        res.result = steps.verify(self.repo, self.cfg, self.now())
        if res.result.get("skipped"):
            res.status, res.note = "skipped", res.result["skipped"]

    def drill(self, res: StepResult) -> None:
        outcome = steps.drill_if_due(self.repo, self.cfg, self.image_id, self.now())
        if outcome is None:
            res.status, res.note = "skipped", f"not due (drill = {self.cfg.drill.every!r})"
            return
        res.result = outcome
        if not outcome["ok"]:
            failed = "; ".join(s["error"] for s in outcome["steps"] if s.get("error"))
            raise steps.DrillFailed(f"drill of image {self.image_id[:12]} failed: {failed}")

    # ---- the whole ----

    def run(self) -> JobSummary:
        order = [("source", self.check_source), ("backup", self.backup), ("prune", self.prune),
                 ("copy", self.copy), ("verify", self.verify), ("drill", self.drill)]
        for name, fn in order:
            res = self.step(name, fn)
            if res.status == "failed" and (name in ("source", "backup") or res.exit_code == Interrupted.exit_code):
                break
        done = {s.step for s in self.summary.steps}
        self.summary.steps += [StepResult(name, "not_run") for name, _ in order if name not in done]
        self._finish()
        return self.summary

    def _finish(self) -> None:
        s = self.summary
        failed = [x for x in s.steps if x.status == "failed"]
        backup = s.step("backup")
        if any(x.exit_code == Interrupted.exit_code for x in failed):
            s.result, s.exit_code = "interrupted", Interrupted.exit_code
        elif not failed:
            s.result, s.exit_code = "ok", 0
        elif backup and backup.status == "ok":
            s.result, s.exit_code = "partial", PARTIAL
        else:
            s.result, s.exit_code = "failed", failed[0].exit_code
        end = self.now()
        s.finished, s.duration_s = _iso(end), round(end - self.started, 3)
        if self.state.first_run is None:
            self.state.first_run = self.started
        self.state.add_run({"started": self.started, "duration_s": s.duration_s, "exit_code": s.exit_code,
                            "result": s.result, "image": s.image,
                            "error": failed[0].error if failed else None,
                            "failed_step": failed[0].step if failed else None})


def run_job(cfg: JobConfig, state_dir: str, now: Callable[[], float] = time.time,
            accept_source_change: bool = False) -> JobSummary:
    """Run the job once under its lock; never raises for a failed step (the summary says)."""
    if cfg.audit:
        audit.configure(cfg.audit)
    with job_lock(state_dir, cfg.name):
        state = load_state(state_dir, cfg.name)
        run = _Run(cfg, state, now, accept_source_change)
        if cfg.inhibit_sleep:
            with sleep_inhibited(f"imgbackup job {cfg.name}") as sleep:
                run.summary.sleep = sleep
                summary = run.run()
        else:
            run.summary.sleep = {"inhibited": False, "reason": "inhibit_sleep = false"}
            summary = run.run()
        summary.warnings += audit.delivery_failures()
        save_state(state_dir, cfg.name, state)
        summary.metrics_file = steps.write_job_metrics(cfg, state, run.repo, summary, now())
    return summary
