"""Backing files, copy-on-write, zero clusters and resize, against QEMU as the oracle.

Reproduces QEMU iotests 017, 025, 027, 028, 034, 037, 050 and 069 (qed-format.md §9) at the
engine level, plus the backing-name safety policy.  Images are made and read back with the
real qemu-img / qemu-io.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from qedfuse import format as fmt
from qedfuse.backing import BackingPolicy
from qedfuse.engine import Kind, OpenOptions, QedImage
from qedfuse.errors import BackingFileError, OutOfRangeError, QedError
from qedfuse.opening import backing_chain, open_path
from support import check_ok, require_tool, run

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB


def qemu_img(*args: str | Path) -> str:
    cp = run([require_tool("qemu-img"), *map(str, args)])
    check_ok(cp)
    return cp.stdout


def qemu_io(image: Path, *commands: str, fmt_name: str = "qed") -> None:
    args: list[str] = [require_tool("qemu-io"), "-f", fmt_name]
    for command in commands:
        args += ["-c", command]
    cp = run([*args, str(image)])
    check_ok(cp)
    assert "error" not in cp.stdout.lower(), cp.stdout
    assert "failed" not in cp.stdout.lower(), cp.stdout


def qemu_raw(image: Path, tmp_path: Path) -> bytes:
    """The guest view of ``image`` (and its chain) as QEMU converts it."""
    out = tmp_path / f"{image.name}.qemu.raw"
    qemu_img("convert", "-U", "-O", "raw", image, out)
    return out.read_bytes()


def qemu_check_rc(image: Path) -> int:
    return run([require_tool("qemu-img"), "check", "-f", "qed", str(image)]).returncode


async def read_all(img: QedImage) -> bytes:
    return await img.read(0, img.image_size)


def make_raw(path: Path, size: int, pattern: int | None = None) -> None:
    with open(path, "wb") as f:
        if pattern is None:
            f.truncate(size)
        else:
            f.write(bytes([pattern]) * size)


def proc_locks() -> list[str]:
    with open("/proc/locks") as f:
        return f.read().splitlines()


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --------------------------------------------------------------------------- reads, COW


async def test_iotest017_reads_alternate_between_overlay_and_backing(tmp_path: Path) -> None:
    """017: overlay and backing data interleaved at 0 and at 4 GiB (L1 index 2)."""
    base = tmp_path / "base.qed"
    top = tmp_path / "top.qed"
    qemu_img("create", "-q", "-f", "qed", base, "6G")
    for start in (0, 4 * GiB):
        qemu_io(base, *(f"write -P 0x{0x10 + k:x} {start + k * 64 * KiB} 64k" for k in range(8)))
    qemu_img("create", "-q", "-f", "qed", "-b", base.name, "-F", "qed", top)
    for start in (0, 4 * GiB):
        qemu_io(top, *(f"write -P 0xee {start + k * 64 * KiB} 64k" for k in range(0, 8, 2)))
    async with await open_path(str(top), read_only=True) as img:
        for start in (0, 4 * GiB):
            data = await img.read(start, 10 * 64 * KiB)
            for k in range(10):
                chunk = data[k * 64 * KiB : (k + 1) * 64 * KiB]
                want = 0xEE if k % 2 == 0 and k < 8 else (0x10 + k if k < 8 else 0)
                assert chunk == bytes([want]) * 64 * KiB, (start, k)


@pytest.mark.parametrize("cluster_size", [4096, 65536])
async def test_iotest037_cow_from_backing_single_two_multi_cluster(
    tmp_path: Path, cluster_size: int
) -> None:
    """037 + 027: partial-cluster writes copy the rest of the cluster from the backing file."""
    base = tmp_path / "base.raw"
    top = tmp_path / "top.qed"
    size = 4 * MiB
    base.write_bytes(bytes(range(256)) * (size // 256))
    qemu_img(
        "create", "-q", "-f", "qed", "-o", f"cluster_size={cluster_size}",
        "-b", base.name, "-F", "raw", top,
    )  # fmt: skip
    cs = cluster_size
    writes = [
        (cs // 2, 512),  # inside one cluster
        (3 * cs - 1000, 2000),  # across two clusters
        (6 * cs + 100, 3 * cs),  # spanning four clusters
        (size - 700, 700),  # the last bytes
    ]
    async with await open_path(str(top), read_only=False) as img:
        for k, (pos, n) in enumerate(writes):
            await img.write(pos, bytes([0xA0 + k]) * n)
    expected = bytearray(base.read_bytes())
    for k, (pos, n) in enumerate(writes):
        expected[pos : pos + n] = bytes([0xA0 + k]) * n
    assert qemu_raw(top, tmp_path) == bytes(expected)
    assert qemu_check_rc(top) == 0
    async with await open_path(str(top), read_only=True) as img:
        assert await read_all(img) == bytes(expected)


async def test_iotest028_short_backing_unaligned_image_size(tmp_path: Path) -> None:
    """028: a backing file shorter than the overlay, size 4 GiB + 1536, reads across its EOF."""
    base = tmp_path / "base.raw"
    top = tmp_path / "top.qed"
    base_size = 100000
    base.write_bytes(b"\x2a" * base_size)
    image_size = 4 * GiB + 1536
    qemu_img("create", "-q", "-f", "qed", "-b", base.name, "-F", "raw", top, str(image_size))
    async with await open_path(str(top), read_only=False) as img:
        assert img.image_size == image_size
        data = await img.read(base_size - 16, 32)
        assert data == b"\x2a" * 16 + bytes(16)
        # A write straddling the backing EOF: COW fill copies backing bytes, then zeros.
        await img.write(base_size - 8, b"\x01" * 4)
        # The very last (partial) cluster of the image, allocated whole.
        await img.write(image_size - 512, b"\x02" * 512)
        assert await img.read(image_size - 1024, 2048) == bytes(512) + b"\x02" * 512
    qemu_io(top, "read -P 0x2a 0 99992", "read -P 1 99992 4", "read -P 0x2a 99996 4")
    qemu_io(top, "read -P 0 100000 28000", f"read -P 2 {image_size - 512} 512")
    assert qemu_check_rc(top) == 0


async def test_iotest034_zero_clusters_hide_backing(tmp_path: Path) -> None:
    """034: write-zeroes over a backing file, overwriting zero clusters, re-zeroing."""
    base = tmp_path / "base.raw"
    top = tmp_path / "top.qed"
    make_raw(base, 1 * MiB, 0x55)
    qemu_img(
        "create", "-q", "-f", "qed", "-o", "cluster_size=4096", "-b", base.name, "-F", "raw", top
    )
    async with await open_path(str(top), read_only=False) as img:
        await img.write_zeroes(0, 64 * KiB)
        assert img.stats.zero_clusters_written == 16
        assert img.stats.allocated_clusters == 0
        ext = await img.extents(0, 128 * KiB)
        assert ext[0].kind is Kind.ZERO
        assert ext[0].length == 64 * KiB
        assert ext[1].kind is Kind.UNALLOCATED
        await img.write(8 * KiB, b"\x11" * 4 * KiB)  # overwrite a zero cluster
        await img.write_zeroes(8 * KiB, 4 * KiB)  # re-zero an allocated cluster: in place
        await img.write(20 * KiB + 100, b"\x22" * 10)  # partial write into a zero cluster
    qemu_io(top, "read -P 0 0 20580", "read -P 0x22 20580 10", "read -P 0 20590 44946")
    qemu_io(top, "read -P 0x55 64k 960k")
    assert qemu_check_rc(top) == 0


async def test_zero_detection_off_allocates(tmp_path: Path) -> None:
    top = tmp_path / "top.qed"
    qemu_img("create", "-q", "-f", "qed", top, "1M")
    opts = OpenOptions(detect_zeroes=False)
    async with await open_path(str(top), read_only=False, options=opts) as img:
        await img.write(0, bytes(64 * KiB))
        assert img.stats.allocated_clusters == 1
    async with await open_path(str(top), read_only=False) as img:
        await img.write(64 * KiB, bytes(64 * KiB))
        assert img.stats.allocated_clusters == 0
        await img.write(0, bytes(64 * KiB))  # over an allocated cluster: stays in place
        assert (await img.extents(0, 64 * KiB))[0].kind is Kind.DATA


async def test_partial_write_into_zero_cluster_over_backing_fills_zeros_qemu_bug_e(
    tmp_path: Path,
) -> None:
    """QEMU copies backing data into a written zero cluster; the spec says zeros.

    docs/qemu-differences.md#bug-e
    """
    base = tmp_path / "base.raw"
    ours = tmp_path / "ours.qed"
    theirs = tmp_path / "theirs.qed"
    make_raw(base, 1 * MiB, 0x55)
    for image in (ours, theirs):
        qemu_img("create", "-q", "-f", "qed", "-b", base.name, "-F", "raw", image)
        qemu_io(image, "write -z 0 64k")
    qemu_io(theirs, "write -P 0x33 4k 4k")
    async with await open_path(str(ours), read_only=False) as img:
        await img.write(4 * KiB, b"\x33" * 4 * KiB)
    # Ours: the rest of the cluster reads as zeros, as the zero cluster did.
    qemu_io(ours, "read -P 0 0 4k", "read -P 0x33 4k 4k", "read -P 0 8k 56k")
    # QEMU: the backing data resurrects.
    qemu_io(theirs, "read -P 0x55 0 4k", "read -P 0x33 4k 4k", "read -P 0x55 8k 56k")


async def test_interop_overlay_both_ways(tmp_path: Path) -> None:
    """qemu-io writes → qedfuse reads; qedfuse writes → qemu-io reads; whole-chain compare."""
    base = tmp_path / "base.qed"
    mid = tmp_path / "mid.qed"
    top = tmp_path / "top.qed"
    qemu_img("create", "-q", "-f", "qed", "-o", "cluster_size=4096", base, "8M")
    qemu_io(base, "write -P 0x01 0 8M")
    qemu_img(
        "create", "-q", "-f", "qed", "-o", "cluster_size=4096", "-b", base.name, "-F", "qed", mid
    )
    qemu_io(mid, "write -P 0x02 1M 1M", "write -z 3M 64k", "write -P 0x03 5000 3000")
    qemu_img(
        "create", "-q", "-f", "qed", "-o", "cluster_size=4096", "-b", mid.name, "-F", "qed", top
    )
    async with await open_path(str(top), read_only=False) as img:
        assert await read_all(img) == qemu_raw(top, tmp_path)
        await img.write(1 * MiB - 100, b"\x04" * 200)
        await img.write(3 * MiB + 1000, b"\x05" * 100)
        await img.write(7 * MiB, os.urandom(64 * KiB))
        ours = await read_all(img)
    assert qemu_raw(top, tmp_path) == ours
    expected = tmp_path / "expected.raw"
    expected.write_bytes(ours)
    check_ok(
        run(
            [require_tool("qemu-img"), "compare", "-f", "qed", "-F", "raw", str(top), str(expected)]
        )
    )
    for image in (base, mid, top):
        assert qemu_check_rc(image) == 0
    assert [p for p, _ in await backing_chain(str(top))] == [str(top), str(mid), str(base)]


async def test_backing_file_is_never_written(tmp_path: Path) -> None:
    base = tmp_path / "base.raw"
    top = tmp_path / "top.qed"
    make_raw(base, 2 * MiB, 0x77)
    before = sha(base)
    qemu_img("create", "-q", "-f", "qed", "-b", base.name, "-F", "raw", top)
    async with await open_path(str(top), read_only=False) as img:
        for k in range(32):
            await img.write(k * 60000, os.urandom(5000))
        await img.resize(4 * MiB)
    assert sha(base) == before


# --------------------------------------------------------------------------- resize


async def test_iotest025_grow_then_reopen(tmp_path: Path) -> None:
    """025: write 128M, grow to 384M, reopen; the new area reads zero; check clean."""
    image = tmp_path / "img.qed"
    qemu_img("create", "-q", "-f", "qed", image, "128M")
    qemu_io(image, "write -P 0xcc 0 128M")
    async with await open_path(str(image), read_only=False) as img:
        await img.resize(384 * MiB)
    info = qemu_img("info", "--output=json", image)
    assert '"virtual-size": 402653184' in info
    qemu_io(image, "read -P 0xcc 0 128M", "read -P 0 128M 256M")
    assert qemu_check_rc(image) == 0


async def test_resize_over_larger_backing_reads_zeros(tmp_path: Path) -> None:
    """QEMU refuses this resize; we grow and keep the new area zero with zero clusters."""
    base = tmp_path / "base.raw"
    top = tmp_path / "top.qed"
    make_raw(base, 16 * MiB, 0x5A)
    qemu_img("create", "-q", "-f", "qed", "-b", base.name, "-F", "raw", top, str(8 * MiB + 1536))
    cp = run([require_tool("qemu-img"), "resize", "-f", "qed", str(top), "12M"])
    assert cp.returncode != 0  # QEMU: "Block driver does not support requested flags"
    async with await open_path(str(top), read_only=False) as img:
        await img.resize(24 * MiB)
        data = await read_all(img)
    assert data[: 8 * MiB + 1536] == b"\x5a" * (8 * MiB + 1536)
    assert data[8 * MiB + 1536 :] == bytes(16 * MiB - 1536)
    assert qemu_raw(top, tmp_path) == data
    assert qemu_check_rc(top) == 0


async def test_resize_refuses_shrink_and_bad_sizes(tmp_path: Path) -> None:
    image = tmp_path / "img.qed"
    qemu_img("create", "-q", "-f", "qed", "-o", "cluster_size=4096,table_size=1", image, "1M")
    async with await open_path(str(image), read_only=False) as img:
        with pytest.raises(OutOfRangeError, match="Shrinking"):
            await img.resize(512 * KiB)
        with pytest.raises(OutOfRangeError, match="multiple of 512"):
            await img.resize(2 * MiB + 1)
        with pytest.raises(OutOfRangeError, match="at most"):
            await img.resize(img.geometry.max_image_size + 512)
        await img.resize(img.geometry.max_image_size)
        assert img.image_size == 1 * GiB


async def test_write_past_end_is_refused(tmp_path: Path) -> None:
    image = tmp_path / "img.qed"
    qemu_img("create", "-q", "-f", "qed", image, "1M")
    async with await open_path(str(image), read_only=False) as img:
        with pytest.raises(OutOfRangeError):
            await img.write(1 * MiB - 1, b"ab")
        assert await img.read(1 * MiB - 1, 10) == b"\0"


# --------------------------------------------------------------------------- names, policy


async def test_iotest069_missing_backing_file(tmp_path: Path) -> None:
    base = tmp_path / "base.raw"
    top = tmp_path / "top.qed"
    make_raw(base, 1 * MiB)
    qemu_img("create", "-q", "-f", "qed", "-b", base.name, "-F", "raw", top)
    base.unlink()
    with pytest.raises(
        QedError, match=r"^Could not open backing file: Could not open '.*base\.raw'"
    ):
        await open_path(str(top), read_only=True)


def poke_backing_name(image: Path, name: bytes, *, raw: bool = True) -> None:
    """Rewrite the image's backing file name in place (header cluster)."""
    data = bytearray(image.read_bytes())
    header = fmt.Header.unpack(bytes(data[:64]))
    features = header.features | fmt.Feature.BACKING_FILE
    features = features | fmt.Feature.BACKING_FORMAT_NO_PROBE if raw else features
    header = header.replace(
        features=features, backing_filename_offset=64, backing_filename_size=len(name)
    )
    data[:64] = header.pack()
    data[64 : 64 + len(name)] = name
    image.write_bytes(bytes(data))


