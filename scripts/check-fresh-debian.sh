#!/usr/bin/env bash
# Manual check, not part of the test suite: do the README's commands work on a truly fresh Debian 12?
# Debootstraps a bookworm minbase chroot, installs only `git ca-certificates python3` in it, clones this
# checkout's HEAD into it (uncommitted changes are not checked) and runs there, timed, as root:
#   scripts/demo.sh  ·  scripts/install.sh (again: the upgrade path) and the installed `imgbackup`  ·
#   CI=true scripts/test.sh TEST-ARGS, then again on one file (nothing may be rebuilt)  ·
#   scripts/install.sh --uninstall (nothing of it may remain)
# Every mount it made (and anything the runs left mounted inside the chroot) is unmounted on exit, even on
# failure or Ctrl-C; the chroot is deleted unless --keep.
#   scripts/check-fresh-debian.sh [--keep] [--dir DIR] [-- TEST-ARGS...]
#   default TEST-ARGS: -k 'cli or layers' (the whole suite takes long; pass `--` alone to run all of it)
# Needs root, ~5 GiB free in DIR's filesystem (default: a new directory in /var/tmp), and the Debian mirror
# of /etc/apt/sources.list.d/debian.sources plus PyPI.
here=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=scripts/lib.sh
. "$here/scripts/lib.sh"
need_root "debootstrap, chroot and bind mounts need it"

keep=0
dir=""
test_args=(-k 'cli or layers')
while [ "$#" -gt 0 ]; do
  case $1 in
    --keep) keep=1; shift ;;
    --dir) [ "$#" -ge 2 ] || fail "--dir needs a directory"; dir=$2; shift 2 ;;
    --) shift; test_args=("$@"); break ;;
    -h|--help) sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) fail "unknown argument $1 (see --help)" ;;
  esac
done

