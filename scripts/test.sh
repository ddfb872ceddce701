#!/usr/bin/env bash
# Installs everything the tests need (apt and pip) and runs the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
ruff check src tests benchmarks scripts
python3 -m pytest -q -p no:cacheprovider "$@"
if [ $# -eq 0 ]; then
  # The engines once more on the pure-Python kernels (_core/reference.py), the definitions.
  IMGBACKUP_CORE=reference python3 -m pytest -q -p no:cacheprovider -m core_reference
fi
