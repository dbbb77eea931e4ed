#!/bin/sh
# Capacity change: the host resizes the disk once it sees READY-FOR-RESIZE;
# the guest must notice through a config-change notification.
# Args: [timeout seconds=60] [device=vda]
timeout=${1:-60}
dev=${2:-vda}

size=$(cat /sys/block/"$dev"/size)
echo "SIZE $size"
echo "READY-FOR-RESIZE"
i=0
while [ $i -lt $((timeout * 2)) ]; do
    now=$(cat /sys/block/"$dev"/size)
    if [ "$now" != "$size" ]; then
        echo "RESIZED $now"
        exit 0
    fi
    sleep 0.5
    i=$((i + 1))
done
echo "resize: size still $size after $timeout s"
exit 1
