#!/usr/bin/env bash
# Installs everything imgbackup needs on a fresh Debian machine: apt packages, then the
# package itself (compiling the Cython core) with its test extras.
#   scripts/install-deps.sh          # runtime + tests
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"

# shellcheck disable=SC2046  # one word per package
scripts/apt-install-missing.sh $(grep -vE '^\s*(#|$)' scripts/apt-packages.txt)

python3 -m pip install -q --upgrade pip >/dev/null 2>&1 || true
# Build requirements first, then build without isolation: no re-download on every run.
python3 -m pip install -q "setuptools>=77" wheel "Cython>=3.0" "numpy>=1.26"
python3 -m pip install -q --no-build-isolation -e ".[test,mount]"
python3 -c "import imgbackup._core" 
