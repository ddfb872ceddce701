"""imgbackup through S3 beside a directory repository and restic, and `copy` beside a plain uploader.

Issue 12's benchmark, run by hand (root: drop_caches). One local SeaweedFS (tests/s3server.py, on
loopback) serves every bucket of the run. For each run, each on an empty repository:

- imgbackup into a directory: full backup of disk4g state 1, second backup of state 2, restore;
- imgbackup into a bucket (``s3://…``): the same three steps;
- restic into a bucket of the same server (its s3 backend, ``--stdin``): the same three steps;
- ``imgbackup copy --all`` of the directory repository into an empty bucket repository (related:
  raw mode), beside a plain parallel uploader (boto3, 8 puts in flight) of the same repository's
  files into another bucket: the server's ceiling for those bytes in this run.

Each step is timed cold (benchmarks/measure.py: sync + drop_caches, /usr/bin/time for CPU and peak
RSS); restic's restore is checked against state 2's content hash, the bucket restore against the
directory restore's (imgbackup restores used blocks; run.py checks that one filesystem by filesystem). Prints a Markdown table (medians) and
the issue's targets, and writes every measurement to ``--json-out``:

    python3 benchmarks/bench_s3.py --runs 1 --json-out benchmarks/results/s3.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))  # tests/s3server.py: the one server recipe
from benchlib import content_hash  # noqa: E402
from measure import timed  # noqa: E402
from peers import PASSPHRASE, q  # noqa: E402
from tests.s3server import running_server  # noqa: E402

MiB = 1 << 20
UPLOADERS = 8  # puts in flight for the ceiling: above imgbackup's, so the ceiling is the server's
TARGETS = {"backup_vs_dir": 1.3, "restore_vs_dir": 1.5, "vs_restic": 1.5, "copy_of_ceiling": 0.8, "rss_mib": 200}


def imgbackup_steps(repo: str, s1: Path, s2: Path, target: Path) -> list[tuple[str, str]]:
    b = "imgbackup backup --name bench --json {} > /dev/null"
    return [("init", f"imgbackup init -r {q(repo)} --json > /dev/null"),
            ("full", b.format(f"-r {q(repo)} {q(str(s1))}")),
            ("second", b.format(f"-r {q(repo)} {q(str(s2))}")),
            ("restore", f"imgbackup restore -r {q(repo)} --name bench --yes latest {q(str(target))} --json > /dev/null")]


def restic_steps(s1: Path, s2: Path, target: Path) -> list[tuple[str, str]]:
    b = "restic backup -q --stdin --stdin-filename disk.img < {}"
    return [("init", "restic init -q"), ("full", b.format(q(str(s1)))), ("second", b.format(q(str(s2)))),
            ("restore", f"restic dump -q latest disk.img > {q(str(target))}")]


def upload_ceiling(server, bucket: str, root: Path) -> tuple[float, int]:
    """Every file under ``root`` PUT into ``bucket`` by a plain thread pool: (seconds, bytes)."""
    client = server.client(max_pool_connections=UPLOADERS * 2)
    files = [p for p in root.rglob("*") if p.is_file()]

    def put(path: Path) -> int:
        data = path.read_bytes()
        client.put_object(Bucket=bucket, Key="ceiling/" + str(path.relative_to(root)), Body=data)
        return len(data)

    t0 = time.monotonic()
    with ThreadPoolExecutor(UPLOADERS) as pool:
        sent = sum(pool.map(put, files))
    return time.monotonic() - t0, sent


def one_run(server, work: Path, s1: Path, s2: Path, reference: str, restic: bool) -> list[dict]:
    records = []
    dir_restore = None
    env = {**os.environ, **server.env(), "IMGBACKUP_PASSPHRASE": PASSPHRASE, "IMGBACKUP_PASSPHRASE2": PASSPHRASE,
           "XDG_CACHE_HOME": str(work / "cache")}
    target = work / "restored.img"
    dir_repo = work / "repo"
    plans = [("imgbackup dir", imgbackup_steps(str(dir_repo), s1, s2, target), env),
             ("imgbackup s3", imgbackup_steps(f"s3://{server.new_bucket('bench')}/repo", s1, s2, target), env)]
    if restic:
        renv = {**env, "RESTIC_PASSWORD": PASSPHRASE, "RESTIC_CACHE_DIR": str(work / "restic-cache"),
                "RESTIC_REPOSITORY": f"s3:{server.endpoint}/{server.new_bucket('restic')}/repo"}
        plans.append(("restic s3", restic_steps(s1, s2, target), renv))
    for tool, steps, step_env in plans:
        for step, cmd in steps:
            if step == "restore":
                target.unlink(missing_ok=True)
            result = timed(cmd, step_env, cold=step != "init")
            rec = {"tool": tool, "step": step, **result.to_dict()}
            if step == "restore" and result.ok:
                got = content_hash(target)
                if tool == "imgbackup dir":   # used blocks only: free space differs from the disk
                    dir_restore = got        # (run.py checks it filesystem by filesystem)
                    rec["check"] = "fs-equal (run.py)"
                else:
                    want = dir_restore if tool.startswith("imgbackup") else reference
                    rec["check"] = "byte-exact" if got == want else "MISMATCH"
            print(f"  {tool:14} {step:8} {result.wall_s:8.1f} s  {result.rss_mib:7.1f} MiB"
                  f"{'' if result.ok else '  FAILED ' + result.error}", file=sys.stderr)
            records.append(rec)
        target.unlink(missing_ok=True)
    # copy of the directory repository into a related bucket repository, and the uploader's ceiling
    copy_url = f"s3://{server.new_bucket('copy')}/repo"
    init = timed(f"imgbackup init -r {q(copy_url)} --related-to {q(str(dir_repo))} --json > /dev/null", env, cold=False)
    copy = timed(f"imgbackup copy -r {q(str(dir_repo))} --all --to {q(copy_url)} --json > {q(str(work / 'copy.json'))}",
                 env)
    copied = json.loads((work / "copy.json").read_text()) if copy.ok and init.ok else {}
    records.append({"tool": "imgbackup copy", "step": "copy", **copy.to_dict(), "bytes": copied.get("bytes_sent", 0),
                    "mode": copied.get("mode")})
    seconds, sent = upload_ceiling(server, server.new_bucket("ceiling"), dir_repo)
    records.append({"tool": "plain uploader (ceiling)", "step": "copy", "wall_s": round(seconds, 3), "cpu_s": 0.0,
                    "rss_mib": 0.0, "ok": True, "bytes": sent})
    print(f"  copy {copy.wall_s:.1f} s for {copied.get('bytes_sent', 0) / MiB:.0f} MiB; "
          f"ceiling {seconds:.1f} s for {sent / MiB:.0f} MiB", file=sys.stderr)
    return records


def summarize(records: list[dict]) -> dict:
    med: dict = {}
    for rec in records:
        med.setdefault((rec["tool"], rec["step"]), []).append(rec)
    table = {k: {"wall_s": statistics.median(r["wall_s"] for r in rs), "rss_mib": max(r["rss_mib"] for r in rs),
                 "ok": all(r["ok"] and r.get("check") != "MISMATCH" for r in rs),
                 "bytes": statistics.median(r.get("bytes", 0) for r in rs)} for k, rs in med.items()}

    def ratio(a: tuple[str, str], b: tuple[str, str]) -> float | None:
        if a in table and b in table and table[a]["wall_s"] > 0:
            return round(table[b]["wall_s"] / table[a]["wall_s"], 3)
        return None

    out = {"table": {f"{t} / {s}": v for (t, s), v in table.items()}, "ratios": {}}
    r = out["ratios"]
    for step in ("full", "second", "restore"):
        r[f"s3_{step}_vs_dir"] = ratio(("imgbackup dir", step), ("imgbackup s3", step))   # s3 time / dir time
        r[f"restic_{step}_vs_s3"] = ratio(("restic s3", step), ("imgbackup s3", step))    # > 1: imgbackup faster
        if r[f"restic_{step}_vs_s3"]:
            r[f"restic_{step}_vs_s3"] = round(1 / r[f"restic_{step}_vs_s3"], 3)
    cp, ceil = table.get(("imgbackup copy", "copy")), table.get(("plain uploader (ceiling)", "copy"))
    if cp and ceil and cp["wall_s"] and ceil["wall_s"]:
        r["copy_of_ceiling"] = round((cp["bytes"] / cp["wall_s"]) / (ceil["bytes"] / ceil["wall_s"]), 3)
    r["peak_rss_mib"] = max((v["rss_mib"] for (t, _), v in table.items() if t.startswith("imgbackup")), default=0)
    return out


def markdown(summary: dict) -> str:
    lines = ["| tool / step | wall s | peak RSS MiB | MiB sent | ok |", "|---|---|---|---|---|"]
    for name, v in summary["table"].items():
        lines.append(f"| {name} | {v['wall_s']:.1f} | {v['rss_mib']:.0f} | "
                     f"{v['bytes'] / MiB:.0f} | {'yes' if v['ok'] else 'NO'} |")
    r = summary["ratios"]
    lines += ["", "| target | measured | goal |", "|---|---|---|"]
    for step in ("full", "second"):
        lines.append(f"| S3 {step} backup / directory | {r.get(f's3_{step}_vs_dir')} | ≤ {TARGETS['backup_vs_dir']} |")
    lines.append(f"| S3 restore / directory | {r.get('s3_restore_vs_dir')} | ≤ {TARGETS['restore_vs_dir']} |")
    for step in ("full", "second", "restore"):
        lines.append(f"| restic {step} / imgbackup (S3) | {r.get(f'restic_{step}_vs_s3')} | ≥ {TARGETS['vs_restic']} |")
    lines.append(f"| copy throughput / plain uploader | {r.get('copy_of_ceiling')} | ≥ {TARGETS['copy_of_ceiling']} |")
    lines.append(f"| imgbackup peak RSS MiB | {r.get('peak_rss_mib')} | ≤ {TARGETS['rss_mib']} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    work_default = os.environ.get("BENCH_WORK", "/var/tmp/imgbackup-bench")
    ap.add_argument("--disk", default=f"{work_default}/disk4g", help="disk prefix: PREFIX-s1.img, PREFIX-s2.img")
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--no-restic", action="store_true")
    ap.add_argument("--json-out", type=Path)
    args = ap.parse_args()
    s1, s2 = Path(f"{args.disk}-s1.img"), Path(f"{args.disk}-s2.img")
    ref_file = Path(f"{args.disk}-s2.reference.json")
    reference = json.loads(ref_file.read_text())["content"] if ref_file.exists() else content_hash(s2)
    records: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="imgbackup-bench-s3-", dir=work_default) as tmp, \
            running_server(Path(tmp) / "seaweedfs") as server:
        for n in range(args.runs):
            print(f"run {n + 1} of {args.runs}", file=sys.stderr)
            work = Path(tmp) / f"run{n}"
            work.mkdir()
            records += [{**r, "run": n} for r in one_run(server, work, s1, s2, reference, not args.no_restic)]
    summary = summarize(records)
    print(markdown(summary))
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps({"records": records, **summary}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
