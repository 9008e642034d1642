"""Crash consistency by record and replay (reliability.md §3.7, matrix rows A1, A3, A4, A5, A7).

Every workload runs on a RecordingBackend; :mod:`crashsim` turns the log into crash states
(every prefix of barrier epochs times every subset of the last epoch's writes, plus torn,
zeroed-append and garbage variants) and checks each one: it opens or is refused with a
FormatError, NEED_CHECK clear ⇒ no corruption, repair leaves no corruption, and every
sector acknowledged by a completed flush reads back exactly (never-written sectors read
zeros).  The design's ordering invariant is asserted too: without garbage, no state has any
corruption at all (metadata never reaches the disk before what it points to).

Garbage (SQLite's third outcome) over a *metadata* overwrite can destroy acknowledged
mappings or the header itself; QED has no checksums, so for those states only (a)-(c) are
asserted (they are counted separately in the figures).
"""

from __future__ import annotations

import dataclasses
import os
import random
import shutil
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import crashsim as cs
import hypothesis.strategies as st
import pytest
import trio
from hypothesis import HealthCheck, given, settings

from qedfuse import engine, opening, tables
from qedfuse import format as fmt
from qedfuse.check import check_image
from qedfuse.errors import FormatError
from qedfuse.imagefile import MemoryImage
from support import check_ok, require_tool, run

CL = 4096
MIB = 1024 * 1024
IMAGE_SIZE = 8 * MIB
#: The "populated" starting image: clusters 0-3 allocated, L2 table 0 exists, clean.
PREFILL = ((0, cs.pattern(900, 4 * CL)),)

#: ACE-style operation menu (cs=4096, ts=2: one L2 table maps 4 MiB).
MENU: dict[str, tuple[Any, ...]] = {
    "w0": ("write", 0, CL),  # aligned cluster 0 (overwrite when populated)
    "wsub": ("write", 5 * CL + 300, 1000),  # unaligned, sub-cluster
    "wx": ("write", 7 * CL + 3000, 6000),  # unaligned, spans two clusters
    "wt1": ("write", 4 * MIB + 2 * CL, CL),  # needs a new L2 table
    "wsec": ("write", CL + 512, 512),  # one sector inside cluster 1
    "wbig": ("write", 20 * CL, 16 * CL),  # 16 clusters in one allocation
    "zero": ("zeroes", 0, 2 * CL),  # write_zeroes over clusters 0-1
    "wedge": ("write", 4 * MIB - 2048, CL),  # crosses the L2 table boundary
}
FLUSH = ("flush",)
REOPEN = ("reopen",)

# Crash states are damaged images by design: opening one repairs it (a warning) or finds
# invalid table entries (a warning, then failsafe mode, an error).
pytestmark = pytest.mark.expect_log(
    r"image had NEED_CHECK set; repaired on open: ",
    r"L\d+ table at 0x[0-9a-f]+ has \d+ invalid entries",
    r"\d+ invalid L\d+ entries; the guest ranges they map will fail with EIO",
    r"entering failsafe mode: \d+ invalid L\d+ entries",
)


def enumerated_workloads() -> Iterator[tuple[str, list[tuple[Any, ...]], bool]]:
    """(name, ops, populated) for every bounded workload, deterministically."""
    names = list(MENU)
    for populated in (False, True):
        for a in names:
            yield f"{a}", [MENU[a]], populated
            yield f"{a},F", [MENU[a], FLUSH], populated
            yield f"{a},R", [MENU[a], REOPEN], populated
        for i, a in enumerate(names):
            for j, b in enumerate(names):
                yield f"{a},F,{b},F", [MENU[a], FLUSH, MENU[b], FLUSH], populated
                yield f"{a},{b},F", [MENU[a], MENU[b], FLUSH], populated
                if (i + j) % 2 == 0:  # half of the pairs for these two (runtime budget)
                    yield f"{a},F,{b}", [MENU[a], FLUSH, MENU[b]], populated
                    yield f"{a},R,{b}", [MENU[a], REOPEN, MENU[b]], populated
    rng = random.Random(20240601)
    for n in range(24):
        ops: list[tuple[Any, ...]] = []
        labels: list[str] = []
        for _ in range(3):
            key = rng.choice(names)
            ops.append(MENU[key])
            labels.append(key)
            if rng.random() < 0.5:
                ops.append(FLUSH)
                labels.append("F")
        ops.append(FLUSH)
        labels.append("F")
        yield f"3op#{n}:" + ",".join(labels), ops, bool(n % 2)


