# Shared by the scripts in scripts/ (sourced, not run): one way to name steps, fail loudly, install apt
# packages and build the project's virtual environments.
# shellcheck shell=bash

set -Eeuo pipefail

# Debian's interpreter, never whatever python3 comes first in PATH (a pyenv shim on developer machines
# and on the CI machine): python3-venv and python3-dev from apt match exactly this one, apt keeps it
# patched, and a fresh Debian 12 has it. The same interpreter everywhere makes CI deterministic.
SYSTEM_PYTHON=/usr/bin/python3

# Build requirements of setup.py (the same as pyproject.toml's [build-system]); installed into the
# checkout's venv so editable rebuilds need no isolated build environment (no download per run).
# shellcheck disable=SC2034  # used by the scripts that source this file
BUILD_REQUIREMENTS=("setuptools>=77" "wheel" "Cython>=3.0" "numpy>=1.26")

SCRIPT_NAME=$(basename "$0")
STEP="starting"
_step_started=$SECONDS

# Every failure stops the script and says which step failed (the ERR trap fires on any failing command
# that set -e would stop at, including ones inside functions thanks to set -E).
trap '_on_error $? "$BASH_COMMAND"' ERR
_on_error() {
  # Only the top-level shell reports: a failing $(...) is reported once, by the command that used it.
  [ "$BASH_SUBSHELL" -gt 0 ] || echo "$SCRIPT_NAME: FAILED at step \"$STEP\" (exit $1): $2" >&2
  exit "$1"
}

# step "what happens now" — names the step that a later failure is reported against.
step() {
  STEP=$*
  _step_started=$SECONDS
  printf '\n== %s\n' "$STEP" >&2
}

# fail "message" — stop with a message naming the current step (for checks that are not a command).
fail() {
  echo "$SCRIPT_NAME: FAILED at step \"$STEP\": $*" >&2
  exit 1
}

need_root() {
  [ "$(id -u)" -eq 0 ] || { echo "$SCRIPT_NAME: run as root ($1)" >&2; exit 2; }
}

# package_list FILE... — the package names in lists like scripts/apt-runtime.txt (# comments allowed).
package_list() {
  sed -e 's/#.*//' "$@" | tr -s ' \t' '\n' | grep -v '^$'
}

# missing_packages PKG... — prints those not installed (one dpkg-query for all of them).
missing_packages() {
  [ "$#" -gt 0 ] || return 0
  local installed
  # dpkg-query exits 1 when some package is unknown to dpkg: that is an answer here, not a failure.
  installed=$(dpkg-query -W -f='${Package} ${Status}\n' "$@" 2>/dev/null | awk '/ install ok installed$/ {print $1}' \
              || true)
  local p
  for p in "$@"; do
    grep -qxF "$p" <<<"$installed" || echo "$p"
  done
}

# apt_install PKG... — installs the ones not installed yet (one apt-get run, none if all are there).
# Without root, only sudo can do it; say so instead of failing inside apt.
apt_install() {
  local missing sudo=()
  mapfile -t missing < <(missing_packages "$@")
  [ "${#missing[@]}" -gt 0 ] || return 0
  if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null || fail "apt packages missing (${missing[*]}); run as root to install them"
    sudo=(sudo)
  fi
  echo "installing with apt: ${missing[*]}" >&2
  "${sudo[@]}" apt-get update -q >/dev/null
  DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -q --no-install-recommends "${missing[@]}" \
    >/dev/null
  local still
  still=$(missing_packages "${missing[@]}")
  [ -z "$still" ] || fail "apt-get reported success but these are still not installed: $still"
}

# make_venv DIR — a venv of $SYSTEM_PYTHON at DIR; one made by another interpreter (or broken) is
# recreated, since its compiled extensions and pip would belong to that other Python.
make_venv() {
  local dir=$1 want have=""
  [ -x "$SYSTEM_PYTHON" ] || fail "$SYSTEM_PYTHON is missing (apt install python3)"
  want=$("$SYSTEM_PYTHON" -c 'import sys; print(sys.version)')
  if [ -x "$dir/bin/python" ]; then
    have=$("$dir/bin/python" -c 'import sys; print(sys.version)' 2>/dev/null || true)
    if [ "$have" = "$want" ] && grep -qx 'home = /usr/bin' "$dir/pyvenv.cfg" \
       && "$dir/bin/python" -m pip --version >/dev/null 2>&1; then
      return 0
    fi
    echo "$dir was made by another interpreter (or is broken): recreating it with $SYSTEM_PYTHON" >&2
    rm -rf "$dir"
  fi
  # The venv's pip stays Debian's own (python3-venv's wheel), never upgraded from PyPI: Debian's reads the
  # system CA store, which a machine behind a TLS-inspecting proxy (this one) needs; PyPI's pip does not.
  "$SYSTEM_PYTHON" -m venv "$dir"
}

# pip_quiet VENV ARGS... — pip without its progress chatter; its full output is shown if it fails.
pip_quiet() {
  local venv=$1 out
  shift
  if ! out=$("$venv/bin/python" -m pip --disable-pip-version-check --no-input "$@" 2>&1); then
    printf '%s\n' "$out" >&2
    fail "pip $* failed (its output is above)"
  fi
}
