#!/bin/sh
# A read-only disk: the guest must see it as such, refuse writes, allow reads.
# Args: [device=vda]
dev=${1:-vda}

fail() {
    echo "readonly: $*"
    exit 1
}

ro=$(cat /sys/block/"$dev"/ro)
echo "RO $ro"
[ "$ro" = 1 ] || fail "/sys/block/$dev/ro is $ro, expected 1"
if dd if=/dev/zero of=/dev/"$dev" bs=4096 count=1 conv=fsync 2>/tmp/dd.err; then
    fail "write to /dev/$dev succeeded"
fi
echo "write refused: $(cat /tmp/dd.err)"
dd if=/dev/"$dev" of=/dev/null bs=1M count=1 2>/dev/null || fail "read failed"
echo "readonly: OK"
