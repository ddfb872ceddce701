"""Collection (compact's plan) at fleet scale, synthetic: index objects only, no data (run by hand).

    python benchmarks/bench_collect.py [--chunks 1000000 2000000] [--files-per-million 200]
                                       [--work /var/tmp/imgbackup-bench] [--json-out PATH]

Reuses bench_index.py's synthetic repository (its build step) at each --chunks scale. The packs its
index objects name do not exist (no data is written), so the plan's pack listing is answered from
the index itself (every named pack present, 16 MiB each), and half of the chunks are "needed" (as if
images named them: the array that needed_chunks builds from the images). One process opens the
table (its size) and saves those ids; a fresh one loads them and runs plan_collection (what compact,
prune and delete run under the exclusive lease): its time and peak RSS. With no grace period and no
backup running, every unneeded copy is a new candidate, held until its mark is written. Prints a Markdown table with the plan's memory
above the opened table per chunk (the table itself is chunktable.py's ~51 bytes) and writes the
numbers as JSON. The issue's scale is ``--chunks 10000000`` (bench_index.py builds that repository).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_index  # noqa: E402  (the synthetic repository's builder)

PACK_SIZE = 16 << 20 | 16     # the synthetic index's packs: 16 chunks of 1 MiB


def rss_mib() -> float:
    """The peak RSS so far."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def current_mib() -> float:
    """The RSS now (the peak may be a loading transient)."""
    with open("/proc/self/statm") as f:
        return round(int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20, 1)


def child_needed(repo_dir: str, out: str) -> dict:
    """Open the table, save half its ids (as if images named them) and its pack ids for the plan's run."""
    import numpy as np

    from imgbackup.repository.chunkids import ChunkIds
    from imgbackup.repository.chunkindex import ChunkIndex
    from imgbackup.repository.repo import Repository

    repo = Repository.open(repo_dir, lambda: bench_index.PASSPHRASE)
    start = current_mib()
    table = ChunkIndex.load(repo.storage, repo.envelope).table
    table_mib = current_mib() - start
    t = time.perf_counter()
    needed = ChunkIds(table.rows[::2, :32])      # as needed_chunks builds it from the images' id arrays
    needed_s = time.perf_counter() - t
    np.save(out + ".needed.npy", needed.ids)
    np.save(out + ".packs.npy", np.unique(table.packs.view("V32")[:, 0]).view(np.uint8).reshape(-1, 32))
    return {"table_mib": round(table_mib, 1), "needed_set_s": round(needed_s, 2)}


def child_plan(repo_dir: str, out: str) -> dict:
    """The plan, in a process that holds only the needed ids when it starts (as compact does)."""
    import numpy as np

    from imgbackup.engine import collectplan as collect
    from imgbackup.repository.chunkids import ChunkIds
    from imgbackup.repository.packs import pack_name
    from imgbackup.repository.repo import Repository

    repo = Repository.open(repo_dir, lambda: bench_index.PASSPHRASE)
    start_rss = current_mib()
    needed = ChunkIds(np.load(out + ".needed.npy"), sorted_unique=True)
    needed_rss = current_mib()
    pack_ids = np.load(out + ".packs.npy")
    collect.pack_sizes = lambda _repo: {pack_name(p.tobytes()): PACK_SIZE for p in pack_ids}   # every pack named is present
    t, c = time.perf_counter(), time.process_time()
    plan = collect.plan_collection(repo, needed)
    plan_s, plan_cpu = time.perf_counter() - t, time.process_time() - c
    return {"chunks": plan.entries_before, "needed": len(needed), "packs": len(pack_ids),
            "rewrite": len(plan.rewrite), "free": len(plan.free), "held": len(plan.held),
            "start_rss_mib": start_rss, "needed_set_mib": round(needed_rss - start_rss, 1),
            "plan_s": round(plan_s, 2), "plan_cpu_s": round(plan_cpu, 2), "peak_rss_mib": rss_mib()}


def run_child(*args: str, env: dict) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", *args], env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--chunks", type=int, nargs="+", default=[1_000_000, 2_000_000])
    ap.add_argument("--files-per-million", type=int, default=200)
    ap.add_argument("--work", default=os.environ.get("BENCH_WORK", "/var/tmp/imgbackup-bench"))
    ap.add_argument("--json-out")
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        mode, repo_dir, out = args.child
        print(json.dumps((child_needed if mode == "needed" else child_plan)(repo_dir, out)))
        return
    env = {**os.environ, "PYTHONPATH": str(bench_index.ROOT / "src"), "IMGBACKUP_GC_GRACE_SECONDS": "0"}
    runs = []
    for chunks in args.chunks:
        files = max(1, chunks * args.files_per_million // 1_000_000)
        hosts = max(1, files // 10)
        repo_dir = Path(args.work) / f"index-{chunks}-{files}-{hosts}" / "repo"
        marker = repo_dir / ".bench-params"
        params = bench_index.build_params(chunks, files, hosts)
        if not marker.exists() or json.loads(marker.read_text()) != params:
            print(f"building {repo_dir} ...", file=sys.stderr)
            bench_index.build(repo_dir, chunks, files, hosts)
        with tempfile.TemporaryDirectory() as tmp:
            first = run_child("needed", str(repo_dir), f"{tmp}/ids", env=env)
            plan = run_child("plan", str(repo_dir), f"{tmp}/ids", env=env)
        run = first | plan | {"files": files}
        run["plan_above_table_mib"] = round(plan["peak_rss_mib"] - plan["start_rss_mib"] - first["table_mib"], 1)
        runs.append(run)
    report(runs, args.json_out)


def report(runs: list[dict], json_out: str | None) -> None:
    print("\n### Collection plan (compact/prune/delete), synthetic index, half the chunks needed\n")
    print("| chunks | index objects | table MiB | needed set s | needed set MiB | plan s | plan CPU s "
          "| peak RSS MiB | plan above table, bytes per chunk |\n|---|---|---|---|---|---|---|---|---|")
    for r in runs:
        r["bytes_per_chunk"] = round(r["plan_above_table_mib"] * 2**20 / r["chunks"])
        print(f"| {r['chunks']:,} | {r['files']:,} | {r['table_mib']:.0f} | {r['needed_set_s']:.1f} | "
              f"{r['needed_set_mib']:.0f} | {r['plan_s']:.1f} | {r['plan_cpu_s']:.1f} | {r['peak_rss_mib']:.0f} | "
              f"{r['bytes_per_chunk']} |")
    load = os.getloadavg()
    print(f"\nload average at the end: {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}")
    doc = {"runs": runs, "load_average": load}
    path = Path(json_out) if json_out else (bench_index.ROOT / "benchmarks" / "results"
                                            / f"collect-{time.strftime('%Y%m%d-%H%M%S')}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1))
    print(f"\n(JSON: {path})")


if __name__ == "__main__":
    main()
