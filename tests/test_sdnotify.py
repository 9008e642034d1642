"""sd_notify: real AF_UNIX datagram sockets receive what qedfuse.sdnotify sends.

The unit tests bind a real socket (a filesystem path and the abstract ``@name`` form) and read
the datagrams; the end-to-end test runs ``qedfuse mount --foreground --systemd`` the way a
``Type=notify`` service does and checks READY=1 comes from the main PID once disk.raw serves,
and STOPPING=1 follows a SIGTERM that ends in exit 0 with a clean image.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from qedfuse import sdnotify
from qedfuse.format import Header
from support import check_ok, describe, require_fuse, require_tool, run

QEDFUSE = Path(sys.executable).with_name("qedfuse")
_UCRED = struct.Struct("iII")  # pid, uid, gid


class Receiver:
    """A bound AF_UNIX datagram socket that records sender PIDs (SO_PASSCRED)."""

    def __init__(self, bind_address: str, env_value: str) -> None:
        self.env_value = env_value
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind(bind_address)

    def recv(self, timeout_s: float = 5.0) -> tuple[str, int]:
        """Next datagram as (text, sender pid); fails the test after ``timeout_s``."""
        got = self.try_recv(timeout_s)
        if got is None:
            pytest.fail(f"no sd_notify datagram within {timeout_s} s")
        return got

    def try_recv(self, timeout_s: float) -> tuple[str, int] | None:
        """Next datagram as (text, sender pid), or None after ``timeout_s``."""
        self.sock.settimeout(timeout_s)
        try:
            data, ancdata, _flags, _addr = self.sock.recvmsg(4096, socket.CMSG_SPACE(_UCRED.size))
        except TimeoutError:
            return None
        pid = -1
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                pid = _UCRED.unpack(payload[: _UCRED.size])[0]
        return data.decode(), pid

    def pending(self) -> list[str]:
        """Every datagram already queued, without waiting."""
        out = []
        self.sock.setblocking(False)
        try:
            while True:
                out.append(self.sock.recv(4096).decode())
        except BlockingIOError:
            return out

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A directory with a short path (sun_path holds 107 bytes; tmp_path can be longer)."""
    with tempfile.TemporaryDirectory(prefix="qn-", dir="/tmp") as d:
        yield Path(d)


@pytest.fixture(params=["path", "abstract"])
def receiver(request: pytest.FixtureRequest, short_dir: Path) -> Iterator[Receiver]:
    if request.param == "path":
        path = str(short_dir / "notify")
        rx = Receiver(path, path)
    else:
        name = f"qedfuse-test-{os.getpid()}-{time.monotonic_ns()}"
        rx = Receiver("\0" + name, "@" + name)
    try:
        yield rx
    finally:
        rx.close()


# --------------------------------------------------------------------------- unit


