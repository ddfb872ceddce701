#!/usr/bin/env bash
# Installs imgbackup for real use, as root: the apt packages of scripts/apt-runtime.txt, then a virtual
# environment of Debian's /usr/bin/python3 at /opt/imgbackup holding imgbackup (built from this checkout,
# not editable: the checkout can go afterwards) and its PyPI dependencies, and the command
# /usr/local/bin/imgbackup -> /opt/imgbackup/bin/imgbackup. Run it again to upgrade from the checkout.
#   scripts/install.sh [--prefix DIR] [--link PATH]             install (or upgrade)
#   scripts/install.sh [--prefix DIR] --uninstall               remove exactly what it installed
# The uninstall removes the venv and the link (recorded in DIR/install-manifest.txt); apt packages stay,
# since other software may use them: it prints the ones this script added and the apt-get command.
here=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=scripts/lib.sh
. "$here/scripts/lib.sh"

prefix=/opt/imgbackup
link=/usr/local/bin/imgbackup
action=install
usage() { echo "usage: $SCRIPT_NAME [--prefix DIR] [--link PATH] [--uninstall]" >&2; exit 2; }
while [ "$#" -gt 0 ]; do
  case $1 in
    --prefix) [ "$#" -ge 2 ] || usage; prefix=$2; shift 2 ;;
    --link) [ "$#" -ge 2 ] || usage; link=$2; shift 2 ;;
    --uninstall) action=uninstall; shift ;;
    -h|--help) sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) usage ;;
  esac
done
case $prefix in /*) ;; *) prefix=$(pwd)/$prefix ;; esac
manifest=$prefix/install-manifest.txt
manifest_value() { sed -n "s/^$1=//p" "$manifest"; }

uninstall() {
  step "uninstalling imgbackup from $prefix"
  [ -e "$prefix" ] || { echo "nothing installed at $prefix" >&2; exit 0; }
  [ -f "$manifest" ] || fail "$prefix has no install-manifest.txt: not installed by $SCRIPT_NAME, left alone"
  local recorded_link added
  recorded_link=$(manifest_value link)
  added=$(manifest_value apt_added)
  if [ -n "$recorded_link" ]; then
    if [ "$(readlink "$recorded_link" || true)" = "$prefix/bin/imgbackup" ]; then
      rm -f "$recorded_link"
      echo "removed $recorded_link" >&2
    elif [ -e "$recorded_link" ] || [ -L "$recorded_link" ]; then
      echo "left $recorded_link alone: it no longer points into $prefix" >&2
    fi
  fi
  rm -rf "$prefix"
  echo "removed $prefix" >&2
  if [ -n "$added" ]; then
    echo "apt packages the install added (kept; other software may use them): $added" >&2
    echo "  to remove them too: apt-get remove $added && apt-get autoremove" >&2
  fi
}

install() {
  local packages missing added venv=$prefix
  step "checking what the install needs"
  mapfile -t packages < <(package_list "$here/scripts/apt-runtime.txt")
  mapfile -t missing < <(missing_packages "${packages[@]}")
  if [ "$(id -u)" -ne 0 ]; then
    [ "${#missing[@]}" -eq 0 ] || fail "run as root: apt must install ${missing[*]}"
    if ! mkdir -p "$(dirname "$prefix")" "$(dirname "$link")" || [ ! -w "$(dirname "$prefix")" ] \
       || [ ! -w "$(dirname "$link")" ]; then
      fail "run as root: $prefix and $link are not writable"
    fi
  fi
  if [ -e "$prefix" ] && [ ! -f "$manifest" ]; then
    fail "$prefix exists but was not made by $SCRIPT_NAME (no install-manifest.txt): move it away or use --prefix"
  fi
  if [ -e "$link" ] || [ -L "$link" ]; then
    [ "$(readlink "$link" || true)" = "$venv/bin/imgbackup" ] \
      || fail "$link exists and is not this install's link: remove it or use --link"
  fi

  step "apt packages (scripts/apt-runtime.txt)"
  apt_install "${packages[@]}"
  added=$( { [ -f "$manifest" ] && manifest_value apt_added; printf '%s\n' "${missing[@]}"; } \
           | tr ' ' '\n' | grep -v '^$' | sort -u | paste -sd' ' || true)

  step "virtual environment $venv ($SYSTEM_PYTHON)"
  make_venv "$venv"
  # Written before anything goes into the venv, so a failed install can still be uninstalled.
  write_manifest "$added"

  step "imgbackup and its dependencies into $venv (builds the Cython core from $here)"
  # Build isolation: pip builds in a throw-away environment from pyproject.toml's [build-system], so the
  # installed venv holds only what imgbackup needs at run time.
  pip_quiet "$venv" install --upgrade "$here"

  step "checking the installed imgbackup"
  "$venv/bin/python" -c 'import imgbackup._core.scan, imgbackup._core.bitmap, mfusepy' \
    || fail "the installed imgbackup does not import (see the error above)"
  "$venv/bin/imgbackup" --help >/dev/null

  step "the command $link"
  mkdir -p "$(dirname "$link")"
  ln -sfn "$venv/bin/imgbackup" "$link"
  write_manifest "$added"
  local on_path
  on_path=$(command -v imgbackup || true)
  echo "installed $("$link" --version): $link -> $venv/bin/imgbackup" >&2
  [ "$on_path" = "$link" ] || echo "note: 'imgbackup' on PATH is ${on_path:-not found}, not $link" >&2
}

write_manifest() {
  local commit
  commit=$(git -C "$here" rev-parse --short HEAD 2>/dev/null || echo "not a git checkout")
  cat > "$manifest.tmp" <<EOF
# Written by scripts/install.sh; 'scripts/install.sh --uninstall' removes what it lists.
prefix=$prefix
link=$link
source=$here ($commit)
python=$SYSTEM_PYTHON $("$SYSTEM_PYTHON" -c 'import platform; print(platform.python_version())')
apt_added=$1
installed=$(date -u +%Y-%m-%dT%H:%M:%SZ)
EOF
  mv "$manifest.tmp" "$manifest"
}

"$action"
