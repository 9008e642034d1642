"""Habits users bring from block devices and qemu-img, through the real CLI and mount.

* ``dd of=MNT/disk.raw`` without ``conv=notrunc`` and ``echo x > disk.raw`` behave as on a
  block device: ``O_TRUNC`` at open is ignored (the data lands at offset 0, the size stays);
  an explicit truncate to a smaller size is still refused.  Checked against a byte model of
  the disk, with qemu-img convert as the oracle and qemu-img check clean.
* The command line: a mistyped command gets a suggestion, the bare ``IMAGE MOUNTPOINT`` form
  is taken only when it can be that form, ``-f qed``/``--format``, ``-q``, ``--output``,
  ``info --backing-chain``, a closed pipe and Ctrl-C end quietly with at most one line.
"""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest
from fusehelpers import QEDFUSE, mounted, need_check, qedfuse

from qedfuse import cli, cliparser
from qedfuse.errors import UsageError
from support import check_ok, open_files, qemu_img_create, require_tool, run

MiB = 1 << 20
DISK_SIZE = 8 * MiB


def _qemu_create(qemu_img: str, path: Path, size: int = DISK_SIZE) -> Path:
    return qemu_img_create(path, size, qemu_img=qemu_img)


def _contents(qemu_img: str, image: Path, tmp_path: Path) -> bytes:
    out = tmp_path / "oracle.raw"
    check_ok(run([qemu_img, "convert", "-f", "qed", "-O", "raw", image, out]))
    return out.read_bytes()


def _check_clean(qemu_img: str, image: Path) -> None:
    check_ok(run([qemu_img, "check", image]))
    assert not need_check(image)


def _bytes(dd_size: str) -> int:
    unit = {"k": 1024, "M": MiB}.get(dd_size[-1])
    return int(dd_size[:-1]) * unit if unit else int(dd_size)


# (bs, count, seek) without conv=notrunc; seek=0 is what people type.
DD_CASES = [
    ("512", 1, 0),
    ("4k", 3, 0),
    ("64k", 17, 0),
    ("1M", 3, 0),
    ("100k", 5, 0),  # not a multiple of the page or cluster size
    ("1M", 8, 0),  # the whole disk
    ("4k", 9, 0),  # dd without count: src runs out
]


@pytest.mark.fuse
@pytest.mark.parametrize("cache", ["auto", "none", "kernel"])
def test_dd_without_notrunc_lands_its_data(tmp_path: Path, qemu_img: str, cache: str) -> None:
    dd = require_tool("dd")
    image = _qemu_create(qemu_img, tmp_path / "disk.qed")
    model = bytearray(DISK_SIZE)
    rng = random.Random(f"dd-{cache}")
    with mounted(image, tmp_path / "mnt", "-o", f"cache={cache}") as m:
        for bs, count, seek in DD_CASES:
            bs_bytes = _bytes(bs)
            length = bs_bytes * count
            data = rng.randbytes(length)
            src = tmp_path / "src"
            src.write_bytes(data)
            args = [dd, f"if={src}", f"of={m.raw}", f"bs={bs}", "status=none"]
            if (bs, count) != ("4k", 9):
                args.append(f"count={count}")
            check_ok(run(args))
            model[seek * bs_bytes : seek * bs_bytes + length] = data
            assert os.path.getsize(m.raw) == DISK_SIZE, (bs, count)
            assert m.raw.read_bytes() == model, (bs, count)
        # with conv=notrunc and a seek, as before
        data = rng.randbytes(3 * 4096)
        (tmp_path / "src").write_bytes(data)
        check_ok(
            run([dd, f"if={tmp_path / 'src'}", f"of={m.raw}", "bs=4k", "seek=7", "conv=notrunc"])
        )
        model[7 * 4096 : 10 * 4096] = data
        # echo x > disk.raw: writes at 0, the size and the rest stay
        check_ok(run(["sh", "-c", f"echo x > '{m.raw}'"]))
        model[0:2] = b"x\n"
        assert os.path.getsize(m.raw) == DISK_SIZE
        with open(m.raw, "w") as f:  # Python's open(..., "w") is O_TRUNC too
            f.write("py")
        model[0:2] = b"py"
        assert m.raw.read_bytes() == model
        # an explicit truncate to a smaller size is still refused, with nothing lost
        for size in (0, 4096, DISK_SIZE - 512):
            with pytest.raises(OSError, match="not supported") as info:
                os.truncate(m.raw, size)
            assert info.value.errno == errno.EOPNOTSUPP
        cp = run(["truncate", "-s", "1M", m.raw])
        assert cp.returncode != 0
        assert os.path.getsize(m.raw) == DISK_SIZE
    _check_clean(qemu_img, image)
    assert _contents(qemu_img, image, tmp_path) == model