#: Other table sizes: (table_size, ops) — ts=1 maps 2 MiB per L2 table, ts=16 32 MiB.
GEOMETRY_WORKLOADS: list[tuple[int, list[tuple[Any, ...]]]] = [
    (1, [("write", 0, CL), FLUSH, ("write", 2 * MIB + 100, 5000), FLUSH]),
    (1, [("write", 2 * MIB - 1000, 3000), ("write", 6 * MIB, CL), FLUSH, ("write", 0, 512)]),
    (1, [("write", 3 * CL, 8 * CL), REOPEN, ("write", 3 * CL + 10, 10), FLUSH]),
    (16, [("write", 0, CL), FLUSH, ("write", 7 * MIB, 3 * CL), FLUSH]),
    (16, [("write", 100, 9000), ("write", 5 * MIB, CL), FLUSH, ("zeroes", 0, CL), FLUSH]),
    (16, [("write", 6 * CL, CL), REOPEN, ("write", 6 * CL, 512), ("write", 0, CL), FLUSH]),
]


async def record(
    ops: Sequence[tuple[Any, ...]], populated: bool, table_size: int = 2, seed: int = 0
) -> cs.Recording:
    return await cs.record_workload(
        ops,
        image_size=IMAGE_SIZE,
        cluster_size=CL,
        table_size=table_size,
        prefill=PREFILL if populated else (),
        seed=seed,
    )


def assert_no_violations(figures: cs.Figures) -> None:
    assert figures.n_violations == 0, "\n".join(f"[{w}] {v}" for w, v in figures.violations)


# --------------------------------------------------------------------------- A7


async def test_a7_exact_write_order_of_one_allocating_write_and_flush() -> None:
    """NEED_CHECK set+F first; then data, L2 space ≺ F ≺ L2 ≺ F ≺ L1 ≺ F ≺ header ≺ F."""
    mem = MemoryImage()
    header = await tables.create_image(mem, IMAGE_SIZE, cluster_size=CL, table_size=2)
    rec = cs.RecordingBackend(mem)
    img = await opening.open_image(rec)
    data = cs.pattern(1, 1000)
    await img.write(CL * 3 + 100, data)
    await img.flush()

    l1 = header.l1_table_offset  # 4096; L1 is 2 clusters, so the file ends at 12288
    data_offset = 3 * CL  # first allocation at the end of the file
    l2_offset = data_offset + CL  # the new L2 table follows its data cluster
    cluster = bytearray(CL)
    cluster[100:1100] = data
    dirty = header.replace(features=header.features | 0x2).pack()
    l2 = bytearray(2 * CL)
    l2[3 * 8 : 4 * 8] = data_offset.to_bytes(8, "little")
    l1_page = bytearray(CL)
    l1_page[0:8] = l2_offset.to_bytes(8, "little")
    expected = [
        ("W", 0, dirty),  # NEED_CHECK set ...
        ("F",),  # ... and durable before the file grows or any metadata is written
        ("W", data_offset, bytes(cluster)),  # data (with zero fill) at the allocator end
        ("W", l2_offset, bytes(2 * CL)),  # the new L2 table's space, taken at creation
        ("F",),  # flush step 1: data (and the table's zeros)
        ("W", l2_offset, bytes(l2[:4096])),  # step 2: the new table's dirty 4 KiB page
        ("F",),
        ("W", l1, bytes(l1_page)),  # step 3: the dirty 4 KiB page of L1
        ("F",),
        ("W", 0, header.pack()),  # step 4: NEED_CHECK cleared
        ("F",),
    ]
    got = [e if e[0] != "W" else (e[0], e[1], e[2]) for e in rec.log]
    assert [(e[0], e[1] if len(e) > 1 else None) for e in got] == [
        (e[0], e[1] if len(e) > 1 else None) for e in expected
    ]
    assert got == expected


# --------------------------------------------------------------------------- A1


async def test_a1_enumerated_workloads_crash_states(request: pytest.FixtureRequest) -> None:
    """≥ 5,000 distinct crash states of bounded workloads, 0 violations."""
    figures = cs.Figures()
    started = time.monotonic()
    n_workloads = 0
    for name, ops, populated in enumerated_workloads():
        recording = await record(ops, populated)
        label = f"{'populated' if populated else 'fresh'}:{name}"
        await cs.replay(recording, figures, label=label)
        n_workloads += 1
    for table_size, ops in GEOMETRY_WORKLOADS:
        for populated in (False, True):
            recording = await record(ops, populated, table_size)
            await cs.replay(recording, figures, label=f"ts={table_size}:{ops}")
            n_workloads += 1
    elapsed = time.monotonic() - started
    figures.counts["workloads"] = n_workloads
    cs.report_figures(
        request.config,
        "crash replay A1 (enumerated workloads)",
        [*figures.lines(), f"elapsed: {elapsed:.1f} s"],
    )
    assert_no_violations(figures)
    assert figures.counts["states"] >= 5000
    # the variants really happen (a generator that degenerated would pass trivially)
    for variant in ("subset", "torn", "zeroed-append", "garbage"):
        assert figures.counts[f"variant:{variant}"] >= 200, variant
    assert figures.counts["need_check set"] >= 1000
    assert figures.counts["corrupt before repair"] >= 50  # garbage over metadata is repaired


