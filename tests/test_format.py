"""Tests for qedfuse.format: header codec, open validation (QEMU's order and messages),
address math, size limits, create-parameter checks and the table codec."""

from __future__ import annotations

import json
import struct
import sys
from array import array
from functools import partial
from pathlib import Path

import pytest

from qedfuse import format as fmt
from qedfuse.errors import FormatError, LimitError, UnsupportedFeatureError, UserError
from support import check_ok, describe, run

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
TiB = 1024 * GiB
PiB = 1024 * TiB

# qed-format.md §10.1: `qemu-img create -f qed v1.qed 10G`, first 64 bytes.
QEMU_DEFAULT_10G = bytes.fromhex(
    "51454400000001000400000001000000"
    "00000000000000000000000000000000"
    "00000000000000000000010000000000"
    "00000080020000000000000000000000"
)
# §10.4: `-b base.raw -F raw`, 16M overlay with 4 KiB clusters (cs=0x1000 at 4, ts=4).
QEMU_RAW_BACKING_STRUCT = bytes.fromhex(
    "51454400001000000400000001000000"
    "05000000000000000000000000000000"
    "00000000000000000010000000000000"
    "00000001000000004000000008000000"
)

# A valid default header on a file big enough for its L1 table.
DEFAULT_FILE_SIZE = 5 * 64 * KiB


def default_header(**changes: int) -> fmt.Header:
    return fmt.new_header(128 * MiB).replace(**changes)


def message_of(header: fmt.Header, file_size: int = DEFAULT_FILE_SIZE) -> str:
    with pytest.raises(FormatError) as info:
        fmt.validate_header(header, file_size)
    return str(info.value)


# ---------------------------------------------------------------------------- header codec


def test_header_unpack_matches_qemu_dump() -> None:
    header = fmt.Header.unpack(QEMU_DEFAULT_10G)
    assert header == fmt.Header(
        magic=fmt.QED_MAGIC,
        cluster_size=65536,
        table_size=4,
        header_size=1,
        features=0,
        compat_features=0,
        autoclear_features=0,
        l1_table_offset=0x10000,
        image_size=10 * GiB,
        backing_filename_offset=0,
        backing_filename_size=0,
    )
    assert header.pack() == QEMU_DEFAULT_10G
    assert fmt.new_header(10 * GiB).pack() == QEMU_DEFAULT_10G


def test_new_header_with_raw_backing_matches_qemu() -> None:
    header = fmt.new_header(
        16 * MiB, cluster_size=4096, table_size=4, backing_name=b"base.raw", backing_raw=True
    )
    assert header.pack() == QEMU_RAW_BACKING_STRUCT
    assert header.features == fmt.Feature.BACKING_FILE | fmt.Feature.BACKING_FORMAT_NO_PROBE
    assert header.has_backing_file
    assert header.backing_is_raw
    assert not header.need_check
    probed = fmt.new_header(16 * MiB, backing_name=b"bq.qed")
    assert probed.features == fmt.Feature.BACKING_FILE
    assert not probed.backing_is_raw
    assert (probed.backing_filename_offset, probed.backing_filename_size) == (64, 6)


def test_header_round_trip_every_field_max_value() -> None:
    values = [0xFFFFFFFF] * 4 + [0xFFFFFFFFFFFFFFFF] * 5 + [0xFFFFFFFF] * 2
    header = fmt.Header(*values)
    packed = header.pack()
    assert len(packed) == fmt.HEADER_STRUCT_SIZE == 64
    assert packed == b"\xff" * 64
    assert fmt.Header.unpack(packed) == header
    # Each field lands at its documented offset (§1.1).
    distinct = fmt.Header(*range(1, 12))
    assert struct.unpack("<IIIIQQQQQII", distinct.pack()) == tuple(range(1, 12))


def test_header_unpack_short_buffer_zero_padded_and_ignores_trailing_bytes() -> None:
    assert fmt.Header.unpack(b"QED\0") == fmt.Header(fmt.QED_MAGIC, *[0] * 10)
    assert fmt.Header.unpack(b"") == fmt.Header(*[0] * 11)
    assert fmt.Header.unpack(QEMU_DEFAULT_10G + b"\xaa" * 100) == fmt.Header.unpack(
        QEMU_DEFAULT_10G
    )