@pytest.mark.parametrize(
    ("name", "message"),
    [
        (b'json:{"file.filename":"/etc/passwd"}', "protocol prefix"),
        (b"nbd://localhost/x", "protocol prefix"),
        (b"file:/etc/hostname", "protocol prefix"),
        (b"missing.raw", "No such file or directory"),
        (b"bad\0name", "NUL"),
        (b"\xff\xfe.raw", "not valid UTF-8"),
    ],
)
async def test_backing_name_refused(tmp_path: Path, name: bytes, message: str) -> None:
    image = tmp_path / "img.qed"
    qemu_img("create", "-q", "-f", "qed", image, "1M")
    poke_backing_name(image, name)
    with pytest.raises(QedError, match=message):
        await open_path(str(image), read_only=True)


async def test_backing_names_relative_dotdot_absolute(tmp_path: Path) -> None:
    """Relative names resolve against the image's directory (not the CWD), ``..`` included."""
    (tmp_path / "sub").mkdir()
    base = tmp_path / "base.raw"
    make_raw(base, 1 * MiB, 0x42)
    image = tmp_path / "sub" / "img.qed"
    qemu_img("create", "-q", "-f", "qed", image, "1M")
    for name in (b"../base.raw", str(base).encode()):
        poke_backing_name(image, name)
        async with await open_path(str(image), read_only=True) as img:
            assert await img.read(0, 4) == b"\x42" * 4
    poke_backing_name(image, b"base.raw")  # relative to sub/, where it does not exist
    with pytest.raises(BackingFileError, match=r"sub/base\.raw"):
        await open_path(str(image), read_only=True)


