"""``imgbackup.action=restore``: restore a dead machine's disk from kernel parameters alone.

Steps, each logged to every console and to a log on the repository's device:
parameters checked → repository device found and mounted → passphrase file read → target disk
found by its stable identity and shown (model, serial, size) → ``imgbackup restore`` → sync,
unmount → ``imgbackup.after``. A failure at any step stops the run with its reason, before the
target is written when it can be known beforehand (wrong identity, too small, wrong passphrase),
and then leaves a shell or powers off (``imgbackup.on-failure``).

The restore itself is the restore engine called in this process, exactly as ``imgbackup restore
… --yes`` calls it (the log names that command): the same refusals and exit codes, without a
second interpreter start.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from imgbackup.device import tools
from imgbackup.device.identity import identify
from imgbackup.engine.passphrase import passphrase_file_source
from imgbackup.engine.rescue.console import RescueLog, boot_seconds
from imgbackup.engine.rescue.locate import (
    RUN_DIR,
    Mounts,
    find_target,
    medium_device,
    wait_for_coldplug,
    whole_disk_of,
)
from imgbackup.engine.rescue.params import ON_FAILURE, Location, RescueParams, parse_params, raw_params
from imgbackup.errors import ImgBackupError, TargetRefused, UsageError

if TYPE_CHECKING:
    from imgbackup.engine.restore.run import BareMetalResult

STATUS_FILE = RUN_DIR / "rescue-status.json"
LOG_DIR = "imgbackup-rescue-logs"


@dataclass
class Outcome:
    ok: bool
    reason: str
    exit_code: int
    log_path: str | None
    seconds: float


def _log_location(params: RescueParams) -> Location | None:
    if params.log is not None:
        return params.log
    if params.repo is not None and params.repo.device not in (None, "MEDIA"):
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        return Location(params.repo.device, f"/{LOG_DIR}/{stamp}-{params.name or 'restore'}.log")
    return None


def _embedded_repo(path: Path) -> Path:
    """A repository on the (read-only) medium, under a RAM overlay so the restore can take its lock."""
    base = RUN_DIR / "embedded"
    for d in ("upper", "work", "repo"):
        (base / d).mkdir(parents=True, exist_ok=True)
    res = tools.run(["mount", "-t", "overlay", "overlay", "-o",
                     f"lowerdir={path},upperdir={base}/upper,workdir={base}/work", str(base / "repo")],
                    timeout=tools.PROBE_TIMEOUT)
    if res.returncode != 0:
        raise _Failed(f"cannot mount the embedded repository: {tools.output_tail(res)}", 10)
    return base / "repo"


def _import_the_restore_engine() -> None:
    import imgbackup.engine.restore.plan
    import imgbackup.engine.restore.run
    import imgbackup.repository.repo  # noqa: F401


def _preload() -> threading.Thread:
    """The restore engine's imports (numpy, the crypto stack, the repository: 10-14 s of a TCG guest's
    CPU) in the background while the run waits for its devices; joined before the restore uses them."""
    def imports() -> None:
        with contextlib.suppress(Exception):     # the restore's own import reports any problem
            _import_the_restore_engine()
    thread = threading.Thread(target=imports, name="imgbackup-preload", daemon=True)
    thread.start()
    return thread


def _restore_words(params: RescueParams, target: str) -> list[str]:
    """The ``imgbackup restore`` a sysadmin would type for this run (the log names it)."""
    words = ["imgbackup", "restore", params.image, target, "--yes"]
    if params.name:
        words += ["--name", params.name]
    if params.grow:
        words.append("--grow")
    if params.partition is not None:
        words += ["--partition", str(params.partition)]
    return words


def _restore_here(params: RescueParams, repo_path: Path, passphrase_file: Path | None, target: str,
                  log: RescueLog, preloaded: threading.Thread | None = None) -> BareMetalResult:
    """What ``imgbackup restore … --yes`` does, in this process: the restore engine itself, with its
    own refusals (before the first byte is written) and exit codes. Not a child ``python -m
    imgbackup``: under TCG a second interpreter start, its imports and the repository open cost
    ~30 s of a ~60 s run."""
    if preloaded is not None:
        preloaded.join()          # one thread imports a module at a time: never two at once
    from imgbackup.engine.restore.plan import plan_disk_restore, plan_partition_restore
    from imgbackup.engine.restore.run import run_disk_restore
    from imgbackup.repository.repo import Repository

    log("running: " + " ".join(_restore_words(params, target)))

    passphrase = passphrase_file_source(passphrase_file, f"the passphrase file {params.passphrase_file}",
                                        "the repository needs a passphrase",
                                        "give imgbackup.passphrase-file=LABEL=…:/path")
    repo = Repository.open(str(repo_path), passphrase)
    repo.require_full_key("restore images (that reads their data)")
    image_id = repo.images.resolve(params.image, params.name)
    if params.partition is not None:
        plan = plan_partition_restore(repo, image_id, params.partition, target, grow=params.grow)
    else:
        plan = plan_disk_restore(repo, image_id, target, grow=params.grow)
    if plan.bad_ranges:
        log(f"  warning: the image was made from a failing disk (backup --rescue): "
            f"{sum(n for _, n in plan.bad_ranges)} unreadable bytes of the source restore as zeros")
    return run_disk_restore(repo, plan)


class _Failed(Exception):
    def __init__(self, reason: str, code: int) -> None:
        super().__init__(reason)
        self.code = code


def _restore(params: RescueParams, log: RescueLog, mounts: Mounts, after_coldplug: bool = False) -> str:
    """Everything from finding the repository to a finished restore; returns the summary line."""
    preloaded = _preload()
    if after_coldplug:
        wait_for_coldplug()
    wait = params.wait_s
    log(f"repository {params.repo}: waiting up to {wait} s for its device")
    repo_path, repo_dev = mounts.path_of(params.repo, wait, read_only=False)
    where = _log_location(params)
    if where is not None:
        log_path, _ = mounts.path_of(where, wait, read_only=False)
        log.attach(log_path)
        log(f"log: {where} (on the repository's device)")
    if params.repo.device == "MEDIA":
        repo_path = _embedded_repo(repo_path)
    if not (repo_path / "config").exists():
        raise _Failed(f"no imgbackup repository at {params.repo}", 3)
    pass_path = None
    if params.passphrase_file is not None:
        pass_path, _ = mounts.path_of(params.passphrase_file, wait, read_only=True)
        if not pass_path.is_file():
            raise _Failed(f"passphrase file {params.passphrase_file} does not exist", 4)
        log(f"passphrase: from {params.passphrase_file}")
    log(f"target {params.target}: waiting up to {wait} s for it")
    node = find_target(params.target, wait)
    disk = whole_disk_of(node)
    for other, what in ((repo_dev, "the repository"), (medium_device(), "the rescue medium")):
        if other and whole_disk_of(other) == disk:
            raise TargetRefused(f"target {params.target} is {disk}, which holds {what}; nothing was written")
    log(f"target: {identify(node).describe()}")
    what = f"image {params.image}" + (f" of {params.name}" if params.name else "")
    log(f"restoring {what}" + (" (growing the last partition)" if params.grow else ""))
    result = _restore_here(params, repo_path, pass_path,
                           params.target.value if params.target.kind == "by-id" else node, log, preloaded)
    for note in result.notes:
        log(f"  {note}")
    return (f"restored image {result.image[:12]} onto {params.target}: "
            f"{result.bytes_written} bytes written in {result.duration_s:.1f} s")


def _write_status(outcome: Outcome) -> None:
    try:
        STATUS_FILE.parent.mkdir(parents=True, exist_ok=True)
        STATUS_FILE.write_text(json.dumps(outcome.__dict__) + "\n")
    except OSError:
        pass


def final_action(params: RescueParams, ok: bool) -> str:
    """What the media does when the run is over: ``imgbackup.after`` once the restore succeeded,
    ``imgbackup.on-failure`` (a shell, or poweroff for racks) when it did not."""
    return params.after if ok else params.on_failure


def _finish(action: str, log: RescueLog) -> None:
    if action == "shell":
        log("a root shell is open on every console (imgbackup is on PATH)")
        return
    up = boot_seconds()
    log(f"{action} now" + (f" ({up:.0f} s after boot)" if up is not None else ""))
    tools.run(["systemctl", "--no-block", action], timeout=60)


def run(params: RescueParams, log: RescueLog, after_coldplug: bool = False) -> Outcome:
    start = time.monotonic()
    mounts = Mounts()
    try:
        summary = _restore(params, log, mounts, after_coldplug)
        ok, reason, code = True, summary, 0
    except _Failed as exc:
        ok, reason, code = False, str(exc), exc.code
    except ImgBackupError as exc:
        ok, reason, code = False, str(exc), exc.exit_code
    except OSError as exc:
        ok, reason, code = False, f"{type(exc).__name__}: {exc}", 10
    seconds = time.monotonic() - start
    log(("SUCCESS: " if ok else "FAILED: ") + reason + f" ({seconds:.0f} s)")
    if log.path is not None:
        log(f"this log: {log.path.name} in {LOG_DIR}/ on the repository's device")
    log.detach()
    for problem in mounts.close():
        log(f"warning: {problem}")
    return Outcome(ok, reason, code, str(log.path) if log.path else None, seconds)


def run_from_cmdline(cmdline: str, log: RescueLog | None = None, after_coldplug: bool = False) -> int:
    """Entry point of ``imgbackup rescue run``: the exit code of the whole action. ``after_coldplug``:
    systemd started this run before udev; wait for its coldplug before looking for devices."""
    log = log or RescueLog()
    try:
        params = parse_params(cmdline)
    except UsageError as exc:
        log(f"FAILED: {exc}")
        log("fix the imgbackup.* parameters at the boot menu (press e) or rebuild the media")
        _write_status(Outcome(False, str(exc), exc.exit_code, None, 0.0))
        if raw_params(cmdline).get("action") == "restore":   # the unattended run did not happen
            on_failure = raw_params(cmdline).get("on-failure", "shell")
            _finish(on_failure if on_failure in ON_FAILURE else "shell", log)
        return exc.exit_code
    if params.unknown:
        log(f"warning: unknown parameters ignored: {', '.join('imgbackup.' + k for k in params.unknown)}")
    if params.action != "restore":
        return 0
    up = boot_seconds()
    log(f"unattended restore: {' '.join(w for w in cmdline.split() if w.startswith('imgbackup.'))}"
        + (f" ({up:.0f} s after boot)" if up is not None else ""))
    outcome = run(params, log, after_coldplug)
    _write_status(outcome)
    _finish(final_action(params, outcome.ok), log)
    return outcome.exit_code
