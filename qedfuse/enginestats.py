"""The engine's figures: the counters it keeps and the record it reports.

:class:`EngineStats` is the mutable set of counters a :class:`~qedfuse.engine.QedImage`
bumps as it works (tests, benchmarks and ``info`` read them); :class:`EngineStatistics` is
the frozen record :meth:`~qedfuse.engine.QedImage.statistics` returns (``qedfuse status``).
No behaviour here.
"""

from __future__ import annotations

from dataclasses import dataclass

from qedfuse.records import StatsRecord


@dataclass
class EngineStats:
    """Counters for tests, benchmarks and ``info``."""

    allocated_clusters: int = 0
    new_l2_tables: int = 0
    zero_clusters_written: int = 0
    zero_writes_skipped: int = 0
    flushes: int = 0
    need_check_sets: int = 0
    flush_failures: int = 0
    #: Duration of the last completed flush and the longest one, in seconds.
    last_flush_seconds: float | None = None
    max_flush_seconds: float = 0.0
    #: L2 tables and L1 pages the completed flushes wrote.
    l2_tables_flushed: int = 0
    l1_pages_flushed: int = 0


@dataclass(frozen=True, slots=True)
class EngineStatistics(StatsRecord):
    """The engine's figures (see :meth:`QedImage.statistics`)."""

    image_size_bytes: int
    cluster_size_bytes: int
    read_only: bool
    #: Where the next cluster goes: the file's length in whole clusters, in bytes.
    allocator_end_bytes: int
    #: Clusters past the header, L1 and L2 tables: guest data (and leaks, if any).
    data_clusters: int
    l2_tables: int
    clusters_allocated: int  # by this process
    new_l2_tables: int
    zero_clusters_written: int
    zero_writes_skipped: int
    flushes: int
    flush_failures: int
    last_flush_seconds: float | None
    max_flush_seconds: float
    l2_tables_flushed: int
    l1_pages_flushed: int
    dirty_l2_tables: int
    dirty_l1_pages: int
    need_check_on_disk: bool
    need_check_sets: int
    failsafe_reason: str | None


__all__ = ["EngineStatistics", "EngineStats"]
