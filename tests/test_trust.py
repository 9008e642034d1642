"""Who ``qedfuse list/status/flush`` believes: registry records, control sockets, answers.

Anyone can create ``/tmp/qedfuse-*`` and a socket in it.  A record there naming a real mount
(its mountpoint and device, with the faker's own live pid) must not make root's ``flush``
talk to the faker, ``list`` hide the real daemon, or ``status`` crash.  A socket served by a
process other than the recorded daemon is refused; an answer of the wrong shape is a
one-line error, never a traceback.  Real mounts; the faker runs as ``nobody`` (setpriv).
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fusehelpers import QEDFUSE, mounted, qedfuse

from qedfuse.mounttable import mount_entry
from support import check_ok, describe, qemu_img_create, require_tool, run, sampled, tools_required

pytestmark = pytest.mark.fuse

NOBODY = 65534

# A fake daemon: writes a registry record naming MOUNTPOINT/DEVICE with its own pid and start
# time into DIR (creating DIR 0700 if missing), holds /dev/fuse open if it may (so a
# "serves FUSE" check alone does not unmask it), serves ANSWER (or the contents of
# ANSWER_FILE, re-read per
# connection) on the socket next to the record, and prints "ready".
FAKER = r"""
import json, os, socket, sys
cfg = json.loads(sys.argv[1])
os.makedirs(cfg["dir"], mode=0o700, exist_ok=True)
with open("/proc/self/stat") as f:
    text = f.read()
start = text[text.rfind(")") + 2:].split()[19]
try:
    fuse = os.open("/dev/fuse", os.O_RDWR)
except OSError:
    pass  # /dev/fuse 0600 here: nobody cannot
base = os.path.join(cfg["dir"], f"mount-{cfg['device'].replace(':', '-')}-{os.getpid()}")
sock = socket.socket(socket.AF_UNIX)
sock.bind(base + ".sock")
sock.listen(8)
record = {"pid": os.getpid(), "start": start, "mountpoint": cfg["mountpoint"],
          "image": "/fake/image.qed", "device": cfg["device"]}
with open(base + ".json", "w") as f:
    json.dump(record, f)
print("ready", base, flush=True)
while True:
    conn, _ = sock.accept()
    with conn:
        try:
            conn.recv(256)
            if cfg.get("answer_file"):
                with open(cfg["answer_file"], "rb") as f:
                    conn.sendall(f.read())
            else:
                conn.sendall(json.dumps(cfg["answer"]).encode() + b"\n")
        except OSError:
            pass  # a client that hung up (as one refusing us does)