#: Overlay workloads: copy-on-write from a raw backing image and zero clusters.
BACKING = cs.pattern(777, 6 * MIB)  # shorter than the 8 MiB overlay: its tail reads zeros
OVERLAY_MENU: dict[str, tuple[Any, ...]] = {
    "cow": ("write", 5 * CL + 300, 1000),  # sub-cluster: the rest comes from the backing
    "cowx": ("write", 7 * CL + 3000, 6000),
    "zfull": ("zeroes", 2 * CL, 2 * CL),  # zero-cluster entries: metadata only
    "zpart": ("zeroes", 9 * CL + 512, 1024),
    "wzero": ("write", 2 * CL + 100, 200),  # into the zero clusters (if zfull ran)
    "wt1": ("write", 4 * MIB + 2 * CL, CL),  # a new L2 table, over the backing
    "tail": ("write", 6 * MIB - 1024, 4096),  # straddles the end of the backing
}


async def test_a1_overlay_workloads(request: pytest.FixtureRequest) -> None:
    """Overlays: acknowledged COW data and zero clusters survive; never-written sectors
    read the backing image (or zeros past its end), never stale or foreign bytes."""
    figures = cs.Figures()
    started = time.monotonic()
    names = list(OVERLAY_MENU)
    for i, a in enumerate(names):
        for j, b in enumerate(names):
            shapes = [[a, "F", b, "F"], [a, b, "F"]] + ([[a, "R", b]] if (i + j) % 3 == 0 else [])
            for shape in shapes:
                ops = [{"F": FLUSH, "R": REOPEN}.get(key) or OVERLAY_MENU[key] for key in shape]
                recording = await cs.record_workload(
                    ops, image_size=IMAGE_SIZE, cluster_size=CL, table_size=2, backing=BACKING
                )
                await cs.replay(recording, figures, label="overlay:" + ",".join(shape))
    cs.report_figures(
        request.config,
        "crash replay A1 (overlays on a raw backing image)",
        [*figures.lines(), f"elapsed: {time.monotonic() - started:.1f} s"],
    )
    assert_no_violations(figures)
    assert figures.counts["states"] >= 1000


