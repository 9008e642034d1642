"""Interoperability with QEMU 7.2, both directions.

* Images written by ``qemu-io`` (patterns, write-zeroes, unaligned writes, writes across
  L2-table boundaries, writes past 4 GiB, backing chains, an unaligned image size) convert
  with ``qedfuse convert -O raw`` to the same bytes as with ``qemu-img convert -O raw``,
  and the output stays sparse.
* Images written by qedfuse (``create`` + engine writes, ``convert`` from raw, a flattened
  chain) pass ``qemu-img check`` with no errors and no leaks, and ``qemu-img compare`` finds
  them identical to the expected raw bytes.  Files stay below ``(cs-1)*cs`` bytes: beyond
  that ``qemu-img check`` reports spurious leaks (docs/qemu-differences.md#bug-a), which says
  nothing about us.
* ``qedfuse create`` output is byte for byte what ``qemu-img create`` writes, for several
  geometries; table_size=1 is the exception QEMU cannot open (docs/qemu-differences.md#bug-c)
  and qedfuse can.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
import qededit

from qedfuse import cli, commands, logsetup
from qedfuse.opening import open_path
from support import check_ok, data_ranges, describe, run

pytestmark = pytest.mark.qemu

MiB = 1024 * 1024
GiB = 1024 * MiB


def qedfuse(*args: str | os.PathLike[str]) -> None:
    """Run a qedfuse command in this process (the console script is covered by test_cli)."""
    argv = [os.fspath(a) for a in args]
    try:
        code = cli.main(argv)
    finally:
        logsetup.reset_logging()
    assert code == 0, f"qedfuse {' '.join(argv)} exited {code}"


def qemu_io_cmds(qemu_io: str, image: Path, cmds: list[str], fmt: str = "qed") -> None:
    argv = [qemu_io, "-f", fmt]
    for cmd in cmds:
        argv += ["-c", cmd]
    cp = check_ok(run([*argv, str(image)]))
    assert "error" not in cp.stdout.lower(), describe(cp)
    assert "failed" not in cp.stdout.lower(), describe(cp)


def assert_same_bytes(ours: Path, theirs: Path) -> None:
    """Byte equality of two (possibly huge, sparse) files: compare wherever either has data."""
    assert ours.stat().st_size == theirs.stat().st_size
    ranges = sorted([*data_ranges(ours), *data_ranges(theirs)])
    with open(ours, "rb") as a, open(theirs, "rb") as b:
        for start, end in ranges:
            pos = start
            while pos < end:
                n = min(end - pos, 4 * MiB)
                a.seek(pos)
                b.seek(pos)
                chunk_a, chunk_b = a.read(n), b.read(n)
                if chunk_a != chunk_b:
                    first = next(i for i in range(n) if chunk_a[i : i + 1] != chunk_b[i : i + 1])
                    pytest.fail(f"{ours} and {theirs} differ at byte {pos + first}")
                pos += n


def allocated_bytes(path: Path) -> int:
    return path.stat().st_blocks * 512


# ---------------------------------------------------------------------- QEMU → qedfuse

# name: (backing chain to build first, image size, create options, qemu-io commands)
SCENARIOS: dict[str, dict[str, object]] = {
    "patterns": {
        "size": "64M",
        "cmds": [
            "write -P 0xab 0 64k",
            "write -P 0xcd 1M 4k",
            "write -z 128k 64k",
            "write -P 0x5a 4097 12345",
            "write -P 0x11 307200 1",
            "write -P 0x12 63M 1M",
            "write -z 63M 4k",
        ],
    },
    "l2-boundaries": {
        # 4 KiB clusters, 2-cluster tables: every L2 table maps 4 MiB.
        "size": "32M",
        "options": "cluster_size=4096,table_size=2",
        "cmds": [
            "write -P 0x77 4190000 12000",
            "write -z 8380000 30000",
            "write -P 0x78 12582912 4096",
            "write -P 0x79 16773120 8192",
            "write -P 0x7a 20971000 2000",
        ],
    },
    "past-4g": {
        "size": "8G",
        "cmds": [
            "write -P 0x42 4294966784 1024",  # straddles 4 GiB
            "write -P 0x43 5G 64k",
            "write -z 6G 128k",
            "write -P 0x44 6442455040 100",
            "write -P 0x45 8589930496 4096",  # the last cluster
            "write -P 0x46 2147483136 1024",  # straddles the first L2 table's end (2 GiB)
        ],
    },
    "raw-backing": {
        "backing": ("raw", "6M", ["write -P 0x2a 0 6M"]),
        "size": "8M",
        "cmds": [
            "write -P 0xab 4k 4k",  # partial cluster: the rest is copied from the backing file
            "write -z 1M 64k",  # hides the backing data
            "write -z 2M 10000",  # partial zeroing over backing data
            "write -P 0xcd 6200000 300000",  # across the backing file's end
        ],
    },
    "odd-size-past-backing": {
        # iotest 028's shape: an overlay of 4 GiB + 1536 over a much smaller backing file.
        "backing": ("qed", "3M", ["write -P 0x2a 0 3M", "write -z 1M 64k"]),
        "size": "4294968832",
        "cmds": ["write -P 0x77 2M 2M", "write -P 0x78 4294967296 1536", "write -z 0 4k"],
    },
}


def _build(tmp_path: Path, qemu_img: str, qemu_io: str, scenario: dict[str, object]) -> Path:
    image = tmp_path / "image.qed"
    create = [qemu_img, "create", "-q", "-f", "qed"]
    if "options" in scenario:
        create += ["-o", str(scenario["options"])]
    backing = scenario.get("backing")
    if backing is not None:
        assert isinstance(backing, tuple)
        fmt_name, size, cmds = backing
        base = tmp_path / f"base.{fmt_name}"
        check_ok(run([qemu_img, "create", "-q", "-f", fmt_name, str(base), size]))
        qemu_io_cmds(qemu_io, base, cmds, fmt_name)
        create += ["-b", base.name, "-F", fmt_name]
    check_ok(run([*create, str(image), str(scenario["size"])]))
    cmds = scenario["cmds"]
    assert isinstance(cmds, list)
    qemu_io_cmds(qemu_io, image, cmds)
    return image


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_convert_to_raw_matches_qemu_img(
    tmp_path: Path, qemu_img: str, qemu_io: str, name: str
) -> None:
    image = _build(tmp_path, qemu_img, qemu_io, SCENARIOS[name])
    theirs = tmp_path / "theirs.raw"
    ours = tmp_path / "ours.raw"
    check_ok(run([qemu_img, "convert", "-f", "qed", "-O", "raw", str(image), str(theirs)]))
    qedfuse("convert", "-O", "raw", image, ours)
    assert_same_bytes(ours, theirs)
    # Sparse: no more blocks than qemu-img's own output (plus a little filesystem slack).
    assert allocated_bytes(ours) <= allocated_bytes(theirs) + 64 * 1024


def test_convert_qemu_chain_to_qed_flattens(tmp_path: Path, qemu_img: str, qemu_io: str) -> None:
    image = _build(tmp_path, qemu_img, qemu_io, SCENARIOS["raw-backing"])
    flat = tmp_path / "flat.qed"
    qedfuse("convert", "-O", "qed", "-o", "cluster_size=4096", image, flat)
    info = json.loads(check_ok(run([qemu_img, "info", "--output=json", str(flat)])).stdout)
    assert "backing-filename" not in info
    assert (info["virtual-size"], info["cluster-size"]) == (8 * MiB, 4096)
    cp = check_ok(run([qemu_img, "check", str(flat)]))
    assert "No errors were found" in cp.stdout
    cp = check_ok(run([qemu_img, "compare", "-f", "qed", "-F", "qed", str(flat), str(image)]))
    assert "Images are identical" in cp.stdout


# ---------------------------------------------------------------------- qedfuse → QEMU


def _expected_raw(path: Path, size: int, writes: list[tuple[int, bytes]]) -> None:
    """A sparse raw file of ``size`` bytes with ``writes`` applied in order."""
    with open(path, "wb") as f:
        f.truncate(size)
        for pos, data in writes:
            f.seek(pos)
            f.write(data)


def _pattern(rng: random.Random, size: int) -> bytes:
    return (bytes(rng.getrandbits(8) for _ in range(256)) * (size // 256 + 1))[:size]


@pytest.mark.parametrize(
    ("cluster_size", "table_size", "size"),
    [
        (4096, 2, 12 * MiB),
        (65536, 4, 3 * GiB),
        (4096, 16, 64 * MiB),
        # Not bigger: qemu-img 7.2 aborts (an assertion in bdrv_co_block_status) on a QED
        # image with an unallocated run of 4 GiB or more inside one L2 table.
        (1 << 20, 2, 3 * GiB),
    ],
)
async def test_engine_written_image_passes_qemu_check(
    tmp_path: Path, qemu_img: str, cluster_size: int, table_size: int, size: int
) -> None:
    image = tmp_path / "image.qed"
    await commands.create(str(image), size, cluster_size=cluster_size, table_size=table_size)
    l2_coverage = table_size * cluster_size // 8 * cluster_size
    rng = random.Random(cluster_size * 31 + table_size)
    writes: list[tuple[int, bytes]] = []
    boundary = l2_coverage if l2_coverage < size else size // 2
    for pos, length in [
        (0, 4096),
        (5, 777),  # unaligned, inside an allocated cluster
        (cluster_size - 100, 300),  # across a cluster boundary
        (boundary - 5000, 10000),  # across an L2 table boundary
        (size - 4096, 4096),  # the last bytes of the image
        (size // 3 + 1, 3 * cluster_size),  # unaligned multi-cluster
    ]:
        writes.append((pos, _pattern(rng, length)))
    zeroes = [(cluster_size, cluster_size), (boundary - 2000, 4000), (size // 3 + 100, 50)]
    async with await open_path(str(image), read_only=False) as img:
        for pos, data in writes:
            await img.write(pos, data)
        for pos, length in zeroes:
            await img.write_zeroes(pos, length)
            writes.append((pos, bytes(length)))
    # Below the size where QEMU's check reports spurious leaks: docs/qemu-differences.md#bug-a.
    assert image.stat().st_size < (cluster_size - 1) * cluster_size
    expected = tmp_path / "expected.raw"
    _expected_raw(expected, size, writes)
    cp = check_ok(run([qemu_img, "check", str(image)]))
    assert "No errors were found on the image." in cp.stdout
    cp = check_ok(run([qemu_img, "compare", "-f", "qed", "-F", "raw", str(image), str(expected)]))
    assert "Images are identical" in cp.stdout


async def test_engine_written_overlay_passes_qemu_check(tmp_path: Path, qemu_img: str) -> None:
    """Copy-on-write from a raw backing file created and written by qedfuse."""
    base = tmp_path / "base.raw"
    base_bytes = _pattern(random.Random(7), 5 * MiB)
    base.write_bytes(base_bytes)
    over = tmp_path / "over.qed"
    await commands.create(
        str(over), 8 * MiB, cluster_size=4096, backing="base.raw", backing_format="raw"
    )
    writes: list[tuple[int, bytes]] = [(0, base_bytes)]
    async with await open_path(str(over), read_only=False) as img:
        for pos, data in [(100, b"\x01" * 100), (8190, b"\x02" * 5), (5 * MiB - 10, b"\x03" * 20)]:
            await img.write(pos, data)
            writes.append((pos, data))
        await img.write_zeroes(1 * MiB + 512, 3000)  # partial cluster over backing data
        writes.append((1 * MiB + 512, bytes(3000)))
        await img.write_zeroes(2 * MiB, 64 * 1024)  # whole clusters: zero clusters
        writes.append((2 * MiB, bytes(64 * 1024)))
    expected = tmp_path / "expected.raw"
    _expected_raw(expected, 8 * MiB, writes)
    cp = check_ok(run([qemu_img, "check", str(over)]))
    assert "No errors were found on the image." in cp.stdout
    check_ok(run([qemu_img, "compare", "-f", "qed", "-F", "raw", str(over), str(expected)]))
    # The whole-cluster zeroes are zero clusters (present, zero), not data.
    entries = json.loads(check_ok(run([qemu_img, "map", "--output=json", str(over)])).stdout)
    assert any(
        e["start"] <= 2 * MiB < e["start"] + e["length"] and e["zero"] and e["depth"] == 0
        for e in entries
    ), entries


@pytest.mark.parametrize(("cluster_size", "table_size"), [(65536, 4), (4096, 2)])
def test_convert_raw_to_qed_passes_qemu_check(
    tmp_path: Path, qemu_img: str, cluster_size: int, table_size: int
) -> None:
    raw = tmp_path / "disk.raw"
    size = 9 * MiB + 1536  # not a multiple of the cluster size
    rng = random.Random(5)
    blocks = [(rng.randrange(0, size - 70000) // 512 * 512, rng.randrange(1, 70000))
              for _ in range(12)]  # fmt: skip
    blocks.append((size - 700, 700))
    _expected_raw(raw, size, [(p, _pattern(rng, n)) for p, n in blocks])
    with open(raw, "r+b") as f:  # an allocated but all-zero region must not become data
        f.seek(7 * MiB)
        f.write(bytes(MiB))
    image = tmp_path / "disk.qed"
    qedfuse("convert", "-O", "qed", "-o", f"cluster_size={cluster_size},table_size={table_size}",
            raw, image)  # fmt: skip
    cp = check_ok(run([qemu_img, "check", str(image)]))
    assert "No errors were found on the image." in cp.stdout
    cp = check_ok(run([qemu_img, "compare", "-f", "qed", "-F", "raw", str(image), str(raw)]))
    assert "Images are identical" in cp.stdout
    # Exactly the clusters holding a non-zero byte are allocated.
    data = raw.read_bytes()
    nonzero = sum(
        1 for k in range(0, len(data), cluster_size) if data[k : k + cluster_size].strip(b"\0")
    )
    assert len(qededit.data_slots(image)) == nonzero
    # And back: the raw output of our image is the original.
    back = tmp_path / "back.raw"
    qedfuse("convert", "-O", "raw", image, back)
    assert_same_bytes(back, raw)


# ---------------------------------------------------------------------- create


@pytest.mark.parametrize(
    ("cluster_size", "table_size", "size"),
    [
        (4096, 2, "100M"),
        (4096, 16, "1G"),
        (8192, 4, "1G"),
        (65536, 4, "10G"),
        (65536, 16, "64T"),
        (1 << 20, 16, "1P"),
        (2 << 20, 2, "1T"),
    ],
)
def test_create_matches_qemu_img_create(
    tmp_path: Path, qemu_img: str, cluster_size: int, table_size: int, size: str
) -> None:
    ours = tmp_path / "ours.qed"
    theirs = tmp_path / "theirs.qed"
    options = f"cluster_size={cluster_size},table_size={table_size}"
    qedfuse("create", "-o", options, ours, size)
    check_ok(run([qemu_img, "create", "-q", "-f", "qed", "-o", options, str(theirs), size]))
    assert ours.read_bytes() == theirs.read_bytes()
    info = json.loads(check_ok(run([qemu_img, "info", "--output=json", str(ours)])).stdout)
    assert info["cluster-size"] == cluster_size
    assert (
        info["virtual-size"]
        == json.loads(check_ok(run([qemu_img, "info", "--output=json", str(theirs)])).stdout)[
            "virtual-size"
        ]
    )
    check_ok(run([qemu_img, "check", str(ours)]))


def test_create_with_backing_matches_qemu_img_create(tmp_path: Path, qemu_img: str) -> None:
    (tmp_path / "base.raw").write_bytes(bytes(3 * MiB))
    for fmt_name, base in (("raw", "base.raw"), ("qed", "ours0.qed")):
        if fmt_name == "qed":
            qedfuse("create", tmp_path / "ours0.qed", "2M")
        ours = tmp_path / f"ours-{fmt_name}.qed"
        theirs = tmp_path / f"theirs-{fmt_name}.qed"
        qedfuse("create", "-b", base, "-F", fmt_name, ours)
        check_ok(run([qemu_img, "create", "-q", "-f", "qed", "-b", base, "-F", fmt_name,
                      str(theirs)]))  # fmt: skip
        assert ours.read_bytes() == theirs.read_bytes()


@pytest.mark.expect_log(r"QEMU cannot open images with table_size=\d+ \(a QEMU bug\); qedfuse can")
def test_table_size_1_qemu_cannot_open_qedfuse_can(tmp_path: Path, qemu_img: str) -> None:
    """QEMU's table-offset test rejects every table when table_size is 1.

    docs/qemu-differences.md#bug-c
    """
    image = tmp_path / "ts1.qed"
    qedfuse("create", "-o", "cluster_size=4096,table_size=1", image, "8M")
    cp = run([qemu_img, "info", "-f", "qed", str(image)])
    assert cp.returncode == 1, describe(cp)
    assert "QED table offset is invalid" in cp.stderr
    # qedfuse opens it, writes through an L2 boundary (2 MiB per table) and reads it back.
    raw = tmp_path / "in.raw"
    _expected_raw(raw, 8 * MiB, [(2 * MiB - 3000, b"\x5a" * 6000), (7 * MiB, b"\x01")])
    qedfuse("convert", "--force", "-O", "qed", "-o", "cluster_size=4096,table_size=1", raw, image)
    qedfuse("check", image)
    qedfuse("info", image)
    out = tmp_path / "out.raw"
    qedfuse("convert", "-O", "raw", image, out)
    assert_same_bytes(out, raw)
