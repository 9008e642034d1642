"""Hostile tables at scale: memory and stalls must not grow with what a table claims.

An outside review built images whose 16 MiB tables hold millions of bad or overlapping
entries (0.5 GiB of RSS before the fix), and valid images whose L1 names thousands of empty
tables (the survey before the first write froze every request for a minute).  The variants
here are generated: several geometries and layouts, each opened read-write in a fresh
process whose peak RSS is read from the kernel.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import trio

from qedfuse import format as fmt
from qedfuse.imagefile import FileImage
from qedfuse.opening import open_image
from qedfuse.tables import create_image
from support import describe

MiB = 1 << 20
#: What the README promises for any hostile image.
RSS_BOUND_MIB = 256


async def _build(path: Path, layout: str, cs: int, ts: int) -> None:
    """A sparse image whose L1 (and, for the L2 layouts, four tables) hold ``layout``."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    file = FileImage(fd, read_only=False)
    try:
        size = min(1 << 50, fmt.Geometry(cs, ts).max_image_size)
        header = await create_image(file, size, cluster_size=cs, table_size=ts)
        table_bytes = cs * ts
        n = table_bytes // 8
        end = os.fstat(fd).st_size
        l1 = header.l1_table_offset

        def put(offset: int, values: range | list[int]) -> None:
            step = 65536  # bounded chunks: the builder must not be what costs memory
            vals = list(values) if isinstance(values, range) and len(values) <= step else values
            for k in range(0, len(vals), step):
                part = vals[k : k + step]
                os.pwrite(fd, b"".join(v.to_bytes(8, "little") for v in part), offset + k * 8)

        if layout == "l1-one-table":  # every entry names the same table
            put(l1, [end] * n)
            os.ftruncate(fd, end + table_bytes)
        elif layout == "l1-staggered":  # every entry's table overlaps its neighbours'
            put(l1, range(end, end + n * cs, cs))
            os.ftruncate(fd, end + n * cs + table_bytes)
        elif layout == "l1-past-end":  # every entry past the end of the file
            put(l1, range(end + table_bytes, end + table_bytes * (n + 1), table_bytes))
        elif layout in ("l2-misaligned", "l2-duplicates"):
            put(l1, [end + i * table_bytes for i in range(4)])
            value = 3 if layout == "l2-misaligned" else end + 4 * table_bytes
            for i in range(4):
                put(end + i * table_bytes, [value] * n)
            os.ftruncate(fd, end + 4 * table_bytes + cs)
        else:
            raise AssertionError(layout)
    finally:
        await file.aclose()


_PROBE = textwrap.dedent(
    """
    import sys, trio
    from qedfuse.errors import QedError
    from qedfuse.imagefile import FileImage
    from qedfuse.opening import open_image

    async def main(path):
        img = await open_image(FileImage.open(path, read_only=False))
        for pos in (0, 1 << 30, 1 << 40, 1 << 45):
            try:
                await img.read(pos, 4096)
            except QedError:
                pass
        try:
            await img.write(0, b"x" * 4096)
        except QedError:
            pass
        assert img.failsafe_reason is not None, "hostile tables must stop writes"
        await img.close()
        # VmHWM, not ru_maxrss: Linux carries the forking parent's peak across exec
        with open("/proc/self/status") as f:
            peak_kib = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
        print(peak_kib // 1024)

    trio.run(main, sys.argv[1])
    """
)


