"""The ``qedfuse`` console script, run for real in subprocesses, checked against qemu-img.

Exit codes, one-line errors (never a traceback), --help/--version, the mount(8) dispatch,
create's size rounding and refusals (with QEMU's messages), info and map cross-checked
with ``qemu-img info/map --output=json``, resize seen by qemu-img, commit checked with
``qemu-img compare``, check's qemu-img exit codes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import qededit

from qedfuse import __version__, cli, cliparser, logsetup
from qedfuse.locking import LockMode, lock_image
from support import check_ok, describe, run

pytestmark = pytest.mark.qemu

_BIN = Path(sys.executable).parent / "qedfuse"
QEDFUSE = [str(_BIN)] if _BIN.exists() else [sys.executable, "-m", "qedfuse"]
MiB = 1024 * 1024


def qf(
    *args: str | os.PathLike[str], cwd: Path | None = None, **kw: Any
) -> subprocess.CompletedProcess[str]:
    return run([*QEDFUSE, *(os.fspath(a) for a in args)], cwd=cwd, **kw)


class InProcess:
    """``qedfuse`` run in this process through :func:`qedfuse.cli.main` (no interpreter
    start-up: most checks here use it; the console script itself is exercised by ``qf``)."""

    def __init__(self, capsys: pytest.CaptureFixture[str]) -> None:
        self.capsys = capsys

    def __call__(
        self, *args: str | os.PathLike[str], cwd: Path | None = None
    ) -> subprocess.CompletedProcess[str]:
        argv = [os.fspath(a) for a in args]
        self.capsys.readouterr()
        old_cwd = os.getcwd()
        try:
            if cwd is not None:
                os.chdir(cwd)
            code = cli.main(argv)
        finally:
            os.chdir(old_cwd)
            logsetup.reset_logging()
        out = self.capsys.readouterr()
        return subprocess.CompletedProcess(["qedfuse", *argv], code, out.out, out.err)


@pytest.fixture
def qm(capsys: pytest.CaptureFixture[str]) -> InProcess:
    return InProcess(capsys)


def one_line_error(
    cp: subprocess.CompletedProcess[str], code: int = 1, *, after_warnings: bool = False
) -> str:
    """Assert exit ``code`` and exactly one ``qedfuse: …`` line on stderr; return it.

    ``after_warnings``: the engine may log ``qedfuse: warning: …`` lines first (e.g. about
    the invalid table entry the error is about); the error is still one line, the last.
    """
    assert cp.returncode == code, describe(cp)
    lines = cp.stderr.splitlines()
    if after_warnings:
        while len(lines) > 1 and lines[0].startswith("qedfuse: warning: "):
            del lines[0]
    assert len(lines) == 1, describe(cp)
    assert lines[0].startswith("qedfuse: "), describe(cp)
    assert "Traceback" not in cp.stderr
    return lines[0]


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def qemu_json(qemu_img: str, *args: str | os.PathLike[str], cwd: Path | None = None) -> object:
    return json.loads(check_ok(run([qemu_img, *args], cwd=cwd)).stdout)


def qio(qemu_io_path: str, image: Path, *cmds: str, fmt: str = "qed") -> None:
    """Run qemu-io commands on ``image``; any failed command fails the test."""
    argv: list[str] = [qemu_io_path, "-f", fmt]
    for cmd in cmds:
        argv += ["-c", cmd]
    cp = check_ok(run([*argv, str(image)]))
    assert "error" not in cp.stdout.lower(), describe(cp)
    assert "failed" not in cp.stdout.lower(), describe(cp)


# ---------------------------------------------------------------------- basics


def test_help_lists_every_command() -> None:
    cp = check_ok(qf("--help"))
    for command in cliparser.COMMANDS:
        assert command in cp.stdout
    assert "IMAGE MOUNTPOINT" in cp.stdout  # the mount(8) form is documented
    assert cp.stderr == ""


@pytest.mark.parametrize("command", cliparser.COMMANDS)
def test_every_command_has_help(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main([command, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: qedfuse {command}")


def test_version() -> None:
    cp = check_ok(qf("--version"))
    lines = cp.stdout.splitlines()
    assert lines[0] == f"qedfuse {__version__}"
    assert any(line.startswith("pyfuse3 3.") for line in lines), cp.stdout
    assert any(line.startswith("libfuse 3.") for line in lines), cp.stdout
    assert check_ok(qf("-V")).stdout == cp.stdout


def test_console_script_end_to_end(tmp_path: Path, qemu_img: str) -> None:
    """The installed script: every offline command once, output on stdout, exit codes."""
    image = tmp_path / "a.qed"
    cp = check_ok(qf("create", "-o", "cluster_size=4096", image, "1234"))
    assert cp.stdout == f"Formatting '{image}', fmt=qed size=1536 cluster_size=4096 table_size=4\n"
    assert cp.stderr == ""
    info = json.loads(check_ok(qf("info", "--json", image)).stdout)
    assert (info["virtual-size"], info["cluster-size"]) == (1536, 4096)
    assert check_ok(qf("resize", image, "+1M")).stdout == "Image resized.\n"
    assert qemu_json(qemu_img, "info", "--output=json", image)["virtual-size"] == MiB + 1536  # type: ignore[index]
    raw = tmp_path / "a.raw"
    raw.write_bytes(os.urandom(8192) + bytes(MiB - 8192 + 1536))
    check_ok(
        qf("convert", "--force", "-f", "raw", "-O", "qed", "-o", "cluster_size=4k", raw, image)
    )
    assert check_ok(qf("check", image)).stdout.startswith("No errors were found on the image.")
    entries = json.loads(check_ok(qf("map", "--json", image)).stdout)
    assert [(e["start"], e["length"], e["data"]) for e in entries][:1] == [(0, 8192, True)]
    check_ok(run([qemu_img, "compare", "-f", "qed", "-F", "raw", str(image), str(raw)]))
    # Errors: one line, the right exit status, also through the real script.
    assert one_line_error(qf(), 2).startswith("qedfuse: a command is required")
    line = one_line_error(qf("info", "nope.qed", cwd=tmp_path))
    assert line == "qedfuse: Could not open 'nope.qed': No such file or directory"
    qededit.invalidate_l2(image, 0, 0)
    cp = qf("check", image)
    assert cp.returncode == 2, describe(cp)
    line = one_line_error(qf("map", image), after_warnings=True)
    assert "invalid L2 entry 0 (0x" in line


def test_python_dash_m() -> None:
    cp = check_ok(run([sys.executable, "-m", "qedfuse", "--version"]))
    assert cp.stdout.startswith(f"qedfuse {__version__}\n")


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        ([], "a command is required"),
        (["--bogus"], "unrecognized arguments: --bogus"),
        (["create"], "create: the following arguments are required: IMAGE"),
        (["create", "x.qed", "12Q"], "invalid size '12Q'"),
        (["create", "-o", "colour=blue", "x.qed", "1M"], "invalid option 'colour'"),
        (["create", "-F", "vmdk", "-b", "b", "x.qed"], "invalid choice: 'vmdk'"),
        (["info", "a.qed", "b.qed"], "unrecognized arguments: b.qed"),
        (["convert", "a.qed", "b.raw"], "the following arguments are required: -O"),
        (["convert", "-O", "vmdk", "a.qed", "b.raw"], "invalid choice: 'vmdk'"),
        (["map", "--json", "--output", "human", "x.qed"], "not allowed with argument"),
        (["resize", "x.qed"], "the following arguments are required: [+]SIZE"),
    ],
)
def test_usage_errors_exit_2_with_one_line(
    qm: InProcess, tmp_path: Path, argv: list[str], needle: str
) -> None:
    cp = qm(*argv, cwd=tmp_path)
    line = one_line_error(cp, 2)
    assert needle in line
    assert list(tmp_path.iterdir()) == []  # nothing created


def test_check_usage_errors_exit_1(qm: InProcess, tmp_path: Path) -> None:
    """For check, 2 means "corruptions remain": a bad command line is "could not complete"."""
    line = one_line_error(qm("check", "-r", "some", "a.qed", cwd=tmp_path), 1)
    assert "invalid choice: 'some'" in line
    one_line_error(qm("check", cwd=tmp_path), 1)


def test_offline_commands_do_not_import_pyfuse3(qm: InProcess, tmp_path: Path) -> None:
    """mount.py (and pyfuse3 with it) loads only for mount/umount."""
    image = tmp_path / "a.qed"
    check_ok(qm("create", image, "1M"))
    code = (
        "import sys\n"
        "from qedfuse.cli import main\n"
        "for argv in (['info', sys.argv[1]], ['map', sys.argv[1]], ['check', sys.argv[1]]):\n"
        "    assert main(argv) == 0\n"
        "assert 'pyfuse3' not in sys.modules, 'pyfuse3 imported'\n"
        "assert 'qedfuse.mount' not in sys.modules, 'qedfuse.mount imported'\n"
    )
    check_ok(run([sys.executable, "-c", code, str(image)]))


# ---------------------------------------------------------------------- mount(8) dispatch


def test_mount_form_reaches_mount(tmp_path: Path) -> None:
    """`qedfuse IMAGE MOUNTPOINT -o …` is the mount command, not an unknown command."""
    missing = tmp_path / "missing.qed"
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    cp = qf(missing, mnt, "-o", "ro,allow_other,dev,suid")
    assert cp.returncode != 0
    assert cp.returncode != 2, describe(cp)  # not a usage error: the arguments were accepted
    assert "invalid choice" not in cp.stderr
    assert "COMMAND" not in cp.stderr
    assert "Traceback" not in cp.stderr
    assert "missing.qed" in cp.stderr, describe(cp)


@pytest.mark.parametrize(
    "argv",
    [
        ["/img/disk.qed", "/mnt/x", "-o", "ro,allow_other,dev,suid"],
        ["/img/disk.qed", "/mnt/x", "-n", "-o", "ro,allow_other,dev,suid", "-t", "fuse.qedfuse"],
        ["--debug", "/img/disk.qed", "/mnt/x", "-o", "ro,allow_other,dev,suid"],
        ["mount", "-o", "ro,allow_other,dev,suid", "/img/disk.qed", "/mnt/x"],
    ],
)
def test_mount_form_arguments(monkeypatch: pytest.MonkeyPatch, argv: list[str]) -> None:
    """The parsed namespace mount_main receives (mount_main replaced: no real mount here)."""
    from qedfuse import mount

    seen: list[argparse.Namespace] = []

    def fake_mount_main(ns: argparse.Namespace) -> int:
        seen.append(ns)
        return 0

    monkeypatch.setattr(mount, "mount_main", fake_mount_main)
    assert cli.main(argv) == 0
    (ns,) = seen
    assert ns.command == "mount"
    assert (ns.image, ns.mountpoint) == ("/img/disk.qed", "/mnt/x")
    assert ns.options == ["ro,allow_other,dev,suid"]
    assert ns.debug is ("--debug" in argv)


def test_unexpected_exception_is_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """A bug (not a QedError/OSError) still prints one line; --debug adds the traceback."""
    from qedfuse import commands

    async def broken(path: str, *, force_share: bool = False) -> object:
        raise RuntimeError("boom")

    monkeypatch.setattr(commands, "info", broken)  # cli calls it as commands.info
    assert cli.main(["info", str(tmp_path / "x.qed")]) == 1
    err = capsys.readouterr().err
    assert err.splitlines() == [
        "qedfuse: internal error: RuntimeError: boom (run with --debug for a traceback)"
    ]
    assert cli.main(["--debug", "info", str(tmp_path / "x.qed")]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err
    assert err.splitlines()[-1] == "qedfuse: internal error: RuntimeError: boom"


# ---------------------------------------------------------------------- create


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        ("1234", 1536),
        ("1000", 1024),
        ("512", 512),
        ("0", 0),
        ("1.5K", 1536),
        ("64k", 65536),
        ("3M", 3 * MiB),
        ("1G", 1 << 30),
        ("2T", 2 << 40),
    ],
)
def test_create_size_suffixes_and_rounding(
    qm: InProcess, tmp_path: Path, qemu_img: str, size: str, expected: int
) -> None:
    image = tmp_path / "a.qed"
    cp = check_ok(qm("create", image, size))
    assert f"size={expected} " in cp.stdout
    info = qemu_json(qemu_img, "info", "--output=json", "-f", "qed", image)
    assert isinstance(info, dict)
    assert info["virtual-size"] == expected
    assert info["cluster-size"] == 65536
    assert image.stat().st_size == 5 * 65536  # header cluster + 4-cluster L1, like QEMU


@pytest.mark.parametrize(
    ("options", "size", "message"),
    [
        ("cluster_size=3000", "1M", "QED cluster size must be within range [4096, 67108864] "
         "and power of 2"),
        ("cluster_size=2048", "1M", "QED cluster size must be within range [4096, 67108864] "
         "and power of 2"),
        ("cluster_size=128M", "1M", "QED cluster size must be within range [4096, 67108864] "
         "and power of 2"),
        ("table_size=3", "1M", "QED table size must be within range [1, 16] and power of 2"),
        ("table_size=32", "1M", "QED table size must be within range [1, 16] and power of 2"),
        ("table_size=0", "1M", "QED table size must be within range [1, 16] and power of 2"),
        ("cluster_size=4096,table_size=1", "2G", "QED image size must be a multiple of 512 "
         "and at most 1073741824 bytes"),
    ],
)  # fmt: skip
def test_create_refusals_use_qemus_messages(
    qm: InProcess, tmp_path: Path, qemu_img: str, options: str, size: str, message: str
) -> None:
    image = tmp_path / "a.qed"
    line = one_line_error(qm("create", "-o", options, image, size))
    assert line == f"qedfuse: {image}: {message}"
    assert not image.exists()
    # QEMU refuses the same parameters (its size message words the rule differently).
    cp = run([qemu_img, "create", "-f", "qed", "-o", options, str(tmp_path / "q.qed"), size])
    assert cp.returncode == 1, describe(cp)
    if "size must" not in message:
        assert message in cp.stderr


def test_create_refuses_a_non_empty_file_without_force(
    qm: InProcess, tmp_path: Path, qemu_img: str
) -> None:
    image = tmp_path / "a.qed"
    image.write_bytes(b"precious data")
    line = one_line_error(qm("create", image, "1M"))
    assert "exists and is not empty" in line
    assert "--force" in line
    assert image.read_bytes() == b"precious data"
    check_ok(qm("create", "--force", image, "1M"))
    assert qemu_json(qemu_img, "info", "--output=json", image)["virtual-size"] == MiB  # type: ignore[index]
    empty = tmp_path / "empty.qed"
    empty.touch()
    check_ok(qm("create", empty, "1M"))
    # qemu-img's own `-f qed` is accepted (muscle memory), any other format is not.
    check_ok(qm("create", "-f", "qed", tmp_path / "b.qed", "1M"))
    one_line_error(qm("create", "-f", "qcow2", tmp_path / "c.qed", "1M"), 2)


def test_create_with_backing(qm: InProcess, tmp_path: Path, qemu_img: str) -> None:
    (tmp_path / "sub").mkdir()
    base = tmp_path / "sub" / "base.raw"
    base.write_bytes(b"\x55" * 1000)  # size rounds up to 1024
    over = tmp_path / "sub" / "over.qed"
    # Relative backing names are relative to the new image, not to the cwd.
    cp = check_ok(qm("create", "-b", "base.raw", "-F", "raw", over, cwd=tmp_path))
    assert "backing_file=base.raw backing_fmt=raw" in cp.stdout
    info = qemu_json(qemu_img, "info", "--output=json", over)
    assert isinstance(info, dict)
    assert info["virtual-size"] == 1024
    assert info["backing-filename"] == "base.raw"
    assert info["backing-filename-format"] == "raw"
    assert qededit.read_header(over).features == 0x5  # BACKING_FILE | NO_PROBE

    over2 = tmp_path / "sub" / "over2.qed"
    check_ok(qm("create", "-b", "over.qed", "-F", "qed", over2, "4M"))
    assert qededit.read_header(over2).features == 0x1  # probed, as qemu-img -F qed does
    info = qemu_json(qemu_img, "info", "--output=json", over2)
    assert isinstance(info, dict)
    assert (info["virtual-size"], info["backing-filename"]) == (4 * MiB, "over.qed")

    line = one_line_error(qm("create", "-b", str(base), tmp_path / "x.qed"), 2)
    assert "Backing file specified without backing format" in line
    line = one_line_error(qm("create", "-b", str(base), "-F", "qed", tmp_path / "x.qed"))
    assert "is not a QED image" in line
    line = one_line_error(qm("create", "-b", "nope.raw", "-F", "raw", tmp_path / "x.qed", "1M"))
    assert "Could not open backing image" in line
    assert "No such file or directory" in line
    assert not (tmp_path / "x.qed").exists()


@pytest.mark.expect_log(r"^QEMU cannot open images with table_size=1")
def test_table_size_1_warns_that_qemu_cannot_open_it(
    qm: InProcess, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cp = check_ok(qm("create", "-o", "cluster_size=4096,table_size=1", tmp_path / "a.qed", "1M"))
    assert (
        cp.stderr == "qedfuse: warning: QEMU cannot open images with table_size=1 "
        "(a QEMU bug); qedfuse can\n"
    )
    # Under systemd (JOURNAL_STREAM set) the same warning carries a journald priority.
    monkeypatch.setenv("JOURNAL_STREAM", "8:12345")
    cp = check_ok(qm("create", "-o", "cluster_size=4096,table_size=1", tmp_path / "b.qed", "1M"))
    assert cp.stderr.startswith("<4>QEMU cannot open images with table_size=1"), cp.stderr


# ---------------------------------------------------------------------- info


def _mixed_chain(tmp_path: Path, qemu_img: str, qemu_io_path: str) -> dict[str, Path]:
    """base.raw <- mid.qed <- top.qed (raw backing), plus plain.qed, written by QEMU."""
    base = tmp_path / "base.raw"
    check_ok(run([qemu_img, "create", "-f", "raw", str(base), "8M"]))
    qio(qemu_io_path, base, "write -P 0x11 0 1M", "write -P 0x22 4M 64k", fmt="raw")
    mid = tmp_path / "mid.qed"
    check_ok(run([qemu_img, "create", "-f", "qed", "-b", "base.raw", "-F", "raw", str(mid)]))
    qio(qemu_io_path, mid, "write -P 0xab 0 64k", "write -z 128k 64k", "write -P 0xcd 1M 4k")
    top = tmp_path / "top.qed"
    check_ok(run([qemu_img, "create", "-f", "qed", "-b", "mid.qed", "-F", "qed", str(top), "12M"]))
    qio(qemu_io_path, top, "write -P 0x33 512k 64k", "write -z 4M 64k", "write -P 0x44 9M 4k")
    plain = tmp_path / "plain.qed"
    check_ok(run([qemu_img, "create", "-f", "qed", "-o", "cluster_size=4096", str(plain), "20M"]))
    qio(qemu_io_path, plain, "write -P 0x5a 4095 8194", "write -z 1M 8k")
    return {"base": base, "mid": mid, "top": top, "plain": plain}


@pytest.mark.parametrize("relative", [True, False])
def test_info_matches_qemu_img_info(
    qm: InProcess, tmp_path: Path, qemu_img: str, qemu_io: str, relative: bool
) -> None:
    images = _mixed_chain(tmp_path, qemu_img, qemu_io)
    for key in ("plain", "mid", "top"):
        name = images[key].name if relative else str(images[key])
        expected = qemu_json(qemu_img, "info", "--output=json", "-f", "qed", name, cwd=tmp_path)
        assert isinstance(expected, dict)
        ours = json.loads(check_ok(qm("info", "--json", name, cwd=tmp_path)).stdout)
        assert {k: ours.get(k) for k in expected} == expected, key
        assert set(ours) - set(expected) <= {"format-specific", "backing-chain"}
        data = ours["format-specific"]["data"]
        header = qededit.read_header(images[key])
        assert data["table-size"] == header.table_size
        assert data["header-size"] == header.header_size
        assert data["l1-table-offset"] == header.l1_table_offset
        allocated = len(qededit.data_slots(images[key])) * header.cluster_size
        assert data["allocated-size"] == allocated
        # Human output: qemu-img's first lines, byte for byte.
        ours_text = check_ok(qm("info", name, cwd=tmp_path)).stdout.splitlines()
        theirs = check_ok(run([qemu_img, "info", "-f", "qed", name], cwd=tmp_path)).stdout
        for line in theirs.splitlines():
            if line.startswith("backing file format:") and "raw" not in line:
                continue
            assert line in ours_text, (line, ours_text)
    chain = json.loads(check_ok(qm("info", "--json", images["top"])).stdout)["backing-chain"]
    assert chain == [
        {"filename": str(images["top"]), "format": "qed"},
        {"filename": str(images["mid"]), "format": "qed"},
        {"filename": str(images["base"]), "format": "raw"},
    ]


def test_info_shows_the_dirty_flag_on_disk(qm: InProcess, tmp_path: Path, qemu_img: str) -> None:
    """NEED_CHECK as it is on disk (qemu-img 7.2 shows false: docs/qemu-differences.md#bug-h)."""
    image = tmp_path / "a.qed"
    check_ok(run([qemu_img, "create", "-f", "qed", str(image), "8M"]))
    qededit.set_need_check(image, True)
    before = sha(image)
    ours = json.loads(check_ok(qm("info", "--json", image)).stdout)
    assert ours["dirty-flag"] is True
    assert "need-check" in ours["format-specific"]["data"]["features"]
    text = check_ok(qm("info", image)).stdout
    assert "cleanly shut down: no" in text
    assert sha(image) == before  # info never writes, not even to repair
    assert qededit.need_check(image)


def test_info_unknown_feature_bits_shown_in_hex(
    qm: InProcess, tmp_path: Path, qemu_img: str
) -> None:
    image = tmp_path / "a.qed"
    check_ok(run([qemu_img, "create", "-f", "qed", str(image), "8M"]))
    qededit.write_header_field(image, "compat_features", 0x8)
    qededit.write_header_field(image, "autoclear_features", 0xFF)
    text = check_ok(qm("info", image)).stdout
    assert "compat features: 0x8" in text
    assert "autoclear features: 0xff" in text
    # A read-only open keeps unknown autoclear bits (as QEMU's does).
    assert qededit.read_header(image).autoclear_features == 0xFF


def test_info_respects_and_can_share_qemu_locks(
    qm: InProcess, tmp_path: Path, qemu_img: str
) -> None:
    image = tmp_path / "a.qed"
    check_ok(run([qemu_img, "create", "-f", "qed", str(image), "8M"]))
    fd = os.open(image, os.O_RDWR)
    try:
        lock_image(fd, LockMode.READ_WRITE, str(image))  # as a read-write QEMU or mount would
        line = one_line_error(qm("info", image))
        assert line.startswith(f"qedfuse: Could not open '{image}': Failed to get shared "), line
        assert "is another process using the image" in line
        check_ok(qm("info", "-U", image))
        check_ok(qm("map", "--force-share", image))
        one_line_error(qm("check", "-r", "all", image))
        # qemu-img agrees on both counts.
        assert run([qemu_img, "info", str(image)]).returncode == 1
        check_ok(run([qemu_img, "info", "-U", str(image)]))
    finally:
        os.close(fd)


# ---------------------------------------------------------------------- map


def test_map_matches_qemu_img_map(
    qm: InProcess, tmp_path: Path, qemu_img: str, qemu_io: str
) -> None:
    images = _mixed_chain(tmp_path, qemu_img, qemu_io)
    # Writes across the L2 boundaries of a small-table image (4 MiB per L2 table).
    small = tmp_path / "small.qed"
    check_ok(
        run([qemu_img, "create", "-f", "qed", "-o", "cluster_size=4096,table_size=2",
             str(small), "32M"])
    )  # fmt: skip
    qio(qemu_io, small, "write -P 0x77 4190000 12000", "write -z 8380000 30000",
            "write -P 0x78 16M 4k", "write -P 0x79 16388k 4k")  # fmt: skip
    for image in [*images.values(), small]:
        if image.suffix == ".raw":
            continue
        name = image.name
        expected = check_ok(
            run([qemu_img, "map", "--output=json", "-f", "qed", name], cwd=tmp_path)
        ).stdout
        ours = check_ok(qm("map", "--json", name, cwd=tmp_path)).stdout
        assert json.loads(ours) == json.loads(expected), name
        assert ours == expected  # same layout, line for line
        expected = check_ok(run([qemu_img, "map", "-f", "qed", name], cwd=tmp_path)).stdout
        assert check_ok(qm("map", name, cwd=tmp_path)).stdout == expected, name
    # The chain's depths are all there.
    entries = json.loads(check_ok(qm("map", "--json", images["top"])).stdout)
    assert {e["depth"] for e in entries} == {0, 1, 2}


# ---------------------------------------------------------------------- resize


def test_resize_grows_and_qemu_sees_it(
    qm: InProcess, tmp_path: Path, qemu_img: str, qemu_io: str
) -> None:
    image = tmp_path / "a.qed"
    check_ok(run([qemu_img, "create", "-f", "qed", str(image), "8M"]))
    qio(qemu_io, image, "write -P 0xab 8384512 4k")
    assert check_ok(qm("resize", image, "16M")).stdout == "Image resized.\n"
    assert qemu_json(qemu_img, "info", "--output=json", image)["virtual-size"] == 16 * MiB  # type: ignore[index]
    check_ok(qm("resize", image, "+1M"))
    assert qemu_json(qemu_img, "info", "--output=json", image)["virtual-size"] == 17 * MiB  # type: ignore[index]
    qio(qemu_io, image, "read -P 0xab 8384512 4k", "read -P 0 8M 9M")
    check_ok(run([qemu_img, "check", str(image)]))

    before = sha(image)
    line = one_line_error(qm("resize", image, "1M"))
    assert "Shrinking images is not supported" in line
    one_line_error(qm("resize", image, "--", "-1M"))
    line = one_line_error(qm("resize", image, "20000001"))
    assert "multiple of 512" in line
    line = one_line_error(qm("resize", image, "65T"))
    assert "at most" in line
    assert sha(image) == before


def test_resize_over_a_larger_backing_reads_zeros(
    qm: InProcess, tmp_path: Path, qemu_img: str, qemu_io: str
) -> None:
    """QEMU refuses this resize; qedfuse hides the backing data past the old size."""
    base = tmp_path / "base.raw"
    base.write_bytes(b"\x55" * (16 * MiB))
    over = tmp_path / "over.qed"
    check_ok(run([qemu_img, "create", "-f", "qed", "-b", "base.raw", "-F", "raw", str(over),
                  "8M"]))  # fmt: skip
    check_ok(qm("resize", over, "16M"))
    qio(qemu_io, over, "read -P 0x55 0 8M", "read -P 0 8M 8M")
    check_ok(run([qemu_img, "check", str(over)]))


# ---------------------------------------------------------------------- commit


@pytest.mark.parametrize("backing_format", ["raw", "qed"])
def test_commit_then_backing_equals_the_overlay_view(
    qm: InProcess, tmp_path: Path, qemu_img: str, qemu_io: str, backing_format: str
) -> None:
    base = tmp_path / f"base.{backing_format}"
    check_ok(run([qemu_img, "create", "-f", backing_format, str(base), "8M"]))
    qio(qemu_io, base, "write -P 0x11 0 2M", "write -P 0x22 4M 64k", fmt=backing_format)
    over = tmp_path / "over.qed"
    check_ok(
        run([qemu_img, "create", "-f", "qed", "-b", base.name, "-F", backing_format, str(over),
             "12M"])
    )  # fmt: skip
    qio(qemu_io, over, "write -P 0xab 0 64k", "write -z 128k 64k", "write -P 0xcd 1M 4097",
            "write -z 4M 4k", "write -P 0xee 9M 64k")  # fmt: skip
    view = tmp_path / "view.raw"
    check_ok(run([qemu_img, "convert", "-O", "raw", str(over), str(view)]))
    over_sha = sha(over)

    cp = check_ok(qm("commit", over))
    assert cp.stdout.startswith("Image committed")
    assert sha(over) == over_sha  # the overlay is left as it is (qemu-img commit -d)
    cp = check_ok(run([qemu_img, "compare", "-f", backing_format, "-F", "raw", str(base),
                       str(view)]))  # fmt: skip
    assert "Images are identical" in cp.stdout
    # …and the overlay still reads the same through the committed backing file.
    check_ok(run([qemu_img, "compare", "-f", "qed", "-F", "raw", str(over), str(view)]))
    if backing_format == "qed":
        check_ok(run([qemu_img, "check", str(base)]))


def test_commit_refuses_an_image_without_backing(qm: InProcess, tmp_path: Path) -> None:
    image = tmp_path / "a.qed"
    check_ok(qm("create", image, "1M"))
    line = one_line_error(qm("commit", image))
    assert line == f"qedfuse: Image '{image}' does not have a backing file"


# ---------------------------------------------------------------------- check


def test_check_exit_codes_match_qemu_img(
    qm: InProcess, tmp_path: Path, qemu_img: str, qemu_io: str
) -> None:
    clean = tmp_path / "clean.qed"
    check_ok(run([qemu_img, "create", "-f", "qed", str(clean), "16M"]))
    qio(qemu_io, clean, "write -P 0xab 0 64k", "write -P 0xcd 1M 4k")
    leaky = tmp_path / "leaky.qed"
    corrupt = tmp_path / "corrupt.qed"
    leaky.write_bytes(clean.read_bytes())
    corrupt.write_bytes(clean.read_bytes())
    qededit.append_clusters(leaky, 2)
    qededit.invalidate_l2(corrupt, 0, 16)  # guest 1M now points past the end of the file

    for image, code in ((clean, 0), (leaky, 3), (corrupt, 2)):
        before = sha(image)
        cp = qm("check", image)
        assert cp.returncode == code, describe(cp)
        assert "Traceback" not in cp.stderr
        assert run([qemu_img, "check", str(image)]).returncode == code
        report = json.loads(qm("check", "--json", image).stdout)
        assert report["filename"] == str(image)
        assert report["format"] == "qed"
        assert sha(image) == before  # a plain check never writes
    assert "No errors were found on the image." in check_ok(qm("check", clean)).stdout

    cp = qm("check", "-r", "all", corrupt)
    assert cp.returncode in (0, 3), describe(cp)
    assert "were found and repaired" in cp.stdout
    assert run([qemu_img, "check", str(corrupt)]).returncode == cp.returncode
    assert qm("check", corrupt).returncode == cp.returncode


def test_check_does_not_repair_a_dirty_image_unless_asked(
    qm: InProcess, tmp_path: Path, qemu_img: str
) -> None:
    image = tmp_path / "a.qed"
    check_ok(run([qemu_img, "create", "-f", "qed", str(image), "8M"]))
    qededit.set_need_check(image, True)
    before = sha(image)
    check_ok(qm("check", image))
    assert sha(image) == before
    assert qededit.need_check(image)
    check_ok(qm("check", "-r", "leaks", image))
    assert not qededit.need_check(image)


# ---------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "argv",
    [
        ["info", "{x}"],
        ["check", "{x}"],
        ["check", "-r", "all", "{x}"],
        ["map", "{x}"],
        ["resize", "{x}", "+1M"],
        ["commit", "{x}"],
        ["convert", "-O", "raw", "{x}", "out.raw"],
        ["convert", "-f", "qed", "-O", "raw", "{x}", "out.raw"],
    ],
)
def test_open_errors_read_like_qemu_img(qm: InProcess, tmp_path: Path, argv: list[str]) -> None:
    raw = tmp_path / "disk.raw"
    raw.write_bytes(b"\x01" * 65536)
    (tmp_path / "adir").mkdir()
    cases = {
        "nope.qed": "Could not open 'nope.qed': No such file or directory",
        "adir": "Could not open 'adir': Is a directory",
    }
    if "-f" in argv or argv[0] != "convert":
        cases["disk.raw"] = "Could not open 'disk.raw': Image not in QED format"
    for name, message in cases.items():
        cp = qm(*(a.replace("{x}", name) for a in argv), cwd=tmp_path)
        assert one_line_error(cp) == f"qedfuse: {message}"
    assert not (tmp_path / "out.raw").exists()
    assert raw.read_bytes() == b"\x01" * 65536