NEEDED_GIB=5  # the chroot's ~2.5 GiB plus room for the tests' disk images
root=""
cleanup() {
  local rc=$? m left
  trap - ERR
  set +e
  [ -n "$root" ] || exit "$rc"
  [ "$rc" -ne 130 ] || echo "$SCRIPT_NAME: interrupted at step \"$STEP\"; cleaning up" >&2
  # Processes still running inside the chroot (a server a failed run left) hold its mounts: end them,
  # each by its PID.
  for m in /proc/[0-9]*; do
    [ "$(readlink "$m/root" 2>/dev/null)" = "$root" ] && kill -9 "${m#/proc/}" 2>/dev/null
  done
  # Loop devices whose backing file lives in the chroot were made by the runs inside it.
  losetup -nO NAME,BACK-FILE 2>/dev/null | while read -r dev file; do
    case $file in "$root"/*) losetup -d "$dev" && echo "detached $dev ($file)" >&2 ;; esac
  done
  # Every mount at or below the chroot, deepest first: ours (the binds) and any a run left behind.
  while read -r m; do
    umount "$m" 2>/dev/null || umount -l "$m" || echo "could not unmount $m" >&2
  done < <(mounts_under "$root" | sort -r)
  left=$(mounts_under "$root")
  if [ -n "$left" ]; then
    echo "$SCRIPT_NAME: still mounted, so $root is NOT deleted: $left" >&2
    rc=1
  elif [ "$keep" -eq 1 ]; then
    echo "kept the chroot: $root" >&2
  else
    rm -rf --one-file-system "$root"
    # The directory goes too if this script made it and nothing (a failure's logs) was kept in it.
    [ "$made_dir" -eq 0 ] || rmdir "$dir" 2>/dev/null || echo "kept $dir (logs of the failure)" >&2
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# mounts_under DIR — mount points at or below DIR (the host's view).
mounts_under() {
  awk -v d="$1" '$5 == d || index($5, d "/") == 1 {print $5}' /proc/self/mountinfo
}

# The mirror this machine's apt uses (deb822 sources: the first URIs of a stanza serving bookworm).
mirror=$(awk '/^URIs:/ {u=$2} /^Suites:/ && / bookworm( |$)/ {print u; exit}' \
           /etc/apt/sources.list.d/debian.sources)
[ -n "$mirror" ] || fail "no bookworm mirror in /etc/apt/sources.list.d/debian.sources"

timings=()
# timed NAME CMD... — runs one measured step and records its wall time.
timed() {
  local name=$1 start=$SECONDS
  shift
  step "$name"
  "$@"
  timings+=("$(printf '%6d s  %s' $((SECONDS - start)) "$name")")
}

# in_chroot CMD — a login-like root shell in the chroot with a clean environment (nothing of this
# machine's: no pyenv, no pip configuration, no CA bundle variables).
in_chroot() {
  chroot "$root" /usr/bin/env -i HOME=/root LANG=C.UTF-8 TERM=dumb \
    PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin /bin/bash -c "$1"
}

bind() {
  mkdir -p "$root$1"
  mount --bind "$1" "$root$1"
}

setup_chroot() {
  apt_install debootstrap
  local log=$dir/debootstrap.log
  if ! debootstrap --variant=minbase bookworm "$root" "$mirror" >"$log" 2>&1; then
    # debootstrap's own log lies inside the chroot, which the clean-up deletes: keep it beside ours.
    [ ! -f "$root/debootstrap/debootstrap.log" ] || cp "$root/debootstrap/debootstrap.log" "$dir/debootstrap-inner.log"
    local f
    for f in "$log" "$dir/debootstrap-inner.log"; do
      if [ -f "$f" ]; then echo "--- the end of $f:" >&2; tail -15 "$f" >&2; fi
    done
    fail "debootstrap failed (logs kept in $dir)"
  fi
  rm -f "$log"
  # As on a real machine: / is a mount point, /dev /dev/pts /proc /sys are there, /dev/shm is a tmpfs.
  mount --bind "$root" "$root"
  bind /dev
  bind /dev/pts
  mount -t tmpfs -o mode=1777 tmpfs "$root/dev/shm"
  bind /proc
  bind /sys
  cp /etc/resolv.conf "$root/etc/resolv.conf"
}

install_base() {
  in_chroot "apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
             --no-install-recommends git ca-certificates python3 >/dev/null"
  # This machine reaches PyPI through a TLS proxy whose CA only its own certificates name.
  cp /usr/local/share/ca-certificates/*.crt "$root/usr/local/share/ca-certificates/"
  in_chroot "update-ca-certificates >/dev/null"
  in_chroot "! command -v pip && ! command -v pip3 && ! python3 -c 'import venv, ensurepip' 2>/dev/null" \
    >/dev/null || fail "the chroot is not fresh: pip or python3-venv is already there"
}

clone_checkout() {
  local commit
  commit=$(git -C "$here" rev-parse HEAD)
  [ -z "$(git -C "$here" status --porcelain --untracked-files=no)" ] \
    || echo "note: uncommitted changes in $here are not part of this check" >&2
  git clone -q --no-hardlinks "$here" "$root/root/imgbackup"
  git -C "$root/root/imgbackup" checkout -q -B fresh-check "$commit"
  echo "checking $(git -C "$here" log --oneline -1 "$commit")" >&2
}

check_installed() {
  # shellcheck disable=SC2016  # expanded by the chroot's shell
  in_chroot 'set -e; [ "$(command -v imgbackup)" = /usr/local/bin/imgbackup ]; imgbackup --version
             cd /tmp && imgbackup --help >/dev/null'
}

check_uninstalled() {
  in_chroot 'cd /root/imgbackup && scripts/install.sh --uninstall'
  in_chroot '! [ -e /opt/imgbackup ] && ! [ -e /usr/local/bin/imgbackup ] && ! command -v imgbackup' \
    || fail "something of the install is left after --uninstall"
}

made_dir=0
if [ -z "$dir" ]; then
  dir=$(mktemp -d /var/tmp/imgbackup-fresh-debian.XXXXXX)
  made_dir=1
fi
mkdir -p "$dir"
root=$(cd "$dir" && pwd)/root
# The chroot grows to ~2.5 GiB (build tools, QEMU, two venvs) plus what the tests write in its /tmp.
free_kib=$(df -Pk "$dir" | awk 'NR == 2 {print $4}')
[ "$free_kib" -ge $((NEEDED_GIB << 20)) ] \
  || fail "$dir has $((free_kib >> 20)) GiB free; the check needs ~$NEEDED_GIB GiB (use --dir elsewhere)"
[ ! -e "$root" ] || fail "$root exists already: pass another --dir"
mkdir "$root"
quoted_args=""
[ "${#test_args[@]}" -eq 0 ] || quoted_args=$(printf '%q ' "${test_args[@]}")

timed "debootstrap bookworm minbase ($mirror)" setup_chroot
timed "apt-get install git ca-certificates python3 (nothing else)" install_base
timed "git clone of this checkout" clone_checkout
timed "scripts/demo.sh" in_chroot "cd /root/imgbackup && scripts/demo.sh"
timed "scripts/install.sh (second run: upgrade in place)" in_chroot "cd /root/imgbackup && scripts/install.sh"
timed "imgbackup on PATH" check_installed
timed "CI=true scripts/test.sh $quoted_args" in_chroot "cd /root/imgbackup && CI=true scripts/test.sh $quoted_args"
timed "CI=true scripts/test.sh tests/test_layers.py (second run: nothing rebuilt)" \
  in_chroot "cd /root/imgbackup && CI=true scripts/test.sh tests/test_layers.py"
timed "scripts/install.sh --uninstall" check_uninstalled

step "every step passed on a fresh Debian 12 minbase; wall times:"
printf '%s\n' "${timings[@]}"
