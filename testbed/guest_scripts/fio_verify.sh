#!/bin/sh
# Random 4k writes with crc32c checksums, verified right after writing, then
# re-read and re-verified by a separate verify-only pass (a fresh fio process
# that only trusts what the device returns).
# Args: [size=64M] [iodepth=16] [device=/dev/vda]
size=${1:-64M}
iodepth=${2:-16}
dev=${3:-/dev/vda}

common="--filename=$dev --rw=randwrite --bs=4k --size=$size --ioengine=libaio \
--direct=1 --iodepth=$iodepth --verify=crc32c --verify_fatal=1 --randrepeat=1 \
--group_reporting"

run_fio() {
    phase=$1
    shift
    # shellcheck disable=SC2086 # $common is a list of options
    fio --name="$phase" $common "$@" >/tmp/fio-$phase.log 2>&1
    rc=$?
    # Keep the console short: the summary lines, or everything on failure.
    if [ $rc -ne 0 ]; then
        cat /tmp/fio-$phase.log
        echo "fio $phase failed: rc=$rc"
        exit 1
    fi
    grep -E 'err=|IOPS=|READ:|WRITE:' /tmp/fio-$phase.log | sed "s/^/fio $phase: /"
}

echo "fio_verify: dev=$dev size=$size iodepth=$iodepth"
run_fio write
run_fio verify --verify_only
echo "fio_verify: OK"
