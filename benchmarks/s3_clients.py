"""Which S3 client library imgbackup uses: boto3 vs obstore, measured against a real SeaweedFS.

    python3 benchmarks/s3_clients.py [--objects 16] [--ranges 256] [--json-out FILE]

For each client, in its own process (so peak RSS is that client's): put throughput of 16 MiB objects
and ranged-get throughput of 1 MiB ranges with 1, 4 and 16 requests in flight (threads), the import
time a CLI run pays (``python -X importtime``), whether a conditional put (If-None-Match: *) gives
exactly one winner, whether a streamed upload can be multipart and aborted on the server (checked
with ListMultipartUploads), and peak RSS. Prints a Markdown table and one JSON document.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/s3server.py: the one server recipe
from tests.s3server import REGION, running_server  # noqa: E402

MiB = 1 << 20
OBJECT_SIZE = 16 * MiB  # a pack's target size
RANGE_SIZE = 1 * MiB  # a chunk's default size: restore reads ranges of about this
IN_FLIGHT = (1, 4, 16)
CLIENTS = ("boto3", "obstore")


def import_ms(module: str) -> float:
    """Cumulative import time of ``module`` in a fresh interpreter (what every CLI run would pay)."""
    out = subprocess.run([sys.executable, "-X", "importtime", "-c", f"import {module}"],
                         capture_output=True, text=True, check=True).stderr
    best = 0
    for line in out.splitlines():
        m = re.match(r"import time:\s+\d+ \|\s+(\d+) \|\s*(\S+)", line)
        if m and m.group(2) == module:
            best = int(m.group(1))
    return best / 1000


class Boto3Client:
    def __init__(self, env: dict, bucket: str) -> None:
        import boto3
        from botocore.config import Config

        self.bucket = bucket
        self.s3 = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name=REGION,
                               aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                               aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
                               config=Config(s3={"addressing_style": "path"}, max_pool_connections=32,
                                             retries={"total_max_attempts": 1},
                                             # as imgbackup configures it: the envelope authenticates
                                             # every object, so no extra CRC per request
                                             request_checksum_calculation="when_required",
                                             response_checksum_validation="when_required"))

    def put(self, key: str, data: bytes) -> None:
        self.s3.put_object(Bucket=self.bucket, Key=key, Body=data)

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        rng = f"bytes={offset}-{offset + length - 1}"
        return self.s3.get_object(Bucket=self.bucket, Key=key, Range=rng)["Body"].read()

    def create(self, key: str, data: bytes) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.s3.put_object(Bucket=self.bucket, Key=key, Body=data, IfNoneMatch="*")
            return True
        except ClientError as exc:
            if exc.response["Error"]["Code"] in ("PreconditionFailed", "ConditionalRequestConflict"):
                return False
            raise

    def multipart_abort(self, key: str) -> bool:
        up = self.s3.create_multipart_upload(Bucket=self.bucket, Key=key)
        self.s3.upload_part(Bucket=self.bucket, Key=key, UploadId=up["UploadId"], PartNumber=1,
                            Body=os.urandom(5 * MiB))
        self.s3.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=up["UploadId"])
        return True


class ObstoreClient:
    def __init__(self, env: dict, bucket: str) -> None:
        from obstore.store import S3Store

        self.store = S3Store(bucket, endpoint=env["AWS_ENDPOINT_URL"], region=REGION,
                             access_key_id=env["AWS_ACCESS_KEY_ID"],
                             secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
                             virtual_hosted_style_request=False, client_options={"allow_http": True},
                             retry_config={"max_retries": 0, "retry_timeout": timedelta(seconds=5),
                                           "backoff": {"init_backoff": timedelta(seconds=0.1),
                                                       "max_backoff": timedelta(seconds=1), "base": 2}})

    def put(self, key: str, data: bytes) -> None:
        import obstore

        obstore.put(self.store, key, data, use_multipart=False)

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        import obstore

        return bytes(obstore.get_range(self.store, key, start=offset, length=length))

    def create(self, key: str, data: bytes) -> bool:
        import obstore
        from obstore.exceptions import AlreadyExistsError, PreconditionError

        try:
            obstore.put(self.store, key, data, mode="create")
            return True
        except (AlreadyExistsError, PreconditionError):
            return False

    def multipart_abort(self, key: str) -> bool:
        """obstore has no abort call: the only way is leaving a writer's context on an exception."""
        import obstore

        try:
            with obstore.open_writer(self.store, key, buffer_size=5 * MiB) as w:
                w.write(os.urandom(6 * MiB))
                w.flush()
                raise RuntimeError("abort")
        except RuntimeError:
            pass
        return True


