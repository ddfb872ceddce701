#!/usr/bin/env bash
# The main job on built-in defaults: installs imgbackup, builds a sample GPT disk image (FAT32 ESP +
# ext4 with real files), backs it up, changes it, backs it up again, restores both images and checks
# them byte for byte and with the filesystems' own checkers. No root needed for the demo itself.
#   scripts/demo.sh [WORKDIR]
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
"$here/scripts/install-deps.sh"

work=${1:-$here/demo-work}
rm -rf "$work"; mkdir -p "$work"; cd "$work"
export IMGBACKUP_REPO="$work/repo"
export IMGBACKUP_PASSPHRASE_FILE="$work/passphrase"
head -c 24 /dev/urandom | base64 > "$IMGBACKUP_PASSPHRASE_FILE"   # a demo secret, never in argv
step() { printf '\n== %s\n' "$*"; }

step "building a 256 MiB GPT disk image: FAT32 ESP (64 MiB) + ext4 with real files"
mkdir -p tree/docs tree/lib
cp -r /usr/share/doc/. tree/docs/ 2>/dev/null || true
cp -r "$(python3 -c 'import json,os;print(os.path.dirname(json.__file__))')" tree/lib/ 2>/dev/null || true
head -c $((8 << 20)) /dev/urandom > tree/random.bin
truncate -s 256M disk.img
esp_start=$((1 << 20)); esp_size=$((64 << 20)); root_start=$((66 << 20)); root_end=$((255 << 20))
sgdisk -n1:$((esp_start / 512)):$(((esp_start + esp_size) / 512 - 1)) -t1:ef00 -c1:ESP \
       -n2:$((root_start / 512)):$((root_end / 512 - 1)) -t2:8300 -c2:root disk.img >/dev/null
truncate -s $esp_size esp.img && mkfs.vfat -F 32 -s 1 -n DEMOESP esp.img >/dev/null
mmd -i esp.img ::/EFI ::/EFI/BOOT && echo "demo boot entry" > boot.txt && mcopy -i esp.img boot.txt ::/EFI/BOOT/
truncate -s $((root_end - root_start)) root.img && mkfs.ext4 -q -F -L demo-root -d tree root.img
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
debugfs -w -R "write new.bin new.bin" root.img >/dev/null 2>&1
debugfs -w -R "rm random.bin" root.img >/dev/null 2>&1
dd if=root.img of=disk.img bs=1M seek=$((root_start >> 20)) conv=notrunc status=none
rm -f root.img
step "imgbackup backup disk.img  (incremental)"
imgbackup backup disk.img --json | tee backup2.json
first=$(python3 -c 'import json;print(json.load(open("backup1.json"))["id"])')

step "imgbackup list / verify"
imgbackup list
imgbackup verify

step "restoring both images and checking them"
fail() { echo "CHECK FAILED: $*" >&2; exit 1; }
imgbackup restore latest restored2.img --yes
imgbackup restore "$first" restored1.img --yes
cmp -s state1.img restored1.img || fail "first image differs from the disk it was taken of"
echo "first image: byte-exact"
# The change deleted a file: used-block mode neither stores nor restores the deleted bytes left in free
# space, so the latest image is checked by what its filesystems hold, not byte for byte.
part() { dd if="$1" of="$2" bs=1M skip=$(($3 >> 20)) count=$(($4 >> 20)) status=none; }
part disk.img src-root.img $root_start $((root_end - root_start))
part restored2.img root.img $root_start $((root_end - root_start))
part disk.img src-esp.img $esp_start $esp_size
part restored2.img esp.img $esp_start $esp_size
e2fsck -fn root.img >/dev/null 2>&1 || fail "e2fsck -fn found errors in the restored ext4"
echo "e2fsck -fn: clean"
fsck.vfat -n esp.img >/dev/null 2>&1 || fail "fsck.vfat -n found errors in the restored FAT32"
echo "fsck.vfat -n: clean"
mkdir -p files/src files/restored
debugfs -R "rdump / files/src" src-root.img >/dev/null 2>&1
debugfs -R "rdump / files/restored" root.img >/dev/null 2>&1
diff -r --no-dereference files/src files/restored >/dev/null || fail "ext4 files differ after restore"
mcopy -s -i src-esp.img ::/ files/src-esp && mcopy -s -i esp.img ::/ files/restored-esp
diff -r --no-dereference files/src-esp files/restored-esp >/dev/null || fail "FAT32 files differ after restore"
cmp -s <(head -c "$esp_start" disk.img) <(head -c "$esp_start" restored2.img) || fail "partition table differs"
echo "latest image: partition table, every ext4 and FAT32 file equal to the source"
python3 - <<'PY'
import json
a, b = (json.load(open(f"backup{i}.json")) for i in (1, 2))
print(f"\nfull backup: read {a['bytes_read'] >> 20} MiB, stored {a['bytes_stored'] / 2**20:.1f} MiB in {a['duration_s']} s")
print(f"incremental: read {b['bytes_read'] >> 20} MiB, stored {b['bytes_stored'] / 2**20:.1f} MiB in {b['duration_s']} s")
PY
step "demo finished: every check passed (work files in $work)"