"""

FAKE_FLUSH = {
    "ok": True,
    "read_only": False,
    "duration_seconds": 0.001,
    "l2_tables_written": 0,
    "l1_pages_written": 0,
    "need_check_before": False,
    "need_check_after": False,
}


def _need_root() -> None:
    if os.geteuid() != 0:  # stated, and a failure under CI (as a missing tool is)
        reason = "running a command as another user needs root"
        if tools_required():
            pytest.fail(reason, pytrace=False)
        pytest.skip(reason)


def _create(path: Path) -> Path:
    return qemu_img_create(path, "4M")


@contextlib.contextmanager
def faker(cfg: dict[str, Any], *, as_nobody: bool) -> Iterator[tuple[int, str]]:
    """Run the fake daemon; yields (pid, record path without suffix); always cleans up."""
    prefix: list[str] = []
    if as_nobody:
        setpriv = require_tool("setpriv")
        prefix = [setpriv, f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
    proc = subprocess.Popen(
        [*prefix, sys.executable, "-c", FAKER, json.dumps(cfg)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd="/",
    )
    base = ""
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("ready "), (line, proc.stderr.read() if proc.stderr else "")
        base = line.split(None, 1)[1].strip()
        yield proc.pid, base
    finally:
        proc.kill()
        proc.wait()
        for suffix in (".json", ".sock"):
            with contextlib.suppress(OSError):
                os.unlink(base + suffix)


def _json(cp: subprocess.CompletedProcess[str]) -> Any:
    check_ok(cp)
    return json.loads(cp.stdout)


def _assert_real_daemon_answers(mnt: Path, pid: int) -> None:
    """list, status and flush of ``mnt`` all reach the real daemon ``pid``."""
    listed = {e["mountpoint"]: e for e in _json(qedfuse("list", "--json"))}
    assert listed[str(mnt)]["pid"] == pid, listed[str(mnt)]
    assert listed[str(mnt)]["state"] == "running", listed[str(mnt)]
    (entry,) = _json(qedfuse("status", "--json", mnt))
    assert (entry["pid"], entry["state"]) == (pid, "running"), entry
    human = qedfuse("status", mnt)
    assert human.returncode == 0, describe(human)
    assert "internal error" not in human.stderr, describe(human)
    flushed = _json(qedfuse("flush", "--json", mnt))
    assert (flushed["pid"], flushed["ok"]) == (pid, True), flushed
    assert "image" in flushed


@pytest.mark.sample(2)
@pytest.mark.parametrize("where", ["own_tmp_dir", "world_writable_dir", "sticky_root_dir"])
def test_a_record_written_by_another_user_is_not_believed(tmp_path: Path, where: str) -> None:
    """nobody's record naming root's mount, in nobody's own dir or a dir others can write."""
    _need_root()
    image = _create(tmp_path / "disk.qed")
    fake_dir = tempfile.mkdtemp(prefix="qedfuse-trust-", dir="/tmp")
    try:
        if where == "own_tmp_dir":
            os.rmdir(fake_dir)  # nobody creates it, 0700, owned by nobody
        else:  # root's directory, but writable by others: its content proves nothing
            os.chmod(fake_dir, 0o777 if where == "world_writable_dir" else 0o1777)
        with mounted(image, tmp_path / "mnt") as m:
            entry = mount_entry(os.fspath(m.mnt))
            assert entry is not None
            cfg = {
                "dir": fake_dir,
                "device": entry.device,
                "mountpoint": str(m.mnt),
                "answer": FAKE_FLUSH,
            }
            with faker(cfg, as_nobody=True) as (fake_pid, _):
                _assert_real_daemon_answers(m.mnt, m.pid)
                cp = qedfuse("flush", m.mnt)
                assert cp.returncode == 0, describe(cp)
                assert str(fake_pid) not in cp.stdout + cp.stderr
    finally:
        with contextlib.suppress(OSError):
            for name in os.listdir(fake_dir):
                os.unlink(os.path.join(fake_dir, name))
            os.rmdir(fake_dir)


@contextlib.contextmanager
def socket_swapped(real_sock: str, *, as_nobody: bool) -> Iterator[int]:
    """Replace the real daemon's socket by one another process serves; put it back after."""
    side = tempfile.mkdtemp(prefix="qedfuse-swap-", dir="/tmp")
    os.chmod(side, 0o755)
    if as_nobody:
        os.chown(side, NOBODY, NOBODY)
    cfg = {"dir": os.path.join(side, "d"), "device": "0:0", "mountpoint": "/", "answer": FAKE_FLUSH}
    aside = real_sock + ".aside"
    os.rename(real_sock, aside)
    try:
        with faker(cfg, as_nobody=as_nobody) as (pid, base):
            os.rename(base + ".sock", real_sock)  # the listener follows the inode
            yield pid
    finally:
        os.replace(aside, real_sock)
        with contextlib.suppress(OSError):
            subprocess.run(["rm", "-rf", side], check=False)


