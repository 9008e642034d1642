"""I/O error injection at every call site (reliability.md §2.1, matrix rows B5 and B6).

A :class:`crashsim.FaultyBackend` fails the k-th ``pwrite`` / ``fdatasync`` / ``pread`` /
``ftruncate`` of a workload with ``OSError(EIO)`` or ``OSError(ENOSPC)`` (and, as iotest 026's
``once=off``, ENOSPC on every pwrite from the k-th on), for every k.  For each injection
point:

* the engine call that hit the fault raises that very error (or a QedError chained to it),
  and nothing else;
* the engine object survives: later calls succeed or raise a QedError;
* no phantom data: right after the error the engine's reads equal the successful writes
  (sectors of the failed write: old or new), and equal a fresh read-only open of the
  file's bytes once metadata is on disk (immediately in failsafe, else after a flush);
* a failed flush leaves NEED_CHECK set on disk, unless the failure was the very last sync
  after every metadata write had been synced (then the image must check fully clean);
* at the end the image repairs to 0 corruptions, and every sector acknowledged by a
  successful flush reads back exactly.

Non-OSError exceptions from the backend (ValueError, struct.error) must propagate unchanged
(the FUSE layer maps them to EIO) and must not corrupt the image either.
"""

from __future__ import annotations

import errno
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import crashsim as cs
import pytest
import trio

from qedfuse import engine, opening, tables
from qedfuse import format as fmt
from qedfuse.check import check_image
from qedfuse.errors import FormatError, QedError
from qedfuse.imagefile import MemoryImage

CL = 4096
MIB = 1024 * 1024
SIZE = 8 * MIB

Step = tuple[Any, ...]

#: name -> (table_size, steps).  Each covers a different set of call sites.
WORKLOADS: dict[str, tuple[int, list[Step]]] = {
    "alloc-flush": (
        2,
        [
            ("create",),
            ("open",),
            ("write", 0, CL),
            ("flush",),
            ("write", 5 * CL + 300, 1000),
            ("read", 0, 8 * CL),
            ("flush",),
            ("close",),
        ],
    ),
    "new-tables": (
        2,
        [
            ("create",),
            ("open",),
            ("write", 4 * MIB - 2048, CL),  # two L2 tables in one write
            ("write", 4 * MIB + 2 * CL, CL),
            ("flush",),
            ("read", 4 * MIB - CL, 4 * CL),
            ("write", 7 * CL + 3000, 6000),
            ("close",),
        ],
    ),
    "overwrite": (
        2,
        [
            ("create",),
            ("open",),
            ("write", 0, 4 * CL),
            ("flush",),
            ("write", CL + 512, 512),  # in place
            ("write", 2 * CL, 3 * CL),  # in place + allocation
            ("flush",),
            ("zeroes", 0, CL),
            ("read", 0, 6 * CL),
            ("close",),
        ],
    ),
    "reopen": (
        2,
        [
            ("create",),
            ("open",),
            ("write", 20 * CL, 16 * CL),
            ("close",),
            ("open",),
            ("read", 20 * CL, 16 * CL),
            ("write", 21 * CL + 100, 100),
            ("write", 40 * CL, CL),
            ("flush",),
            ("close",),
        ],
    ),
    "resize": (
        2,
        [
            ("create",),
            ("open",),
            ("write", SIZE - 1000, 1000),
            ("resize", SIZE + 4 * MIB),
            ("write", SIZE + MIB, CL),
            ("flush",),
            ("read", SIZE - CL, 2 * CL),
            ("close",),
        ],
    ),
    "many-tables": (
        1,  # 2 MiB per L2 table: four tables
        [
            ("create",),
            ("open",),
            ("write", 0, CL),
            ("write", 2 * MIB + 100, 200),
            ("write", 4 * MIB, CL),
            ("write", 6 * MIB + CL, 2 * CL),
            ("flush",),
            ("zeroes", 2 * MIB, CL),
            ("close",),
            ("open",),
            ("read", 0, SIZE),
            ("write", 6 * MIB + 3 * CL, 10),
            ("close",),
        ],
    ),
    "ts1": (
        1,
        [
            ("create",),
            ("open",),
            ("write", 2 * MIB - 512, CL),
            ("flush",),
            ("write", 0, 100),
            ("close",),
        ],
    ),
    "ts16": (
        16,
        [
            ("create",),
            ("open",),
            ("write", 100, 9000),
            ("write", 5 * MIB, CL),
            ("flush",),
            ("write", 200, 100),
            ("close",),
        ],
    ),
}