def test_header_replace_and_flags() -> None:
    header = default_header()
    dirty = header.replace(features=fmt.Feature.NEED_CHECK)
    assert dirty.need_check
    assert not header.need_check
    assert dirty.image_size == header.image_size
    # Backing bit without a name: no backing file (QEMU opens it and uses none).
    assert not header.replace(features=fmt.Feature.BACKING_FILE).has_backing_file


# ---------------------------------------------------------------------------- validate_header


def test_valid_default_header() -> None:
    geometry = fmt.validate_header(default_header(), DEFAULT_FILE_SIZE)
    assert geometry == fmt.Geometry(65536, 4, 1)


@pytest.mark.parametrize(
    ("changes", "file_size", "message"),
    [
        # §10.7 table, in order, plus boundary values.
        ({"magic": 0x58444551}, DEFAULT_FILE_SIZE, "Image not in QED format"),  # "QEDX"
        ({"magic": 0}, DEFAULT_FILE_SIZE, "Image not in QED format"),
        ({"features": 0x8}, DEFAULT_FILE_SIZE, "Unsupported QED features: 8"),
        ({"features": 0x100}, DEFAULT_FILE_SIZE, "Unsupported QED features: 100"),
        ({"features": 0x10B}, DEFAULT_FILE_SIZE, "Unsupported QED features: 108"),
        ({"features": 1 << 63}, DEFAULT_FILE_SIZE, "Unsupported QED features: 8000000000000000"),
        ({"cluster_size": 0}, DEFAULT_FILE_SIZE, "QED cluster size is invalid"),
        ({"cluster_size": 0xFFFFFFFF}, DEFAULT_FILE_SIZE, "QED cluster size is invalid"),
        ({"cluster_size": 2048}, DEFAULT_FILE_SIZE, "QED cluster size is invalid"),
        ({"cluster_size": 4097}, DEFAULT_FILE_SIZE, "QED cluster size is invalid"),
        ({"cluster_size": 3 * 4096}, DEFAULT_FILE_SIZE, "QED cluster size is invalid"),
        ({"cluster_size": 128 * MiB}, DEFAULT_FILE_SIZE, "QED cluster size is invalid"),
        ({"table_size": 0}, DEFAULT_FILE_SIZE, "QED table size is invalid"),
        ({"table_size": 0xFFFFFFFF}, DEFAULT_FILE_SIZE, "QED table size is invalid"),
        ({"table_size": 3}, DEFAULT_FILE_SIZE, "QED table size is invalid"),
        ({"table_size": 32}, DEFAULT_FILE_SIZE, "QED table size is invalid"),
        ({"image_size": 1000}, DEFAULT_FILE_SIZE, "QED image size is invalid"),
        ({"image_size": 64 * TiB + 512}, DEFAULT_FILE_SIZE, "QED image size is invalid"),
        ({"image_size": 2**64 - 512}, DEFAULT_FILE_SIZE, "QED image size is invalid"),
        ({"l1_table_offset": 0x10001}, DEFAULT_FILE_SIZE, "QED table offset is invalid"),
        ({"l1_table_offset": 0x20000}, DEFAULT_FILE_SIZE, "QED table offset is invalid"),
        ({"l1_table_offset": 0}, DEFAULT_FILE_SIZE, "QED table offset is invalid"),
        ({"l1_table_offset": 2**64 - 65536}, DEFAULT_FILE_SIZE, "QED table offset is invalid"),
        ({"header_size": 2}, DEFAULT_FILE_SIZE, "QED table offset is invalid"),
        ({"header_size": 0x10000}, DEFAULT_FILE_SIZE, "QED table offset is invalid"),
        ({"header_size": 0xFFFFFFFF}, DEFAULT_FILE_SIZE, "QED table offset is invalid"),
        ({}, 512, "QED table offset is invalid"),  # file truncated to 512 bytes
        # The last L1 cluster must lie below the file size rounded down (a partial cluster
        # at the end does not count).
        ({}, 5 * 64 * KiB - 1, "QED table offset is invalid"),
        (
            {"features": 1, "backing_filename_offset": 65530, "backing_filename_size": 8},
            DEFAULT_FILE_SIZE,
            "QED backing filename offset is invalid",
        ),
        (
            {"features": 1, "backing_filename_offset": 0xFFFFFFFF, "backing_filename_size": 1},
            DEFAULT_FILE_SIZE,
            "QED backing filename offset is invalid",
        ),
        (
            {"features": 1, "backing_filename_offset": 64, "backing_filename_size": 4096},
            DEFAULT_FILE_SIZE,
            "Failed to read backing filename",
        ),
    ],
)
def test_validate_header_rule_messages(
    changes: dict[str, int], file_size: int, message: str
) -> None:
    assert message_of(default_header(**changes), file_size) == message


