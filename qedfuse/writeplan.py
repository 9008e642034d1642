"""The per-cluster plan of an allocating write: pure, no I/O.

An allocating write covers a run of guest clusters that are unallocated or zero clusters.
With zero detection on, a cluster whose part of the write is all zeros may need no data
cluster: :func:`plan_write` says, per run of clusters, which of the three
:class:`WriteKind` the engine carries out.
"""

from __future__ import annotations

import enum
from typing import Final, NamedTuple


class WriteKind(enum.Enum):
    """What an allocating write does for one guest cluster."""

    #: Zeros over a cluster that already reads zeros (zero cluster, or no backing image):
    #: nothing to write.
    SKIP = "skip"
    #: Zeros over a whole cluster that would read backing data: point its L2 entry at a
    #: zero cluster, no data written.
    ZERO_CLUSTER = "zero-cluster"
    #: Anything else: allocate a data cluster and write it (with the copy-on-write fill).
    ALLOCATE = "allocate"


# Module-level aliases: an enum member lookup costs ~40 ns each, on the write path.
_SKIP: Final = WriteKind.SKIP
_ZERO_CLUSTER: Final = WriteKind.ZERO_CLUSTER
_ALLOCATE: Final = WriteKind.ALLOCATE


class PlanRun(NamedTuple):
    """Consecutive guest clusters with one kind: from guest position ``cluster_pos`` (cluster
    aligned), ``n_clusters`` of them."""

    kind: WriteKind
    cluster_pos: int
    n_clusters: int


def plan_write(
    pos: int,
    data: memoryview,
    cluster_size: int,
    *,
    detect_zeroes: bool,
    reads_zero: bool,
    zeros: bytes | None = None,
) -> list[PlanRun]:
    """The plan for writing ``data`` (format ``"B"``) at guest ``pos``, in guest order.

    ``reads_zero``: the clusters read as zeros now (zero clusters, or unallocated without a
    backing image).  ``zeros``: at least ``cluster_size`` zero bytes (the caller's cached
    copy, to spare an allocation per call).  The runs cover every cluster the write touches;
    neighbours differ in kind.
    """
    if zeros is None:
        zeros = bytes(cluster_size)
    end = pos + len(data)
    start = pos - pos % cluster_size
    n_clusters = -(-(end - start) // cluster_size)
    kinds: list[WriteKind] = []
    for k in range(n_clusters):
        c_start = start + k * cluster_size
        lo = max(pos, c_start)
        hi = min(end, c_start + cluster_size)
        part = data[lo - pos : hi - pos]
        if detect_zeroes and part[0] == 0 and part[-1] == 0 and bytes(part) == zeros[: hi - lo]:
            if reads_zero:
                kinds.append(_SKIP)
                continue
            if hi - lo == cluster_size:
                kinds.append(_ZERO_CLUSTER)
                continue
        kinds.append(_ALLOCATE)
    runs: list[PlanRun] = []
    k = 0
    while k < n_clusters:
        kind = kinds[k]
        j = k + 1
        while j < n_clusters and kinds[j] is kind:
            j += 1
        runs.append(PlanRun(kind, start + k * cluster_size, j - k))
        k = j
    return runs


__all__ = ["PlanRun", "WriteKind", "plan_write"]
