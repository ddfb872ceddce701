"""The node_exporter textfile a job leaves after every run, success or failure.

One file per job, ``<metrics_dir>/imgbackup-job-<NAME>.prom``, replaced atomically (written under a
name the textfile collector ignores, fsynced, renamed), so node_exporter never reads half of it.
Samples carry no timestamps (the collector refuses them) and only the labels ``job`` and
``source`` (low cardinality: one series per job). A value that is not known yet (no drill ever)
is left out rather than reported as 0, which would read as a real measurement.

For alerting, ``time() - imgbackup_last_success_timestamp_seconds > imgbackup_rpo_seconds`` stays
right even when the job stops running; ``imgbackup_rpo_breached`` is as of the last run.
"""

from __future__ import annotations

import os
from pathlib import Path

from imgbackup.engine.job.status import SourceStatus

# name -> (help text); all gauges.
METRICS = {
    "imgbackup_last_success_timestamp_seconds": "Unix time the newest image of the job's source was made.",
    "imgbackup_last_run_exit_code": "Exit code of the job's last run (0 ok, 15 partial success, else the failure's).",
    "imgbackup_last_run_timestamp_seconds": "Unix time the job's last run ended.",
    "imgbackup_duration_seconds": "Wall time of the job's last run.",
    "imgbackup_bytes_read": "Bytes the job's last successful backup read from the source.",
    "imgbackup_bytes_stored": "Bytes the job's last successful backup added to the repository.",
    "imgbackup_repository_bytes": "Bytes all objects of the job's repository take.",
    "imgbackup_repository_reclaimable_bytes": "Bytes compacting the job's repository would free.",
    "imgbackup_rpo_seconds": "The job's recovery point objective.",
    "imgbackup_rpo_breached": "1 when the newest image was older than the RPO at the end of the last run.",
    "imgbackup_last_verify_timestamp_seconds": "Unix time of the last verify of the job's images.",
    "imgbackup_last_verify_success": "1 when the last verify found no damage.",
    "imgbackup_last_drill_timestamp_seconds": "Unix time of the last restore drill of the job's images.",
    "imgbackup_last_drill_success": "1 when the last restore drill succeeded.",
    "imgbackup_last_drill_rto_seconds": "Measured restore time (RTO) of the last drill that restored.",
}


def metrics_path(metrics_dir: str, job: str) -> Path:
    return Path(metrics_dir) / f"imgbackup-job-{job}.prom"


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _value(v: float) -> str:
    return repr(float(v)) if isinstance(v, float) and not float(v).is_integer() else str(int(v))


def metric_values(status: SourceStatus, summary) -> dict[str, float]:
    """The samples of one job: every known value in ``METRICS``."""
    last_success = summary.get("last_success") or {}
    values: dict[str, float | None] = {
        "imgbackup_last_success_timestamp_seconds": (status.last_image or {}).get("created"),
        "imgbackup_last_run_exit_code": summary.get("exit_code"),
        "imgbackup_last_run_timestamp_seconds": summary.get("finished_ts"),
        "imgbackup_duration_seconds": summary.get("duration_s"),
        "imgbackup_bytes_read": last_success.get("bytes_read"),
        "imgbackup_bytes_stored": last_success.get("bytes_stored"),
        "imgbackup_repository_bytes": status.repository_bytes,
        "imgbackup_repository_reclaimable_bytes": status.reclaimable_bytes,
        "imgbackup_rpo_seconds": status.rpo.target_s,
        "imgbackup_rpo_breached": None if status.rpo.state is None else int(status.rpo.breached),
        "imgbackup_last_verify_timestamp_seconds": (status.last_verify or {}).get("time"),
        "imgbackup_last_verify_success": None if not status.last_verify else int(status.last_verify["ok"]),
        "imgbackup_last_drill_timestamp_seconds": (status.last_drill or {}).get("time"),
        "imgbackup_last_drill_success": None if not status.last_drill else int(status.last_drill["ok"]),
        "imgbackup_last_drill_rto_seconds": (status.last_drill or {}).get("rto_s"),
    }
    return {k: v for k, v in values.items() if v is not None}


def render(job: str, source: str, values: dict[str, float]) -> str:
    labels = f'{{job="{_label(job)}",source="{_label(source)}"}}'
    lines = []
    for name, text in METRICS.items():
        if name in values:
            lines += [f"# HELP {name} {text}", f"# TYPE {name} gauge", f"{name}{labels} {_value(values[name])}"]
    return "\n".join(lines) + "\n"


def write_metrics(metrics_dir: str, status: SourceStatus, run: dict) -> str:
    """Replace the job's textfile atomically; returns its path. ``run``: exit_code, duration_s,
    finished_ts and the state's last_success."""
    path = metrics_path(metrics_dir, status.job or status.name)
    text = render(status.job or status.name, status.source or status.name, metric_values(status, run))
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            os.write(fd, text.encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return str(path)