def test_unsupported_features_error_class() -> None:
    with pytest.raises(UnsupportedFeatureError):
        fmt.validate_header(default_header(features=0x8), DEFAULT_FILE_SIZE)


def test_header_size_too_large_reachable_with_a_huge_file() -> None:
    # hs*cs lands the L1 table past 4 GiB; with a big enough file the table offset is fine
    # and the header-size rule (§1.2 step 10) is what fails.
    cs = 4096
    hs = 0xFFFFFFFF // cs + 1
    header = fmt.new_header(1 * GiB, cluster_size=cs, table_size=1).replace(
        header_size=hs, l1_table_offset=hs * cs
    )
    assert message_of(header, hs * cs + 2 * cs) == "QED header size is too large"
    # One less is accepted.
    ok = header.replace(header_size=hs - 1, l1_table_offset=(hs - 1) * cs)
    assert fmt.validate_header(ok, hs * cs + 2 * cs).header_size == hs - 1


@pytest.mark.parametrize(
    ("changes", "file_size", "message"),
    [
        # Every pair of consecutive rules: the earlier one wins (QEMU's order).
        ({"magic": 0, "cluster_size": 1000}, DEFAULT_FILE_SIZE, "Image not in QED format"),
        ({"magic": 0, "features": 0x8}, DEFAULT_FILE_SIZE, "Image not in QED format"),
        ({"features": 0x8, "cluster_size": 1000}, DEFAULT_FILE_SIZE, "Unsupported QED features: 8"),
        ({"cluster_size": 1000, "table_size": 3}, DEFAULT_FILE_SIZE, "QED cluster size is invalid"),
        ({"table_size": 3, "image_size": 1000}, DEFAULT_FILE_SIZE, "QED table size is invalid"),
        (
            {"image_size": 1000, "l1_table_offset": 0x10001},
            DEFAULT_FILE_SIZE,
            "QED image size is invalid",
        ),
        (
            {"l1_table_offset": 0x10001, "features": 1, "backing_filename_offset": 65530},
            DEFAULT_FILE_SIZE,
            "QED table offset is invalid",
        ),
        (
            {"features": 1, "backing_filename_offset": 65530, "backing_filename_size": 4096},
            DEFAULT_FILE_SIZE,
            "QED backing filename offset is invalid",
        ),
        # Truncated file with everything else wrong too: magic first.
        ({"magic": 0x58444551, "table_size": 0}, 512, "Image not in QED format"),
    ],
)
def test_validate_header_reports_the_first_failing_rule(
    changes: dict[str, int], file_size: int, message: str
) -> None:
    assert message_of(default_header(**changes), file_size) == message


@pytest.mark.parametrize(
    "changes",
    [
        {"compat_features": 0x8},
        {"compat_features": 2**64 - 1},
        {"autoclear_features": 0xFF},
        {"features": fmt.Feature.NEED_CHECK},
        {"features": fmt.Feature.BACKING_FILE},  # bit set, name off/size 0: no backing
        {"features": 1, "backing_filename_offset": 64, "backing_filename_size": 4095},
        {"features": 1, "backing_filename_offset": 65528, "backing_filename_size": 8},
        # The backing fields are ignored without the bit.
        {"backing_filename_offset": 0xFFFFFFFF, "backing_filename_size": 0xFFFFFFFF},
        {"cluster_size": 8192},  # §10.7: L1 at 0x10000 still aligned
        {"table_size": 2},
        {"header_size": 0},  # QEMU accepts hs = 0 (the struct still occupies cluster 0)
        {"image_size": 0},
        {"image_size": 64 * TiB},
    ],
)
def test_validate_header_accepts(changes: dict[str, int]) -> None:
    fmt.validate_header(default_header(**changes), DEFAULT_FILE_SIZE)


