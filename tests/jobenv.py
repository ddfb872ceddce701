"""A job's world for tests: passphrase file, repository, job file, config/state/unit folders; and
running a unit's ExecStart the way systemd starts it."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from tests.support import cli_env, cli_json

PASSPHRASE = "job-test-passphrase"
# What systemd 252 gives a system service before Environment= and EnvironmentFile= (systemd.exec(5)).
SYSTEMD_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


@dataclass
class JobEnv:
    root: Path
    name: str
    config_dir: Path
    state_dir: Path
    unit_dir: Path
    repo: Path
    passphrase_file: Path
    metrics_dir: Path
    audit_file: Path

    @property
    def dirs(self) -> list[str]:
        return ["--config-dir", str(self.config_dir), "--state-dir", str(self.state_dir)]

    def write_job(self, source: str | os.PathLike, extra: str = "", rpo: str = "24h") -> Path:
        path = self.config_dir / f"{self.name}.toml"
        path.write_text(f'source = "{source}"\nrepository = "{self.repo}"\npassphrase_file = "{self.passphrase_file}"\n'
                        f'rpo = "{rpo}"\nmetrics_dir = "{self.metrics_dir}"\naudit = ["file:{self.audit_file}"]\n'
                        f'inhibit_sleep = false\n{extra}')
        return path

    def run(self, *args: str, fake_time: str | None = None) -> subprocess.CompletedProcess:
        """``job run NAME --json`` (never raises), under ``faketime`` when ``fake_time`` is given."""
        return imgbackup("job", "run", self.name, *self.dirs, "--json", *args, fake_time=fake_time)

    def summary(self, *args: str, fake_time: str | None = None) -> tuple[int, dict]:
        proc = self.run(*args, fake_time=fake_time)
        assert proc.stdout, proc.stderr
        return proc.returncode, json.loads(proc.stdout)

    def events(self) -> list[dict]:
        if not self.audit_file.exists():
            return []
        return [json.loads(line) for line in self.audit_file.read_text().splitlines()]

    def images(self) -> list[dict]:
        return cli_json("list", repo=self.repo, passphrase=PASSPHRASE)["images"]

    def state(self) -> dict:
        return json.loads((self.state_dir / f"{self.name}.json").read_text())


def imgbackup(*args: str | os.PathLike, fake_time: str | None = None, timeout: float = 600,
              **extra: str) -> subprocess.CompletedProcess:
    """The CLI without repository or passphrase in the environment (jobs bring their own), optionally
    with the clock of ``faketime -f @TIME``. (Monotonic time is faked too: with
    FAKETIME_DONT_FAKE_MONOTONIC, libfaketime 0.9.10 makes Python's time.sleep fail with EINVAL.)"""
    env = cli_env(None, None, **extra)
    argv = [sys.executable, "-m", "imgbackup", *map(str, args)]
    if fake_time:
        argv = ["faketime", "-f", f"@{fake_time}", *argv]
    return subprocess.run(argv, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout)


def make_env(tmp_path: Path, name: str = "host") -> JobEnv:
    env = JobEnv(tmp_path, name, tmp_path / "etc jobs", tmp_path / "state", tmp_path / "units", tmp_path / "repo",
                 tmp_path / "pass", tmp_path / "metrics", tmp_path / "log" / "audit.jsonl")
    env.config_dir.mkdir()
    env.passphrase_file.write_text(PASSPHRASE + "\n")
    env.passphrase_file.chmod(0o600)
    cli_json("init", repo=env.repo, passphrase=PASSPHRASE)
    return env


def unit_values(path: Path, key: str) -> list[str]:
    """Every value of ``key=`` in a unit file (systemd allows a key several times)."""
    return [line.split("=", 1)[1] for line in path.read_text().splitlines() if line.startswith(key + "=")]


def exec_start_argv(value: str) -> list[str]:
    """An ExecStart= value split as systemd splits it: optional prefix characters, words with C-style
    double quotes and backslash escapes, then the ``%%`` and ``$$`` escapes undone."""
    value = value.lstrip("-@:+!")
    return [w.replace("%%", "%").replace("$$", "$") for w in shlex.split(value, posix=True)]


def environment_of(unit: Path) -> dict[str, str]:
    """The environment systemd gives the service: its base, then EnvironmentFile= (a missing '-' file is
    skipped), then Environment=."""
    env = {"PATH": SYSTEMD_PATH, "INVOCATION_ID": os.urandom(16).hex()}
    locale = Path("/etc/locale.conf")
    if locale.exists():   # systemd's manager passes the system locale on
        env.update(line.split("=", 1) for line in locale.read_text().split() if "=" in line)
    for value in unit_values(unit, "EnvironmentFile"):
        optional = value.startswith("-")
        path = Path(exec_start_argv(value.lstrip("-"))[0])
        if not path.exists() and optional:
            continue
        for line in path.read_text().splitlines():
            if line.strip() and not line.lstrip().startswith("#"):
                k, _, v = line.partition("=")
                env[k.strip()] = v.strip().strip('"')
    for value in unit_values(unit, "Environment"):
        for word in exec_start_argv(value):
            k, _, v = word.partition("=")
            env[k] = v
    return env


def run_exec_start(unit: Path, fake_time: str | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """Start the service's ExecStart as systemd does: that argv, its environment, cwd /, stdin /dev/null,
    its UMask and Nice; under ``faketime`` when given (the only difference: the clock)."""
    (exec_start,) = unit_values(unit, "ExecStart")
    argv = exec_start_argv(exec_start)
    env = environment_of(unit)
    umask = int(unit_values(unit, "UMask")[0], 8)
    nice = int(unit_values(unit, "Nice")[0])
    if fake_time:
        argv = ["faketime", "-f", f"@{fake_time}", *argv]

    def as_systemd() -> None:
        os.umask(umask)
        os.nice(nice)

    return subprocess.run(argv, env=env, cwd="/", stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=timeout, preexec_fn=as_systemd)
