"""``job install`` / ``job uninstall``: the job's units written (checked by systemd's own parser) or removed,
and the timer enabled or disabled when systemd runs this machine."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from imgbackup.device.tools import output_tail, run
from imgbackup.engine.job.config import JobConfig
from imgbackup.engine.job.state import load_state, save_state
from imgbackup.engine.job.units import (
    DEFAULT_UNIT_DIR,
    remove_units,
    systemd_running,
    unit_names,
    write_units,
)
from imgbackup.errors import JobConfigError, StorageError

CHECK_TIMEOUT = 60.0   # systemd-analyze reads a few unit files; a minute means it hangs


@dataclass
class InstallResult:
    job: str
    units: list[str]
    schedule: str
    next_elapse: str | None
    enabled: bool
    notes: list[str] = field(default_factory=list)


def check_schedule(cfg: JobConfig) -> str | None:
    """systemd's own parse of ``schedule`` (``systemd-analyze calendar``): the next elapse, or the error."""
    res = run(["systemd-analyze", "calendar", cfg.schedule], timeout=CHECK_TIMEOUT)
    if res.returncode != 0:
        line = cfg.path and _line_of(cfg.path, "schedule")
        raise JobConfigError(f"{cfg.path}{':' + str(line) if line else ''}: schedule: {cfg.schedule!r} is not "
                             f"systemd OnCalendar syntax ({output_tail(res, 200)})",
                             "see 'man systemd.time', e.g. daily, 'Mon *-*-* 02:00', '*-*-* 03:30'")
    for text in res.stdout.splitlines():
        if "Next elapse:" in text:
            return text.split("Next elapse:", 1)[1].strip()
    return None


def _line_of(path: str, key: str) -> int | None:
    from imgbackup.engine.job.config import KeyLines

    try:
        with open(path) as f:
            return KeyLines(f.read()).line((key,))
    except OSError:
        return None


def verify_units(paths: list[str]) -> None:
    """``systemd-analyze verify``: StorageError with its complaint when the units would not load."""
    res = run(["systemd-analyze", "verify", *paths], timeout=CHECK_TIMEOUT)
    if res.returncode != 0:
        raise StorageError(f"systemd-analyze verify rejects the written units: {output_tail(res, 400)}")


def install_job(cfg: JobConfig, command: list[str], config_dir: str, state_dir: str,
                unit_dir: str = DEFAULT_UNIT_DIR, enable: bool = True) -> InstallResult:
    next_elapse = check_schedule(cfg)
    paths = write_units(cfg, unit_dir, command, config_dir, state_dir)
    try:
        verify_units(paths)
    except StorageError:
        remove_units(cfg.name, unit_dir)
        raise
    state = load_state(state_dir, cfg.name)
    if state.installed is None:
        state.installed = time.time()
    save_state(state_dir, cfg.name, state)
    result = InstallResult(cfg.name, paths, cfg.schedule, next_elapse, False)
    timer = unit_names(cfg.name)[1]
    if not enable:
        result.notes.append(f"not enabled (--no-enable): systemctl enable --now {timer}")
    elif not systemd_running():
        result.notes.append(f"systemd is not running on this machine: enable it there with "
                            f"'systemctl daemon-reload && systemctl enable --now {timer}'")
    elif unit_dir != DEFAULT_UNIT_DIR:
        result.notes.append(f"units written outside {DEFAULT_UNIT_DIR}: link or copy them, then "
                            f"'systemctl enable --now {timer}'")
    else:
        for cmd in (["systemctl", "daemon-reload"], ["systemctl", "enable", "--now", timer]):
            res = run(cmd, timeout=CHECK_TIMEOUT)
            if res.returncode != 0:
                raise StorageError(f"{' '.join(cmd)} failed: {output_tail(res)}")
        result.enabled = True
    return result


def uninstall_job(name: str, unit_dir: str = DEFAULT_UNIT_DIR) -> list[str]:
    """Stop and disable the timer (when systemd runs here), then remove our unit files."""
    timer = unit_names(name)[1]
    if systemd_running() and unit_dir == DEFAULT_UNIT_DIR:
        run(["systemctl", "disable", "--now", timer], timeout=CHECK_TIMEOUT)
    removed = remove_units(name, unit_dir)
    if removed and systemd_running() and unit_dir == DEFAULT_UNIT_DIR:
        run(["systemctl", "daemon-reload"], timeout=CHECK_TIMEOUT)
    return removed