def worker(client_name: str, env: dict, bucket: str, objects: int, ranges: int) -> dict:
    """Runs in a child process: every measurement of one client."""
    cls = Boto3Client if client_name == "boto3" else ObstoreClient
    client = cls(env, bucket)
    data = os.urandom(OBJECT_SIZE)
    result: dict = {"client": client_name, "put_MBps": {}, "get_range_MBps": {}}
    for n in IN_FLIGHT:
        keys = [f"{client_name}/n{n}/obj{i:03d}" for i in range(objects)]
        with ThreadPoolExecutor(n) as pool:
            list(pool.map(lambda k: client.put(k, data), keys[:n]))  # warm the connections
            started = time.perf_counter()
            list(pool.map(lambda k: client.put(k, data), keys))
            took = time.perf_counter() - started
        result["put_MBps"][n] = round(objects * OBJECT_SIZE / took / 1e6, 1)
        spots = [(keys[i % objects], (i * 7 % (OBJECT_SIZE // RANGE_SIZE)) * RANGE_SIZE) for i in range(ranges)]
        with ThreadPoolExecutor(n) as pool:
            started = time.perf_counter()
            got = list(pool.map(lambda s: len(client.get_range(s[0], s[1], RANGE_SIZE)), spots))
            took = time.perf_counter() - started
        assert all(g == RANGE_SIZE for g in got)
        result["get_range_MBps"][n] = round(ranges * RANGE_SIZE / took / 1e6, 1)
    key = f"{client_name}/cond"
    with ThreadPoolExecutor(8) as pool:
        wins = sum(pool.map(lambda i: client.create(key, str(i).encode()), range(8)))
    result["conditional_put_one_winner"] = wins == 1
    client.multipart_abort(f"{client_name}/mpu")
    result["peak_rss_MiB"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    return result


def pending_uploads(server, bucket: str, prefix: str) -> int:
    return len(server.client().list_multipart_uploads(Bucket=bucket, Prefix=prefix).get("Uploads", []))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--objects", type=int, default=16, help="16 MiB objects put per in-flight level")
    ap.add_argument("--ranges", type=int, default=256, help="1 MiB ranged gets per in-flight level")
    ap.add_argument("--json-out", type=Path)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        spec = json.loads(os.environ["S3BENCH_SPEC"])  # the secret travels in the environment, not argv
        print(json.dumps(worker(spec["client"], spec["env"], spec["bucket"], args.objects, args.ranges)))
        return
    results = []
    with tempfile.TemporaryDirectory(prefix="s3bench-") as tmp, running_server(tmp) as server:
        baseline = import_ms("json")
        for name in CLIENTS:
            bucket = server.new_bucket(name)
            spec = json.dumps({"client": name, "env": server.env(), "bucket": bucket})
            out = subprocess.run([sys.executable, __file__, "--objects", str(args.objects), "--ranges",
                                  str(args.ranges), "--worker"], capture_output=True, text=True,
                                 env={**os.environ, "S3BENCH_SPEC": spec})
            if out.returncode:
                raise SystemExit(f"{name} worker failed: {out.stderr[-3000:]}")
            res = json.loads(out.stdout.strip().splitlines()[-1])
            res["import_ms"] = round(import_ms(name if name == "obstore" else "boto3"), 1)
            res["multipart_abort_leaves_nothing"] = pending_uploads(server, bucket, f"{name}/mpu") == 0
            results.append(res)
    doc = {"object_MiB": OBJECT_SIZE // MiB, "range_MiB": RANGE_SIZE // MiB, "objects": args.objects,
           "ranges": args.ranges, "json_import_ms": baseline, "results": results}
    cols = [f"put {n}" for n in IN_FLIGHT] + [f"get {n}" for n in IN_FLIGHT]
    print("| client | " + " | ".join(f"{c} MB/s" for c in cols) + " | import ms | If-None-Match | "
          "multipart abort | peak RSS MiB |")
    print("|---" * (len(cols) + 5) + "|")
    for r in results:
        nums = [r["put_MBps"][str(n)] if str(n) in r["put_MBps"] else r["put_MBps"][n] for n in IN_FLIGHT]
        nums += [r["get_range_MBps"][str(n)] if str(n) in r["get_range_MBps"] else r["get_range_MBps"][n]
                 for n in IN_FLIGHT]
        print(f"| {r['client']} | " + " | ".join(str(x) for x in nums) +
              f" | {r['import_ms']} | {'yes' if r['conditional_put_one_winner'] else 'NO'} | "
              f"{'yes' if r['multipart_abort_leaves_nothing'] else 'NO'} | {r['peak_rss_MiB']} |")
    print(json.dumps(doc, indent=1))
    if args.json_out:
        args.json_out.write_text(json.dumps(doc, indent=1) + "\n")


if __name__ == "__main__":
    main()