def test_l1_at_offset_zero_with_header_size_zero_is_refused() -> None:
    # QEMU accepts it although the table overlaps the header; qedfuse refuses.
    # docs/qemu-differences.md#table-overlaps-header
    header = default_header(header_size=0, l1_table_offset=0)
    assert message_of(header) == "QED table offset is invalid"


def test_table_size_one_accepted_unlike_qemu() -> None:
    # docs/qemu-differences.md#bug-c: every ts=1 image fails with "QED table offset is invalid".
    header = fmt.new_header(1 * GiB, cluster_size=4096, table_size=1)
    geometry = fmt.validate_header(header, 2 * 4096)
    assert geometry.table_entries == 512
    assert geometry.max_image_size == 1 * GiB
    assert message_of(header, 2 * 4096 - 1) == "QED table offset is invalid"
    assert message_of(header.replace(image_size=GiB + 512), 2 * 4096) == "QED image size is invalid"


def test_table_limit_is_a_limit_error_after_qemus_rules() -> None:
    # cs=64 MiB, ts=1: 64 MiB tables, valid QED (size 0 even for QEMU), over our 16 MiB cap.
    cs = 64 * MiB
    header = fmt.new_header(0, cluster_size=cs, table_size=1)
    with pytest.raises(LimitError) as info:
        fmt.validate_header(header, 2 * cs)
    assert str(info.value) == (
        f"QED table size is too large for qedfuse: {64 * MiB} bytes (limit {fmt.MAX_TABLE_SIZE})"
    )
    # The QEMU rules are checked first.
    assert message_of(header, 2 * cs - 1) == "QED table offset is invalid"
    # 16 MiB tables exactly are fine.
    ok = fmt.new_header(0, cluster_size=16 * MiB, table_size=1)
    assert fmt.validate_header(ok, 2 * 16 * MiB).table_bytes == fmt.MAX_TABLE_SIZE == 16 * MiB


# ---------------------------------------------------------------------------- sizes


@pytest.mark.parametrize(
    ("cs", "ts", "expected"),
    [
        (4 * KiB, 1, 1 * GiB),
        (4 * KiB, 2, 4 * GiB),
        (4 * KiB, 4, 16 * GiB),
        (4 * KiB, 8, 64 * GiB),
        (4 * KiB, 16, 256 * GiB),
        (64 * KiB, 1, 4 * TiB),
        (64 * KiB, 2, 16 * TiB),
        (64 * KiB, 4, 64 * TiB),
        (64 * KiB, 8, 256 * TiB),
        (64 * KiB, 16, 1 * PiB),
        # Sizes where QEMU's uint64 product wraps (to 0): computed exactly here.
        (16 * MiB, 1, 2**66),
        (8 * MiB, 2, 2**65),
        (4 * MiB, 4, 2**64),
        (2 * MiB, 16, 2**65),
        (64 * MiB, 16, 2**80),
    ],
)
def test_max_image_size_exact(cs: int, ts: int, expected: int) -> None:
    assert fmt.Geometry(cs, ts).max_image_size == expected


def test_max_image_size_boundary_default_geometry() -> None:
    fmt.validate_header(default_header(image_size=70368744177664), DEFAULT_FILE_SIZE)
    assert message_of(default_header(image_size=70368744177664 + 512)) == (
        "QED image size is invalid"
    )


def test_wrapping_geometry_accepts_large_images_qemu_refuses() -> None:
    # cs=8 MiB, ts=2 (16 MiB tables): QEMU's limit wraps to 0, the exact one is 2^65, so every
    # 64-bit image size that is a multiple of 512 is valid here.
    cs = 8 * MiB
    header = fmt.new_header(2**64 - 512, cluster_size=cs, table_size=2)
    assert fmt.validate_header(header, 3 * cs).max_image_size == 2**65


# ---------------------------------------------------------------------------- address math


def test_address_math_worked_example() -> None:
    geo = fmt.Geometry(4096, 2)
    pos = 0x1234000
    assert geo.table_entries == 1024
    assert geo.l1_index(pos) == 4
    assert geo.l2_index(pos) == 564 == 0x234
    assert geo.offset_in_cluster(pos + 0x123) == 0x123
    # L1 entry 4 at 0x1000 + 4*8; L2 entry 564 at L2 + 0x11A0 (§2.3).
    assert 0x1000 + geo.l1_index(pos) * 8 == 0x1020
    assert geo.l2_index(pos) * 8 == 0x11A0
    assert geo.l2_coverage == 4 * MiB


