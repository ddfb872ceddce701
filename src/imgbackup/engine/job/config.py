"""Job files: ``/etc/imgbackup/jobs/NAME.toml``, read with tomllib and checked key by key.

Every key is listed in ``SCHEMA`` (README "Scheduled jobs" documents each); an unknown key is an
error, since a typo (``keep_dayly``) must not silently keep nothing. Errors name the file and the
line: tomllib reports syntax errors with their line, and ``KeyLines`` finds the line that set a
key for everything checked afterwards.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from imgbackup.device.stable import STABLE_FORMS, check_stable
from imgbackup.engine.job.periods import check_period, parse_duration, zone
from imgbackup.errors import JobConfigError

DEFAULT_CONFIG_DIR = "/etc/imgbackup/jobs"
JOB_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
KEEP_KEYS = ("keep_last", "keep_hourly", "keep_daily", "keep_weekly", "keep_monthly", "keep_yearly")
WITHIN_KEYS = ("keep_within", *(f"keep_within_{p}" for p in ("hourly", "daily", "weekly", "monthly", "yearly")))
KEEP_WITHIN = re.compile(r"(?=\d)(\d+y)?(\d+m)?(\d+d)?(\d+h)?")   # prune's DURATION (issue 14): 1y2m3d4h
IO_CLASSES = ("idle", "best-effort")


class KeyLines:
    """Which line of a TOML text set each key (``("retention", "keep_daily")`` → 12)."""

    _HEADER = re.compile(r"\s*\[\[?\s*([^\]]+?)\s*\]\]?\s*(#.*)?$")
    _KEY = re.compile(r"""\s*((?:[A-Za-z0-9_-]+|"[^"]*"|'[^']*')(?:\s*\.\s*(?:[A-Za-z0-9_-]+|"[^"]*"|'[^']*'))*)\s*=""")

    def __init__(self, text: str) -> None:
        self.lines: dict[tuple[str, ...], int] = {}
        table: tuple[str, ...] = ()
        for number, line in enumerate(text.splitlines(), 1):
            if m := self._HEADER.match(line):
                table = self._split(m.group(1))
                self.lines.setdefault(table, number)
            elif m := self._KEY.match(line):
                self.lines.setdefault(table + self._split(m.group(1)), number)

    @staticmethod
    def _split(dotted: str) -> tuple[str, ...]:
        return tuple(p.strip().strip("\"'") for p in re.findall(r"""(?:"[^"]*"|'[^']*'|[^.]+)""", dotted))

    def line(self, path: tuple[str, ...]) -> int | None:
        while path:
            if path in self.lines:
                return self.lines[path]
            path = path[:-1]
        return None


@dataclass
class DrillPolicy:
    every: str = "never"
    boot: bool = False
    expect: str | None = None
    timeout: float = 120.0
    firmware: str = "bios"
    restore_to: str | None = None
    filesystems: bool = True


@dataclass
class CopyTarget:
    repository: str
    passphrase_file: str | None = None


@dataclass
class JobConfig:
    """One job file, checked; defaults filled in."""

    name: str
    path: str
    source: str
    repository: str
    rpo: float
    rpo_text: str
    image_name: str = ""
    passphrase_file: str | None = None
    schedule: str = "daily"
    randomized_delay: float = 1800.0
    timezone: str | None = None
    copy_to: list[CopyTarget] = field(default_factory=list)
    metrics_dir: str | None = None
    audit: list[str] = field(default_factory=list)
    nice: int = 19
    io_class: str = "idle"
    inhibit_sleep: bool = True
    timeout: float | None = None
    full: str = "never"
    backup_type: str = "incremental"
    all_blocks: bool = False
    allow_mounted: bool = False
    snapshot: str | None = None
    retention: dict = field(default_factory=dict)
    sample_percent: float = 5.0
    verify_filesystems: str = "never"
    drill: DrillPolicy = field(default_factory=DrillPolicy)

    @property
    def tz(self):
        return zone(self.timezone)

    def prune_policy(self) -> dict:
        """The [retention] table as prune's options (``keep_daily`` → ``--keep-daily``), timezone defaulted."""
        policy = dict(self.retention)
        if self.timezone and "timezone" not in policy:
            policy["timezone"] = self.timezone
        return policy


Check = Callable[[object], str | None]


def _type(*types: type, what: str) -> Check:
    def check(v: object) -> str | None:
        ok = isinstance(v, types) and not (isinstance(v, bool) and bool not in types)
        return None if ok else f"must be {what}"
    return check


def _abs_path(v: object) -> str | None:
    return None if isinstance(v, str) and v.startswith("/") else "must be an absolute path"


def _repository(v: object) -> str | None:
    if not isinstance(v, str) or not v:
        return "must be a repository path or URL"
    if v.startswith("/") or v.startswith("s3://") or v.startswith("file:///"):
        return None
    return "must be an absolute path, file:///PATH or s3://BUCKET/PREFIX"


def _raises(fn: Callable[[str], object], what: str) -> Check:
    def check(v: object) -> str | None:
        if not isinstance(v, str):
            return f"must be a string ({what})"
        try:
            fn(v)
        except ValueError as exc:
            return str(exc)
        return None
    return check


def _match(pattern: re.Pattern, message: str) -> Check:
    return lambda v: None if isinstance(v, str) and pattern.fullmatch(v) else message


def _source(v: object) -> str | None:
    if not isinstance(v, str):
        return "must be a string"
    problem = check_stable(v)
    return f"{problem}; name it by " + ", ".join(STABLE_FORMS) if problem else None


def _int_range(lo: int, hi: int) -> Check:
    def check(v: object) -> str | None:
        ok = isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi
        return None if ok else f"must be a whole number from {lo} to {hi}"
    return check


def _percent(v: object) -> str | None:
    ok = isinstance(v, int | float) and not isinstance(v, bool) and 0 <= v <= 100
    return None if ok else "must be a number from 0 to 100"


def _choice(*values: str) -> Check:
    return lambda v: None if v in values else f"must be one of {', '.join(values)}"


def _string_list(item: Check) -> Check:
    def check(v: object) -> str | None:
        if not isinstance(v, list):
            return "must be a list"
        for x in v:
            if problem := item(x):
                return f"item {x!r}: {problem}"
        return None
    return check


def _audit_sink(v: object) -> str | None:
    from imgbackup.audit.sinks import parse_sinks
    from imgbackup.errors import UsageError

    if not isinstance(v, str):
        return "must be a string"
    try:
        parse_sinks([v])
    except UsageError as exc:
        return str(exc)
    return None


_BOOL = _type(bool, what="true or false")
_STR = _type(str, what="a string")
_PERIOD = _raises(check_period, "a period")
_DURATION = _raises(parse_duration, "a duration")
_ZONE = _raises(zone, "a time zone")

TOP: dict[str, Check] = {
    "source": _source, "name": _match(JOB_NAME, "letters, digits, '_' and '-' only, at most 64"),
    "repository": _repository, "passphrase_file": _abs_path, "schedule": _STR, "randomized_delay": _DURATION,
    "rpo": _DURATION, "timezone": _ZONE, "copy_to": _type(list, what="a list"), "metrics_dir": _abs_path,
    "audit": _string_list(_audit_sink), "drill": _type(str, dict, what="a period or a [drill] table"),
    "nice": _int_range(-20, 19), "io_class": _choice(*IO_CLASSES), "inhibit_sleep": _BOOL, "timeout": _DURATION,
    "backup": _type(dict, what="a table"), "retention": _type(dict, what="a table"),
    "verify": _type(dict, what="a table"),
}
BACKUP: dict[str, Check] = {"full": _PERIOD, "type": _choice("incremental", "differential"), "all_blocks": _BOOL,
                            "allow_mounted": _BOOL, "snapshot": _choice("lvm", "reflink", "auto")}
RETENTION: dict[str, Check] = {**{k: _int_range(0, 1_000_000) for k in KEEP_KEYS},
                               **{k: _match(KEEP_WITHIN, "must be a duration like '1y2m3d4h'") for k in WITHIN_KEYS},
                               "timezone": _ZONE}
VERIFY: dict[str, Check] = {"sample_percent": _percent, "filesystems": _PERIOD}
def _scratch(v: object) -> str | None:
    """A drill's scratch target: a file, or a device by a stable name (a kernel name could be the
    data disk after the next boot, and the drill overwrites it)."""
    if problem := _abs_path(v):
        return problem
    if str(v).startswith("/dev/") and (problem := check_stable(str(v))):
        return f"{problem}; a scratch device must be named by /dev/disk/by-id/… or similar"
    return None


DRILL: dict[str, Check] = {"every": _PERIOD, "boot": _BOOL, "expect": _STR,
                           "timeout": _type(int, float, what="seconds"), "firmware": _choice("bios", "uefi"),
                           "restore_to": _scratch, "filesystems": _BOOL}
COPY: dict[str, Check] = {"repository": _repository, "passphrase_file": _abs_path}
REQUIRED = ("source", "repository", "rpo")
SCHEMA = {"": TOP, "backup": BACKUP, "retention": RETENTION, "verify": VERIFY, "drill": DRILL, "copy_to": COPY}


class _Checker:
    def __init__(self, path: str, text: str) -> None:
        self.path = path
        self.where = KeyLines(text)

    def fail(self, keys: tuple[str, ...], message: str) -> JobConfigError:
        line = self.where.line(keys)
        at = f"{self.path}:{line}" if line else self.path
        return JobConfigError(f"{at}: {'.'.join(keys) + ': ' if keys else ''}{message}")

    def table(self, doc: dict, schema: dict[str, Check], prefix: tuple[str, ...]) -> None:
        for key, value in doc.items():
            if key not in schema:
                known = ", ".join(sorted(schema))
                raise self.fail((*prefix, key), f"unknown key (known here: {known})")
            if problem := schema[key](value):
                raise self.fail((*prefix, key), problem)


def _read(path: str) -> tuple[str, dict]:
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        raise JobConfigError(f"no job file {path}", "create it, or point --config-dir at the folder") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise JobConfigError(f"cannot read job file {path}: {getattr(exc, 'strerror', None) or exc}") from None
    try:
        return text, tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        msg = str(exc)
        m = re.search(r"\(at line (\d+), column (\d+)\)", msg)
        where = f"{path}:{m.group(1)}" if m else path
        raise JobConfigError(f"{where}: TOML syntax error: {re.sub(r' ?[(]at line.*', '', msg)}") from None


def job_file(config_dir: str, name: str) -> str:
    if not JOB_NAME.fullmatch(name):
        raise JobConfigError(f"bad job name {name!r}", "letters, digits, '_' and '-' only, at most 64")
    return os.path.join(config_dir, f"{name}.toml")


def load_job(config_dir: str, name: str) -> JobConfig:
    return load_job_file(job_file(config_dir, name), name)


def load_job_file(path: str, name: str | None = None) -> JobConfig:
    """Read and check a job file completely; JobConfigError (exit 2) naming file, line and key."""
    name = name or Path(path).stem
    text, doc = _read(path)
    check = _Checker(path, text)
    check.table(doc, TOP, ())
    for key in REQUIRED:
        if key not in doc:
            raise check.fail((), f"missing required key {key!r}")
    for section in ("backup", "retention", "verify"):
        check.table(doc.get(section, {}), SCHEMA[section], (section,))
    retention = doc.get("retention")
    if retention is not None and not any(k in retention for k in (*KEEP_KEYS, *WITHIN_KEYS)):
        raise check.fail(("retention",), "keeps nothing: give at least one keep_* rule, or remove [retention]")
    copies = []
    for i, item in enumerate(doc.get("copy_to", [])):
        if isinstance(item, str):
            item = {"repository": item}
        if not isinstance(item, dict):
            raise check.fail(("copy_to",), f"item {i + 1} must be a repository or a table")
        check.table(item, COPY, ("copy_to",))
        if "repository" not in item:
            raise check.fail(("copy_to",), f"item {i + 1} has no repository")
        copies.append(CopyTarget(item["repository"], item.get("passphrase_file")))
    drill = _drill(check, doc.get("drill", "never"))
    verify = doc.get("verify", {})
    backup = doc.get("backup", {})
    return JobConfig(
        name=name, path=path, source=doc["source"], repository=doc["repository"], rpo=parse_duration(doc["rpo"]),
        rpo_text=doc["rpo"], image_name=doc.get("name", name), passphrase_file=doc.get("passphrase_file"),
        schedule=doc.get("schedule", "daily"),
        randomized_delay=parse_duration(doc["randomized_delay"]) if "randomized_delay" in doc else 1800.0,
        timezone=doc.get("timezone"), copy_to=copies, metrics_dir=doc.get("metrics_dir"),
        audit=list(doc.get("audit", [])), nice=doc.get("nice", 19), io_class=doc.get("io_class", "idle"),
        inhibit_sleep=doc.get("inhibit_sleep", True),
        timeout=parse_duration(doc["timeout"]) if "timeout" in doc else None,
        full=backup.get("full", "never"), backup_type=backup.get("type", "incremental"),
        all_blocks=backup.get("all_blocks", False), allow_mounted=backup.get("allow_mounted", False),
        snapshot=backup.get("snapshot"),
        retention=dict(retention or {}), sample_percent=float(verify.get("sample_percent", 5.0)),
        verify_filesystems=verify.get("filesystems", "never"), drill=drill,
    )


def _drill(check: _Checker, value: str | dict) -> DrillPolicy:
    if isinstance(value, str):
        if problem := _PERIOD(value):
            raise check.fail(("drill",), problem)
        return DrillPolicy(every=value)
    check.table(value, DRILL, ("drill",))
    if "every" not in value:
        raise check.fail(("drill",), "a [drill] table needs 'every' (e.g. every = \"weekly\")")
    if value.get("boot") and not value.get("expect"):
        raise check.fail(("drill", "boot"), "boot = true needs expect = \"TEXT the booted system prints\"")
    return DrillPolicy(**value)


def list_jobs(config_dir: str) -> list[str]:
    """Names of the job files in ``config_dir`` (``*.toml`` with a valid job name), sorted."""
    try:
        names = [p.stem for p in Path(config_dir).glob("*.toml")]
    except OSError:
        return []
    return sorted(n for n in names if JOB_NAME.fullmatch(n))
