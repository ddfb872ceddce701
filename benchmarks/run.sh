#!/usr/bin/env bash
# One command: install the peers and imgbackup (the checkout's .venv), build (or reuse) the benchmark
# disks, run everything, print the Markdown table and write benchmarks/results/bench-*.json.  Needs root
# (loop devices, mounts, drop_caches) and ~40 GiB free in the work directory.
#   benchmarks/run.sh [--quick] [--runs N] [--disks disk4g raw2g sparse1t] [--tools NAME ...]
#   BENCH_WORK=/var/tmp/imgbackup-bench (default) holds the disks between runs.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
[ "$(id -u)" -eq 0 ] || { echo "run as root: loop devices, mounts and drop_caches need it" >&2; exit 2; }
"$here/setup-peers.sh"
"$here/../scripts/dev-setup.sh"
# The checkout's .venv (Debian's python3, imgbackup editable): its imgbackup is the one the peers' shell
# commands find first on PATH.
venv=$(cd "$here/.." && pwd)/.venv
PATH=$venv/bin:$PATH exec "$venv/bin/python" "$here/run.py" --work "${BENCH_WORK:-/var/tmp/imgbackup-bench}" "$@"
