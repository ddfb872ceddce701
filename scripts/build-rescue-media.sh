#!/usr/bin/env bash
# Builds the rescue media: a thin wrapper around 'imgbackup rescue build' (README, "Rescue media").
#   scripts/build-rescue-media.sh [--cmdline "imgbackup.action=restore ..."] [--timeout 5] OUT.iso
# Uses this checkout's .venv (scripts/test.sh makes it) or an installed imgbackup (scripts/install.sh).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
for candidate in "$here/.venv/bin/imgbackup" /opt/imgbackup/bin/imgbackup "$(command -v imgbackup || true)"; do
    if [ -n "$candidate" ] && [ -x "$candidate" ]; then
        exec "$candidate" rescue build "$@"
    fi
done
echo "build-rescue-media: imgbackup is not installed (run scripts/install.sh or scripts/test.sh first)" >&2
exit 12