def test_address_math_default_geometry() -> None:
    geo = fmt.Geometry(65536, 4)
    assert geo.table_entries == 32768
    assert geo.l2_coverage == 2 * GiB
    for pos in (0, 1, 65535, 65536, 2 * GiB - 1, 2 * GiB, 64 * TiB - 1, 4 * GiB + 1536):
        assert geo.l1_index(pos) == pos >> 31
        assert geo.l2_index(pos) == (pos >> 16) & 0x7FFF
        assert geo.offset_in_cluster(pos) == pos & 0xFFFF
        assert geo.cluster_start(pos) == pos - (pos & 0xFFFF)


def test_clusters_for_is_ceil_not_qemu_bug_a() -> None:
    geo = fmt.Geometry(4096, 8)
    assert geo.clusters_for(0) == 0
    assert geo.clusters_for(1) == 1
    assert geo.clusters_for(4096) == 1
    assert geo.clusters_for(4097) == 2
    # QEMU's roundup(b, cs)/(cs-1) gives 4096 for 4095 clusters and 4097 for 4096.
    assert geo.clusters_for(4095 * 4096) == 4095
    assert geo.clusters_for(4096 * 4096) == 4096
    assert geo.round_down(4096 * 3 + 17) == 4096 * 3


def test_cluster_and_table_offset_tests() -> None:
    geo = fmt.Geometry(4096, 2, 1)
    file_size = 10 * 4096
    assert geo.header_end_offset == 4096
    assert geo.is_cluster_offset(4096, file_size)
    assert not geo.is_cluster_offset(0, file_size)  # header
    assert not geo.is_cluster_offset(4096 + 512, file_size)  # unaligned
    assert geo.is_cluster_offset(9 * 4096, file_size)
    assert not geo.is_cluster_offset(10 * 4096, file_size)  # at EOF
    assert geo.is_table_offset(8 * 4096, file_size)
    assert not geo.is_table_offset(9 * 4096, file_size)  # second cluster past EOF
    assert not geo.is_table_offset(1, file_size)
    one = fmt.Geometry(4096, 1, 1)
    # ts=1: end == off is fine (docs/qemu-differences.md#bug-c)
    assert one.is_table_offset(9 * 4096, file_size)
    # header_size 0: the struct still owns cluster 0.
    assert fmt.Geometry(4096, 1, 0).header_end_offset == 4096
    assert fmt.Geometry(4096, 1, 3).header_end_offset == 3 * 4096


# ---------------------------------------------------------------------------- create params


def test_check_create_params_ok() -> None:
    assert fmt.check_create_params(10 * GiB, 65536, 4) == fmt.Geometry(65536, 4)
    assert fmt.check_create_params(0, 4096, 1) == fmt.Geometry(4096, 1)
    fmt.check_create_params(64 * TiB, 65536, 4)
    fmt.check_create_params(0, 16 * MiB, 1)


@pytest.mark.parametrize(
    ("size", "cs", "ts", "message"),
    [
        (
            MiB,
            2048,
            4,
            "QED cluster size must be within range [4096, 67108864] and power of 2",
        ),
        (
            MiB,
            6000,
            4,
            "QED cluster size must be within range [4096, 67108864] and power of 2",
        ),
        (
            MiB,
            128 * MiB,
            4,
            "QED cluster size must be within range [4096, 67108864] and power of 2",
        ),
        (MiB, 65536, 0, "QED table size must be within range [1, 16] and power of 2"),
        (MiB, 65536, 3, "QED table size must be within range [1, 16] and power of 2"),
        (MiB, 65536, 32, "QED table size must be within range [1, 16] and power of 2"),
        (0, 64 * MiB, 1, f"QED table of {64 * MiB} bytes exceeds qedfuse's limit of {16 * MiB}"),
        (0, 2 * MiB, 16, f"QED table of {32 * MiB} bytes exceeds qedfuse's limit of {16 * MiB}"),
        (
            1000,
            65536,
            4,
            "QED image size must be a multiple of 512 and at most 70368744177664 bytes",
        ),
        (
            64 * TiB + 512,
            65536,
            4,
            "QED image size must be a multiple of 512 and at most 70368744177664 bytes",
        ),
        (5 * GiB, 4096, 2, "QED image size must be a multiple of 512 and at most 4294967296 bytes"),
        (-512, 4096, 2, "QED image size must be a multiple of 512 and at most 4294967296 bytes"),
    ],
)
def test_check_create_params_messages(size: int, cs: int, ts: int, message: str) -> None:
    with pytest.raises(FormatError) as info:
        fmt.check_create_params(size, cs, ts)
    assert str(info.value) == message


