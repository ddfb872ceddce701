#!/usr/bin/env bash
# The README's test command, and exactly what .ci/run runs (CI: a clean clone, as root, CI=true).
# Installs everything the tests need (scripts/dev-setup.sh: apt packages, .venv with imgbackup
# editable), then runs ruff and pytest from .venv; arguments go to pytest. Without arguments, the engine
# tests marked core_reference then run once more on the pure-Python kernels (IMGBACKUP_CORE=reference).
# pytest runs with two pytest-xdist workers (most tests wait on tools, loop devices, FUSE, SeaweedFS or
# QEMU, so two share two cores well); the guest tests stay together on one worker and start first
# (tests/conftest.py). Later arguments win: `-n 0` runs in one process, `-n 4` on a bigger machine.
#   scripts/test.sh [PYTEST-ARGS...]        e.g. scripts/test.sh -k 'cli or layers'  ·  -m 'not slow'
#   scripts/test.sh -m guest                the QEMU guest tests alone
here=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=scripts/lib.sh
. "$here/scripts/lib.sh"
cd "$here"

STEP="scripts/dev-setup.sh (apt packages, .venv)"
"$here/scripts/dev-setup.sh"

step "ruff check src tests benchmarks scripts"
.venv/bin/ruff check src tests benchmarks scripts

# Two workers (README "Development"); loadgroup: tests/conftest.py's groups, guest tests first.
XDIST_ARGS=(-n 2 --dist loadgroup)

# run_pytest ARGS... — pytest from .venv; its exit 5 (nothing collected) is a failure, not a pass.
run_pytest() {
  local rc=0
  .venv/bin/python -m pytest -q -p no:cacheprovider "${XDIST_ARGS[@]}" "$@" || rc=$?
  [ "$rc" -ne 5 ] || fail "pytest collected no tests (exit 5): check the arguments ($*)"
  [ "$rc" -eq 0 ] || fail "pytest failed (exit $rc)"
}

step "pytest $*"
run_pytest "$@"
if [ "$#" -eq 0 ]; then
  step "pytest -m core_reference with IMGBACKUP_CORE=reference (the pure-Python kernels)"
  IMGBACKUP_CORE=reference run_pytest -m core_reference
fi
