"""Repair is bounded in bytes (issue 11, finding 5).

A repair gives each extra reference to a shared ("duplicated") data cluster its own copy.
A tiny hostile image (one cluster referenced thousands of times) used to make ``check -r``
and the repair on a read-write open copy tens of GiB.  The rule tested here: the copies are
counted before anything is written, and past the byte limit (``--max-copy``), the reference
cap, or the free space of the image's filesystem, the repair is refused with one line that
says what to do, leaving the image byte for byte unchanged; ``--duplicates=unmap`` resolves
the same image without any new space.  Variants: cluster sizes 4 KiB .. 64 MiB, fans within
one table, across tables, several fanned clusters, entries pointing into L2 tables (zeroed,
never copied), free space above and below the need (a small tmpfs per test), through the
engine, ``check -r all``, ``check -r leaks`` and a real mount (repair on open), and under an
RLIMIT_AS for memory.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import struct
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trio
from fusehelpers import QEDFUSE, fusermount_u, mount_entry, mounted, need_check

from qedfuse import check as check_mod
from qedfuse import format as fmt
from qedfuse.check import FREE_SPACE_RESERVE, RepairLimitError, check_image
from qedfuse.imagefile import FileImage
from qedfuse.opening import open_image
from support import _unavailable, check_ok, describe, require_fuse, require_tool, run

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
PROBE = 2048  # bytes compared at the head and the tail of every referenced cluster
CLUSTER_SIZES = [4 * KiB, 16 * KiB, 64 * KiB, 256 * KiB, 1 * MiB, 4 * MiB, 16 * MiB]
KINDS = ["one-table", "across-tables", "many-clusters"]


# ============================================================================ images


@dataclass
class Fan:
    """A built image: which guest clusters reference which data cluster."""

    path: Path
    cs: int
    ts: int
    #: (guest position, data cluster offset) of every reference, in L1 then L2 order.
    refs: list[tuple[int, int]] = field(default_factory=list)
    #: guest positions of entries that point into metadata (zeroed by a repair).
    bad: list[int] = field(default_factory=list)

    @property
    def n_copies(self) -> int:
        """References after the first one to each data cluster: what copying must add."""
        return len(self.refs) - len({offset for _, offset in self.refs})

    @property
    def need(self) -> int:
        return self.n_copies * self.cs


def probe_bytes(offset: int) -> tuple[bytes, bytes]:
    """The head and tail pattern written into the data cluster at ``offset``."""
    seed = hashlib.sha256(offset.to_bytes(8, "little")).digest()
    head = (seed * (PROBE // len(seed) + 1))[:PROBE]
    return head, bytes(reversed(head))


def geometry_for(cs: int) -> fmt.Geometry:
    # ts=2 keeps images QEMU can open (not ts=1, docs/qemu-differences.md#bug-c); above 2 MiB
    # clusters only ts=1 stays under qedfuse's 16 MiB table cap (and QEMU's size limit wraps
    # anyway: docs/qemu-differences.md#bug-d).
    return fmt.Geometry(cs, 2 if cs <= 2 * MiB else 1)


def build_fan(path: Path, cs: int, kind: str, n_refs: int, *, need_check: bool = True) -> Fan:
    """A sparse image whose L2 entries reference shared data clusters (see ``kind``)."""
    geo = geometry_for(cs)
    ts = geo.table_size
    n = geo.table_entries
    l1_offset = cs
    tables = [l1_offset + geo.table_bytes * (1 + k) for k in range(2)]
    n_data = 3 if kind == "many-clusters" else 1
    data = [tables[1] + geo.table_bytes + k * cs for k in range(n_data)]
    fan = Fan(path, cs, ts)
    slots: list[tuple[int, int]] = []  # (table index, entry index)
    if kind == "one-table":
        slots = [(0, k) for k in range(n_refs)]
    elif kind in ("across-tables", "many-clusters"):
        slots = [(k % 2, k // 2) for k in range(n_refs)]
    elif kind == "l2-table-as-data":
        slots = [(0, 0)]
    else:
        raise AssertionError(kind)
    assert all(index < n for _, index in slots), "fan larger than a table"
    entries: list[dict[int, int]] = [{}, {}]
    for k, (table, index) in enumerate(slots):
        entries[table][index] = data[k % n_data]
        fan.refs.append(((table * n + index) * cs, data[k % n_data]))
    if kind == "l2-table-as-data":
        # Entries naming metadata (the L1 table, its own table, the other table): zeroed by
        # a repair, never copied, whatever the space.
        for index, target in enumerate([l1_offset, tables[0], tables[1]] * 3, start=1):
            entries[0][index] = target
            fan.bad.append(index * cs)
    fan.refs.sort()
    header = fmt.new_header(2 * geo.l2_coverage, cluster_size=cs, table_size=ts)
    if need_check:
        header = header.replace(features=fmt.Feature.NEED_CHECK)
    with open(path, "wb") as f:
        f.write(header.pack())
        f.seek(l1_offset)
        f.write(struct.pack("<2Q", *tables))
        for table, values in zip(tables, entries, strict=True):
            for index, value in values.items():
                f.seek(table + 8 * index)
                f.write(struct.pack("<Q", value))
        for offset in data:
            head, tail = probe_bytes(offset)
            f.seek(offset)
            f.write(head)
            f.seek(offset + cs - PROBE)
            f.write(tail)
        f.truncate(data[-1] + cs)
    return fan


def size_of(path: Path) -> int:
    return os.path.getsize(path)


def digest(path: Path) -> tuple[int, str]:
    """(size, sha256) of the whole file: "unchanged" means byte for byte."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(4 * MiB):
            h.update(chunk)
    return os.path.getsize(path), h.hexdigest()


