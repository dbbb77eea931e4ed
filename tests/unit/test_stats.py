"""Request statistics: counting, merging, percentiles."""

from bisect import bisect_left

from vhostd.devices.stats import (
    LATENCY_BOUNDS_NS,
    OP_FLUSH,
    OP_READ,
    OP_WRITE,
    QueueStats,
    add_snapshots,
    bucket_of,
    max_bucket_ns,
    percentile_ns,
)


def test_counts_by_kind_and_bytes() -> None:
    s = QueueStats()
    s.completed(OP_READ, 4096, True, 7_000)
    s.completed(OP_WRITE, 8192, True, 30_000)
    s.completed(OP_FLUSH, 0, False, 3_000_000)
    snap = s.snapshot()
    assert snap["requests"] == 3
    assert snap["ops"]["read"] == snap["ops"]["write"] == snap["ops"]["flush"] == 1
    assert (snap["bytes_read"], snap["bytes_written"], snap["errors"]) == (4096, 8192, 1)
    assert sum(snap["latency_buckets"]) == 3
    # 7 us lands in the 10 us bucket, 30 us in the 50 us one, 3 ms in the 5 ms one.
    assert snap["latency_buckets"][LATENCY_BOUNDS_NS.index(10_000)] == 1
    assert snap["latency_buckets"][LATENCY_BOUNDS_NS.index(50_000)] == 1
    assert snap["latency_buckets"][LATENCY_BOUNDS_NS.index(5_000_000)] == 1


def test_merge_adds_another_process_counts() -> None:
    a, b = QueueStats(), QueueStats()
    a.completed(OP_READ, 512, True, 1_000)
    b.completed(OP_READ, 1024, True, 1_000)
    b.completed(OP_WRITE, 512, False, 20_000_000_000)  # slower than the last bound
    a.merge(b.snapshot())
    snap = a.snapshot()
    assert (snap["requests"], snap["bytes_read"], snap["errors"]) == (3, 1536, 1)
    assert snap["latency_buckets"][-1] == 1


def test_percentiles() -> None:
    s = QueueStats()
    assert percentile_ns(s.latency, 0.5) is None
    for _ in range(99):
        s.completed(OP_READ, 4096, True, 8_000)
    s.completed(OP_READ, 4096, True, 900_000)
    assert percentile_ns(s.latency, 0.5) == 10_000
    assert percentile_ns(s.latency, 0.99) == 10_000
    assert percentile_ns(s.latency, 1.0) == 1_000_000


def test_bucket_lookup_agrees_with_a_search_of_the_bounds() -> None:
    values = {0, 1, 4_999, (1 << 63) - 1, 10 ** 12}
    for b in LATENCY_BOUNDS_NS:
        values |= {b - 1, b, b + 1}
    for k in range(64):
        values |= {(1 << k) - 1, 1 << k, (1 << k) + 1}
    for v in sorted(values):
        assert bucket_of(v) == bisect_left(LATENCY_BOUNDS_NS, v), v
        s = QueueStats()
        s.completed(OP_READ, 0, True, v)
        assert s.latency[bisect_left(LATENCY_BOUNDS_NS, v)] == 1, v


def test_add_snapshots_and_slowest_bucket() -> None:
    a, b = QueueStats(), QueueStats()
    a.completed(OP_READ, 4096, True, 6_000)
    b.completed(OP_WRITE, 512, False, 300_000)
    b.in_flight = 2
    total = add_snapshots(a.snapshot(), b.snapshot())
    assert total["requests"] == 2 and total["in_flight"] == 2 and total["errors"] == 1
    assert (total["bytes_read"], total["bytes_written"]) == (4096, 512)
    assert total["latency_sum_ns"] == 306_000
    assert max_bucket_ns(total["latency_buckets"]) == 500_000
    assert max_bucket_ns(QueueStats().latency) is None