def test_check_create_params_order_cluster_then_table() -> None:
    with pytest.raises(FormatError, match="cluster size"):
        fmt.check_create_params(1000, 1000, 3)
    with pytest.raises(FormatError, match="table size"):
        fmt.check_create_params(1000, 4096, 3)


# ---------------------------------------------------------------------------- table codec


def test_table_codec_round_trip_and_little_endian() -> None:
    values = [0, 1, 0x50000, 2**64 - 1, 0x0102030405060708, *range(2, 509)]
    table = array("Q", values)
    raw = fmt.encode_table(table)
    assert raw == struct.pack(f"<{len(values)}Q", *values)
    decoded = fmt.decode_table(raw)
    assert decoded == table
    assert decoded.typecode == "Q"
    assert fmt.encode_table(table, 2, 4) == struct.pack("<2Q", 0x50000, 2**64 - 1)
    assert fmt.encode_table(table, 510) == struct.pack("<2Q", *values[510:])
    assert fmt.encode_table(table, 0, 1) == bytes(8)
    assert fmt.decode_table(b"") == array("Q")
    # Decoding a table is independent of the buffer type.
    assert fmt.decode_table(bytearray(raw)) == table
    assert fmt.decode_table(memoryview(raw)) == table


# ------------------------------------------------------------ geometries QEMU can hold

CLUSTER_SIZES = [1 << bits for bits in range(12, 27)]  # 4 KiB .. 64 MiB


def test_create_params_refuse_the_issue_11_geometries() -> None:
    for cs, ts in ((4 * MiB, 4), (8 * MiB, 2), (16 * MiB, 1)):
        with pytest.raises(FormatError, match=r"at most 0 bytes .* QEMU computes"):
            fmt.check_create_params(MiB, cs, ts)
        fmt.check_create_params(0, cs, ts)  # qemu-img creates and opens size 0 (checked below)


@pytest.mark.parametrize("cs", CLUSTER_SIZES, ids=lambda cs: f"cs{cs // KiB}k")
def test_create_geometry_matrix_against_qemu_img(cs: int, tmp_path: Path, qemu_img: str) -> None:
    """Every table_size 1..16 x a few sizes: what we create, QEMU 7.2 opens with that size;
    what we refuse, qemu-img refuses to create or cannot open (or our 16 MiB table cap);
    the one warned case (table_size=1, docs/qemu-differences.md#bug-c) is the only image QEMU
    cannot open."""
    import trio

    from qedfuse import commands

    problems: list[str] = []
    for ts in range(1, 17):
        geo = fmt.Geometry(cs, ts)
        sizes = [512]
        if fmt.is_power_of_two(ts):
            sizes = [0, 512, geo.max_image_size, geo.max_image_size + 512]
            sizes = [s for s in sizes if s < 2**63]  # qemu-img's size option is signed
        for size in sizes:
            what = f"cs={cs} ts={ts} size={size}"
            ours = tmp_path / f"ours-{ts}-{size}.qed"
            try:
                trio.run(partial(commands.create, str(ours), size, cluster_size=cs, table_size=ts))
                refused = None
            except UserError as exc:
                refused = str(exc)
                assert "\n" not in refused, what
                assert not ours.exists(), what
            capped = ts <= 16 and fmt.is_power_of_two(ts) and geo.table_bytes > fmt.MAX_TABLE_SIZE
            if refused is not None and capped:
                assert "exceeds qedfuse's limit" in refused, what
                continue  # qemu-img would write a >16 MiB L1 table of zeros: not run
            theirs = tmp_path / f"theirs-{ts}-{size}.qed"
            opts = f"cluster_size={cs},table_size={ts}"
            made = run([qemu_img, "create", "-q", "-f", "qed", "-o", opts, theirs, str(size)])
            if refused is None:
                info = run([qemu_img, "info", "-f", "qed", "--output=json", ours])
                if ts == 1:  # we warn: docs/qemu-differences.md#bug-c
                    if info.returncode == 0 or "QED table offset is invalid" not in info.stderr:
                        problems.append(f"{what}: expected QEMU's bug-c\n{describe(info)}")
                elif info.returncode != 0:
                    problems.append(f"{what}: we created it, QEMU cannot open it\n{describe(info)}")
                elif json.loads(info.stdout)["virtual-size"] != size:
                    problems.append(f"{what}: QEMU sees another size\n{info.stdout}")
                if made.returncode != 0:
                    problems.append(f"{what}: we created it, qemu-img refuses\n{describe(made)}")
            elif made.returncode == 0 and run([qemu_img, "info", theirs]).returncode == 0:
                problems.append(f"{what}: we refuse ({refused}); QEMU creates and opens it")
            for path in (ours, theirs):
                path.unlink(missing_ok=True)
    assert not problems, "\n".join(problems[:20])