@dataclass
class PointResult:
    problems: list[str] = field(default_factory=list)
    fired: int = 0
    failsafe: bool = False
    flush_failed_clean: bool = False


def _sectors(pos: int, size: int) -> range:
    return range(pos // 512, (pos + size + 511) // 512)


def _in_chain(exc: BaseException, target: BaseException) -> bool:
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        if cur is target:
            return True
        seen.add(id(cur))
        cur = cur.__cause__ or cur.__context__
    return False


async def _fresh_view(data: bytes) -> bytes:
    img = await opening.open_image(MemoryImage(data, read_only=True), read_only=True)
    try:
        return await img.read(0, img.image_size)
    finally:
        await img.close()


async def run_point(
    name: str,
    fail_op: str | None,
    fail_at: int,
    make_exc: Callable[[], BaseException] | None,
    *,
    sticky: bool = False,
) -> tuple[PointResult, cs.FaultyBackend]:
    """Run workload ``name`` with one injected fault and check everything listed above."""
    table_size, steps = WORKLOADS[name]
    mem = MemoryImage()
    injected: list[BaseException] = []

    def make() -> BaseException:
        assert make_exc is not None
        exc = make_exc()
        injected.append(exc)
        return exc

    faulty = cs.FaultyBackend(mem, fail_op, fail_at, make if make_exc else None, sticky=sticky)
    result = PointResult()
    p = result.problems
    img: engine.QedImage | None = None
    good_writes: list[tuple[int, int, bytes]] = []
    failed_sectors: set[int] = set()
    acked = 0
    checked_after_error = False
    create_failed = False

    for op_id, step in enumerate(steps):
        kind = step[0]
        if kind not in ("create", "open") and (img is None or img._closed):
            continue  # no image object to call (its open failed)
        fired_before = faulty.fired
        # metadata in flight: a failed flush must then leave NEED_CHECK set on disk
        need_check_before = img is not None and (img.has_dirty_metadata or img._need_check_on_disk)
        data = b""
        try:
            with trio.fail_after(10):
                if kind == "create":
                    await tables.create_image(faulty, SIZE, cluster_size=CL, table_size=table_size)
                elif kind == "open":
                    img = await opening.open_image(faulty)
                elif kind == "write":
                    data = cs.pattern(op_id, step[2])
                    assert img is not None
                    await img.write(step[1], data)
                elif kind == "zeroes":
                    data = bytes(step[2])
                    assert img is not None
                    await img.write_zeroes(step[1], step[2])
                elif kind == "read":
                    assert img is not None
                    await img.read(step[1], step[2])
                elif kind == "flush":
                    assert img is not None
                    await img.flush()
                elif kind == "close":
                    assert img is not None
                    await img.close()
                elif kind == "resize":
                    assert img is not None
                    await img.resize(step[1])
        except trio.TooSlowError:
            p.append(f"step {op_id} {step}: hung")
            break
        except Exception as exc:
            fired_now = faulty.fired != fired_before
            if kind in ("write", "zeroes"):
                failed_sectors.update(_sectors(step[1], len(data)))
            if img is not None and img.failsafe:
                # a failed flush dropped the cache: unacknowledged writes may be lost for good
                # (a later flush, even after a reopen, does not cover them)
                for w_id, w_pos, w_data in good_writes:
                    if w_id >= acked:
                        failed_sectors.update(_sectors(w_pos, len(w_data)))
            if kind == "create":
                create_failed = True
            if fired_now:
                target = injected[-1]
                ok = exc is target or (isinstance(exc, QedError) and _in_chain(exc, target))
                if not ok:
                    p.append(f"step {op_id} {step}: raised {exc!r}, not the injected {target!r}")
            elif sticky and isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
                pass  # the disk is still full
            elif not isinstance(exc, QedError):
                p.append(f"step {op_id} {step}: unexpected {type(exc).__name__}: {exc!r}")
            if fired_now and not checked_after_error and img is not None and not img._closed:
                checked_after_error = True
                await _after_error(
                    img,
                    mem,
                    kind,
                    need_check_before,
                    good_writes,
                    failed_sectors,
                    acked,
                    result,
                    sticky,
                )
            continue
        if faulty.fired != fired_before and not (kind == "open" and fail_op == "pread"):
            # the check run by a dirty open counts table read errors instead of raising
            p.append(f"step {op_id} {step}: the injected fault was swallowed")
        if kind in ("write", "zeroes"):
            good_writes.append((op_id, step[1], data))
        elif kind in ("flush", "close", "resize") and img is not None and not img.failsafe:
            acked = op_id  # (resize flushes too; a close in failsafe flushes nothing)

    result.fired = faulty.fired
    if img is not None:
        result.failsafe = img.failsafe
        if not img._closed:
            try:
                await img.close()
            except QedError:
                pass
            except OSError as exc:
                if not sticky:
                    p.append(f"final close: {exc!r}")
    faulty.armed = False
    await _final_repair(mem, good_writes, failed_sectors, acked, create_failed, p)
    return result, faulty


async def _after_error(
    img: engine.QedImage,
    mem: MemoryImage,
    kind: str,
    dirty_before: bool,
    good_writes: list[tuple[int, int, bytes]],
    failed_sectors: set[int],
    acked: int,
    result: PointResult,
    sticky: bool,
) -> None:
    """No phantom data, NEED_CHECK kept after a failed flush.

    Without failsafe every successful write must still read back; in failsafe the cache
    was dropped, so only acknowledged writes must (the rest may read old or new).
    """
    p = result.problems
    flush_failed = img.failsafe or kind in ("flush", "close", "resize")
    if img.failsafe and dirty_before:
        header = fmt.Header.unpack(bytes(mem.data))
        if not header.need_check:
            ref = cs.reference_check(bytes(mem.data))
            if ref.corruptions or ref.leaks:
                p.append(f"failed flush left NEED_CHECK clear on an unclean image: {ref}")
            else:
                result.flush_failed_clean = True
    try:
        view = await img.read(0, img.image_size)
    except QedError as exc:
        p.append(f"read after the error: {exc!r}")
        return
    oracle = cs.Oracle.build(img.image_size, good_writes)
    relaxed = set(failed_sectors)
    problems = await cs.verify_view(img, oracle, acked if img.failsafe else 1 << 30, relaxed)
    p.extend(f"engine view after error: {v}" for v in problems)
    if img.failsafe:
        fresh = await _fresh_view(bytes(mem.data))
        if fresh != view:
            p.append("failsafe reads differ from a fresh open of the file (phantom data)")
        return
    if flush_failed and kind == "close":
        return
    try:
        await img.flush()
    except OSError as exc:
        if not sticky:
            p.append(f"flush after the error: {exc!r}")
        return
    except QedError as exc:
        p.append(f"flush after the error: {exc!r}")
        return
    fresh = await _fresh_view(bytes(mem.data))
    if fresh != await img.read(0, img.image_size):
        p.append("after a flush the engine's reads differ from a fresh open (phantom data)")


async def _final_repair(
    mem: MemoryImage,
    good_writes: list[tuple[int, int, bytes]],
    failed_sectors: set[int],
    acked: int,
    create_failed: bool,
    p: list[str],
) -> None:
    """The image repairs to 0 corruptions and acknowledged data reads back."""
    data = bytes(mem.data)
    work = MemoryImage(data)
    try:
        report = await check_image(work, repair=True)
    except FormatError as exc:
        if not create_failed:
            p.append(f"image no longer opens: {exc}")
        return
    if report.corruptions or report.check_errors:
        p.append(f"repair left corruption: {report.summary_line()}")
        return
    img = await opening.open_image(work)
    try:
        oracle = cs.Oracle.build(img.image_size, good_writes)
        problems = await cs.verify_view(img, oracle, acked, failed_sectors)
        p.extend(f"after repair: {v}" for v in problems)
    finally:
        await img.close()
    after = await check_image(MemoryImage(work.data))
    if after.exit_code() not in (0, 3) or after.need_check:
        p.append(f"after repair and close: {after.summary_line()}")


def injection_points(sticky_enospc: bool = True) -> Iterator[tuple[str, str, int, str, bool]]:
    """(workload, op, k, error, sticky) for every call of every kind, both errnos."""
    for name in WORKLOADS:
        _, counts = trio.run(_dry_run, name)
        for op in cs.FAULT_OPS:
            for k in range(1, counts[op] + 1):
                for err in ("EIO", "ENOSPC"):
                    yield name, op, k, err, False
                if sticky_enospc and op == "pwrite":
                    yield name, op, k, "ENOSPC", True


async def _dry_run(name: str) -> tuple[PointResult, Any]:
    result, faulty = await run_point(name, None, 0, None)
    return result, faulty.counts


def test_workloads_run_clean_without_faults() -> None:
    """The baseline: no fault, no problem, and every call kind is exercised."""
    total: dict[str, int] = {}
    for name in WORKLOADS:
        result, counts = trio.run(_dry_run, name)
        assert not result.problems, (name, result.problems)
        for op, n in counts.items():
            total[op] = total.get(op, 0) + n
    assert all(total.get(op, 0) > 0 for op in cs.FAULT_OPS), total


def _make(err: str) -> Callable[[], BaseException]:
    code = getattr(errno, err)
    return lambda: OSError(code, f"injected {err}")


@pytest.mark.expect_log(
    r"injected",
    r"image had NEED_CHECK set; repaired on open: ",
    r"flush refused for lack of space: ",
)
def test_b5_oserror_at_every_call_site(request: pytest.FixtureRequest) -> None:
    """EIO/ENOSPC at every pwrite/fdatasync/pread/ftruncate of every workload."""
    started = time.monotonic()
    n_points = 0
    n_fired = 0
    n_failsafe = 0
    n_clean_clear = 0
    per_op: dict[str, int] = {}
    failures: list[str] = []
    for name, op, k, err, sticky in injection_points():
        result, _ = trio.run(partial(run_point, name, op, k, _make(err), sticky=sticky))
        n_points += 1
        per_op[op] = per_op.get(op, 0) + 1
        n_fired += bool(result.fired)
        n_failsafe += result.failsafe
        n_clean_clear += result.flush_failed_clean
        if result.problems:
            tag = f"{name} {op}#{k} {err}{' sticky' if sticky else ''}"
            failures += [f"[{tag}] {problem}" for problem in result.problems]
    cs.report_figures(
        request.config,
        "fault injection B5 (OSError at every call site)",
        [
            f"injection points: {n_points} ({', '.join(f'{k} {v}' for k, v in per_op.items())})",
            f"workloads: {len(WORKLOADS)}",
            f"faults fired: {n_fired}",
            f"runs ending in failsafe: {n_failsafe}",
            f"failed final sync with NEED_CHECK clear (image verified clean): {n_clean_clear}",
            f"problems: {len(failures)}",
            f"elapsed: {time.monotonic() - started:.1f} s",
        ],
    )
    assert n_points >= 500
    assert n_fired == n_points  # every point really injected a fault
    assert n_failsafe > 0
    assert not failures, "\n".join(failures[:40])


@pytest.mark.expect_log(
    r"injected",
    r"image had NEED_CHECK set; repaired on open: ",
    r"flush refused for lack of space: ",
)
def test_b6_non_oserror_exceptions_propagate_and_do_not_corrupt(
    request: pytest.FixtureRequest,
) -> None:
    """ValueError / struct.error from the backend: raised as-is, image repairs clean."""
    makers: list[Callable[[], BaseException]] = [
        lambda: ValueError("injected"),
        lambda: struct.error("injected"),
    ]
    n_points = 0
    failures: list[str] = []
    for index, (name, op, k, _err, sticky) in enumerate(injection_points(sticky_enospc=False)):
        if index % 2:  # both errnos give the same k; one non-OSError per call is enough
            continue
        make = makers[(index // 2) % 2]
        result, _ = trio.run(partial(run_point, name, op, k, make, sticky=sticky))
        n_points += 1
        if result.problems:
            failures += [f"[{name} {op}#{k}] {problem}" for problem in result.problems]
    cs.report_figures(
        request.config,
        "fault injection B6 (ValueError / struct.error from the backend)",
        [f"injection points: {n_points}", f"problems: {len(failures)}"],
    )
    assert n_points >= 200
    assert not failures, "\n".join(failures[:40])


def test_harness_catches_phantom_data(monkeypatch: pytest.MonkeyPatch) -> None:
    """Self-test: an engine that keeps its cache after a failed flush (QEMU's l2_update
    behaviour) must be reported."""

    async def keep_cache(self: engine.QedImage, reason: str) -> None:
        self.failsafe_reason = reason

    monkeypatch.setattr(engine.QedImage, "_enter_failsafe", keep_cache)
    _, counts = trio.run(_dry_run, "alloc-flush")
    problems: list[str] = []
    for k in range(1, counts["pwrite"] + 1):
        result, _ = trio.run(partial(run_point, "alloc-flush", "pwrite", k, _make("EIO")))
        problems += result.problems
    assert any("phantom" in problem for problem in problems), problems


@pytest.mark.expect_log(
    r"injected",
    r"image had NEED_CHECK set; repaired on open: ",
    r"flush refused for lack of space: ",
)
async def test_failed_l2_write_shows_no_phantom_data() -> None:
    """QEMU's l2_update case (reliability.md §2.1): the read after the failure is old data."""
    mem = MemoryImage()
    await tables.create_image(mem, SIZE, cluster_size=CL, table_size=2)
    # pwrite #1 sets NEED_CHECK, #2 is the data, #3 takes the new L2 table's space (zeros),
    # #4 writes its entries (in the flush)
    faulty = cs.FaultyBackend(mem, "pwrite", 4, lambda: OSError(errno.EIO, "injected"))
    img = await opening.open_image(faulty)
    await img.write(64 * 1024, b"\x33" * CL)
    with pytest.raises(OSError, match="injected"):
        await img.flush()
    assert img.failsafe
    assert await img.read(64 * 1024, CL) == bytes(CL)
    assert fmt.Header.unpack(bytes(mem.data)).need_check
    await img.close()
    report = await check_image(MemoryImage(mem.data), repair=True)
    assert report.corruptions == 0


async def test_failed_resize_sync_leaves_engine_and_file_agreeing() -> None:
    """Bug found by B5 (resize workload, fdatasync #7): when the sync after the header's
    new image_size fails, the file holds the new size but the engine kept the old one, so
    reads disagree with a fresh open, and the next header write (NEED_CHECK) silently
    shrinks the image back."""
    mem = MemoryImage()
    faulty = cs.FaultyBackend(mem)
    await tables.create_image(faulty, SIZE, cluster_size=CL, table_size=2)
    img = await opening.open_image(faulty)
    faulty.fail_op = "fdatasync"
    faulty.fail_at = faulty.counts["fdatasync"] + 1  # the sync after the size update
    faulty.make_exc = lambda: OSError(errno.EIO, "injected")
    with pytest.raises(OSError, match="injected"):
        await img.resize(SIZE + MIB)
    on_file = fmt.Header.unpack(bytes(mem.data)).image_size
    assert img.image_size == on_file
    await img.write(0, b"x" * CL)  # sets NEED_CHECK: rewrites the header struct
    await img.close()
    assert fmt.Header.unpack(bytes(mem.data)).image_size == on_file