async def test_untrusted_refuses_any_backing_and_override_replaces_it(tmp_path: Path) -> None:
    base = tmp_path / "base.raw"
    other = tmp_path / "other.raw"
    make_raw(base, 1 * MiB, 0x42)
    make_raw(other, 1 * MiB, 0x43)
    image = tmp_path / "img.qed"
    qemu_img("create", "-q", "-f", "qed", "-b", base.name, "-F", "raw", image)
    with pytest.raises(BackingFileError, match="untrusted"):
        await open_path(str(image), read_only=True, policy=BackingPolicy(allow=False))
    policy = BackingPolicy(override=str(other), override_format="raw")
    async with await open_path(str(image), read_only=True, policy=policy) as img:
        assert await img.read(0, 2) == b"\x43\x43"


async def test_backing_loop_and_depth_refused(tmp_path: Path) -> None:
    a = tmp_path / "a.qed"
    b = tmp_path / "b.qed"
    qemu_img("create", "-q", "-f", "qed", a, "1M")
    qemu_img("create", "-q", "-f", "qed", "-b", a.name, "-F", "qed", b)
    poke_backing_name(a, b"b.qed", raw=False)  # a → b → a
    with pytest.raises(BackingFileError, match="loops"):
        await open_path(str(b), read_only=True)
    with pytest.raises(BackingFileError, match="loops"):
        await backing_chain(str(b))
    chain = [tmp_path / "c0.qed"]
    qemu_img("create", "-q", "-f", "qed", chain[0], "1M")
    for k in range(1, 18):
        chain.append(tmp_path / f"c{k}.qed")
        qemu_img("create", "-q", "-f", "qed", "-b", chain[k - 1].name, "-F", "qed", chain[k])
    async with await open_path(str(chain[16]), read_only=True) as img:  # 16 backing levels
        assert await img.read(0, 1) == b"\0"
    with pytest.raises(BackingFileError, match="deeper than 16"):
        await open_path(str(chain[17]), read_only=True)