@pytest.mark.fuse
@pytest.mark.parametrize(("bs", "seek", "count"), [("4k", 1, 1), ("64k", 5, 3), ("1M", 2, 6)])
def test_dd_seek_without_notrunc_lands_its_data(
    tmp_path: Path, qemu_img: str, bs: str, seek: int, count: int
) -> None:
    """dd seek=N without notrunc first shrinks to the seek offset: refused, dd writes anyway.

    coreutils dd reports the failed ftruncate on stderr and goes on writing; nothing before
    or after the written range is lost.
    """
    dd = require_tool("dd")
    image = _qemu_create(qemu_img, tmp_path / "disk.qed")
    rng = random.Random(f"{bs}-{seek}")
    model = bytearray(rng.randbytes(DISK_SIZE))
    (tmp_path / "full").write_bytes(model)
    data = rng.randbytes(_bytes(bs) * count)
    (tmp_path / "src").write_bytes(data)
    with mounted(image, tmp_path / "mnt") as m:
        check_ok(run([dd, f"if={tmp_path / 'full'}", f"of={m.raw}", "bs=1M", "status=none"]))
        cp = run([dd, f"if={tmp_path / 'src'}", f"of={m.raw}", f"bs={bs}", f"seek={seek}"])
        assert "failed to truncate" in cp.stderr or cp.returncode == 0, cp.stderr
        offset = _bytes(bs) * seek
        model[offset : offset + len(data)] = data
        assert os.path.getsize(m.raw) == DISK_SIZE
        assert m.raw.read_bytes() == model
    _check_clean(qemu_img, image)
    assert _contents(qemu_img, image, tmp_path) == model


@pytest.mark.fuse
def test_writeback_cache_still_refuses_o_trunc(tmp_path: Path, qemu_img: str) -> None:
    """The kernel's writeback cache would take the size as 0 after O_TRUNC: refused there."""
    image = _qemu_create(qemu_img, tmp_path / "disk.qed")
    with mounted(image, tmp_path / "mnt", "-o", "writeback_cache") as m:
        with pytest.raises(OSError, match="not supported"):
            open(m.raw, "w").close()
        assert os.path.getsize(m.raw) == DISK_SIZE
        with open(m.raw, "r+b") as f:
            f.write(b"still writable")
        assert os.path.getsize(m.raw) == DISK_SIZE
    _check_clean(qemu_img, image)
    assert _contents(qemu_img, image, tmp_path)[:14] == b"still writable"


# ---------------------------------------------------------------------- the command line


def _one_line(cp: subprocess.CompletedProcess[str], code: int) -> str:
    assert cp.returncode == code, cp
    assert "Traceback" not in cp.stderr
    lines = cp.stderr.splitlines()
    assert len(lines) == 1, cp.stderr
    assert lines[0].startswith("qedfuse: ")
    return lines[0]


@pytest.mark.parametrize(
    ("typo", "meant"),
    [
        ("chek", "check"),
        ("cehck", "check"),
        ("infoo", "info"),
        ("inf", "info"),
        ("conver", "convert"),
        ("mout", "mount"),
        ("unmount", "umount"),
        ("creat", "create"),
        ("comit", "commit"),
        ("resise", "resize"),
        ("mapp", "map"),
    ],
)
@pytest.mark.parametrize("rest", [["x.qed"], [], ["x.qed", "mnt"], ["-U", "x.qed"]])
def test_mistyped_command_suggests_the_command(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    typo: str,
    meant: str,
    rest: list[str],
) -> None:
    monkeypatch.chdir(tmp_path)
    code = cli.main([typo, *rest])
    err = capsys.readouterr().err
    line = _one_line(subprocess.CompletedProcess([], code, "", err), 2)
    assert line == f"qedfuse: unknown command '{typo}' (did you mean '{meant}'?)"
    assert list(tmp_path.iterdir()) == []


def test_unknown_word_without_suggestion_lists_the_commands() -> None:
    assert _one_line(qedfuse("chek", "x.qed"), 2).endswith("(did you mean 'check'?)")
    line = _one_line(qedfuse("frobnicate", "x.qed"), 2)
    assert "unknown command 'frobnicate'" in line
    for command in cliparser.COMMANDS:
        assert command in line


