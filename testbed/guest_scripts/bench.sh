#!/bin/sh
# Benchmark jobs for benchmarks/guest_bench.py. Each job prints BENCH-START, runs fio
# and prints BENCH-RESULT with fio's JSON on one line, so the host can sample the
# back end's CPU time around exactly that job.
# Args: runtime-seconds job... (jobs: randread32 randwrite32 randread1 seqread128k mq2)
runtime=$1
shift
dev=/dev/vda
common="--filename=$dev --ioengine=libaio --direct=1 --time_based --runtime=$runtime \
--ramp_time=1 --size=128M --group_reporting --output-format=json"

# Interrupts the disk's request queues raised so far (all CPUs): the host divides
# the difference over a job by its I/Os.
irqs() {
    awk '/virtio[0-9]+-req/ { for (i = 2; i <= NF; i++) if ($i ~ /^[0-9]+$/) s += $i }
         END { print s + 0 }' /proc/interrupts
}

for job in "$@"; do
    case $job in
        randread32) opts="--rw=randread --bs=4k --iodepth=32" ;;
        randwrite32) opts="--rw=randwrite --bs=4k --iodepth=32" ;;
        randread1) opts="--rw=randread --bs=4k --iodepth=1" ;;
        seqread128k) opts="--rw=read --bs=128k --iodepth=16" ;;
        mq2) opts="--rw=randread --bs=4k --iodepth=16 --numjobs=2 --cpus_allowed=0-1 \
--cpus_allowed_policy=split" ;;
        *) echo "bench: unknown job $job"; exit 1 ;;
    esac
    before=$(irqs)
    echo "BENCH-START $job"
    # shellcheck disable=SC2086 # option lists
    if ! fio --name="$job" $common $opts >/tmp/$job.json 2>/tmp/$job.err; then
        cat /tmp/$job.err
        echo "bench: $job failed"
        exit 1
    fi
    after=$(irqs)
    echo "BENCH-RESULT $job $(tr -d '\n' </tmp/$job.json)"
    echo "BENCH-IRQS $job $before $after"
done
echo "bench: done"
