#!/usr/bin/env bash
# Installs the peer tools the benchmark compares imgbackup with (Debian packages), skipping what is there.
#   benchmarks/setup-peers.sh
set -euo pipefail
"$(dirname "$0")/../scripts/apt-install-missing.sh" \
  borgbackup restic zstd partclone qemu-utils e2fsprogs dosfstools mtools gdisk time
for t in borg restic zstd partclone.ext4 partclone.fat qemu-img; do
  command -v "$t" >/dev/null || { echo "missing after install: $t" >&2; exit 1; }
done
echo "peers: $(borg --version) | $(restic version | cut -d' ' -f1-2) | $(zstd --version | head -1)" \
     "| $(qemu-img --version | head -1)" >&2
