"""The chunk index at fleet scale (issue 13), synthetic: index objects only, no data (run by hand).

    python benchmarks/bench_index.py [--chunks 10000000] [--files 2000] [--hosts 200] [--runs 3]
                                     [--work /var/tmp/imgbackup-bench] [--json-out PATH]

Builds (once, cached under --work) a real encrypted directory repository whose index/ holds --files
chunk-index objects written by --hosts hosts, --chunks entries in all (1 % of them second copies of
another host's chunk: two hosts storing one chunk at once). Then, each in a fresh process so that
peak RSS is the step's own, with the page cache dropped first (when root):

- **cold**: no local cache: every index object read, opened, merged and sorted, and the cache written;
- **cache**: from the local cache (the listing of index/ unchanged);
- **cache + 1**: another host has backed up since: the cache plus one new index object merged;
- **lookups**: ids per second, a backup's segment at a time (8 ids: 8 MiB of 1 MiB chunks) and in
  batches of 65,536, known and unknown ids;
- **dict baseline**: the previous implementation (a Python dict of locations, read file by file),
  at a tenth of the scale (some 300 bytes of Python objects per chunk) and scaled up ×10 — the
  peer this replaces;
- **per-backup requests**: a real backup of a small source into repositories holding 0, 200 and
  2,000 other hosts' images: the storage requests it makes, by kind (the work a backup does must not
  grow with other hosts' images).

Targets: cold ≤ 5 s, cache ≤ 1 s, peak RSS ≤ 600 MiB. Wall seconds on a shared machine move with
the load, so CPU seconds are shown beside them. Prints a Markdown table and writes every number as
JSON (--json-out, default benchmarks/results/index-TIMESTAMP.json).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
PASSPHRASE = b"bench-index"
TARGETS = {"cold_s": 5.0, "cache_s": 1.0, "rss_mib": 600.0}
CHUNKS_PER_PACK = 16          # 16 MiB packs of 1 MiB chunks
BUILD = 2                     # bumped when the synthetic repository's make-up changes (a config gained a signature)
DUPLICATES = 0.01             # share of entries that are a second copy of another file's chunk


def drop_caches() -> None:
    os.sync()
    with contextlib.suppress(OSError):     # not root: the steps then run with a warm page cache
        Path("/proc/sys/vm/drop_caches").write_text("3\n")


# --- building the synthetic repository -----------------------------------------------------------

def build_params(chunks: int, files: int, hosts: int) -> dict:
    """What a built repository's ``.bench-params`` marker says: rebuilt when it differs."""
    from imgbackup.format.layout import FORMAT_VERSION

    return {"chunks": chunks, "files": files, "hosts": hosts, "format": FORMAT_VERSION, "build": BUILD}