_OP_STRATEGY = st.one_of(
    st.tuples(
        st.just("write"),
        st.integers(0, IMAGE_SIZE - 1),
        st.integers(1, 3 * CL),
    ).map(lambda t: (t[0], min(t[1], IMAGE_SIZE - t[2]), t[2])),
    st.tuples(st.just("zeroes"), st.integers(0, IMAGE_SIZE // CL - 4), st.integers(1, 3)).map(
        lambda t: (t[0], t[1] * CL, t[2] * CL)
    ),
    st.just(FLUSH),
    st.just(REOPEN),
)
_HYPOTHESIS_FIGURES = cs.Figures()


@settings(
    max_examples=200,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(ops=st.lists(_OP_STRATEGY, min_size=1, max_size=5), populated=st.booleans())
def test_a1_hypothesis_workloads(ops: list[tuple[Any, ...]], populated: bool) -> None:
    """Hypothesis draws workloads (≤ 5 ops); every crash state of each is checked."""

    async def run() -> cs.Figures:
        figures = cs.Figures()
        recording = await record(ops, populated)
        await cs.replay(recording, figures, label=str(ops))
        return figures

    figures = trio.run(run)
    _HYPOTHESIS_FIGURES.counts.update(figures.counts)
    assert_no_violations(figures)


def test_a1_hypothesis_figures(request: pytest.FixtureRequest) -> None:
    """Report what the hypothesis run covered (runs after it, in file order)."""
    counts = _HYPOTHESIS_FIGURES.counts
    if not counts:
        pytest.skip("the hypothesis workload test did not run in this session")
    cs.report_figures(
        request.config, "crash replay A1 (hypothesis workloads)", cs.Figures(counts).lines()
    )
    assert counts["states"] >= 1000


# --------------------------------------------------------------------------- A4

_A4 = {"examples": 0, "states": 0, "garbage": 0}
_A4_FIGURES = cs.Figures()


@settings(
    max_examples=2000,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(
    ops=st.lists(_OP_STRATEGY, min_size=1, max_size=5),
    populated=st.booleans(),
    n_sync=st.integers(0, 40),
    seed=st.integers(0, 2**32 - 1),
)
def test_a4_sqlite_style_random_crash(
    ops: list[tuple[Any, ...]], populated: bool, n_sync: int, seed: int
) -> None:
    """SQLite crash VFS: at the n-th sync each pending write lands, vanishes or is garbage."""

    async def run() -> cs.Figures:
        figures = cs.Figures()
        recording = await record(ops, populated, seed=seed)
        state = cs.sqlite_crash_state(
            recording.initial,
            recording.log,
            n_sync,
            random.Random(seed),
            initial_acked=recording.initial_acked,
        )
        result = await cs.check_state(state, recording.oracle, recording.layout)
        figures.add_result(state, result, f"{ops} n_sync={n_sync} seed={seed}")
        return figures

    figures = trio.run(run)
    _A4["examples"] += 1
    _A4_FIGURES.counts.update(figures.counts)
    assert_no_violations(figures)


def test_a4_figures(request: pytest.FixtureRequest) -> None:
    counts = _A4_FIGURES.counts
    if not _A4["examples"]:
        pytest.skip("the A4 hypothesis test did not run in this session")
    cs.report_figures(
        request.config,
        "crash replay A4 (SQLite-style random crash at the n-th sync)",
        [f"seeds: {_A4['examples']}", *cs.Figures(counts).lines()],
    )
    assert _A4["examples"] >= 2000
    assert counts["variant:garbage"] >= 100


# --------------------------------------------------------------------------- A5


async def test_a5_qemu_cross_check_of_repaired_states(
    request: pytest.FixtureRequest, tmp_path: Any
) -> None:
    """≥ 200 repaired crash states: qemu-img check rc 0/3, convert equals our raw view."""
    qemu_img = require_tool("qemu-img")
    samples: list[tuple[str, bytes]] = []
    figures = cs.Figures()
    workloads = [w for w in enumerated_workloads() if ",F," in w[0] or w[0].startswith("3op")]
    for index, (name, ops, populated) in enumerate(workloads[::7]):
        recording = await record(ops, populated)
        kept: list[bytes] = []

        def keep(state: cs.CrashState, result: cs.StateResult, out: list[bytes] = kept) -> None:
            if result.repaired is not None and not result.violations:
                out.append(result.repaired)

        await cs.replay(recording, figures, label=name, keep=keep)
        # a spread of states per workload: first, middle, last, and every 7th
        picks = sorted({0, len(kept) // 2, len(kept) - 1, *range(3, len(kept), 7)})
        samples += [(f"{index}-{name}-{k}", kept[k]) for k in picks if 0 <= k < len(kept)]
    assert_no_violations(figures)
    assert len(samples) >= 200

    async def raw_view(data: bytes) -> bytes:
        img = await opening.open_image(MemoryImage(data, read_only=True), read_only=True)
        try:
            return await img.read(0, img.image_size)
        finally:
            await img.close()

    paths = []
    for k, (_, data) in enumerate(samples):
        path = tmp_path / f"s{k}.qed"
        path.write_bytes(data)
        paths.append(path)
    rc_counts: dict[int, int] = {}
    failures: list[str] = []
    limiter = trio.CapacityLimiter(os.cpu_count() or 2)

    async def one(k: int) -> None:
        async with limiter:
            path = paths[k]
            check = await trio.run_process(
                [qemu_img, "check", "-f", "qed", str(path)], capture_stdout=True, check=False
            )
            rc_counts[check.returncode] = rc_counts.get(check.returncode, 0) + 1
            if check.returncode not in (0, 3):
                failures.append(f"{samples[k][0]}: qemu-img check rc {check.returncode}")
            out = path.with_suffix(".raw")
            conv = await trio.run_process(
                [qemu_img, "convert", "-f", "qed", "-O", "raw", str(path), str(out)],
                capture_stderr=True,
                check=False,
            )
            if conv.returncode != 0:
                failures.append(f"{samples[k][0]}: convert rc {conv.returncode}")
            elif out.read_bytes() != await raw_view(samples[k][1]):  # 8 MiB: one at a time
                failures.append(f"{samples[k][0]}: qemu-img convert differs from our raw view")
            out.unlink(missing_ok=True)

    started = time.monotonic()
    async with trio.open_nursery() as nursery:
        for k in range(len(samples)):
            nursery.start_soon(one, k)
    cs.report_figures(
        request.config,
        "crash replay A5 (QEMU cross-check of repaired crash states)",
        [
            f"states cross-checked: {len(samples)}",
            f"qemu-img check rc: {dict(sorted(rc_counts.items()))}",
            f"failures: {len(failures)}",
            f"elapsed: {time.monotonic() - started:.1f} s",
        ],
    )
    assert not failures, "\n".join(failures[:20])


# --------------------------------------------------------------------------- A2, A6 (QEMU)

#: QEMU workloads for A2: ("write", pattern, pos, size) | ("flush",).  The first is §2.5's.
QEMU_WORKLOADS: list[list[tuple[Any, ...]]] = [
    [
        ("write", 0x11, 0, 4096),
        ("write", 0x22, MIB, 4096),
        ("flush",),
        ("write", 0x33, 2 * MIB, 4096),
        ("write", 0x44, 8192, 512),
        ("write", 0x55, 0, 4096),
        ("flush",),
        ("write", 0x66, 3 * MIB + 100 * 512, 8192),
    ],
    [
        ("write", 0x21, 60 * MIB, 65536),
        ("flush",),
        ("write", 0x22, 60 * MIB + 4096, 512),
        ("write", 0x23, 0, 131072),
        ("flush",),
        ("write", 0x24, 30 * MIB, 4096),
        ("flush",),
    ],
]


def _qemu_io_session(qemu_io: str, image: Path, log: Path, commands: list[str]) -> list[int]:
    """Run qemu-io on ``image`` through blklogwrites, one command at a time; return the log's
    nr_entries after each command (so a guest flush's ACK position is known)."""
    opts = (
        "driver=qed,file.driver=blklogwrites,file.file.driver=file,"
        f"file.file.filename={image},file.log.driver=file,file.log.filename={log},"
        "file.log-sector-size=512"
    )
    proc = subprocess.Popen(
        [qemu_io, "-t", "writeback", "--image-opts", opts],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    assert proc.stdin is not None
    assert proc.stdout is not None
    out = b""
    entries = []

    def wait_prompt() -> None:
        nonlocal out
        deadline = time.monotonic() + 30
        while not out.endswith(b"qemu-io> "):
            assert time.monotonic() < deadline, out[-500:]
            chunk = os.read(proc.stdout.fileno(), 4096)  # type: ignore[union-attr]
            assert chunk, f"qemu-io exited: {out[-500:]!r}"
            out += chunk

    try:
        wait_prompt()
        for command in commands:
            proc.stdin.write(command.encode() + b"\n")
            proc.stdin.flush()
            wait_prompt()
            assert b"error" not in out.lower().rsplit(b"qemu-io> ", 2)[-2], out[-500:]
            entries.append(cs.dm_log_entries(log.read_bytes()))
        proc.stdin.write(b"quit\n")
        proc.stdin.close()
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return entries


def _qemu_recording(
    *,
    entries: list[list[tuple[Any, ...]]],
    acks: dict[int, int],
    writes: list[tuple[int, int, bytes]],
    initial: bytes,
    layout: cs.Layout,
    drop: frozenset[int] = frozenset(),
) -> cs.Recording:
    """A Recording from a parsed QEMU log: an ACK after each guest flush's last entry."""
    log: list[tuple[Any, ...]] = []
    for index, converted in enumerate(entries):
        if index not in drop:
            log.extend(converted)
        if index + 1 in acks:
            log.append(("ACK", acks[index + 1]))
    oracle = cs.Oracle.build(64 * MIB, writes)
    return cs.Recording(initial, log, 0, oracle, layout, 64 * MIB, 0)


async def test_a2_oracle_on_qemus_own_write_order(
    request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """QEMU 7.2's QED writes (recorded with blklogwrites) replayed through this harness:
    every crash state passes (a)-(d).  The ordering invariant is qedfuse's, not QEMU's."""
    qemu_img = require_tool("qemu-img")
    qemu_io = require_tool("qemu-io")
    figures = cs.Figures()
    mutant = cs.Figures()
    for k, workload in enumerate(QEMU_WORKLOADS):
        init = tmp_path / f"init{k}.qed"
        work = tmp_path / f"work{k}.qed"
        log_path = tmp_path / f"w{k}.log"
        check_ok(run([qemu_img, "create", "-q", "-f", "qed", init, "64M"]))
        shutil.copy(init, work)
        log_path.write_bytes(b"")
        commands = [
            f"write -P {op[1]:#x} {op[2]} {op[3]}" if op[0] == "write" else "flush"
            for op in workload
        ]
        positions = _qemu_io_session(qemu_io, work, log_path, commands)
        raw = log_path.read_bytes()
        # rebuild the log with an ACK after each guest flush's last entry
        entries = cs.parse_dm_log_entries(raw)
        acks = {positions[i]: i for i, op in enumerate(workload) if op[0] == "flush"}
        writes = [
            (i, op[2], bytes([op[1]]) * op[3]) for i, op in enumerate(workload) if op[0] == "write"
        ]
        final = await opening.open_image(
            MemoryImage(work.read_bytes(), read_only=True), read_only=True
        )
        layout = await cs.layout_of(final)
        await final.close()

        parts: dict[str, Any] = {"entries": entries, "acks": acks, "writes": writes}
        parts.update(initial=init.read_bytes(), layout=layout)
        await cs.replay(_qemu_recording(**parts), figures, label=f"qemu#{k}", ordering=False)
        if k == 0:
            # negative control (reliability.md §3.8): without the NEED_CHECK header write
            # (entry 0) and the barrier after the new L2 table (entry 4) it must fail
            assert entries[0][0][:2] == ("W", 0)
            assert entries[4] == [("F",)]
            control = _qemu_recording(drop=frozenset({0, 4}), **parts)
            await cs.replay(control, mutant, ordering=False)
    cs.report_figures(
        request.config,
        "crash replay A2 (QEMU 7.2's own write order)",
        [
            *figures.lines(),
            f"negative control (entries 0 and 4 dropped): {mutant.n_violations} violations "
            f"in {mutant.counts['states']} states",
        ],
    )
    assert figures.counts["states"] >= 200
    assert_no_violations(figures)
    assert mutant.counts["violation:clean_corrupt"] >= 1


async def test_a6_qemu_made_crash_images(request: pytest.FixtureRequest, tmp_path: Path) -> None:
    """iotest 039's pattern: qemu-io writes, then SIGKILLs itself; qedfuse sees NEED_CHECK,
    repairs, and reads what qemu-img convert reads (20 random workloads)."""
    qemu_img = require_tool("qemu-img")
    qemu_io = require_tool("qemu-io")
    rng = random.Random(39)
    n_need_check = 0
    for k in range(20):
        path = tmp_path / f"crash{k}.qed"
        opts = rng.choice(["cluster_size=4096,table_size=2", "cluster_size=65536,table_size=4"])
        check_ok(run([qemu_img, "create", "-q", "-f", "qed", "-o", opts, path, "64M"]))
        args: list[str | Path] = [qemu_io]
        for n in range(rng.randint(1, 4)):
            pos = rng.randrange(0, 64 * MIB - 200_000) // 512 * 512
            size = rng.choice([512, 4096, 65536, 100_000 // 512 * 512])
            args += ["-c", f"write -P {0x5A + n} {pos} {size}"]
        args += ["-c", "sigraise 9", path]
        cp = run(args)
        assert cp.returncode == -9, cp.stdout + cp.stderr
        raw = path.with_suffix(".raw")
        check_ok(run([qemu_img, "convert", "-f", "qed", "-O", "raw", path, raw]))
        data = path.read_bytes()
        if fmt.Header.unpack(data).need_check:
            n_need_check += 1
        mem = MemoryImage(data)
        img = await opening.open_image(mem)  # repairs
        assert not fmt.Header.unpack(bytes(mem.data)).need_check
        assert await img.read(0, img.image_size) == raw.read_bytes(), k
        await img.close()
        raw.unlink()
        report = await check_image(MemoryImage(mem.data))
        assert report.exit_code() in (0, 3), report
    cs.report_figures(
        request.config,
        "crash replay A6 (QEMU-made crash images)",
        ["images: 20", f"NEED_CHECK set by QEMU: {n_need_check}", "repaired and equal: 20"],
    )
    assert n_need_check == 20


# --------------------------------------------------------------------------- repair crashes


async def test_repair_is_crash_safe(request: pytest.FixtureRequest) -> None:
    """A crash during the open-time repair (check_image(repair=True)) of a crash state: every
    state of the repair's own log must again open, repair to 0 corruptions and keep every
    acknowledged sector (the repair zeroes entries, truncates leaks, sets/clears NEED_CHECK).
    """
    figures = cs.Figures()
    n_repairs = 0
    started = time.monotonic()
    candidates: list[tuple[cs.Recording, cs.CrashState]] = []
    for _name, ops, populated in list(enumerated_workloads())[::9]:
        recording = await record(ops, populated)
        for state in cs.crash_states(
            recording.initial, recording.log, initial_acked=recording.initial_acked
        ):
            header = fmt.Header.unpack(state.data)
            if header.magic == fmt.QED_MAGIC and header.need_check:
                candidates.append((recording, state))
    for recording, state in candidates[::4][:400]:
        mem = MemoryImage(state.data)
        rec = cs.RecordingBackend(mem)
        try:
            await check_image(rec, repair=True)
        except FormatError:
            continue  # garbage destroyed the header: nothing to repair
        if not rec.log:
            continue
        n_repairs += 1
        repair = dataclasses.replace(
            recording, initial=state.data, log=rec.log, initial_acked=state.acked
        )
        await cs.replay(repair, figures, label="repair", extra_garbage=state.garbage)
    cs.report_figures(
        request.config,
        "crash replay: crashes during repair",
        [
            f"repairs recorded: {n_repairs}",
            *figures.lines(),
            f"elapsed: {time.monotonic() - started:.1f} s",
        ],
    )
    assert n_repairs >= 100
    assert figures.counts["states"] >= 500
    assert_no_violations(figures)


# --------------------------------------------------------------------------- harness self-tests


async def test_oracle_catches_lost_acknowledged_sector() -> None:
    """A state whose acknowledged data cluster was zeroed must be reported (d)."""
    recording = await record([("write", 0, CL), FLUSH, ("write", 8 * CL, CL)], False)
    states = list(cs.crash_states(recording.initial, recording.log, initial_acked=0))
    final = states[-1]
    data = bytearray(final.data)
    host = next(h for h, g in recording.layout.data_map.items() if g == 0)
    data[host + 512 : host + 1024] = bytes(512)
    result = await cs.check_state(
        cs.CrashState(bytes(data), final.epoch, "subset", final.acked),
        recording.oracle,
        recording.layout,
    )
    assert [v.kind for v in result.violations] == ["durability"]


async def test_oracle_catches_foreign_data_and_clean_corruption() -> None:
    recording = await record([("write", 0, 1000), FLUSH], False)
    final = list(cs.crash_states(recording.initial, recording.log))[-1]
    host = next(iter(recording.layout.data_map))
    # foreign data: a never-written sector of the allocated cluster turns non-zero
    data = bytearray(final.data)
    data[host + CL - 1] = 0x77
    result = await cs.check_state(
        cs.CrashState(bytes(data), final.epoch, "subset", 0), recording.oracle, recording.layout
    )
    assert [v.kind for v in result.violations] == ["foreign"]
    # an L2 entry past EOF with NEED_CHECK clear: (b)
    data = bytearray(final.data)
    l2 = int.from_bytes(data[CL : CL + 8], "little")
    data[l2 + 8 : l2 + 16] = (1 << 40).to_bytes(8, "little")
    result = await cs.check_state(
        cs.CrashState(bytes(data), final.epoch, "subset", 0), recording.oracle, recording.layout
    )
    assert "clean_corrupt" in [v.kind for v in result.violations]


def test_generator_enumerates_every_subset_and_variant() -> None:
    initial = bytes(4 * 512)
    log: list[tuple[Any, ...]] = [
        ("W", 0, b"\1" * 1024),  # overwrite: torn, garbage
        ("W", 2048, b"\2" * 512),  # append at the old EOF: zeroed-append, no garbage
        ("W", 3000, b"\3" * 100),  # sub-sector: persists as its whole sector
        ("F",),
        ("ACK", 1),
        ("W", 4096, b"\4" * 1536),  # pure append: torn, zeroed-append
    ]
    states = list(cs.crash_states(initial, log, seed=1))
    by_epoch = [s for s in states if s.epoch == 0 and s.variant == "subset"]
    assert len(by_epoch) == 2**3
    assert all(s.acked == 0 for s in states if s.epoch == 0)
    assert all(s.acked == 1 for s in states if s.epoch == 1)
    variants = {(s.epoch, s.variant) for s in states}
    assert variants >= {(0, "torn"), (0, "garbage"), (1, "torn"), (1, "zeroed-append")}
    assert (1, "garbage") not in variants  # appends never read back as garbage
    zeroed = [s for s in states if s.variant == "zeroed-append" and s.epoch == 1]
    assert any(len(s.data) == 4096 + 1536 and s.data[4096:] == bytes(1536) for s in zeroed)
    torn = [s for s in states if s.variant == "torn" and s.epoch == 1]
    assert {len(s.data) for s in torn} >= {4096 + 512, 4096 + 1024}
    # the sub-sector write reaches the disk as whole sectors 5-6 of the page cache (to EOF)
    assert cs.sector_writes(initial, log)[2] == ("W", 2560, bytes(440) + b"\3" * 100)


async def test_overlapping_sub_sector_writes_persist_as_page_cache_sectors() -> None:
    """Two unacknowledged 1-byte writes to one sector: the disk sees whole sectors."""
    recording = await record([("write", 0, 1), ("write", 1, 1)], True)
    figures = cs.Figures()
    await cs.replay(recording, figures)
    assert_no_violations(figures)


# --------------------------------------------------------------------------- A3 mutants


class _MutantFile:
    """Wraps the engine's file during one flush and perturbs its barriers."""

    def __init__(self, inner: Any, mode: str, l1_range: tuple[int, int]) -> None:
        self.inner = inner
        self.mode = mode
        self.l1_range = l1_range
        self.last_write: str | None = None  # "header" | "l1" | "l2" since the last sync
        self.n_syncs = 0
        self.pending_sync = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def pwrite(self, offset: int, data: Any) -> None:
        if offset == 0:
            kind = "header"
        elif self.l1_range[0] <= offset < self.l1_range[1]:
            kind = "l1"
        else:
            kind = "l2"
        if self.pending_sync and kind == "header":
            # (iii): the header (NEED_CHECK cleared) goes out before the preceding sync
            await self.inner.pwrite(offset, data)
            await self.inner.fdatasync()
            self.pending_sync = False
            self.last_write = None
            return
        if self.pending_sync:
            await self.inner.fdatasync()
            self.pending_sync = False
        self.last_write = kind
        await self.inner.pwrite(offset, data)

    async def fdatasync(self) -> None:
        self.n_syncs += 1
        first = self.n_syncs == 1
        last_write, self.last_write = self.last_write, None
        if self.mode == "no_l2_barrier" and last_write == "l2":
            return
        if self.mode == "no_data_barrier" and first and last_write is None:
            return
        if self.mode == "early_clear":
            self.pending_sync = True
            return
        await self.inner.fdatasync()

    async def finish(self) -> None:
        if self.pending_sync:
            await self.inner.fdatasync()


def install_mutant(monkeypatch: pytest.MonkeyPatch, mode: str) -> None:
    if mode == "no_need_check":

        async def no_need_check(self: engine.QedImage) -> None:
            return None

        monkeypatch.setattr(engine.QedImage, "_mark_need_check", no_need_check)
        return
    original = engine.QedImage._flush_locked

    async def mutated(self: engine.QedImage) -> None:
        real = self.file
        l1 = self.header.l1_table_offset
        proxy = _MutantFile(real, mode, (l1, l1 + self.geometry.table_bytes))
        self.file = proxy
        try:
            await original(self)
            await proxy.finish()
        finally:
            self.file = real

    monkeypatch.setattr(engine.QedImage, "_flush_locked", mutated)


#: mutant -> the violation kinds that reveal it
MUTANTS = {
    # (i) L1 (or the NEED_CHECK clear) can reach the disk before the L2 page it vouches for.
    # A new table's zeros are durable with the data (its space is taken at creation), so
    # L1 overtaking it shows an empty table; the header clear overtaking a page does not.
    "no_l2_barrier": {"ordering", "clean_corrupt"},
    # (ii) a garbage-torn table write with NEED_CHECK clear goes unrepaired
    "no_need_check": {"clean_corrupt"},
    # (iii) NEED_CHECK clear can be durable before the L1 update it vouches for
    "early_clear": {"clean_corrupt"},
    # (iv) L2 entries can reach the disk before the data they point to
    "no_data_barrier": {"ordering"},
}


@pytest.mark.parametrize("mode", list(MUTANTS))
async def test_a3_mutant_is_caught(
    mode: str, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> None:
    install_mutant(monkeypatch, mode)
    figures = cs.Figures()
    workloads = [w for w in enumerated_workloads() if w[0].count(",") <= 3][::7]
    for name, ops, populated in workloads:
        recording = await record(ops, populated)
        await cs.replay(recording, figures, label=name)
    kinds = {k.split(":", 1)[1] for k in figures.counts if k.startswith("violation:")}
    cs.report_figures(
        request.config,
        f"crash replay A3 mutant {mode}",
        [
            f"violations: {figures.n_violations} of {figures.counts['states']} states",
            *sorted(kinds),
        ],
    )
    assert kinds & MUTANTS[mode], f"mutant {mode} not caught: {figures.lines()}"


async def test_our_log_round_trips_through_the_dm_log_writes_format() -> None:
    """One replayer for both: our recording written as dm-log-writes parses back equal."""
    recording = await record([MENU["wx"], FLUSH, MENU["wt1"], REOPEN, MENU["wsub"]], True)
    ours = [e for e in cs.sector_writes(recording.initial, recording.log) if e[0] in "WF"]
    assert all(len(e[2]) % 512 == 0 for e in ours if e[0] == "W")
    assert cs.parse_dm_log(cs.write_dm_log(ours)) == ours
    assert cs.dm_log_entries(cs.write_dm_log(ours)) == len(ours)


async def test_overlay_oracle_catches_a_cow_fill_of_zeros(monkeypatch: pytest.MonkeyPatch) -> None:
    """Self-test: an engine that fills new clusters with zeros instead of backing data."""

    async def zero_fill(self: engine.QedImage, pos: int, size: int, old_kind: Any) -> bytes:
        return bytes(size)

    monkeypatch.setattr(engine.QedImage, "_fill", zero_fill)
    recording = await cs.record_workload(
        [OVERLAY_MENU["cow"], FLUSH], image_size=IMAGE_SIZE, cluster_size=CL, backing=BACKING
    )
    figures = cs.Figures()
    await cs.replay(recording, figures)
    assert figures.counts["violation:foreign"] >= 1, figures.lines()
