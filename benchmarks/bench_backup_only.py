"""What a backup-only host pays for an incremental backup (issue 15), measured by hand.

    python benchmarks/bench_backup_only.py [--mib 256] [--changed-blocks 400] [--runs 3]
                                           [--work /var/tmp/imgbackup-bench] [--json-out PATH]

A backup-only key cannot open the parent's chunks, so a changed chunk is stored whole instead of as a
delta against the parent (FORMAT.md 4.2). This script makes an image file (each MiB half random, half
zero), one repository with a full backup of it, then rewrites scattered 4 KiB blocks and copies the
repository once per run and key: an incremental with the full key and one with a backup-only key
(`key add --backup-only`) start from identical repositories. Prints a Markdown table (wall, CPU,
stored bytes, deltas) with the backup-only / full ratios, and writes the numbers as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

MIB = 1 << 20
BLOCK = 4096
FULL_PASS, HOST_PASS = "bench-full-passphrase", "bench-host-passphrase"


def imgbackup(repo: Path, *args: str, passphrase: str = FULL_PASS, **env: str) -> tuple[dict, float, float]:
    """One CLI run: its JSON document, wall seconds, CPU seconds (the child's user + system)."""
    # the cheap KDF in every slot: opening tries slots in turn, and the passphrase's cost is not the subject
    environ = {**os.environ, "IMGBACKUP_REPO": str(repo), "IMGBACKUP_PASSPHRASE": passphrase,
               "IMGBACKUP_TEST_CHEAP_KDF": "1", **env}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "imgbackup", *args, "--json"], env=environ, check=True,
                         capture_output=True, text=True).stdout
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return json.loads(out), wall, cpu


def make_image(path: Path, mib: int, rng: random.Random) -> None:
    with path.open("wb") as f:
        for _ in range(mib):
            f.write(rng.randbytes(MIB // 2) + bytes(MIB // 2))


def rewrite_blocks(path: Path, count: int, rng: random.Random) -> None:
    blocks = path.stat().st_size // BLOCK
    with path.open("r+b") as f:
        for block in rng.sample(range(blocks), count):
            f.seek(block * BLOCK)
            f.write(rng.randbytes(BLOCK))


def measure(args: argparse.Namespace) -> dict:
    work = Path(args.work) / "backup-only"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    rng = random.Random(15)
    image, base = work / "disk.img", work / "base-repo"
    make_image(image, args.mib, rng)
    imgbackup(base, "init")
    imgbackup(base, "key", "add", "--backup-only", "--label", "bench-host", IMGBACKUP_NEW_PASSPHRASE=HOST_PASS)
    imgbackup(base, "backup", str(image))
    rewrite_blocks(image, args.changed_blocks, rng)
    rows: dict[str, list[dict]] = {"full key": [], "backup-only key": []}
    for run in range(args.runs):
        for label, passphrase in (("full key", FULL_PASS), ("backup-only key", HOST_PASS)):
            repo = work / f"repo-{run}-{label.split()[0]}"
            shutil.copytree(base, repo, symlinks=True)
            doc, wall, cpu = imgbackup(repo, "backup", str(image), passphrase=passphrase)
            rows[label].append({"wall_s": round(wall, 2), "cpu_s": round(cpu, 2), "stored": doc["bytes_stored"],
                                "new_chunks": doc["chunks_new"], "deltas": doc["chunks_delta"], "type": doc["type"]})
            shutil.rmtree(repo)
    shutil.rmtree(work)
    return {"mib": args.mib, "changed_blocks": args.changed_blocks, "runs": args.runs,
            "load_average": os.getloadavg(), "results": rows}


def report(result: dict) -> str:
    med = {label: {k: statistics.median(r[k] for r in runs) for k in ("wall_s", "cpu_s", "stored", "deltas")}
           for label, runs in result["results"].items()}
    lines = [f"{result['mib']} MiB image, {result['changed_blocks']} scattered 4 KiB blocks rewritten, "
             f"median of {result['runs']} run(s), load average {result['load_average'][0]:.1f}", "",
             "| incremental by | wall s | CPU s | stored MB | deltas |", "|---|---:|---:|---:|---:|"]
    for label, m in med.items():
        lines.append(f"| {label} | {m['wall_s']:.2f} | {m['cpu_s']:.2f} | {m['stored'] / 1e6:.1f} | {m['deltas']:.0f} |")
    full, host = med["full key"], med["backup-only key"]
    lines += ["", f"backup-only / full: wall {host['wall_s'] / full['wall_s']:.2f}, "
              f"CPU {host['cpu_s'] / full['cpu_s']:.2f}, stored {host['stored'] / max(full['stored'], 1):.1f}"]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mib", type=int, default=256)
    parser.add_argument("--changed-blocks", type=int, default=400)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--work", default="/var/tmp/imgbackup-bench")
    parser.add_argument("--json-out", default=str(Path(__file__).resolve().parent / "results" / "backup-only.json"))
    args = parser.parse_args()
    result = measure(args)
    Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json_out).write_text(json.dumps(result, indent=1))
    print(report(result))


if __name__ == "__main__":
    main()