def test_convert_refuses_other_formats_and_its_own_source(
    qm: InProcess, tmp_path: Path, qemu_img: str
) -> None:
    qcow2 = tmp_path / "a.qcow2"
    check_ok(run([qemu_img, "create", "-f", "qcow2", str(qcow2), "1M"]))
    line = one_line_error(qm("convert", "-O", "raw", qcow2, tmp_path / "out.raw"))
    assert "is a qcow2 image" in line
    image = tmp_path / "a.qed"
    check_ok(qm("create", image, "1M"))
    before = sha(image)
    line = one_line_error(qm("convert", "--force", "-O", "qed", image, image))
    assert "source image" in line
    assert sha(image) == before


def test_convert_progress(qm: InProcess, tmp_path: Path) -> None:
    raw = tmp_path / "a.raw"
    raw.write_bytes(os.urandom(3 * MiB))
    cp = check_ok(qm("convert", "-p", "-O", "qed", raw, tmp_path / "a.qed"))
    assert cp.stderr.endswith("(100.00/100%)\r\n") or cp.stderr.endswith("(100.00/100%)\n")
    assert "(0.00/100%)" in cp.stderr
    out = check_ok(qm("convert", "-O", "raw", tmp_path / "a.qed", tmp_path / "b.raw"))
    assert out.stderr == ""
    assert (tmp_path / "b.raw").read_bytes() == raw.read_bytes()


def test_missing_backing_file(qm: InProcess, tmp_path: Path, qemu_img: str) -> None:
    """info still works (like qemu-img info, it does not need the backing file); the
    commands that read guest data fail with qemu-img's nested message."""
    base = tmp_path / "gone.raw"
    base.write_bytes(bytes(MiB))
    check_ok(qm("create", "-b", "gone.raw", "-F", "raw", tmp_path / "over.qed"))
    base.unlink()
    info = json.loads(check_ok(qm("info", "--json", "over.qed", cwd=tmp_path)).stdout)
    assert info["backing-filename"] == "gone.raw"
    assert "No such file or directory" in info["backing-chain-error"]
    expected = (
        "qedfuse: Could not open 'over.qed': Could not open backing file: "
        f"Could not open '{base}': No such file or directory"
    )
    assert one_line_error(qm("map", "over.qed", cwd=tmp_path)) == expected
    assert one_line_error(qm("convert", "-O", "raw", "over.qed", "o.raw", cwd=tmp_path)) == expected
    cp = run([qemu_img, "map", "over.qed"], cwd=tmp_path)
    assert cp.stderr.startswith("qemu-img: Could not open 'over.qed': Could not open backing file")
