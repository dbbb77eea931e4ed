#!/bin/sh
# A file system round trip: the data written through ext4 must survive an
# unmount, a clean forced fsck and a remount.
# Args: [device=/dev/vda] [MiB of data=8]
dev=${1:-/dev/vda}
mib=${2:-8}

fail() {
    echo "mkfs_check: $*"
    exit 1
}

mkfs.ext4 -F -q "$dev" || fail "mkfs.ext4 failed"
mkdir -p /mnt/test
mount -t ext4 "$dev" /mnt/test || fail "mount failed"
dd if=/dev/urandom of=/mnt/test/data bs=1M count="$mib" 2>/dev/null || fail "write failed"
sum1=$(sha256sum /mnt/test/data | cut -d' ' -f1)
echo "mkfs_check: wrote $mib MiB, sha256 $sum1"
sync
umount /mnt/test || fail "umount failed"

e2fsck -f -n "$dev" || fail "e2fsck reported problems (rc=$?)"

# Make the second read come from the device, not from cached pages.
echo 3 >/proc/sys/vm/drop_caches
mount -t ext4 "$dev" /mnt/test || fail "second mount failed"
sum2=$(sha256sum /mnt/test/data | cut -d' ' -f1)
umount /mnt/test
[ "$sum1" = "$sum2" ] || fail "checksum mismatch after remount: $sum2"
echo "mkfs_check: OK"
