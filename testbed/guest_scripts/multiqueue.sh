#!/bin/sh
# Reports how many hardware queues the guest driver set up, and drives two
# fio jobs at once (on disjoint ranges, so verification stays meaningful).
# Args: [expected queues] [size per job=32M] [device=vda]
expect=$1
size=${2:-32M}
dev=${3:-vda}

queues=$(ls /sys/block/"$dev"/mq | wc -l)
echo "NUM-QUEUES $queues"
if [ -n "$expect" ] && [ "$queues" != "$expect" ]; then
    echo "multiqueue: expected $expect queues"
    exit 1
fi

fio --name=mq --filename=/dev/"$dev" --rw=randwrite --bs=4k --size="$size" \
    --offset_increment="$size" --numjobs=2 --ioengine=libaio --direct=1 --iodepth=16 \
    --verify=crc32c --verify_fatal=1 --group_reporting >/tmp/fio-mq.log 2>&1
rc=$?
if [ $rc -ne 0 ]; then
    cat /tmp/fio-mq.log
    echo "multiqueue: fio failed: rc=$rc"
    exit 1
fi
grep -E 'err=|IOPS=|READ:|WRITE:' /tmp/fio-mq.log | sed 's/^/fio mq: /'
echo "multiqueue: OK"
