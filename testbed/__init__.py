"""The QEMU and guest harness of vhostd's tests, benchmarks and demo (not installed).

``guest`` builds the small test guest (Debian's cloud kernel and a busybox initramfs
with fio), ``qemu`` boots it on vhost-user disks and runs qemu-storage-daemon as a
baseline, ``demo`` is the migration demo of ``./scripts/demo``.
"""