def test_unset_is_a_noop(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert sdnotify.notify("READY=1") is False
    assert sdnotify.ready() is False
    monkeypatch.setenv("NOTIFY_SOCKET", "")
    assert sdnotify.stopping() is False


def test_helpers_send_the_protocol_strings(
    receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", receiver.env_value)
    assert sdnotify.ready() is True
    assert receiver.recv() == ("READY=1", os.getpid())
    assert sdnotify.status("serving /mnt/x") is True
    assert receiver.recv()[0] == "STATUS=serving /mnt/x"
    assert sdnotify.stopping() is True
    assert receiver.recv()[0] == "STOPPING=1"
    assert sdnotify.notify("WATCHDOG=1") is True
    assert receiver.recv()[0] == "WATCHDOG=1"
    assert receiver.pending() == []


def test_status_newlines_cannot_inject_assignments(
    receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", receiver.env_value)
    assert sdnotify.status("line one\nREADY=1") is True
    assert receiver.recv()[0] == "STATUS=line one READY=1"
    assert sdnotify.ready("mounted\r\nat x") is True
    assert receiver.recv()[0] == "READY=1\nSTATUS=mounted at x"


@pytest.mark.parametrize(
    "value",
    [
        "/nonexistent-dir/notify",  # ENOENT
        "@qedfuse-nobody-listens-here",  # ECONNREFUSED
        "relative/notify",  # not an address systemd would pass
        "vsock:2:1234",  # systemd >= 254 form, unsupported here
        "/" + "x" * 200,  # longer than sun_path
        "/tmp/a\0b",  # embedded NUL -> ValueError inside socket
    ],
)
def test_send_errors_return_false_and_never_raise(
    value: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # os.environ rejects NUL, so patch the lookup for that case only.
    if "\0" in value:
        monkeypatch.setattr(os, "environ", {"NOTIFY_SOCKET": value})
    else:
        monkeypatch.setenv("NOTIFY_SOCKET", value)
    assert sdnotify.notify("READY=1") is False


def test_socket_that_is_a_stream_socket_fails_softly(
    short_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = short_dir / "stream"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as srv:
        srv.bind(str(path))
        srv.listen()
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        assert sdnotify.ready() is False  # EPROTOTYPE, logged at debug


# --------------------------------------------------------------------------- end to end


def _wait_for(
    rx: Receiver, proc: subprocess.Popen[str], wanted: str, timeout_s: float
) -> tuple[str, int]:
    """Wait for a datagram containing the line ``wanted``; fail early if ``proc`` exits."""
    deadline = time.monotonic() + timeout_s
    seen: list[str] = []
    while time.monotonic() < deadline:
        exited = proc.poll() is not None
        got = rx.try_recv(timeout_s=0.2)
        if got is None:
            if exited:
                out, err = proc.communicate()
                pytest.fail(
                    f"qedfuse exited {proc.returncode} before {wanted} (got {seen})\n"
                    f"--- stdout ---\n{out}\n--- stderr ---\n{err}",
                    pytrace=False,
                )
            continue
        state, sender = got
        seen.append(state)
        if wanted in state.splitlines():
            return state, sender
    pytest.fail(f"no {wanted} within {timeout_s} s (got {seen})", pytrace=False)


def _qed_image(path: Path, qemu_img: str, qemu_io: str) -> None:
    check_ok(run([qemu_img, "create", "-q", "-f", "qed", path, "64M"]))
    check_ok(run([qemu_io, "-f", "qed", "-c", "write -P 0x5a 1M 64k", path]))


def _assert_clean(image: Path, qemu_img: str) -> None:
    header = Header.unpack(image.read_bytes()[:64])
    assert not header.need_check, "NEED_CHECK still set after a clean shutdown"
    check_ok(run([qemu_img, "check", "-f", "qed", image]))


@pytest.mark.fuse
@pytest.mark.qemu
@pytest.mark.timeout(60)
def test_foreground_systemd_mount_notifies_ready_then_stopping(
    tmp_path: Path, short_dir: Path
) -> None:
    require_fuse()
    qemu_img, qemu_io = require_tool("qemu-img"), require_tool("qemu-io")
    image = tmp_path / "disk.qed"
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    _qed_image(image, qemu_img, qemu_io)
    rx = Receiver(str(short_dir / "notify"), str(short_dir / "notify"))
    env = {**os.environ, "NOTIFY_SOCKET": rx.env_value}
    proc = subprocess.Popen(
        [QEDFUSE, "mount", "--foreground", "--systemd", image, mnt],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        state, sender = _wait_for(rx, proc, "READY=1", timeout_s=20)
        assert state.splitlines()[0] == "READY=1", state
        # NotifyAccess=main: systemd drops datagrams from any other PID.
        assert sender == proc.pid, f"READY=1 came from pid {sender}, main pid is {proc.pid}"
        # READY means serving: the raw file is readable at this very moment.
        raw = mnt / "disk.raw"
        with raw.open("rb") as f:
            f.seek(1 << 20)
            assert f.read(65536) == b"\x5a" * 65536
        assert proc.poll() is None, "a --systemd mount must stay in the foreground"
        # `systemctl stop` while a consumer (a VM) still holds the file open with a write
        # that allocated a cluster and was never flushed (closing would have flushed it):
        # the SIGTERM path itself must make it durable and clear NEED_CHECK.
        fd = os.open(raw, os.O_RDWR)
        try:
            os.pwrite(fd, b"\xa5" * 4096, 8 << 20)
            assert Header.unpack(image.read_bytes()[:64]).need_check, "write not dirty"
            proc.send_signal(signal.SIGTERM)
            _wait_for(rx, proc, "STOPPING=1", timeout_s=20)
            out, err = proc.communicate(timeout=30)
        finally:
            with contextlib.suppress(OSError):
                os.close(fd)  # the mount is gone by now
        cp = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
        assert proc.returncode == 0, describe(cp)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        run(["fusermount3", "-uz", mnt])
        rx.close()
    assert not os.path.ismount(mnt)
    _assert_clean(image, qemu_img)
    cp = check_ok(run([qemu_io, "-f", "qed", "-r", "-c", "read -P 0xa5 8M 4k", image]))
    assert "Pattern verification failed" not in cp.stdout, cp.stdout