@pytest.mark.parametrize("as_nobody", [False, True], ids=["root_other_pid", "nobody_pid"])
def test_a_socket_served_by_another_process_is_refused(tmp_path: Path, as_nobody: bool) -> None:
    """The right record in the right directory, but its socket is served by someone else."""
    _need_root()
    from qedfuse import control
    from qedfuse.registry import qedfuse_mounts

    image = _create(tmp_path / "disk.qed")
    with mounted(image, tmp_path / "mnt") as m:
        (ref,) = qedfuse_mounts(os.fspath(m.mnt))
        assert ref.registry_path is not None
        assert ref.pid == m.pid
        with socket_swapped(control.socket_path(ref.registry_path), as_nobody=as_nobody) as fake:
            cp = qedfuse("flush", m.mnt)
            assert cp.returncode == 1, describe(cp)
            lines = cp.stderr.strip().splitlines()
            assert len(lines) == 1, describe(cp)
            assert lines[0].startswith("qedfuse: "), describe(cp)
            assert f"pid {fake}" in lines[0], describe(cp)
            assert "flushed" not in cp.stdout, describe(cp)
            (entry,) = json.loads(qedfuse("status", "--json", m.mnt).stdout)
            assert (entry["ok"], entry["state"]) == (False, "not trusted"), entry
            line = [x for x in check_ok(qedfuse("list")).stdout.splitlines() if str(m.mnt) in x]
            assert line, line
            assert f"not trusted  pid {m.pid}" in line[0], line
        _assert_real_daemon_answers(m.mnt, m.pid)


def _variants(answer: dict[str, Any]) -> Iterator[tuple[str, Any]]:
    """``answer`` with each key removed, and each value replaced by a wrong type."""
    yield "not an object", [answer]
    yield "empty", {}

    def walk(node: dict[str, Any], path: list[str]) -> Iterator[tuple[str, Any]]:
        for key, value in node.items():
            for label, bad in (("missing", None), ("string", "x"), ("list", [1]), ("null", 0)):
                variant = copy.deepcopy(answer)
                parent: Any = variant
                for step in path:
                    parent = parent[step]
                if label == "missing":
                    del parent[key]
                elif label == "null":
                    if value is None:
                        continue
                    parent[key] = None
                else:
                    parent[key] = bad
                yield f"{'.'.join([*path, key])}:{label}", variant
            if isinstance(value, dict):
                yield from walk(value, [*path, key])
            if isinstance(value, list) and value and isinstance(value[0], dict):
                for label, bad_item in (("item missing keys", {}), ("item a string", "x")):
                    variant = copy.deepcopy(answer)
                    parent = variant
                    for step in [*path, key]:
                        parent = parent[step]
                    parent[0] = bad_item
                    yield f"{'.'.join([*path, key])}[0]:{label}", variant

    yield from walk(answer, [])