def build(repo_dir: Path, chunks: int, files: int, hosts: int) -> None:
    from imgbackup.format.layout import OBJ_CHUNK_INDEX
    from imgbackup.repository.chunktable import ROW_DTYPE, empty_rows
    from imgbackup.repository.indexfile import encode_rows
    from imgbackup.repository.repo import Repository

    if repo_dir.exists():
        shutil.rmtree(repo_dir)
    repo = Repository.init(str(repo_dir), lambda: PASSPHRASE)
    rng = np.random.default_rng(13)
    per_file = chunks // files
    previous = None
    for f in range(files):
        n = per_file + (chunks - per_file * files if f == files - 1 else 0)
        rows = empty_rows(n)
        rows[:, :32] = rng.integers(0, 256, (n, 32), np.uint8)
        if previous is not None:          # two hosts storing one chunk at once: a second copy
            dup = rng.choice(n, int(n * DUPLICATES), replace=False)
            rows[dup, :32] = previous[rng.choice(len(previous), len(dup), replace=False)]
        n_packs = -(-n // CHUNKS_PER_PACK)
        packs = rng.integers(0, 256, (n_packs, 32), np.uint8)
        view = rows.view(ROW_DTYPE)[:, 0]
        view["pack"] = np.arange(n) // CHUNKS_PER_PACK
        view["offset"] = 16 + (np.arange(n) % CHUNKS_PER_PACK) * (1 << 20)
        view["length"] = rng.integers(300_000, 1 << 20, n)
        view["info"] = 1 << 20
        order = np.lexsort([rows[:, i] for i in range(31, -1, -1)])
        rows = rows[order]
        previous = rows[:, :32].copy()
        file_id = os.urandom(32)
        name = f"index/{file_id.hex()}"
        repo.storage.put(name, repo.envelope.seal(OBJ_CHUNK_INDEX, file_id, encode_rows(rows, packs)))
        if f % 200 == 0:
            print(f"  index object {f + 1}/{files} (host {f % hosts})", file=sys.stderr)
    (repo_dir / ".bench-params").write_text(json.dumps(build_params(chunks, files, hosts)))


def add_one_file(repo_dir: Path, n: int) -> str:
    from imgbackup.format.layout import OBJ_CHUNK_INDEX
    from imgbackup.repository.chunktable import ROW_DTYPE, empty_rows
    from imgbackup.repository.indexfile import encode_rows
    from imgbackup.repository.repo import Repository

    repo = Repository.open(str(repo_dir), lambda: PASSPHRASE)
    rng = np.random.default_rng()
    rows = empty_rows(n)
    rows[:, :32] = rng.integers(0, 256, (n, 32), np.uint8)
    rows = rows[np.lexsort([rows[:, i] for i in range(31, -1, -1)])]
    view = rows.view(ROW_DTYPE)[:, 0]
    view["pack"], view["offset"], view["length"], view["info"] = np.arange(n) // CHUNKS_PER_PACK, 16, 1000, 1 << 20
    file_id = os.urandom(32)
    name = f"index/{file_id.hex()}"
    packs = rng.integers(0, 256, (-(-n // CHUNKS_PER_PACK), 32), np.uint8)
    repo.storage.put(name, repo.envelope.seal(OBJ_CHUNK_INDEX, file_id, encode_rows(rows, packs)))
    return name


# --- the measured steps, each run in its own process (--child) -------------------------------------

def child_open(repo_dir: str, lookups: bool) -> dict:
    from imgbackup.repository.repo import Repository

    t0 = time.perf_counter()
    repo = Repository.open(repo_dir, lambda: PASSPHRASE)
    t1, c1 = time.perf_counter(), time.process_time()
    index = repo.chunk_index()
    t2, c2 = time.perf_counter(), time.process_time()
    out = {"kdf_s": round(t1 - t0, 3), "open_s": round(t2 - t1, 3), "open_cpu_s": round(c2 - c1, 3),
           "chunks": len(index.table), "spare": len(index.table.spare), "table_mib": round(index.table.nbytes / 2**20, 1),
           "bytes_per_chunk": round(index.table.nbytes / max(len(index.table), 1), 2),
           "open_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    if lookups:   # its id arrays (64 MB) and results raise the process's peak: rss_mib, not the open's
        rows = index.table.rows
        rng = np.random.default_rng(7)
        known = rows[rng.integers(0, len(rows), 1_000_000), :32].copy()
        unknown = rng.integers(0, 256, (1_000_000, 32), np.uint8)
        for label, ids in (("known", known), ("unknown", unknown)):
            for batch in (8, 65536):
                t = time.perf_counter()
                hits = 0
                for start in range(0, len(ids), batch):
                    hits += int(index.table.contains(ids[start : start + batch]).sum())
                seconds = time.perf_counter() - t
                assert hits == (len(ids) if label == "known" else 0)
                out[f"lookup_{label}_{batch}_per_s"] = round(len(ids) / seconds)
    out["rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    return out


def child_dict_baseline(repo_dir: str, fraction: float) -> dict:
    """The replaced design: every index object decoded into a dict of location objects."""
    from imgbackup.format.layout import OBJ_CHUNK_INDEX
    from imgbackup.repository.indexfile import decode_rows
    from imgbackup.repository.packs import BlobLocation
    from imgbackup.repository.repo import Repository

    repo = Repository.open(repo_dir, lambda: PASSPHRASE)
    names = sorted(repo.storage.list("index"))
    names = names[: max(1, int(len(names) * fraction))]
    t, c = time.perf_counter(), time.process_time()
    locations: dict[bytes, BlobLocation] = {}
    for name in names:
        plain = repo.envelope.open(OBJ_CHUNK_INDEX, bytes.fromhex(name[6:]), repo.storage.get(name), name)
        rows, packs, _ = decode_rows(plain, name)
        pack_ids = [p.tobytes() for p in packs]
        for r in rows:
            locations[r[:32].tobytes()] = BlobLocation(pack_ids[int.from_bytes(r[32:36], "little")],
                                                       int.from_bytes(r[36:40], "little"),
                                                       int.from_bytes(r[40:44], "little"),
                                                       int.from_bytes(r[44:48], "little"))
    return {"open_s": round(time.perf_counter() - t, 3), "open_cpu_s": round(time.process_time() - c, 3),
            "chunks": len(locations), "rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


PACKS_PER_OTHER = 4        # each other image comes with packs (tiny stand-in objects an index file names)
CHUNKS_PER_PACK = 4
IMAGES_PER_INDEX_FILE = 100   # other hosts' index objects, as a compaction leaves them merged


def _other_hosts(repo, others: int) -> None:
    """``others`` images of other hosts (tiny, real image objects), each with packs named by index
    files: what a backup must not come to ask about."""
    from imgbackup.format.imageindex import ImageIndex
    from imgbackup.repository.images import series_tag
    from imgbackup.repository.indexfile import write_index_files
    from imgbackup.repository.packs import BlobLocation, pack_name

    rows = []
    for i in range(others):
        host = f"host{i % 200}"
        meta = {"version": 1, "id": os.urandom(12).hex() + series_tag(repo.keys.id_key, host, "sda"),
                "created": time.time(), "hostname": host, "name": "sda", "type": "full", "parent": None,
                "chunk_size": repo.chunk_size, "slots": 1, "source": {"path": "/dev/sda", "size": 4096},
                "used_map": {"enabled": False, "regions": []}, "changed_blocks": None}
        repo.images.write(ImageIndex(meta, np.zeros(1, np.uint8), np.zeros((0, 32), np.uint8), np.ones(1, np.uint8)))
        for _ in range(PACKS_PER_OTHER):
            pack = os.urandom(32)
            repo.storage.put(pack_name(pack), bytes(64))
            rows += [(os.urandom(32), BlobLocation(pack, 16, 48, 48)) for _ in range(CHUNKS_PER_PACK)]
        if (i + 1) % IMAGES_PER_INDEX_FILE == 0 or i == others - 1:
            write_index_files(repo.storage, repo.envelope, rows)
            rows = []


def child_backup_requests(work: str, others: int) -> dict:
    """A backup of an 8 MiB source into a repository with ``others`` images of other hosts: requests
    per operation and folder (``list packs`` apart from ``list index``)."""
    import socket

    from imgbackup.engine.backup.run import BackupRequest, run_backup
    from imgbackup.repository.backends.faults import FaultyStorage
    from imgbackup.repository.repo import Repository

    base = Path(work) / f"images-{others}"
    if base.exists():
        shutil.rmtree(base)
    base.mkdir(parents=True)
    repo = Repository.init(str(base / "repo"), lambda: PASSPHRASE)
    _other_hosts(repo, others)
    source = base / "source.img"
    source.write_bytes(os.urandom(8 << 20))
    counts: dict[str, int] = {}
    for run in range(2):                         # a full, then an incremental (reads its parent)
        counting = FaultyStorage(repo.storage, at=None)
        assert socket.gethostname()
        run_backup(Repository.open(counting, lambda: PASSPHRASE, for_writing=True),
                   BackupRequest(source=str(source), name="sda"))
        for call in counting.calls:
            op, _, name = call.partition(" ")
            folder = name.split("/", 1)[0] if op in ("list", "exists", "size") else ""
            key = f"{'full' if run == 0 else 'incremental'}_{op}{' ' + folder if folder else ''}"
            counts[key] = counts.get(key, 0) + 1
    shutil.rmtree(base)
    return counts


# --- the driver ---------------------------------------------------------------------------------------

def run_child(args: list[str], env: dict) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", *args], env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--chunks", type=int, default=10_000_000)
    ap.add_argument("--files", type=int, default=2000)
    ap.add_argument("--hosts", type=int, default=200)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--work", default=os.environ.get("BENCH_WORK", "/var/tmp/imgbackup-bench"))
    ap.add_argument("--json-out")
    ap.add_argument("--requests-only", action="store_true",
                    help="only count a backup's storage requests beside 0, 200 and 2,000 other hosts' images")
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        mode, *rest = args.child
        doc = {"open": lambda: child_open(rest[0], rest[1] == "1"),
               "dict": lambda: child_dict_baseline(rest[0], float(rest[1])),
               "requests": lambda: child_backup_requests(rest[0], int(rest[1]))}[mode]()
        print(json.dumps(doc))
        return
    work = Path(args.work) / f"index-{args.chunks}-{args.files}-{args.hosts}"
    if args.requests_only:
        env = {**os.environ, "XDG_CACHE_HOME": str(work / "cache-requests"), "PYTHONPATH": str(ROOT / "src")}
        requests = {n: run_child(["requests", str(work), str(n)], env) for n in (0, 200, 2000)}
        ok = report_requests(requests)
        _save({"requests": requests, "verdicts": {"per_backup_requests_constant": ok},
               "load_average": os.getloadavg()}, args.json_out)
        return
    repo_dir = work / "repo"

    params = build_params(args.chunks, args.files, args.hosts)
    marker = repo_dir / ".bench-params"
    if not marker.exists() or json.loads(marker.read_text()) != params:
        print(f"building {repo_dir} ({args.chunks} entries in {args.files} index objects) ...", file=sys.stderr)
        build(repo_dir, args.chunks, args.files, args.hosts)
    cache_home = work / "cache"
    env = {**os.environ, "XDG_CACHE_HOME": str(cache_home), "PYTHONPATH": str(ROOT / "src")}
    results: dict[str, list[dict]] = {"cold": [], "cache": [], "cache_plus_one": [], "dict_tenth": []}
    for run in range(args.runs):
        print(f"run {run + 1}/{args.runs}", file=sys.stderr)
        shutil.rmtree(cache_home, ignore_errors=True)
        drop_caches()
        results["cold"].append(run_child(["open", str(repo_dir), "0"], env))
        drop_caches()
        results["cache"].append(run_child(["open", str(repo_dir), "1"], env))
        added = add_one_file(repo_dir, args.chunks // args.files)
        drop_caches()
        results["cache_plus_one"].append(run_child(["open", str(repo_dir), "0"], env))
        (repo_dir / added).unlink()
        drop_caches()
        results["dict_tenth"].append(run_child(["dict", str(repo_dir), "0.1"], env))
    requests = {n: run_child(["requests", str(work), str(n)], env) for n in (0, 200, 2000)}
    report(params, results, requests, args.json_out)


def _median(rows: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in rows)


def _incremental_total(counts: dict) -> int:
    return sum(n for k, n in counts.items() if k.startswith("incremental_"))


def report(params: dict, results: dict, requests: dict, json_out: str | None) -> None:
    cold, cache, plus = results["cold"], results["cache"], results["cache_plus_one"]
    base = results["dict_tenth"]
    table = [
        ("open, cold (no cache)", _median(cold, "open_s"), _median(cold, "open_cpu_s"), _median(cold, "open_rss_mib")),
        ("open, from the cache", _median(cache, "open_s"), _median(cache, "open_cpu_s"), _median(cache, "open_rss_mib")),
        ("open, cache + 1 new object", _median(plus, "open_s"), _median(plus, "open_cpu_s"),
         _median(plus, "open_rss_mib")),
        ("dict baseline, 1/10 scale", _median(base, "open_s"), _median(base, "open_cpu_s"), _median(base, "rss_mib")),
    ]
    print(f"\n### Chunk index: {params['chunks']:,} chunks in {params['files']:,} index objects from "
          f"{params['hosts']} hosts ({len(cold)} runs, medians)\n")
    print("| step | wall s | CPU s | peak RSS MiB (after the open) |\n|---|---|---|---|")
    for label, wall, cpu, rss in table:
        print(f"| {label} | {wall:.2f} | {cpu:.2f} | {rss:.0f} |")
    scaled = _median(base, "open_s") * 10
    print(f"\ndict baseline scaled to full size: ~{scaled:.0f} s, ~{_median(base, 'rss_mib') * 10:.0f} MiB "
          f"(ratio cold/baseline {_median(cold, 'open_s') / scaled:.3f})")
    print(f"table: {cache[0]['chunks']:,} chunks + {cache[0]['spare']:,} spare copies, {cache[0]['table_mib']} MiB, "
          f"{cache[0]['bytes_per_chunk']} bytes per chunk (rows, packs, directory)")
    print("\n| lookups per second | segment of 8 | batch of 65,536 |\n|---|---|---|")
    for label in ("known", "unknown"):
        print(f"| {label} ids | {_median(cache, f'lookup_{label}_8_per_s'):,.0f} | "
              f"{_median(cache, f'lookup_{label}_65536_per_s'):,.0f} |")
    verdicts = {
        "cold_s": _median(cold, "open_s") <= TARGETS["cold_s"],
        "cache_s": _median(cache, "open_s") <= TARGETS["cache_s"],
        "rss_mib": max(_median(cold, "open_rss_mib"), _median(cache, "open_rss_mib")) <= TARGETS["rss_mib"],
        "per_backup_requests_constant": report_requests(requests),
    }
    print("\nTargets: " + ", ".join(f"{k} {'PASS' if v else 'FAIL'}" for k, v in verdicts.items()))
    doc = {"params": params, "results": results, "requests": requests, "targets": TARGETS, "verdicts": verdicts,
           "load_average": os.getloadavg()}
    _save(doc, json_out)


def report_requests(requests: dict) -> bool:
    """The table of a backup's requests beside other hosts' images; whether they stay constant: the
    incremental (its index from the local cache) asks no more of the storage with 2,000 other hosts'
    images and their packs than alone, and never lists packs/ then (alone, one listing of packs/ may
    answer where it would otherwise ask one HEAD)."""
    kinds = sorted({k for r in requests.values() for k in r})
    print("\n| storage requests of a backup | " + " | ".join(f"{n} other images" for n in requests) + " |")
    print("|---|" + "---|" * len(requests))
    for kind in kinds:
        print(f"| {kind} | " + " | ".join(str(r.get(kind, 0)) for r in requests.values()) + " |")
    last, alone = requests[max(requests)], requests[min(requests)]
    ok = _incremental_total(last) <= _incremental_total(alone) and not last.get("incremental_list packs")
    print(f"\nper-backup requests constant: {'PASS' if ok else 'FAIL'}")
    return ok


def _save(doc: dict, json_out: str | None) -> None:
    path = Path(json_out) if json_out else ROOT / "benchmarks" / "results" / f"index-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1))
    print(f"\n(JSON: {path})")

if __name__ == "__main__":
    main()