async def guest_probes(path: Path, positions: list[int], cs: int) -> list[tuple[bytes, bytes]]:
    """Head and tail of each guest cluster, read through the engine (read-only)."""
    image = await open_image(FileImage.open(path, read_only=True), read_only=True)
    try:
        return [
            (await image.read(pos, PROBE), await image.read(pos + cs - PROBE, PROBE))
            for pos in positions
        ]
    finally:
        await image.close()


async def assert_copied(fan: Fan) -> None:
    """Every reference reads what it read before the repair."""
    got = await guest_probes(fan.path, [pos for pos, _ in fan.refs], fan.cs)
    for (pos, offset), probes in zip(fan.refs, got, strict=True):
        assert probes == probe_bytes(offset), f"guest {pos:#x} lost its data"


async def assert_unmapped(fan: Fan) -> None:
    """The first reference to each cluster keeps it; every other one reads zeros."""
    got = await guest_probes(fan.path, [pos for pos, _ in fan.refs], fan.cs)
    seen: set[int] = set()
    zero = (bytes(PROBE), bytes(PROBE))
    for (pos, offset), probes in zip(fan.refs, got, strict=True):
        expected = zero if offset in seen else probe_bytes(offset)
        seen.add(offset)
        assert probes == expected, f"guest {pos:#x}"


# ============================================================================ tmpfs


def _require_root_mounts() -> None:
    require_tool("mount")
    if os.geteuid() != 0:
        _unavailable("mounting a small tmpfs needs root")


