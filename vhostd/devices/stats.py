"""Per-queue request statistics: plain integers updated where requests complete.

The data path pays one ``time.monotonic_ns()`` pair and a few list and integer
additions per request; readers (the control socket, metrics, SIGUSR1) take a
:meth:`snapshot`, which is plain data and can cross a process boundary (queue workers
answer ``stats`` with it).

Latency is kept as a histogram over fixed bounds (:data:`LATENCY_BOUNDS_NS`), from which
percentiles are estimated and which Prometheus exports as its ``le`` buckets.
"""

from __future__ import annotations

from bisect import bisect_left
from typing import Any

# Upper bounds of the latency buckets in nanoseconds: 1-2-5 steps from 5 us to 10 s; the
# last bucket (index len(LATENCY_BOUNDS_NS)) counts everything slower.
LATENCY_BOUNDS_NS: tuple[int, ...] = tuple(
    m * 10 ** e for e in range(3, 11) for m in (1, 2, 5) if 5_000 <= m * 10 ** e <= 10 ** 10
)

# Request kinds, as counted.
OPS = ("read", "write", "flush", "discard", "write_zeroes", "get_id", "other")
OP_READ, OP_WRITE, OP_FLUSH, OP_DISCARD, OP_WRITE_ZEROES, OP_GET_ID, OP_OTHER = range(len(OPS))


# Bucket lookup without a search: a power-of-two range [2**(k-1), 2**k) holds at most
# one bound (1-2-5 steps are at least a factor 2 apart), so the bucket of a value of bit
# length k is _FIRST[k] or the one after it. _BOUNDS ends with a bound no value passes.
_BOUNDS = (*LATENCY_BOUNDS_NS, 1 << 64)
_FIRST = tuple(bisect_left(LATENCY_BOUNDS_NS, 1 << (k - 1) if k else 0) for k in range(66))


def bucket_of(elapsed_ns: int) -> int:
    """Index of the latency bucket of ``elapsed_ns`` (as bisect_left on the bounds)."""
    i = _FIRST[elapsed_ns.bit_length()]
    return i + 1 if elapsed_ns > _BOUNDS[i] else i


class QueueStats:
    """Counters of one request queue. Only the process serving the queue updates them."""

    __slots__ = ("errors", "in_flight", "latency", "latency_sum_ns", "nbytes", "ops")

    def __init__(self) -> None:
        self.ops = [0] * len(OPS)  # completed, by kind
        self.nbytes = [0] * len(OPS)  # data moved, by kind (reads: to the driver)
        self.errors = 0  # requests completed with a status other than OK
        self.in_flight = 0  # taken, not yet completed
        self.latency = [0] * (len(LATENCY_BOUNDS_NS) + 1)
        self.latency_sum_ns = 0  # a histogram's sum: mean latency = sum / requests

    def completed(self, op: int, nbytes: int, ok: bool, elapsed_ns: int) -> None:
        # The hot path: as few operations as can be (the bucket lookup is inline).
        self.ops[op] += 1
        self.nbytes[op] += nbytes
        if not ok:
            self.errors += 1
        i = _FIRST[elapsed_ns.bit_length()]
        if elapsed_ns > _BOUNDS[i]:
            i += 1
        self.latency[i] += 1
        self.latency_sum_ns += elapsed_ns

    @property
    def requests(self) -> int:
        """Requests completed."""
        return sum(self.ops)

    @property
    def bytes_read(self) -> int:
        """Data moved to the driver."""
        return self.nbytes[OP_READ]

    @property
    def bytes_written(self) -> int:
        """Data moved to storage."""
        return self.nbytes[OP_WRITE]

    def snapshot(self) -> dict[str, Any]:
        """Plain data (JSON-able): the counters and the latency histogram."""
        return {"requests": self.requests, "ops": dict(zip(OPS, self.ops, strict=True)),
                "bytes_read": self.bytes_read, "bytes_written": self.bytes_written,
                "errors": self.errors, "in_flight": self.in_flight,
                "latency_buckets": list(self.latency), "latency_sum_ns": self.latency_sum_ns}

    def merge(self, snap: dict[str, Any]) -> None:
        """Add the counts of ``snap`` (a queue that was served elsewhere for a while)."""
        for i, op in enumerate(OPS):
            self.ops[i] += snap["ops"][op]
        self.nbytes[OP_READ] += snap["bytes_read"]
        self.nbytes[OP_WRITE] += snap["bytes_written"]
        self.errors += snap["errors"]
        for i, n in enumerate(snap["latency_buckets"]):
            self.latency[i] += n
        self.latency_sum_ns += snap["latency_sum_ns"]


def percentile_ns(buckets: list[int], fraction: float) -> int | None:
    """The bucket bound below which ``fraction`` of the requests completed (an upper
    estimate), or None without requests. The overflow bucket reports the last bound."""
    total = sum(buckets)
    if not total:
        return None
    want = fraction * total
    seen = 0
    for i, n in enumerate(buckets):
        seen += n
        if seen >= want:
            return LATENCY_BOUNDS_NS[min(i, len(LATENCY_BOUNDS_NS) - 1)]
    return LATENCY_BOUNDS_NS[-1]


def add_snapshots(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """One queue's counts when part of them were made in another process (a queue
    worker serving the ring now): every counter added, in flight too."""
    s = QueueStats()
    s.merge(a)
    s.merge(b)
    s.in_flight = a["in_flight"] + b["in_flight"]
    return s.snapshot()


def max_bucket_ns(buckets: list[int]) -> int | None:
    """The upper bound of the slowest non-empty bucket (the overflow bucket reports the
    last bound), or None without requests."""
    for i in range(len(buckets) - 1, -1, -1):
        if buckets[i]:
            return LATENCY_BOUNDS_NS[min(i, len(LATENCY_BOUNDS_NS) - 1)]
    return None
