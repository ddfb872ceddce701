#!/usr/bin/env bash
# The development environment in this checkout: the apt packages of scripts/apt-runtime.txt and
# scripts/apt-dev.txt, then .venv (Debian's /usr/bin/python3) with imgbackup installed editable with the
# test extra, the Cython core compiled in place. scripts/test.sh runs it first; run it alone to get a
# .venv for `.venv/bin/python -m pytest …`.
#   scripts/dev-setup.sh
# Fast when nothing changed: imgbackup is reinstalled only when pyproject.toml, setup.py or a .pyx/.pxd
# file changed since the last install (a stamp in .venv), or when the compiled core does not import.
here=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=scripts/lib.sh
. "$here/scripts/lib.sh"
cd "$here"
venv=$here/.venv

step "apt packages for imgbackup, its tests and the demo"
mapfile -t packages < <(package_list scripts/apt-runtime.txt scripts/apt-dev.txt)
apt_install "${packages[@]}"

step "virtual environment $venv ($SYSTEM_PYTHON)"
make_venv "$venv"

# What a rebuild depends on: the build configuration, the Cython sources, the interpreter.
stamp_file=$venv/.imgbackup-dev-stamp
mapfile -t cython_sources < <(find src -name '*.pyx' -o -name '*.pxd' | sort)
stamp=$( { "$venv/bin/python" -c 'import sys; print(sys.version)'
           cat pyproject.toml setup.py "${cython_sources[@]}"; } | sha256sum | cut -d' ' -f1)
# installed_here — imgbackup (compiled core included), its dependencies and the test tools import from
# this checkout's src.
installed_here() {
  "$venv/bin/python" - "$here/src" <<'PY'
import sys
import imgbackup, imgbackup._core.scan, imgbackup._core.bitmap, mfusepy, pytest, hypothesis, xdist  # noqa: F401
if not imgbackup.__file__.startswith(sys.argv[1] + "/"):
    sys.exit(f"imgbackup imports from {imgbackup.__file__}, not from {sys.argv[1]}")
PY
}
if [ -f "$stamp_file" ] && [ "$(cat "$stamp_file")" = "$stamp" ] && installed_here >/dev/null 2>&1; then
  echo "imgbackup is installed in $venv and up to date (nothing to rebuild)" >&2
  exit 0
fi

step "build requirements into $venv (${BUILD_REQUIREMENTS[*]})"
pip_quiet "$venv" install "${BUILD_REQUIREMENTS[@]}"

step "imgbackup editable with the test extra into $venv (compiles the Cython core)"
rm -f "$stamp_file"
# No build isolation: the build requirements are in the venv already, so a rebuild downloads nothing.
pip_quiet "$venv" install --no-build-isolation -e ".[test]"

step "checking the editable install"
installed_here
echo "$stamp" > "$stamp_file"
echo "imgbackup is installed in $venv (editable: $here/src)" >&2