@contextlib.contextmanager
def tmpfs(where: Path, size: int) -> Iterator[Path]:
    """A tmpfs of ``size`` bytes at ``where`` (ours alone; always unmounted)."""
    _require_root_mounts()
    where.mkdir(parents=True, exist_ok=True)
    check_ok(run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", where]))
    try:
        yield where
    finally:
        cp = run(["umount", where])
        if cp.returncode != 0:
            check_ok(run(["umount", "-l", where]))


def available(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def set_available(fs: Path, avail: int) -> None:
    """Resize the tmpfs at ``fs`` so that about ``avail`` bytes are available."""
    st = os.statvfs(fs)
    used = (st.f_blocks - st.f_bfree) * st.f_frsize
    check_ok(run(["mount", "-o", f"remount,size={used + avail}", fs]))
    assert abs(available(fs) - avail) <= 64 * KiB, (available(fs), avail)


def fan_size(cs: int, kind: str = "one-table") -> int:
    """References per fan: copies of up to 8 MiB (at least one per fanned cluster), within
    one table."""
    least = 6 if kind == "many-clusters" else 2
    return min(geometry_for(cs).table_entries, max(least, 8 * MiB // cs + 1))


# ============================================================================ engine


def _mount_refused(image: Path, mnt: Path) -> subprocess.CompletedProcess[str]:
    """``qedfuse mount IMAGE MNT``, which must fail; unmounts if it mounted anyway."""
    try:
        cp = run([QEDFUSE, "mount", image, mnt], timeout=60)
    finally:
        if mount_entry(mnt) is not None:
            fusermount_u(mnt)
    assert cp.returncode != 0, describe(cp)
    return cp


@pytest.mark.sample(14)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("cs", CLUSTER_SIZES, ids=lambda cs: f"cs{cs // KiB}k")
@pytest.mark.parametrize("space", ["short", "enough"])
async def test_copy_repair_is_decided_by_free_space_before_writing(
    cs: int, kind: str, space: str, tmp_path: Path
) -> None:
    """Free space below the need: refused, image unchanged, NEED_CHECK still set.  Enough
    space: every duplicate copied, every guest cluster reads what it read, clean after."""
    with tmpfs(tmp_path / "fs", 256 * MiB) as fs:
        fan = build_fan(fs / "fan.qed", cs, kind, fan_size(cs, kind))
        assert fan.n_copies >= 1
        want = fan.need + FREE_SPACE_RESERVE
        set_available(fs, want + 2 * MiB if space == "enough" else want - cs // 2 - 64 * KiB)
        before = digest(fan.path)
        file = FileImage.open(fan.path, read_only=False)
        try:
            if space == "short":
                with pytest.raises(RepairLimitError) as info:
                    await check_image(file, repair="all")
                text = str(info.value)
                assert "\n" not in text
                assert "available on its filesystem" in text
                assert f"--duplicates=unmap {fan.path}" in text
                assert digest(fan.path) == before
                assert need_check(fan.path)
                return
            report = await check_image(file, repair="all")
        finally:
            await file.aclose()
        assert report.corruptions_fixed == fan.n_copies, report.messages[:5]
        assert (report.corruptions, report.check_errors, report.need_check) == (0, 0, False)
        assert size_of(fan.path) == before[0] + fan.need
        await assert_copied(fan)


@pytest.mark.sample(5)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("cs", [4 * KiB, 64 * KiB, 1 * MiB, 16 * MiB], ids=lambda c: f"{c}")
async def test_byte_limit_refuses_and_unmap_needs_no_space(
    cs: int, kind: str, tmp_path: Path
) -> None:
    """Past ``max_copy_bytes`` the repair is refused (with plenty of space); unmapping then
    repairs the same image on a full filesystem, keeping the first reference's data."""
    with tmpfs(tmp_path / "fs", 256 * MiB) as fs:
        fan = build_fan(fs / "fan.qed", cs, kind, fan_size(cs, kind))
        before = digest(fan.path)
        file = FileImage.open(fan.path, read_only=False)
        try:
            with pytest.raises(RepairLimitError, match="more than the copy limit of"):
                await check_image(file, repair="leaks", max_copy_bytes=fan.need - 1)
            assert digest(fan.path) == before
            set_available(fs, 0)
            report = await check_image(file, repair="all", duplicates="unmap")
        finally:
            await file.aclose()
        assert report.corruptions_fixed == fan.n_copies
        assert (report.corruptions, report.need_check) == (0, False)
        assert size_of(fan.path) == before[0]
        await assert_unmapped(fan)


async def test_the_issue_image_16mib_clusters_5000_references(tmp_path: Path) -> None:
    """The reported image: 52 KB on disk, 4999 copies of 16 MiB (78 GiB) on a 1 GiB tmpfs:
    refused by the engine, check -r all and a mount; --duplicates=unmap repairs it."""
    with tmpfs(tmp_path / "fs", 1 * GiB) as fs:
        fan = build_fan(fs / "fan.qed", 16 * MiB, "one-table", 5000)
        before = digest(fan.path)
        assert os.stat(fan.path).st_blocks * 512 < 256 * KiB
        file = FileImage.open(fan.path, read_only=False)
        try:
            with trio.fail_after(30), pytest.raises(RepairLimitError) as info:
                await check_image(file, repair="all")
        finally:
            await file.aclose()
        assert "copying 4999 duplicated cluster references needs 78.1 GiB" in str(info.value)
        assert digest(fan.path) == before
        # The same through check -r all and a real read-write mount (repair on open).
        cp = run([QEDFUSE, "check", "-r", "all", fan.path], timeout=60)
        assert cp.returncode == 1, describe(cp)
        assert "needs 78.1 GiB" in cp.stderr
        require_fuse()
        mnt = tmp_path / "mnt"
        mnt.mkdir()
        cp = _mount_refused(fan.path, mnt)
        assert cp.stderr.count("\n") == 1, cp.stderr
        assert f"--duplicates=unmap {fan.path}" in cp.stderr
        assert digest(fan.path) == before
        assert available(fs) > 1 * GiB - MiB
        cp = check_ok(run([QEDFUSE, "check", "-r", "all", "--duplicates=unmap", fan.path]))
        assert "4999 corruptions" in cp.stdout
        assert available(fs) > 1 * GiB - 32 * MiB  # the rewritten table pages, no copies


async def test_entries_into_l2_tables_are_zeroed_without_space(tmp_path: Path) -> None:
    """L2 entries naming the L1 table, their own or another L2 table are corruptions, not
    duplicates: zeroed in place on a full filesystem, nothing copied, the data kept."""
    for cs in CLUSTER_SIZES:
        with tmpfs(tmp_path / f"fs{cs}", 128 * MiB) as fs:
            fan = build_fan(fs / "fan.qed", cs, "l2-table-as-data", 1)
            size = size_of(fan.path)
            set_available(fs, 0)
            file = FileImage.open(fan.path, read_only=False)
            try:
                report = await check_image(file, repair="all")
            finally:
                await file.aclose()
            assert report.corruptions_fixed == len(fan.bad), (cs, report.messages)
            assert (report.corruptions, report.need_check) == (0, False)
            assert size_of(fan.path) == size
            await assert_copied(fan)
            zero = (bytes(PROBE), bytes(PROBE))
            assert await guest_probes(fan.path, fan.bad, cs) == [zero] * len(fan.bad)


async def test_duplicates_beyond_the_reference_cap_are_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(check_mod, "MAX_DUPLICATE_REPAIRS", 10)
    with tmpfs(tmp_path / "fs", 64 * MiB) as fs:
        fan = build_fan(fs / "fan.qed", 4 * KiB, "across-tables", 12)
        before = digest(fan.path)
        file = FileImage.open(fan.path, read_only=False)
        try:
            with pytest.raises(RepairLimitError, match="more than the 10 references"):
                await check_image(file, repair="all")
            assert digest(fan.path) == before
            report = await check_image(file, repair="all", duplicates="unmap")
        finally:
            await file.aclose()
        assert report.exit_code() == 0


def test_64mib_clusters_are_refused_before_any_repair(tmp_path: Path) -> None:
    """64 MiB clusters need 64 MiB tables, above qedfuse's cap: a one-line refusal before
    the walk, so no fan of them can cost anything."""
    path = tmp_path / "big.qed"
    cs = 64 * MiB
    header = fmt.new_header(cs, cluster_size=cs, table_size=1)
    header = header.replace(features=fmt.Feature.NEED_CHECK)
    with open(path, "wb") as f:
        f.write(header.pack())
        f.seek(cs)
        f.write(struct.pack("<Q", 2 * cs))
        f.seek(2 * cs)
        f.write(struct.pack("<4Q", *[3 * cs] * 4))
        f.truncate(4 * cs)
    before = digest(path)
    cp = run([QEDFUSE, "check", "-r", "all", path])
    assert cp.returncode == 1, describe(cp)
    assert "table size is too large for qedfuse" in cp.stderr
    assert cp.stderr.count("\n") == 1
    assert digest(path) == before


async def test_a_failing_copy_is_cut_off_again(tmp_path: Path) -> None:
    """If the space goes between the decision and the copy (another writer), the copies
    written so far are truncated away; nothing points at them; NEED_CHECK stays set."""

    class FailingFile(FileImage):
        writes = 0

        async def pwrite(self, offset: int, data: object) -> None:
            if offset >= grow_from:
                FailingFile.writes += 1
                if FailingFile.writes > 3:
                    raise OSError(errno.ENOSPC, "No space left on device")
            await super().pwrite(offset, data)  # type: ignore[arg-type]

    with tmpfs(tmp_path / "fs", 64 * MiB) as fs:
        fan = build_fan(fs / "fan.qed", 4 * KiB, "one-table", 20)
        grow_from = size_of(fan.path)
        file = FailingFile(os.open(fan.path, os.O_RDWR), read_only=False)
        try:
            with pytest.raises(OSError, match="No space"):
                await check_image(file, repair="all")
        finally:
            await file.aclose()
        assert size_of(fan.path) == grow_from
        assert need_check(fan.path)
        again = FileImage.open(fan.path, read_only=False)
        try:
            assert (await check_image(again, repair="all")).exit_code() == 0
        finally:
            await again.aclose()
        await assert_copied(fan)


# ============================================================================ CLI


@pytest.mark.parametrize("mode", ["all", "leaks"])
@pytest.mark.parametrize(
    ("cs", "kind"), [(4 * KiB, "many-clusters"), (64 * KiB, "across-tables"), (MiB, "one-table")]
)
@pytest.mark.sample(3)
def test_cli_check_repair_refuses_then_unmaps(
    cs: int, kind: str, mode: str, tmp_path: Path, qemu_img: str
) -> None:
    """``check -r all|leaks``: exit 1 with one line naming the fix; ``--duplicates=unmap``
    then repairs (exit 0), and qemu-img check finds the image clean."""
    with tmpfs(tmp_path / "fs", 128 * MiB) as fs:
        fan = build_fan(fs / "fan.qed", cs, kind, fan_size(cs, kind))
        set_available(fs, fan.need // 2 + FREE_SPACE_RESERVE)
        before = digest(fan.path)
        cp = run([QEDFUSE, "check", "-r", mode, fan.path])
        assert cp.returncode == 1, describe(cp)
        assert cp.stderr.count("\n") == 1, cp.stderr
        assert cp.stderr.startswith("qedfuse: repair refused, nothing was changed: "), cp.stderr
        assert f"qedfuse check -r all --duplicates=unmap {fan.path}" in cp.stderr
        assert cp.stdout == ""
        assert digest(fan.path) == before
        # A larger --max-copy does not help: the free space is the limit here.
        cp = run([QEDFUSE, "check", "-r", mode, "--max-copy", "1T", fan.path])
        assert cp.returncode == 1, describe(cp)
        assert digest(fan.path) == before
        cp = check_ok(run([QEDFUSE, "check", "-r", mode, "--duplicates=unmap", fan.path]))
        assert "No errors were found on the image." in cp.stdout
        check_ok(run([qemu_img, "check", "-f", "qed", fan.path]))
        trio.run(assert_unmapped, fan)


def test_cli_max_copy_raises_the_limit(tmp_path: Path, qemu_img: str) -> None:
    cs = 256 * KiB
    with tmpfs(tmp_path / "fs", 128 * MiB) as fs:
        fan = build_fan(fs / "fan.qed", cs, "one-table", 9)  # 8 copies: 2 MiB
        before = digest(fan.path)
        cp = run([QEDFUSE, "check", "-r", "all", "--max-copy", "1M", fan.path])
        assert cp.returncode == 1, describe(cp)
        assert "more than the copy limit of 1 MiB" in cp.stderr
        assert digest(fan.path) == before
        check_ok(run([QEDFUSE, "check", "-r", "all", "--max-copy", "2M", fan.path]))
        check_ok(run([qemu_img, "check", "-f", "qed", fan.path]))
        trio.run(assert_copied, fan)


def test_cli_repair_options_need_r(tmp_path: Path) -> None:
    fan = build_fan(tmp_path / "fan.qed", 4 * KiB, "one-table", 3)
    for extra in (["--duplicates=unmap"], ["--max-copy", "1G"]):
        cp = run([QEDFUSE, "check", *extra, fan.path])
        assert cp.returncode == 1, describe(cp)  # check's usage errors exit 1, as qemu-img's
        assert "apply only with -r" in cp.stderr


# ============================================================================ mount


@pytest.mark.parametrize("cs", [64 * KiB, 16 * MiB], ids=lambda c: f"{c}")
@pytest.mark.expect_log(r"image had NEED_CHECK set; repaired on open: ")
def test_mount_repair_on_open_gives_the_same_advice(cs: int, tmp_path: Path) -> None:
    """A read-write mount of a NEED_CHECK fan on a filesystem without room for the copies:
    the mount fails with the same one-line advice, nothing is mounted, the image is
    unchanged.  With room, the mount repairs on open and serves every copy."""
    require_fuse()
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with tmpfs(tmp_path / "fs", 256 * MiB) as fs:
        fan = build_fan(fs / "fan.qed", cs, "across-tables", fan_size(cs))
        set_available(fs, fan.need // 2)
        before = digest(fan.path)
        cp = _mount_refused(fan.path, mnt)
        lines = cp.stderr.strip().splitlines()
        assert len(lines) == 1, cp.stderr
        assert "repair refused, nothing was changed" in lines[0]
        assert f"qedfuse check -r all --duplicates=unmap {fan.path}" in lines[0]
        assert digest(fan.path) == before
        set_available(fs, fan.need + FREE_SPACE_RESERVE + 4 * MiB)
        with mounted(fan.path, mnt) as m:
            with open(m.raw, "rb") as raw:
                for pos, offset in fan.refs:
                    raw.seek(pos)
                    head = raw.read(PROBE)
                    raw.seek(pos + cs - PROBE)
                    assert (head, raw.read(PROBE)) == probe_bytes(offset), hex(pos)
            assert "repaired on open" in m.log()
        assert not need_check(fan.path)
        cp = check_ok(run([QEDFUSE, "check", fan.path]))
        assert "No errors were found" in cp.stdout


# ============================================================================ memory


_MEMORY_SCRIPT = r"""
import json, resource, sys, trio
resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))
from qedfuse.check import check_image, RepairLimitError
from qedfuse.imagefile import FileImage

async def main():
    out = {}
    for path in sys.argv[1:]:
        file = FileImage.open(path, read_only=False)
        try:
            report = await check_image(file, repair="all")
            out[path] = report.exit_code()
        except RepairLimitError:
            out[path] = "refused"
        finally:
            await file.aclose()
    return out

result = trio.run(main)
with open("/proc/self/status") as f:
    rss = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
print(json.dumps({"result": result, "maxrss_kib": rss}))
"""


def test_repair_memory_bounded_under_rlimit_as(tmp_path: Path) -> None:
    """Under RLIMIT_AS = 1 GiB: copying 16 MiB clusters (in 1 MiB chunks) and refusing the
    78 GiB fan both stay below 160 MiB of peak RSS."""
    with tmpfs(tmp_path / "fs", 512 * MiB) as fs:
        small = build_fan(fs / "copies.qed", 16 * MiB, "across-tables", 9)  # 8 copies, 128 MiB
        hostile = build_fan(fs / "hostile.qed", 16 * MiB, "one-table", 5000)
        cp = subprocess.run(
            [sys.executable, "-c", _MEMORY_SCRIPT, str(small.path), str(hostile.path)],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert cp.returncode == 0, describe(cp)
        summary = json.loads(cp.stdout)
        assert summary["result"] == {str(small.path): 0, str(hostile.path): "refused"}
        assert summary["maxrss_kib"] < 160 * 1024, summary
        trio.run(assert_copied, small)


# ============================================================================ corpus


@pytest.mark.expect_log(r"image had NEED_CHECK set; repaired on open: ")
async def test_corpus_fans_are_repaired_or_refused_in_memory() -> None:
    """The hostile corpus's duplicate fans (in-memory files, no free space to see): small
    fans are repaired by copying on a read-write open; the GiB-sized ones are refused with
    RepairLimitError, leaving the file as it was; read-only opens serve them all."""
    import hostile_corpus as hc

    items = [item for item in hc.corpus() if "dup-fan" in item.name]
    assert len(items) >= 12
    for item in items:
        file = item.file()
        before = file._read_sync(0, len(item.data))
        image = await open_image(item.file(read_only=True), read_only=True)
        await image.close()
        if not item.name.endswith("+need-check"):
            continue
        if item.name.startswith("big-"):
            with pytest.raises(RepairLimitError, match="more than the copy limit"):
                await open_image(file)
            assert file._read_sync(0, len(item.data)) == before, item.name
            assert file.length == item.file_size
            continue
        image = await open_image(file)
        await image.close()
        report = await check_image(file.copy(read_only=True))
        # (interior leaks may remain where a fan overwrote the entries of other clusters)
        assert (report.corruptions, report.need_check) == (0, False), item.name