@pytest.mark.parametrize("cs", CLUSTER_SIZES, ids=lambda cs: f"cs{cs // KiB}k")
def test_qemu_max_image_size_is_the_wrapped_product(cs: int) -> None:
    for ts in (1, 2, 4, 8, 16):
        geo = fmt.Geometry(cs, ts)
        exact = geo.max_image_size
        assert geo.qemu_max_image_size == (exact if exact < 2**64 else 0)
        if exact >= 2**64 and geo.table_bytes <= fmt.MAX_TABLE_SIZE:
            with pytest.raises(FormatError, match="QEMU computes"):
                fmt.check_create_params(512, cs, ts)


QEDFUSE_CLI = str(Path(sys.executable).with_name("qedfuse"))


@pytest.mark.parametrize(("cs", "ts"), [("4M", 4), ("8M", 2), ("16M", 1)])
def test_cli_create_convert_resize_refuse_what_qemu_cannot_open(
    cs: str, ts: int, tmp_path: Path, qemu_img: str
) -> None:
    """create, convert -O qed and resize (the CLI): a one-line refusal, no file left behind,
    where QEMU's size limit wraps; size 0 is still created and QEMU opens it."""
    opts = f"cluster_size={cs},table_size={ts}"
    image = tmp_path / "a.qed"
    cp = run([QEDFUSE_CLI, "create", "-o", opts, image, "1M"])
    assert cp.returncode == 1, describe(cp)
    assert cp.stderr.count("\n") == 1, cp.stderr
    assert cp.stderr.startswith("qedfuse: "), cp.stderr
    assert "QEMU computes" in cp.stderr
    assert not image.exists()
    raw = tmp_path / "src.raw"
    raw.write_bytes(b"\x5a" * 65536)
    out = tmp_path / "c.qed"
    cp = run([QEDFUSE_CLI, "convert", "-f", "raw", "-O", "qed", "-o", opts, raw, out])
    assert cp.returncode == 1, describe(cp)
    assert "QEMU computes" in cp.stderr
    assert cp.stderr.count("\n") == 1
    assert not out.exists()
    # A size-0 image of that geometry is fine for both; growing it past QEMU's limit is not.
    check_ok(run([qemu_img, "create", "-q", "-f", "qed", "-o", opts, image, "0"]))
    before = image.read_bytes()[:4096]
    cp = run([QEDFUSE_CLI, "resize", image, "1M"])
    assert cp.returncode == 1, describe(cp)
    assert "QEMU computes" in cp.stderr
    assert cp.stderr.count("\n") == 1
    assert image.read_bytes()[:4096] == before
    if ts != 1:
        check_ok(run([qemu_img, "info", image]))


def test_cli_convert_warns_for_table_size_1_as_create_does(tmp_path: Path) -> None:
    raw = tmp_path / "src.raw"
    raw.write_bytes(b"\x5a" * 65536)
    cp = check_ok(
        run(
            [
                QEDFUSE_CLI,
                "convert",
                "-O",
                "qed",
                "-o",
                "cluster_size=4096,table_size=1",
                raw,
                tmp_path / "c.qed",
            ]
        )
    )
    assert "QEMU cannot open images with table_size=1" in cp.stderr