async def test_backing_of_another_format_is_refused_not_misread(tmp_path: Path) -> None:
    base = tmp_path / "base.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", base, "1M")
    image = tmp_path / "img.qed"
    qemu_img("create", "-q", "-f", "qed", image, "1M")
    poke_backing_name(image, b"base.qcow2", raw=False)
    with pytest.raises(BackingFileError, match="qcow2"):
        await open_path(str(image), read_only=True)


async def test_backing_files_locked_like_qemu(tmp_path: Path) -> None:
    """A QED backing file gets QEMU's bytes 100, 201, 203: readable by qemu-img, not writable.

    (tests/test_locks_backing.py compares every level with qemu-io holding the same chain.)
    """
    base = tmp_path / "base.qed"
    top = tmp_path / "top.qed"
    qemu_img("create", "-q", "-f", "qed", base, "1M")
    qemu_img("create", "-q", "-f", "qed", "-b", base.name, "-F", "qed", top)
    async with await open_path(str(top), read_only=False):
        inode = os.stat(base).st_ino
        lines = [ln for ln in proc_locks() if f":{inode} " in ln]
        assert sorted(ln.split()[-2:] for ln in lines) == [
            ["100", "100"],
            ["201", "201"],
            ["203", "203"],
        ]
        qemu_img("info", base)  # allowed: the backing file is only read
        cp = run([require_tool("qemu-img"), "resize", str(base), "+1M"])
        assert 'Failed to get "write" lock' in cp.stderr
        cp = run([require_tool("qemu-img"), "info", str(top)])
        assert cp.returncode != 0
        assert 'Failed to get shared "write" lock' in cp.stderr


async def test_iotest050_rebase_keeps_zero_clusters_reading_zeros(tmp_path: Path) -> None:
    """050: zero clusters written by us survive `qemu-img rebase` onto a different backing file."""
    base = tmp_path / "base.raw"
    other = tmp_path / "other.raw"
    top = tmp_path / "top.qed"
    make_raw(base, 1 * MiB, 0x11)
    make_raw(other, 1 * MiB, 0x22)
    qemu_img("create", "-q", "-f", "qed", "-b", base.name, "-F", "raw", top)
    async with await open_path(str(top), read_only=False) as img:
        await img.write(128 * KiB, bytes(256 * KiB))  # zero detection → zero clusters
        assert img.stats.zero_clusters_written == 4
        assert img.stats.allocated_clusters == 0
    qemu_img("rebase", "-u", "-f", "qed", "-b", other.name, "-F", "raw", top)
    qemu_io(top, "read -P 0x22 0 128k", "read -P 0 128k 256k", "read -P 0x22 384k 640k")
    async with await open_path(str(top), read_only=True) as img:
        data = await read_all(img)
    assert data == b"\x22" * 128 * KiB + bytes(256 * KiB) + b"\x22" * 640 * KiB
