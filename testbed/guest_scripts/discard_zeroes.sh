#!/bin/sh
# DISCARD and WRITE_ZEROES: fill 8 MiB with a pattern, discard the first
# 4 MiB, write zeroes to the next 2 MiB, and check what reads back.
# Args: [device=vda]
dev=${1:-vda}
MiB=1048576
# By full path: busybox's shell runs its own applet of the same name (which
# lacks -z) in preference to anything on PATH.
BLKDISCARD=/usr/sbin/blkdiscard

fail() {
    echo "discard_zeroes: $*"
    exit 1
}

echo "discard_max_bytes $(cat /sys/block/"$dev"/queue/discard_max_bytes)"
echo "write_zeroes_max_bytes $(cat /sys/block/"$dev"/queue/write_zeroes_max_bytes)"

# Any non-zero pattern will do; 0xaa makes a stale read obvious.
head -c $((8 * MiB)) /dev/zero | tr '\000' '\252' >/tmp/pattern
dd if=/tmp/pattern of=/dev/"$dev" bs=1M conv=fsync 2>/dev/null || fail "pattern write failed"

"$BLKDISCARD" -o 0 -l 4M /dev/"$dev" || fail "blkdiscard failed"
"$BLKDISCARD" -z -o 4M -l 2M /dev/"$dev" || fail "blkdiscard -z failed"
echo "DISCARD-DONE"

# Read from the device, not from the page cache.
echo 3 >/proc/sys/vm/drop_caches
head -c $((2 * MiB)) /dev/zero >/tmp/zeroes
dd if=/dev/"$dev" of=/tmp/zeroed bs=1M skip=4 count=2 2>/dev/null || fail "read failed"
cmp /tmp/zeroed /tmp/zeroes || fail "write-zeroes range does not read back as zeroes"
dd if=/dev/"$dev" of=/tmp/kept bs=1M skip=6 count=2 2>/dev/null || fail "read failed"
dd if=/tmp/pattern of=/tmp/expect bs=1M skip=6 count=2 2>/dev/null
cmp /tmp/kept /tmp/expect || fail "data after the zeroed range changed"
# Discarded data is unspecified; print it for whoever needs to know.
echo "discarded range sha256 $(dd if=/dev/"$dev" bs=1M count=4 2>/dev/null | sha256sum)"
echo "discard_zeroes: OK"