def test_answers_of_the_wrong_shape_are_one_line_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A daemon (a trusted one: root's record in /run/qedfuse) answering garbage.

    Every variant goes through the CLI's own entry point in-process (fast); a sample also
    through the installed command.
    """
    _need_root()
    from qedfuse import cli

    image = _create(tmp_path / "disk.qed")
    other = _create(tmp_path / "other.qed")
    with mounted(image, tmp_path / "mnt") as m, mounted(other, tmp_path / "other-mnt") as o:
        real_status = _json(qedfuse("status", "--json", m.mnt))[0]
        real_status.pop("mountpoint")
        real_status["problems"] = [{"time": 1.0, "level": "WARNING", "message": "m"}]
        real_status["io"] = real_status.get("io") or {}
        entry = mount_entry(os.fspath(m.mnt))
        assert entry is not None
        registry = os.path.dirname(next(r for r in _registry_of(m.mnt) if r))
        answer_file = tmp_path / "answer"
        answer_file.write_text("{}")
        cfg = {
            "dir": registry,
            "device": entry.device,
            "mountpoint": str(m.mnt),
            "answer_file": str(answer_file),
        }
        refused = 0
        with faker(cfg, as_nobody=False) as (fake_pid, _):
            cases = [("status", v) for v in _variants(real_status)]
            cases += [("flush", v) for v in _variants(FAKE_FLUSH)]
            cases = sampled(cases, max(12, len(cases) // 4), "trust-wrong-shape")
            cases += [("status", ("text", "hello")), ("flush", ("partial", '{"ok": tr'))]
            for n, (command, (label, bad)) in enumerate(cases):
                payload = bad if isinstance(bad, str) else json.dumps(bad)
                answer_file.write_text(payload + "\n")
                argv_sets = [[command, str(m.mnt)], [command, "--json", str(m.mnt)]]
                if command == "status":
                    argv_sets.append(["list"])
                for argv in argv_sets:
                    capsys.readouterr()
                    rc = cli.main(argv)
                    out, err = capsys.readouterr()
                    if n % 15 == 0:  # and the installed command agrees
                        cp = qedfuse(*argv)
                        assert (cp.returncode, cp.stderr) == (rc, err), describe(cp)
                    what = f"{label} {argv}: rc {rc}, stdout {out!r}, stderr {err!r}"
                    assert "Traceback" not in err, what
                    assert "internal error" not in err, what
                    if argv == ["list"]:
                        # one daemon's garbage never hides the other mounts
                        (line,) = [x for x in out.splitlines() if str(o.mnt) in x]
                        assert f"running  pid {o.pid} " in line, what
                    if "malformed answer" in out:
                        # status and list show it as that mount's state, naming the pid
                        assert f"(pid {fake_pid})" in out or (
                            argv == ["list"] and f"malformed answer  pid {fake_pid} " in out
                        ), what
                        assert rc == (0 if argv == ["list"] else 1), what
                        assert not err, what
                        refused += 1
                        continue
                    if rc == 0:
                        continue  # a field nothing reads: harmless
                    assert rc == 1, what
                    lines = err.strip().splitlines()
                    assert len(lines) <= 1, what
                    if lines:
                        assert lines[0].startswith("qedfuse: "), what
                        assert f"(pid {fake_pid})" in lines[0] or "not responding" in lines[0]
                        refused += 1
        assert refused > 50, refused  # most variants are refused, not printed
        _assert_real_daemon_answers(m.mnt, m.pid)


def _registry_of(mnt: Path) -> list[str | None]:
    from qedfuse.registry import qedfuse_mounts

    return [ref.registry_path for ref in qedfuse_mounts(os.fspath(mnt))]


# ------------------------------------------------------------------ relative paths (B)


@pytest.mark.sample(3)
@pytest.mark.parametrize("which", ["backing", "log", "pidfile", "--pidfile", "--overlay", "image"])
def test_relative_paths_are_taken_against_the_callers_cwd(tmp_path: Path, which: str) -> None:
    """The daemon chdirs to /: each path given relative to the caller's cwd still works."""
    base = _create(tmp_path / "b.qed")
    top = tmp_path / "top.qed"
    check_ok(run([require_tool("qemu-img"), "create", "-q", "-f", "qed", "-b", "/nonexistent",
                  "-F", "qed", "-u", top, "4M"]))  # fmt: skip
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    args: list[str] = []
    image = str(top)
    if which == "backing":
        args = ["-o", "backing=b.qed"]
    elif which == "log":
        args = ["-o", "log=daemon.log"]
        image = str(base)
    elif which == "pidfile":
        args = ["-o", "pidfile=daemon.pid"]
        image = str(base)
    elif which == "--pidfile":
        args = ["--pidfile", "daemon.pid"]
        image = str(base)
    elif which == "--overlay":
        args = ["--overlay", "new.qed"]
        image = "b.qed"
    else:
        image = "b.qed"
    cp = run([QEDFUSE, "mount", *args, image, "mnt"], cwd=tmp_path, timeout=60)
    try:
        assert cp.returncode == 0, describe(cp)
        raw = next(mnt.iterdir())
        assert raw.stat().st_size == 4 << 20
        if which in ("pidfile", "--pidfile"):
            assert (tmp_path / "daemon.pid").read_text().strip().isdigit()
        if which == "log":
            assert (tmp_path / "daemon.log").exists()
        if which == "--overlay":
            assert (tmp_path / "new.qed").exists()
    finally:
        if cp.returncode == 0:
            check_ok(qedfuse("umount", "--wait", mnt))
