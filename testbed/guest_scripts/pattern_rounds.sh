#!/bin/sh
# Rounds of host-checkable writes: round i writes 1 MiB of the text
# "vhostd-round-<i>" (one per line, repeated) at offset i MiB with O_DIRECT,
# flushes, reads it back with O_DIRECT and compares, then prints PATTERN-ROUND i OK.
# The host recomputes the same bytes and checks the image file.
# Args: [rounds=10] [pause seconds between rounds=1] [device=vda]
rounds=${1:-10}
pause=${2:-1}
dev=/dev/${3:-vda}

i=1
while [ "$i" -le "$rounds" ]; do
    yes "vhostd-round-$i" | head -c 1048576 >/tmp/want
    if ! dd if=/tmp/want of="$dev" bs=1M seek="$i" count=1 oflag=direct conv=fsync \
            2>/tmp/dd.log; then
        cat /tmp/dd.log
        echo "pattern_rounds: write of round $i failed"
        exit 1
    fi
    dd if="$dev" of=/tmp/got bs=1M skip="$i" count=1 iflag=direct 2>/dev/null
    if ! cmp -s /tmp/want /tmp/got; then
        echo "pattern_rounds: round $i read back differs"
        exit 1
    fi
    echo "PATTERN-ROUND $i OK"
    sleep "$pause"
    i=$((i + 1))
done
echo "pattern_rounds: $rounds rounds OK"
