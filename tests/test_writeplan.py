"""The pure per-cluster plan of an allocating write (qedfuse/writeplan.py).

Table-driven cases for each kind, then a property: carrying out the plan on a model of the
old contents gives exactly the old contents with the write laid over them, so a plan that
confuses two kinds (skips a cluster that needed writing, hides backing data a partial write
keeps, allocates what a zero cluster covers) fails.
"""

from __future__ import annotations

import itertools

import hypothesis.strategies as st
import pytest
from hypothesis import given, settings

from qedfuse.writeplan import PlanRun, WriteKind, plan_write

CS = 4096
SKIP, ZERO, ALLOC = WriteKind.SKIP, WriteKind.ZERO_CLUSTER, WriteKind.ALLOCATE


def _kinds(runs: list[PlanRun]) -> list[WriteKind]:
    return [run.kind for run in runs for _ in range(run.n_clusters)]


def _data(spec: str) -> bytes:
    """One cluster per letter: ``z`` all zeros, ``d`` data with zeros at both ends (the
    cheap first/last-byte test must not decide alone), ``h`` zeros but one byte."""
    middle = bytes(CS // 2 - 1) + b"\x07" + bytes(CS // 2)
    return b"".join(
        {"z": bytes(CS), "d": b"\x00" + b"x" * (CS - 2) + b"\x00", "h": middle}[c] for c in spec
    )


CASES = [
    # (name, pos, data, detect, reads_zero, expected kinds)
    ("detect off: zeros allocate", 0, _data("z"), False, True, [ALLOC]),
    ("zeros over zeros: skip", 0, _data("z"), True, True, [SKIP]),
    ("zeros over backing: zero cluster", 0, _data("z"), True, False, [ZERO]),
    ("data allocates", 0, _data("d"), True, True, [ALLOC]),
    ("one nonzero byte inside", 0, _data("h"), True, True, [ALLOC]),
    ("partial zeros over zeros: skip", 100, bytes(1000), True, True, [SKIP]),
    (
        "partial zeros over backing: allocate (fill keeps backing)",
        100,
        bytes(1000),
        True,
        False,
        [ALLOC],
    ),
    ("partial zeros with detect off", 100, bytes(1000), False, True, [ALLOC]),
    ("mixed runs over backing", 0, _data("zzdzh"), True, False, [ZERO, ZERO, ALLOC, ZERO, ALLOC]),
    ("mixed runs over zeros", 0, _data("dzzd"), True, True, [ALLOC, SKIP, SKIP, ALLOC]),
    ("unaligned span of two clusters", CS - 10, bytes(20), True, False, [ALLOC, ALLOC]),
    (
        "unaligned, whole cluster in the middle",
        CS - 10,
        bytes(CS + 20),
        True,
        False,
        [ALLOC, ZERO, ALLOC],
    ),
]


@pytest.mark.parametrize(
    ("pos", "data", "detect", "reads_zero", "expected"),
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
def test_plan_kinds(
    pos: int, data: bytes, detect: bool, reads_zero: bool, expected: list[WriteKind]
) -> None:
    runs = plan_write(pos, memoryview(data), CS, detect_zeroes=detect, reads_zero=reads_zero)
    assert _kinds(runs) == expected
    # Runs are maximal: neighbours differ.
    assert all(a.kind is not b.kind for a, b in itertools.pairwise(runs))


def test_runs_are_positioned_in_guest_order() -> None:
    pos = 3 * CS + 5
    runs = plan_write(
        pos, memoryview(bytes(CS - 5) + _data("dd")), CS, detect_zeroes=True, reads_zero=True
    )
    assert runs == [PlanRun(SKIP, 3 * CS, 1), PlanRun(ALLOC, 4 * CS, 2)]


def test_cached_zeros_give_the_same_plan() -> None:
    data = memoryview(_data("zdz"))
    plain = plan_write(0, data, CS, detect_zeroes=True, reads_zero=False)
    cached = plan_write(0, data, CS, detect_zeroes=True, reads_zero=False, zeros=bytes(CS))
    assert plain == cached == [PlanRun(ZERO, 0, 1), PlanRun(ALLOC, CS, 1), PlanRun(ZERO, 2 * CS, 1)]


def _apply(old: bytearray, pos: int, data: bytes, runs: list[PlanRun], reads_zero: bool) -> bytes:
    """Carry out a plan on guest contents ``old``: what a read returns afterwards.

    ``old`` is what the clusters read now (zeros when ``reads_zero``, else backing data).
    """
    out = bytearray(old)
    end = pos + len(data)
    for kind, run_start, n_clusters in runs:
        run_end = run_start + n_clusters * CS
        if kind is WriteKind.ZERO_CLUSTER:
            out[run_start:run_end] = bytes(run_end - run_start)
        elif kind is WriteKind.ALLOCATE:
            # Copy-on-write fill from the old contents, the write laid over it.
            lo, hi = max(pos, run_start), min(end, run_end)
            out[lo:hi] = data[lo - pos : hi - pos]
        # SKIP: nothing written; the cluster keeps reading what it read.
    return bytes(out)


@st.composite
def _writes(draw: st.DrawFn) -> tuple[int, bytes, bool, bool]:
    n_clusters = draw(st.integers(1, 5))
    pieces = draw(
        st.lists(st.sampled_from(["z", "d", "h"]), min_size=n_clusters, max_size=n_clusters)
    )
    data = _data("".join(pieces))
    head = draw(st.integers(0, CS - 1))
    tail = draw(st.integers(0, len(data) - head - 1))
    return (
        draw(st.integers(0, 3)) * CS + head,
        data[head : len(data) - tail],
        draw(st.booleans()),
        draw(st.booleans()),
    )


@settings(max_examples=300, deadline=None)
@given(_writes())
def test_plan_preserves_what_reads_return(write: tuple[int, bytes, bool, bool]) -> None:
    pos, data, detect, reads_zero = write
    size = 10 * CS
    old = bytearray(size) if reads_zero else bytearray((i * 7 + 1) % 251 + 1 for i in range(size))
    runs = plan_write(pos, memoryview(data), CS, detect_zeroes=detect, reads_zero=reads_zero)
    expected = bytearray(old)
    expected[pos : pos + len(data)] = data
    assert _apply(old, pos, data, runs, reads_zero) == bytes(expected)
    # The runs cover exactly the clusters the write touches, in order.
    first = pos - pos % CS
    assert runs[0].cluster_pos == first
    for a, b in itertools.pairwise(runs):
        assert b.cluster_pos == a.cluster_pos + a.n_clusters * CS
        assert a.kind is not b.kind
    last = runs[-1]
    assert last.cluster_pos + last.n_clusters * CS == -(-(pos + len(data)) // CS) * CS
    if not detect:
        assert {run.kind for run in runs} == {WriteKind.ALLOCATE}
    # Nothing is allocated that needed no data cluster: every allocated cluster holds a
    # nonzero byte of the write, or a partial zero write over backing data.
    for run in runs:
        if run.kind is not WriteKind.ALLOCATE or not detect:
            continue
        for k in range(run.n_clusters):
            c = run.cluster_pos + k * CS
            lo, hi = max(pos, c), min(pos + len(data), c + CS)
            part = data[lo - pos : hi - pos]
            assert any(part) or (not reads_zero and hi - lo < CS)
