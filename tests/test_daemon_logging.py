"""A daemonized mount without ``log=`` logs to syslog rather than into /dev/null."""

from __future__ import annotations

import os
import socket
from pathlib import Path

from fusehelpers import QEDFUSE, daemon_pid, pid_alive, wait_until

from support import check_ok, require_fuse, require_tool, run


def test_detached_daemon_logs_to_syslog(tmp_path: Path) -> None:
    require_fuse()
    image = tmp_path / "disk.qed"
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    check_ok(run([require_tool("qemu-img"), "create", "-q", "-f", "qed", str(image), "16M"]))
    address = str(tmp_path / "syslog.sock")
    env = {**os.environ, "QEDFUSE_SYSLOG_SOCKET": address}
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(address)
        sock.settimeout(20)
        check_ok(run([QEDFUSE, "mount", str(image), str(mnt)], env=env))
        pid = daemon_pid(mnt)
        try:
            message = sock.recv(4096).decode()
        finally:
            check_ok(run([QEDFUSE, "umount", "--wait", str(mnt)]))
        wait_until(lambda: not pid_alive(pid), 30, "daemon exit")
    assert message.startswith("<"), message  # syslog priority prefix
    assert f"qedfuse[{pid}]: INFO serving {image} at {mnt}" in message, message