@pytest.mark.parametrize(
    "argv",
    [
        ["{image}", "{mnt}", "-o", "ro"],  # an existing image
        ["{image}", "{mnt}"],
        ["disk.qed", "{mnt}", "-o", "ro"],  # a missing image that looks like a file name
        ["./disk", "{mnt}"],
        ["{bare}", "{mnt}"],  # an existing file without a dot
    ],
)
def test_mount_form_is_taken_when_it_can_be_that_form(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, argv: list[str]
) -> None:
    (tmp_path / "a.qed").write_bytes(b"")
    (tmp_path / "chek").write_bytes(b"")
    names = {"image": str(tmp_path / "a.qed"), "mnt": str(tmp_path / "m"), "bare": "chek"}
    monkeypatch.chdir(tmp_path)
    words = [w.format(**names) for w in argv]
    assert cliparser.mount_form(words) == ["mount", *words]


@pytest.mark.parametrize(
    "argv",
    [["chek", "x.qed"], ["chek"], ["chek", "-o", "ro"], ["disk.qed"], ["--debug", "infp", "x"]],
)
def test_not_the_mount_form(
    argv: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UsageError, match="unknown command"):
        cliparser.mount_form(argv)


@pytest.mark.parametrize(
    ("argv", "command"),
    [
        (["check", "--frobnicate", "x.qed"], "check"),
        (["info", "a.qed", "b.qed"], "info"),
        (["map", "--output", "yaml", "x.qed"], "map"),
        (["convert", "x.qed"], "convert"),
        (["create", "-f", "qcow2", "x.qed", "1M"], "create"),
        (["resize", "-f", "raw", "x.qed", "+1M"], "resize"),
        (["commit", "--bogus", "x.qed"], "commit"),
        (["umount"], "umount"),
        (["mount", "x.qed"], "mount"),
    ],
)
@pytest.mark.sample(4)
def test_usage_error_points_at_the_commands_own_help(argv: list[str], command: str) -> None:
    cp = qedfuse(*argv)
    line = _one_line(cp, 1 if command == "check" else 2)
    assert line.endswith(f"(see 'qedfuse {command} --help')"), line


def test_qemu_img_habits(tmp_path: Path, qemu_img: str) -> None:
    """-f qed everywhere, -q, --output=human|json, info --backing-chain."""
    base = tmp_path / "base.raw"
    base.write_bytes(random.Random(1).randbytes(MiB))
    mid, top = tmp_path / "mid.qed", tmp_path / "top.qed"
    assert check_ok(qedfuse("create", "-q", "-f", "qed", "-b", base, "-F", "raw", mid)).stdout == ""
    check_ok(qedfuse("create", "-f", "qed", "-b", mid, "-F", "qed", top))
    for argv in (
        ["info", "-f", "qed", top],
        ["info", "--format", "qed", top],
        ["check", "-f", "qed", top],
        ["map", "-f", "qed", top],
    ):
        check_ok(qedfuse(*map(str, argv)))
    assert check_ok(qedfuse("check", "-q", "-f", "qed", top)).stdout == ""
    assert check_ok(qedfuse("resize", "-q", "-f", "qed", top, "+1M")).stdout == ""
    assert check_ok(qedfuse("commit", "-q", "-f", "qed", top)).stdout == ""
    out = tmp_path / "out.raw"
    assert check_ok(qedfuse("convert", "-q", "-p", "-f", "qed", "-O", "raw", top, out)).stderr == ""
    for cmd in ("info", "check", "map"):
        as_json = json.loads(check_ok(qedfuse(cmd, "--output=json", top)).stdout)
        assert as_json == json.loads(check_ok(qedfuse(cmd, "--json", top)).stdout)
        assert check_ok(qedfuse(cmd, "--output", "human", top)).stdout == (
            check_ok(qedfuse(cmd, top)).stdout
        )
    # info --backing-chain: one record per layer, top first, as qemu-img shows them
    ours = json.loads(check_ok(qedfuse("info", "--backing-chain", "--output=json", top)).stdout)
    theirs = json.loads(
        check_ok(run([qemu_img, "info", "--backing-chain", "--output=json", top])).stdout
    )
    assert [r["format"] for r in ours] == [r["format"] for r in theirs] == ["qed", "qed", "raw"]
    assert [r["virtual-size"] for r in ours] == [r["virtual-size"] for r in theirs]
    assert [os.path.basename(r["filename"]) for r in ours] == [
        os.path.basename(r["filename"]) for r in theirs
    ]
    text = check_ok(qedfuse("info", "--backing-chain", top)).stdout
    assert text.count("image: ") == 3
    assert "file format: raw" in text
    # mount takes --format qed (-f is --foreground there)
    with mounted(top, tmp_path / "mnt", "--format", "qed") as m:
        assert os.path.getsize(m.raw) == 2 * MiB


