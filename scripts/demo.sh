#!/usr/bin/env bash
# The README's demo command: installs imgbackup the way a user does (scripts/install.sh: apt packages,
# /opt/imgbackup, /usr/local/bin/imgbackup), then runs the main job on built-in defaults: builds a sample
# GPT disk image (FAT32 ESP + ext4 with real files), backs it up, changes it, backs it up again, restores
# both images and checks them byte for byte and with the filesystems' own checkers.
# Needs root, for the install (apt, /opt, /usr/local/bin); the demo itself works on image files only
# (no loop devices, no mounts). Exits non-zero, naming the step, if anything fails.
#   scripts/demo.sh [WORKDIR]          (default: demo-work in the checkout; removed and made anew)
here=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=scripts/lib.sh
. "$here/scripts/lib.sh"
need_root "the demo installs imgbackup with apt and into /opt/imgbackup; see README.md, Quick start"

"$here/scripts/install.sh"
imgbackup() { /usr/local/bin/imgbackup "$@"; }   # the command just installed, whatever else is on PATH
python=/opt/imgbackup/bin/python

step "tools the demo builds its sample disk with (sgdisk)"
apt_install gdisk

work=${1:-$here/demo-work}
rm -rf "$work"; mkdir -p "$work"; cd "$work"
export IMGBACKUP_REPO="$work/repo"
export IMGBACKUP_PASSPHRASE_FILE="$work/passphrase"
head -c 24 /dev/urandom | base64 > "$IMGBACKUP_PASSPHRASE_FILE"   # a demo secret, never in argv

# quietly CMD... — runs CMD; its output is shown only if it fails (then the script stops).
quietly() {
  local out
  out=$("$@" 2>&1) || { printf '%s\n' "$out" >&2; fail "$1 failed (its output is above)"; }
}
# debugfs_do IMAGE REQUEST — debugfs exits 0 even when its request fails: anything on stderr but its
# version banner is a failure.
debugfs_do() {
  local err
  err=$(debugfs "${@:3}" -R "$2" "$1" 2>&1 >/dev/null | grep -v -e '^debugfs [0-9]' -e 'Using EXT2FS Library' \
        || true)
  [ -z "$err" ] || fail "debugfs -R \"$2\" $1: $err"
}

step "building a 256 MiB GPT disk image: FAT32 ESP (64 MiB) + ext4 with real files"
mkdir -p tree/docs tree/lib
cp -r /usr/share/doc/. tree/docs/
cp -r "$("$python" -c 'import json, os; print(os.path.dirname(json.__file__))')" tree/lib/
head -c $((8 << 20)) /dev/urandom > tree/random.bin
truncate -s 256M disk.img
esp_start=$((1 << 20)); esp_size=$((64 << 20)); root_start=$((66 << 20)); root_end=$((255 << 20))
quietly sgdisk -n1:$((esp_start / 512)):$(((esp_start + esp_size) / 512 - 1)) -t1:ef00 -c1:ESP \
               -n2:$((root_start / 512)):$((root_end / 512 - 1)) -t2:8300 -c2:root disk.img
truncate -s $esp_size esp.img
quietly mkfs.vfat -F 32 -s 1 -n DEMOESP esp.img
mmd -i esp.img ::/EFI ::/EFI/BOOT
echo "demo boot entry" > boot.txt
mcopy -i esp.img boot.txt ::/EFI/BOOT/
truncate -s $((root_end - root_start)) root.img
mkfs.ext4 -q -F -L demo-root -d tree root.img
dd if=esp.img of=disk.img bs=1M seek=$((esp_start >> 20)) conv=notrunc status=none
dd if=root.img of=disk.img bs=1M seek=$((root_start >> 20)) conv=notrunc status=none
rm -f esp.img root.img
cp --sparse=always disk.img state1.img

step "imgbackup init"
imgbackup init
step "imgbackup backup disk.img  (full)"
imgbackup backup disk.img --json | tee backup1.json

step "changing the disk: add, edit and delete files in the ext4 partition"
dd if=disk.img of=root.img bs=1M skip=$((root_start >> 20)) count=$(((root_end - root_start) >> 20)) status=none
head -c $((2 << 20)) /dev/urandom > new.bin
debugfs_do root.img "write new.bin new.bin" -w
debugfs_do root.img "rm random.bin" -w
dd if=root.img of=disk.img bs=1M seek=$((root_start >> 20)) conv=notrunc status=none
rm -f root.img
step "imgbackup backup disk.img  (incremental)"
imgbackup backup disk.img --json | tee backup2.json
first=$("$python" -c 'import json; print(json.load(open("backup1.json"))["id"])')

step "imgbackup list / verify"
imgbackup list
imgbackup verify

step "restoring both images"
imgbackup restore latest restored2.img --yes
imgbackup restore "$first" restored1.img --yes

step "checking the first image byte for byte"
cmp state1.img restored1.img || fail "the first image differs from the disk it was taken of"
echo "first image: byte-exact"

step "checking the latest image: partition table, filesystem checkers, every file"
# The change deleted a file: used-block mode neither stores nor restores the deleted bytes left in free
# space, so the latest image is checked by what its filesystems hold, not byte for byte.
part() { dd if="$1" of="$2" bs=1M skip=$(($3 >> 20)) count=$(($4 >> 20)) status=none; }
part disk.img src-root.img $root_start $((root_end - root_start))
part restored2.img root.img $root_start $((root_end - root_start))
part disk.img src-esp.img $esp_start $esp_size
part restored2.img esp.img $esp_start $esp_size
quietly e2fsck -fn root.img
echo "e2fsck -fn: clean"
quietly fsck.vfat -n esp.img
echo "fsck.vfat -n: clean"
mkdir -p files/src files/restored
debugfs_do src-root.img "rdump / files/src"
debugfs_do root.img "rdump / files/restored"
diff -r --no-dereference files/src files/restored >/dev/null || fail "ext4 files differ after restore"
mcopy -s -i src-esp.img ::/ files/src-esp
mcopy -s -i esp.img ::/ files/restored-esp
diff -r --no-dereference files/src-esp files/restored-esp >/dev/null || fail "FAT32 files differ after restore"
cmp <(head -c "$esp_start" disk.img) <(head -c "$esp_start" restored2.img) || fail "partition table differs"
echo "latest image: partition table, every ext4 and FAT32 file equal to the source"
"$python" - <<'PY'
import json
a, b = (json.load(open(f"backup{i}.json")) for i in (1, 2))
print(f"\nfull backup: read {a['bytes_read'] >> 20} MiB, stored {a['bytes_stored'] / 2**20:.1f} MiB in {a['duration_s']} s")
print(f"incremental: read {b['bytes_read'] >> 20} MiB, stored {b['bytes_stored'] / 2**20:.1f} MiB in {b['duration_s']} s")
PY
step "demo finished: every check passed (work files in $work)"
