#!/usr/bin/env bash
# Installs the peer tools the benchmark compares imgbackup with (Debian packages), skipping what is there.
#   benchmarks/setup-peers.sh
set -euo pipefail
pkgs="borgbackup restic zstd partclone qemu-utils e2fsprogs dosfstools mtools gdisk time"
missing=""
for p in $pkgs; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  echo "installing:$missing" >&2
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends $missing >/dev/null
fi
for t in borg restic zstd partclone.ext4 partclone.fat qemu-img; do
  command -v "$t" >/dev/null || { echo "missing after install: $t" >&2; exit 1; }
done
echo "peers: $(borg --version) | $(restic version | cut -d' ' -f1-2) | $(zstd --version | head -1)" \
     "| $(qemu-img --version | head -1)" >&2