def _many_extents(tmp_path: Path) -> Path:
    """A QED image whose map has thousands of lines (every other cluster allocated)."""
    raw = tmp_path / "sparse.raw"
    with open(raw, "wb") as f:
        f.truncate(512 * MiB)
        for pos in range(0, 512 * MiB, 128 * 1024):
            f.seek(pos)
            f.write(b"x")
    image = tmp_path / "sparse.qed"
    check_ok(qedfuse("convert", "-O", "qed", raw, image))
    return image


def test_closed_pipe_exits_quietly(tmp_path: Path) -> None:
    image = _many_extents(tmp_path)
    for read_bytes, argv in (
        (0, ["map", image]),
        (1, ["map", "--output=json", image]),
        (70000, ["map", image]),
        (0, ["info", "--json", image]),
        (10, ["info", image]),
    ):
        proc = subprocess.Popen(
            [QEDFUSE, *map(str, argv)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        assert proc.stdout is not None
        assert proc.stderr is not None
        proc.stdout.read(read_bytes)
        proc.stdout.close()
        err = proc.stderr.read().decode()
        rc = proc.wait(timeout=60)
        assert err == "", err
        assert rc in (0, cliparser.EXIT_BROKEN_PIPE), rc
    cp = run(["sh", "-c", f"'{QEDFUSE}' map '{image}' | head -1"])
    assert cp.stderr == ""
    assert cp.stdout.startswith("Offset")


def _started(pid: int, path: Path) -> bool:
    """True once the process has ``path`` open (qedfuse's own code is running)."""
    return any(target == str(path) for target, _ in open_files(pid))


@pytest.mark.slow
@pytest.mark.parametrize("command", ["convert", "check"])
def test_ctrl_c_at_any_moment_prints_one_line(tmp_path: Path, command: str) -> None:
    """SIGINT at random moments once qedfuse runs: one line and 130, or a normal finish.

    (A SIGINT while the interpreter itself still starts, before any qedfuse code runs, is
    Python's own business: it may print Python's traceback.)
    """
    src = tmp_path / "src.raw"
    src.write_bytes(os.urandom(48 * MiB))
    image = tmp_path / "img.qed"
    check_ok(qedfuse("convert", "-O", "qed", src, image))
    rng = random.Random(command)
    outcomes: set[int] = set()
    duration_s = 0.5
    # At least 8 runs; more (up to 30) until one was interrupted inside qedfuse: a short
    # check on a fast machine may finish before most signals land.
    for attempt in range(30):
        if attempt >= 8 and cliparser.EXIT_INTERRUPTED in outcomes:
            break
        if command == "convert":
            dst = tmp_path / f"out{attempt}.qed"
            argv, watched = ["convert", "-p", "-O", "qed", src, dst], src
        else:
            argv, watched = ["check", image], image
        proc = subprocess.Popen(
            [QEDFUSE, *map(str, argv)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        deadline = time.monotonic() + 30
        while not _started(proc.pid, watched) and proc.poll() is None:
            assert time.monotonic() < deadline
            time.sleep(0.002)
        started = time.monotonic()
        if attempt == 0:  # measure a whole run, then interrupt somewhere inside one
            proc.communicate(timeout=60)
            duration_s = time.monotonic() - started
            continue
        time.sleep(0 if attempt % 8 == 1 else rng.uniform(0, duration_s))
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
        outcomes.add(proc.returncode)
        assert "Traceback" not in err, err
        if proc.returncode == cliparser.EXIT_INTERRUPTED:
            assert err.splitlines()[-1] == "qedfuse: interrupted", err
            assert err.count("qedfuse:") == 1, err
        elif proc.returncode == -signal.SIGINT:  # during the interpreter's exit: silent
            assert "qedfuse:" not in err, err
        else:
            assert proc.returncode == 0, err
    assert cliparser.EXIT_INTERRUPTED in outcomes
