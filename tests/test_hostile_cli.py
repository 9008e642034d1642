"""Hostile images through the command line: one clear line, a non-zero exit, no writes.

One image per header validation rule (qed-format.md §1.2 and the §10.7 pokes, iotest 116):
``qedfuse info`` and ``qedfuse check`` (the installed script) print exactly one line on
stderr, the same text qemu-img prints where QEMU has the rule (``Could not open 'X': QED
cluster size is invalid``), exit 1, never a traceback; ``check -r all``, ``map`` and
``convert`` refuse the same way; and the file is unchanged afterwards.  Corrupt tables
behind a valid header are reported (check's exit codes agree with qemu-img's) without
writes, hangs or tracebacks.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from array import array
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import qededit

from qedfuse import cli, logsetup
from qedfuse import format as fmt
from support import check_ok, data_ranges, describe, run

pytestmark = pytest.mark.qemu

_BIN = Path(sys.executable).parent / "qedfuse"
QEDFUSE = [str(_BIN)] if _BIN.exists() else [sys.executable, "-m", "qedfuse"]
MiB = 1024 * 1024
CS = 65536  # the base image: qemu-img create -f qed base.qed 128M (file = 5 clusters)


def fingerprint(path: Path) -> tuple[int, list[tuple[int, int, str]]]:
    """Size plus the hash of every allocated range: cheap for huge sparse files."""
    out: list[tuple[int, int, str]] = []
    with open(path, "rb") as f:
        for start, end in data_ranges(path):
            digest = hashlib.sha256()
            for chunk_pos in range(start, end, 4 * MiB):
                digest.update(os.pread(f.fileno(), min(4 * MiB, end - chunk_pos), chunk_pos))
            out.append((start, end, digest.hexdigest()))
    return os.path.getsize(path), out


def only_line(stderr: str) -> str:
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    return lines[0]


def in_process(*args: str | os.PathLike[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """cli.main in this process, with stdout/stderr captured by file descriptors."""
    argv = [os.fspath(a) for a in args]
    old = os.getcwd()
    out_r, err_r = (cwd / ".stdout"), (cwd / ".stderr")
    with open(out_r, "w+") as out_f, open(err_r, "w+") as err_f:
        saved = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = out_f, err_f
        try:
            os.chdir(cwd)
            code = cli.main(argv)
        finally:
            sys.stdout, sys.stderr = saved
            os.chdir(old)
            logsetup.reset_logging()
    result = subprocess.CompletedProcess(argv, code, out_r.read_text(), err_r.read_text())
    out_r.unlink()
    err_r.unlink()
    return result


# ---------------------------------------------------------------------- header cases


def _poke(field: str, value: int) -> Callable[[Path], None]:
    return lambda path: qededit.write_header_field(path, field, value)


def _truncate(size: int) -> Callable[[Path], None]:
    return lambda path: os.truncate(path, size)


def _header_size_too_large(path: Path) -> None:
    # Reachable only if the L1 table lies past hs*cs > 4 GiB: a sparse file that large.
    header_size = 0xFFFFFFFF // CS + 2
    l1_offset = header_size * CS
    qededit.write_header_field(path, "header_size", header_size)
    qededit.write_header_field(path, "l1_table_offset", l1_offset)
    os.truncate(path, l1_offset + 4 * CS)


def _backing_name(offset: int, size: int) -> Callable[[Path], None]:
    def mutate(path: Path) -> None:
        qededit.write_header_field(path, "features", fmt.Feature.BACKING_FILE)
        qededit.write_header_field(path, "backing_filename_offset", offset)
        qededit.write_header_field(path, "backing_filename_size", size)

    return mutate


def _huge_tables(path: Path) -> None:
    # 4 MiB clusters, 8-cluster tables: 32 MiB per table, over qedfuse's 16 MiB cap.  QEMU
    # opens such an image only with size 0 (its wrapped maximum size refuses any other).
    cs = 4 * MiB
    header = fmt.new_header(0, cluster_size=cs, table_size=8)
    path.write_bytes(header.pack())
    os.truncate(path, cs + 8 * cs)


@dataclass(frozen=True)
class Case:
    mutate: Callable[[Path], None]
    message: str
    qemu_agrees: bool = True  # qemu-img refuses with the same message (else: QEMU opens it)


TB = 1 << 40
CASES: dict[str, Case] = {
    "truncated-to-512": Case(_truncate(512), "QED table offset is invalid"),
    "bad-magic": Case(_poke("magic", 0x58444551), "Image not in QED format"),
    "features-0x8": Case(_poke("features", 0x8), "Unsupported QED features: 8"),
    "features-0x100": Case(_poke("features", 0x100), "Unsupported QED features: 100"),
    "cluster-size-0": Case(_poke("cluster_size", 0), "QED cluster size is invalid"),
    "cluster-size-max": Case(_poke("cluster_size", 0xFFFFFFFF), "QED cluster size is invalid"),
    "cluster-size-3000": Case(_poke("cluster_size", 3000), "QED cluster size is invalid"),
    "table-size-0": Case(_poke("table_size", 0), "QED table size is invalid"),
    "table-size-3": Case(_poke("table_size", 3), "QED table size is invalid"),
    "table-size-32": Case(_poke("table_size", 32), "QED table size is invalid"),
    "image-size-1000": Case(_poke("image_size", 1000), "QED image size is invalid"),
    "image-size-over-max": Case(_poke("image_size", 64 * TB + 512), "QED image size is invalid"),
    "header-size-huge": Case(_poke("header_size", 0xFFFFFFFF), "QED table offset is invalid"),
    "header-size-too-large": Case(_header_size_too_large, "QED header size is too large"),
    "l1-offset-0": Case(_poke("l1_table_offset", 0), "QED table offset is invalid"),
    "l1-offset-unaligned": Case(_poke("l1_table_offset", 0x10001), "QED table offset is invalid"),
    "l1-offset-past-eof": Case(_poke("l1_table_offset", 0x20000), "QED table offset is invalid"),
    "backing-name-outside-header": Case(
        _backing_name(65530, 8), "QED backing filename offset is invalid"
    ),
    "backing-name-4096": Case(_backing_name(64, 4096), "Failed to read backing filename"),
    "tables-over-16MiB": Case(
        _huge_tables,
        "QED table size is too large for qedfuse: 33554432 bytes (limit 16777216)",
        qemu_agrees=False,
    ),
}


@pytest.fixture(scope="module")
def base_image(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    from support import require_tool

    qemu_img = require_tool("qemu-img")
    path = tmp_path_factory.mktemp("base") / "base.qed"
    check_ok(run([qemu_img, "create", "-q", "-f", "qed", str(path), "128M"]))
    data = path.read_bytes()
    assert len(data) == 5 * CS
    return data


@pytest.mark.parametrize("name", list(CASES))
def test_hostile_header(tmp_path: Path, base_image: bytes, qemu_img: str, name: str) -> None:
    case = CASES[name]
    image = tmp_path / "hostile.qed"
    image.write_bytes(base_image)
    case.mutate(image)
    before = fingerprint(image)
    expected = f"Could not open 'hostile.qed': {case.message}"

    # The installed script, info and check side by side.
    procs = {
        command: subprocess.Popen(
            [*QEDFUSE, command, "hostile.qed"],
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for command in ("info", "check")
    }
    for command, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=60)
        assert proc.returncode == 1, (command, stdout, stderr)
        assert only_line(stderr) == f"qedfuse: {expected}", command
        assert stdout == ""

    # The other commands that open the image, in-process (same code path, no start-up).
    for argv in (
        ["check", "-r", "all", "hostile.qed"],
        ["map", "--json", "hostile.qed"],
        ["resize", "hostile.qed", "+1M"],
        ["commit", "hostile.qed"],
        ["convert", "-f", "qed", "-O", "raw", "hostile.qed", "out.raw"],
    ):
        cp = in_process(*argv, cwd=tmp_path)
        assert cp.returncode == 1, describe(cp)
        assert only_line(cp.stderr) == f"qedfuse: {expected}", argv
    assert not (tmp_path / "out.raw").exists()

    assert fingerprint(image) == before  # nothing wrote to the image, not even a repair

    if case.qemu_agrees:
        cp = run([qemu_img, "info", "-f", "qed", "hostile.qed"], cwd=tmp_path)
        assert cp.returncode == 1, describe(cp)
        assert cp.stderr.splitlines()[-1] == f"qemu-img: {expected}"
    else:
        check_ok(run([qemu_img, "info", "-f", "qed", "hostile.qed"], cwd=tmp_path))


# ---------------------------------------------------------------------- table cases


@pytest.fixture(scope="module")
def written_image(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """A 128M image (4 KiB clusters, 4 MiB per L2 table) with data in two L2 tables."""
    from support import require_tool

    qemu_img = require_tool("qemu-img")
    qemu_io = require_tool("qemu-io")
    path = tmp_path_factory.mktemp("written") / "w.qed"
    check_ok(
        run([qemu_img, "create", "-q", "-f", "qed", "-o", "cluster_size=4096,table_size=2",
             str(path), "128M"])
    )  # fmt: skip
    check_ok(
        run([qemu_io, "-f", "qed", "-c", "write -P 0xab 0 128k", "-c", "write -P 0xcd 1M 4k",
             "-c", "write -P 0xef 100M 64k", str(path)])
    )  # fmt: skip
    return path.read_bytes()


def _l1_into_header(path: Path) -> None:
    qededit.set_l1(path, 0, qededit.geometry(path).cluster_size // 2)  # unaligned, in the header


def _l1_past_eof(path: Path) -> None:
    qededit.invalidate_l1(path, 0)


def _l1_all_same(path: Path) -> None:
    # Every L1 entry names the same L2 table: overlapping tables, none usable.
    entries = qededit.l1_entries(path)
    same = fmt.encode_table(array("Q", [entries[0]] * len(entries)))
    qededit.pwrite(path, qededit.read_header(path).l1_table_offset, same)


def _l2_into_l1(path: Path) -> None:
    qededit.set_l2(path, 0, 0, qededit.read_header(path).l1_table_offset)


def _l2_unaligned(path: Path) -> None:
    qededit.set_l2(path, 0, 1, qededit.l2_entries(path, 0)[0] + 512)


TABLE_CASES = {
    "l1-into-header": _l1_into_header,
    "l1-past-eof": _l1_past_eof,
    "l1-all-same-table": _l1_all_same,
    "l2-into-l1": _l2_into_l1,
    "l2-unaligned": _l2_unaligned,
}


@pytest.mark.parametrize("name", list(TABLE_CASES))
@pytest.mark.expect_log(
    r"\d+ invalid L\d+ entries; the guest ranges they map will fail with EIO",
    r"L\d+ table at 0x[0-9a-f]+ has \d+ invalid entries",
)
def test_hostile_tables(tmp_path: Path, written_image: bytes, qemu_img: str, name: str) -> None:
    image = tmp_path / "bad.qed"
    image.write_bytes(written_image)
    TABLE_CASES[name](image)
    before = fingerprint(image)
    started = time.monotonic()

    cp = in_process("info", "bad.qed", cwd=tmp_path)  # the header is fine: info works
    assert cp.returncode == 0, describe(cp)
    assert "Traceback" not in cp.stderr
    qemu_rc = run([qemu_img, "check", "bad.qed"], cwd=tmp_path).returncode
    cp = in_process("check", "bad.qed", cwd=tmp_path)
    assert cp.returncode == 2, describe(cp)  # corruptions remain
    assert qemu_rc == 2
    assert "Traceback" not in cp.stderr
    for argv in (["map", "bad.qed"], ["convert", "-O", "raw", "bad.qed", "out.raw"]):
        cp = in_process(*argv, cwd=tmp_path)
        assert cp.returncode == 1, describe(cp)
        lines = cp.stderr.splitlines()
        assert lines, describe(cp)
        assert all(line.startswith("qedfuse: warning: ") for line in lines[:-1]), describe(cp)
        assert lines[-1].startswith("qedfuse: invalid L"), describe(cp)
        assert "Traceback" not in cp.stderr
    assert not (tmp_path / "out.raw").exists()
    assert fingerprint(image) == before
    assert time.monotonic() - started < 30

    # Repair (explicit) leaves an image qemu-img finds free of corruption.
    cp = in_process("check", "-r", "all", "bad.qed", cwd=tmp_path)
    assert cp.returncode in (0, 3), describe(cp)
    assert run([qemu_img, "check", "bad.qed"], cwd=tmp_path).returncode in (0, 3)