@pytest.mark.parametrize(
    "layout", ["l1-one-table", "l1-staggered", "l1-past-end", "l2-misaligned", "l2-duplicates"]
)
@pytest.mark.parametrize(("cs", "ts"), [(MiB, 16), (64 * 1024, 16), (4096, 4)])
def test_hostile_tables_stay_under_the_memory_bound(
    tmp_path: Path, layout: str, cs: int, ts: int
) -> None:
    path = tmp_path / "hostile.qed"
    trio.run(_build, path, layout, cs, ts)
    cp = subprocess.run(
        [sys.executable, "-c", _PROBE, os.fspath(path)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert cp.returncode == 0, describe(cp)
    assert "Traceback" not in cp.stderr, describe(cp)
    peak_mib = int(cp.stdout.split()[-1])
    assert peak_mib < RSS_BOUND_MIB, f"{layout} cs={cs} ts={ts}: peak RSS {peak_mib} MiB"


@pytest.mark.parametrize(("cs", "ts", "n_tables"), [(65536, 16, 2048), (4096, 16, 4096)])
async def test_the_survey_lets_reads_through(
    tmp_path: Path, cs: int, ts: int, n_tables: int
) -> None:
    """A valid image whose L1 names thousands of empty tables: while the first write's
    survey checks them, reads elsewhere are served (they used to wait for all of it)."""
    path = tmp_path / "many-tables.qed"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    file = FileImage(fd, read_only=False)
    size = fmt.Geometry(cs, ts).max_image_size
    header = await create_image(file, size, cluster_size=cs, table_size=ts)
    end = os.fstat(fd).st_size
    table_bytes = cs * ts
    l1 = b"".join((end + i * table_bytes).to_bytes(8, "little") for i in range(n_tables))
    os.pwrite(fd, l1, header.l1_table_offset)
    os.ftruncate(fd, end + n_tables * table_bytes)  # the tables: holes, all zeros
    await file.aclose()

    img = await open_image(FileImage.open(path, read_only=False))
    surveying_when_read: list[bool] = []

    async def reader() -> None:
        await trio.lowlevel.checkpoint()  # the write starts first
        elsewhere = cs * (table_bytes // 8)  # guest range of the second table
        for _ in range(3):
            assert await img.read(elsewhere, 4096) == bytes(4096)
            surveying_when_read.append(not img._map.surveyed)
            await trio.lowlevel.checkpoint()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(img.write, 0, b"w" * cs)
        nursery.start_soon(reader)
    assert all(surveying_when_read), surveying_when_read
    assert img.failsafe_reason is None  # a valid image: the survey finds nothing
    await img.flush()
    await img.close()


async def test_overlap_detection_is_exact() -> None:
    """The bitmap-based overlap test agrees with the pairwise definition on random L1s."""
    import random
    from array import array

    from qedfuse.l2cache import ClusterBitmap, validate_l1

    rng = random.Random(20261203)
    for _ in range(200):
        cs, ts = rng.choice([(4096, 1), (4096, 4), (65536, 3), (4096, 16)])
        geo = fmt.Geometry(cs, ts)
        n = geo.table_bytes // 8
        l1_offset = cs
        open_end = cs * rng.randint(ts + 2, 200)
        entries = array("Q", [0] * n)
        for i in rng.sample(range(n), min(n, rng.randint(1, 40))):
            entries[i] = cs * rng.randint(0, open_end // cs + 3) + rng.choice([0, 0, 0, 8])
        used = ClusterBitmap(open_end // cs, geo.cluster_bits)
        bad = set(validate_l1(entries, geo, l1_offset, open_end, used))
        expect = set()
        tb = geo.table_bytes
        valid = []
        for i, off in enumerate(entries):
            if not off:
                continue
            if not geo.is_table_offset(off, open_end) or (
                off < l1_offset + tb and off + tb > l1_offset
            ):
                expect.add(i)
            else:
                valid.append(i)
        for i in valid:
            for j in valid:
                if i != j and abs(entries[i] - entries[j]) < tb:
                    expect.add(i)
        assert bad == expect, (cs, ts, list(entries))
        for i in valid:  # every named table's clusters are metadata now
            for k in range(ts):
                assert used.test(entries[i] + k * cs)
        used.close()


@pytest.mark.expect_log(r"has \d+ invalid entries", r"entering failsafe mode")
async def test_reads_go_on_within_one_hostile_table(tmp_path: Path) -> None:
    """One 16 MiB L2 table whose 2M entries all map one cluster: checking it takes about a
    second of Python, and reads elsewhere are served during it, not after it."""
    cs, ts = MiB, 16
    path = tmp_path / "fat.qed"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    file = FileImage(fd, read_only=False)
    header = await create_image(file, 1 << 50, cluster_size=cs, table_size=ts)
    end = os.fstat(fd).st_size
    table_bytes = cs * ts
    os.pwrite(fd, end.to_bytes(8, "little"), header.l1_table_offset)
    data_cluster = end + table_bytes
    os.pwrite(fd, data_cluster.to_bytes(8, "little") * (table_bytes // 8), end)
    os.ftruncate(fd, data_cluster + cs)
    await file.aclose()

    img = await open_image(FileImage.open(path, read_only=False))
    reads_during_survey = 0

    async def reader() -> None:
        nonlocal reads_during_survey
        await trio.lowlevel.checkpoint()
        elsewhere = cs * (table_bytes // 8)  # the second L1 entry's range: unallocated
        while not img._map.surveyed:
            assert await img.read(elsewhere, 4096) == bytes(4096)
            reads_during_survey += 1
            await trio.lowlevel.checkpoint()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(_write_refused, img)
        nursery.start_soon(reader)
    assert reads_during_survey >= 10, reads_during_survey
    await img.close()


async def _write_refused(img: object) -> None:
    from qedfuse.engine import QedImage
    from qedfuse.errors import FailsafeError

    assert isinstance(img, QedImage)
    with pytest.raises(FailsafeError):
        await img.write(0, b"w" * 4096)
