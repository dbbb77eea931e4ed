#!/bin/sh
# A write load with verification that runs while the host migrates the guest.
# Each round writes a fresh pattern and reads it all back; after a fixed time the
# last round's data is verified once more. Every 4k block holds the round's own
# pattern and its offset: a lost write (stale data from an earlier round, which
# checksummed blocks would accept) and a misplaced one both fail the verification.
# Args: [seconds=30] [size per round=16M] [device=vda] [wt: switch to writethrough]
#       [offset=0: where on the device the rounds write]
seconds=${1:-30}
size=${2:-16M}
dev=${3:-vda}
offset=${5:-0}

if [ "$4" = wt ]; then
    # The driver writes the config's wce byte; the device must keep that mode.
    echo "write through" >/sys/block/"$dev"/cache_type || exit 1
fi
echo "CACHE-TYPE $(cat /sys/block/"$dev"/cache_type)"

# Round N's pattern: 4 bytes of N * 7919, then (fio's %o) the block's 8-byte offset.
pattern() {
    printf '0x%08x%%o' $(($1 * 7919))
}
echo "LOAD-STARTED"
start=$(cut -d. -f1 /proc/uptime)
round=0
while :; do
    now=$(cut -d. -f1 /proc/uptime)
    [ $((now - start)) -ge "$seconds" ] && break
    round=$((round + 1))
    # A different seed and pattern each round, so stale data from an earlier round
    # cannot pass.
    fio --name=mig --filename=/dev/"$dev" --rw=randwrite --bs=4k --size="$size" \
        --offset="$offset" --ioengine=libaio --direct=1 --iodepth=8 --verify=pattern --verify_fatal=1 \
        --verify_pattern="$(pattern "$round")" \
        --randseed=$((round * 7919)) --do_verify=1 >/tmp/fio-mig.log 2>&1
    rc=$?
    if [ $rc -ne 0 ]; then
        cat /tmp/fio-mig.log
        echo "migrate_load: round $round failed: rc=$rc"
        exit 1
    fi
    echo "LOAD-ROUND $round OK"
done
# A last read-only pass over the final round's data.
fio --name=mig --filename=/dev/"$dev" --rw=randwrite --bs=4k --size="$size" \
    --offset="$offset" --ioengine=libaio --direct=1 --iodepth=8 --verify=pattern --verify_fatal=1 \
    --verify_pattern="$(pattern "$round")" \
    --randseed=$((round * 7919)) --verify_only >/tmp/fio-final.log 2>&1 || {
    cat /tmp/fio-final.log
    echo "migrate_load: final verify failed"
    exit 1
}
echo "migrate_load: $round rounds OK"
