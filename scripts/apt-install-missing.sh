#!/usr/bin/env bash
# Installs the given Debian packages that are not installed yet (one apt-get run, none if all are there).
#   scripts/apt-install-missing.sh PKG...
here=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=scripts/lib.sh
. "$here/scripts/lib.sh"
step "apt packages: $*"
apt_install "$@"
