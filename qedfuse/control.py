"""The daemon's control socket: live status and flush on demand (``qedfuse status|list|flush``).

Server
------
Each mount daemon listens on an ``AF_UNIX`` stream socket next to its registry record
(``…/qedfuse/mount-<major>-<minor>.sock``, see :func:`socket_path`), mode 0600 in a 0700
directory owned by the mounting user, served by one trio task (:func:`serve`).  It also
refuses peers that are neither that user nor root (``SO_PEERCRED``).

Protocol: the client sends one request line, ``status`` or ``flush``; the daemon answers
with one JSON object on one line and closes.  Every answer has ``"ok"``; a failed request
has ``"error"`` too.  A request handler never lets an exception reach the serve loop.

The figures come from the components' ``statistics()`` records (engine, L2 cache, I/O seam,
request loop; see :mod:`qedfuse.records`), assembled by :class:`DaemonView`.  Taking them
costs a few attribute reads and one pass over L1; the counters behind them are plain int
increments on the I/O path.

Client
------
:func:`query` never touches the mount (a stopped FUSE daemon hangs every syscall into its
mount): it reads ``/proc/self/mountinfo`` and the registry (done by the caller, see
:func:`qedfuse.registry.qedfuse_mounts`) and talks to the socket with a timeout.  A daemon that
does not answer in time is ``stopped`` (SIGSTOP: state ``T`` in ``/proc/PID/stat``) or
``not responding``; one whose process is gone is ``dead``.

This module does not import pyfuse3 or the mount code.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import trio

from qedfuse.errors import QedError
from qedfuse.imagefile import io_statistics
from qedfuse.logsetup import destination, recent_problems
from qedfuse.procfs import process_state

if TYPE_CHECKING:
    from qedfuse.engine import QedImage
    from qedfuse.records import StatsRecord

log = logging.getLogger(__name__)

#: Longest request line the daemon reads.
MAX_REQUEST_BYTES = 256
#: Seconds a client may take to send its request, and the daemon to send its answer.
SERVER_IO_TIMEOUT_S = 5.0
#: Default client timeouts: a status answer is immediate; a flush may write a lot.
STATUS_TIMEOUT_S = 2.0
FLUSH_TIMEOUT_S = 120.0
#: Largest answer the client accepts.
MAX_ANSWER_BYTES = 1 << 20


def socket_path(registry_path: str) -> str:
    """The control socket that belongs to a registry record (``mount-….json``)."""
    return registry_path.removesuffix(".json") + ".sock"


# ---------------------------------------------------------------------------- daemon side


@dataclass
class DaemonView:
    """What the control socket reports about one mount daemon, and its flush."""

    image: QedImage
    image_path: str
    mountpoint: str
    options: list[str]
    requests: Callable[[], StatsRecord]
    started_at: float  # time.time() at start-up

    def status(self) -> dict[str, Any]:
        """The ``status`` answer: identity, uptime and each component's record."""
        io = io_statistics(self.image.file)
        return {
            "state": "running",
            "image": self.image_path,
            "mountpoint": self.mountpoint,
            "pid": os.getpid(),
            "started_at": self.started_at,
            "uptime_seconds": round(time.time() - self.started_at, 3),
            "options": self.options,
            "log": destination(),
            "engine": self.image.statistics().to_json(),
            "cache": self.image.cache.statistics().to_json(),
            "io": io.to_json() if io is not None else None,
            "requests": self.requests().to_json(),
            "problems": recent_problems(),
        }

    async def flush(self) -> dict[str, Any]:
        """Run the ordered flush now; report its duration and what it wrote."""
        image = self.image
        before = image.statistics()
        if image.read_only:
            return {"ok": True, "read_only": True}
        started = time.monotonic()
        try:
            await image.flush()
        except (QedError, OSError) as exc:
            return {"ok": False, "error": f"flush failed: {exc}"}
        duration = time.monotonic() - started
        after = image.statistics()
        log.info("flush on request: %.3f s", duration)
        return {
            "ok": True,
            "read_only": False,
            "duration_seconds": round(duration, 6),
            # Written by the flushes that completed meanwhile (the idle flusher may run one).
            "l2_tables_written": after.l2_tables_flushed - before.l2_tables_flushed,
            "l1_pages_written": after.l1_pages_flushed - before.l1_pages_flushed,
            "need_check_before": before.need_check_on_disk,
            "need_check_after": after.need_check_on_disk,
        }


class _Handler:
    """Answers one connection."""

    def __init__(self, view: DaemonView) -> None:
        self.view = view

    async def __call__(self, stream: trio.SocketStream) -> None:
        try:
            async with stream:
                if not _peer_allowed(stream.socket):
                    return
                with trio.move_on_after(SERVER_IO_TIMEOUT_S):
                    request = await _read_line(stream)
                    answer = await self.answer(request)
                    await stream.send_all(json.dumps(answer).encode() + b"\n")
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass  # the client went away
        except Exception:
            log.exception("control socket request failed")

    async def answer(self, request: str | None) -> dict[str, Any]:
        if request == "status":
            return {"ok": True, **self.view.status()}
        if request == "flush":
            # Once started, the flush runs to completion even if the client gives up.
            with trio.CancelScope(shield=True):
                return await self.view.flush()
        return {"ok": False, "error": f"unknown request {request!r} (status, flush)"}


def _peer_allowed(sock: trio.socket.SocketType) -> bool:
    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return False
    _pid, uid, _gid = struct.unpack("3i", creds)
    return uid in (os.geteuid(), 0)


async def _read_line(stream: trio.SocketStream) -> str | None:
    data = b""
    while b"\n" not in data and len(data) <= MAX_REQUEST_BYTES:
        chunk = await stream.receive_some(MAX_REQUEST_BYTES)
        if not chunk:
            break
        data += chunk
    line, newline, _ = data.partition(b"\n")
    if not newline or len(line) > MAX_REQUEST_BYTES:
        return None
    return line.decode("ascii", "replace").strip()


async def serve(
    path: str,
    view: DaemonView,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the control socket at ``path`` until cancelled; then remove it."""
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # left by a daemon killed with SIGKILL
        old_umask = os.umask(0o177)
        try:
            await sock.bind(path)
        finally:
            os.umask(old_umask)
        os.chmod(path, 0o600)
        sock.listen(socket.SOMAXCONN)
    except OSError:
        sock.close()
        raise
    ino = os.stat(path).st_ino
    try:
        listener = trio.SocketListener(sock)
        task_status.started()
        await trio.serve_listeners(_Handler(view), [listener])
    finally:
        sock.close()
        with contextlib.suppress(OSError):
            if os.stat(path).st_ino == ino:
                os.unlink(path)


async def serve_or_warn(
    path: str, view: DaemonView, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """:func:`serve`, but a socket that cannot be created only costs ``qedfuse status``."""
    try:
        await serve(path, view, task_status=task_status)
    except OSError as exc:
        log.warning("no control socket (qedfuse status/flush will not work): %s", exc)
        task_status.started()


# ---------------------------------------------------------------------------- client side


class NoAnswer(Exception):
    """The daemon did not answer; ``state`` says how (``dead``, ``not responding`` …)."""

    def __init__(self, state: str, detail: str) -> None:
        super().__init__(f"{state}: {detail}")
        self.state = state
        self.detail = detail


#: The state of a mount whose daemon answered something of the wrong shape.
MALFORMED = "malformed answer"


class MalformedAnswer(Exception):
    """The daemon's answer does not have the shape of a ``status``/``flush`` answer."""

    def __init__(self, pid: int | None) -> None:
        super().__init__(f"malformed answer from the daemon (pid {pid})")


def request(
    path: str,
    command: str,
    timeout: float,
    *,
    peer_pid: int | None = None,
    peer_uid: int | None = None,
) -> dict[str, Any]:
    """Send one request to the socket at ``path``; the decoded answer.  Raises NoAnswer.

    With ``peer_pid``/``peer_uid``, the process serving the socket must be that one
    (``SO_PEERCRED``), else nothing is sent: a socket anyone else serves is not the daemon's.
    """
    deadline = time.monotonic() + timeout
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            _connect(sock, path, deadline)
            if peer_pid is not None or peer_uid is not None:
                creds = sock.getsockopt(
                    socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")
                )
                pid, uid, _gid = struct.unpack("3i", creds)
                if (peer_pid is not None and pid != peer_pid) or (
                    peer_uid is not None and uid != peer_uid
                ):
                    raise NoAnswer(
                        "not trusted",
                        f"its control socket is served by pid {pid} (uid {uid}), not by the "
                        f"registered daemon pid {peer_pid} (uid {peer_uid}); refusing to use it",
                    )
            sock.sendall(command.encode("ascii") + b"\n")
            chunks: list[bytes] = []
            size = 0
            while True:
                sock.settimeout(max(0.001, deadline - time.monotonic()))
                chunk = sock.recv(65536)
                if not chunk:
                    break
                chunks.append(chunk)
                size += len(chunk)
                if size > MAX_ANSWER_BYTES:
                    raise NoAnswer("not responding", "answer too large")
    except TimeoutError:
        raise NoAnswer("not responding", f"no answer within {timeout:g} s") from None
    except (FileNotFoundError, ConnectionRefusedError):
        raise NoAnswer("dead", "nothing listens on its control socket") from None
    except PermissionError:
        raise NoAnswer("not accessible", f"permission denied on {path}") from None
    except OSError as exc:
        raise NoAnswer("not responding", f"{path}: {exc.strerror or exc}") from None
    try:
        answer = json.loads(b"".join(chunks))
    except ValueError:
        raise NoAnswer("not responding", "the connection closed without an answer") from None
    if not isinstance(answer, dict):
        raise NoAnswer(MALFORMED, "the answer is not a JSON object")
    return answer


def _connect(sock: socket.socket, path: str, deadline: float) -> None:
    """Connect, waiting while the daemon's backlog is full (EAGAIN) until ``deadline``."""
    delay = 0.005
    while True:
        try:
            sock.connect(path)
            return
        except BlockingIOError:
            if time.monotonic() + delay > deadline:
                raise TimeoutError from None
            time.sleep(delay)
            delay = min(delay * 2, 0.1)


@dataclass(frozen=True, slots=True)
class MountRef:
    """A qedfuse mount found in mountinfo, with its registry record if one is live."""

    mountpoint: str
    image: str
    pid: int | None  # None: no live daemon registered for it
    registry_path: str | None
    foreign_uid: int | None = None  # mounted by this other user (we can't ask its daemon)
    owner_uid: int | None = None  # the uid the daemon (and its registry record) runs as


def query(ref: MountRef, command: str, timeout: float) -> dict[str, Any]:
    """Ask one mount's daemon; the answer, or a ``state`` saying why there is none."""
    base: dict[str, Any] = {"mountpoint": ref.mountpoint, "image": ref.image, "pid": ref.pid}
    if ref.foreign_uid is not None:
        error = f"mounted by uid {ref.foreign_uid}: only that user or root can ask its daemon"
        return {**base, "ok": False, "state": "not accessible", "error": error}
    if ref.pid is None or ref.registry_path is None:
        error = (
            "no live daemon is registered for it (killed?); clean it up with "
            f"`qedfuse umount {ref.mountpoint}`"
        )
        return {**base, "ok": False, "state": "dead", "error": error}
    if process_state(ref.pid) in ("T", "t"):
        # Stopped (SIGSTOP, a debugger): it cannot answer, so do not wait out the timeout.
        error = f"the daemon (pid {ref.pid}) is stopped; resume it with `kill -CONT {ref.pid}`"
        return {**base, "ok": False, "state": "stopped", "error": error}
    try:
        answer = request(
            socket_path(ref.registry_path),
            command,
            timeout,
            peer_pid=ref.pid,
            peer_uid=ref.owner_uid,
        )
    except NoAnswer as exc:
        state, detail = exc.state, exc.detail
        if state == MALFORMED:
            detail = str(MalformedAnswer(ref.pid))
        letter = process_state(ref.pid)
        if letter is None or letter in ("Z", "X"):
            state = "dead"
        elif letter in ("T", "t") and state == "not responding":
            state = "stopped"
        elif state == "dead":  # alive, but nothing listens: a qedfuse without the socket
            state = "no control socket"
            detail = "the daemon runs, but nothing listens on its control socket"
        return {**base, "ok": False, "state": state, "error": detail}
    if not _well_formed(answer, command):
        # One daemon's garbage (another version, a stand-in) must not hide the other mounts
        # from ``list``/``status``: it is this mount's state, worded as the error.
        error = str(MalformedAnswer(ref.pid))
        return {**base, "ok": False, "state": MALFORMED, "error": error}
    answer.setdefault("state", "running")
    return {**base, **answer, "mountpoint": ref.mountpoint, "pid": ref.pid}


# What the formatting below reads from an answer: key → type (a tuple: any of them; a dict:
# a nested object of that shape; a list: a list of such).  Anything else is malformed.
_NUM = (int, float)
_OPT_NUM = (int, float, type(None))
_OPT_STR = (str, type(None))
_ENGINE = {
    "read_only": bool,
    "flushes": int,
    "last_flush_seconds": _OPT_NUM,
    "max_flush_seconds": _OPT_NUM,
    "flush_failures": int,
    "dirty_l2_tables": int,
    "dirty_l1_pages": int,
    "need_check_on_disk": bool,
    "failsafe_reason": _OPT_STR,
    "allocator_end_bytes": int,
    "data_clusters": int,
    "cluster_size_bytes": int,
    "l2_tables": int,
    "image_size_bytes": int,
}
_CACHE = {
    "hit_rate": _OPT_NUM,
    "cached_tables": int,
    "capacity_tables": int,
    "table_bytes": int,
    "hits": int,
    "misses": int,
}
_REQUESTS = {
    "requests": int,
    "reads": int,
    "bytes_read": int,
    "writes": int,
    "bytes_written": int,
    "flushes": int,
    "errors": int,
    "last_error": _OPT_STR,
}
_IO = {
    "file_bytes": int,
    "preads": int,
    "bytes_read": int,
    "pwrites": int,
    "bytes_written": int,
    "fdatasyncs": int,
}
_PROBLEM = {"time": _NUM, "level": str, "message": str}
_STATUS = {
    "image": str,
    "uptime_seconds": _NUM,
    "options": [str],
    "log": str,
    "engine": _ENGINE,
    "cache": _CACHE,
    "requests": _REQUESTS,
    "problems": [_PROBLEM],
}
_FLUSH = {
    "duration_seconds": _NUM,
    "l2_tables_written": int,
    "l1_pages_written": int,
    "need_check_before": bool,
    "need_check_after": bool,
}


def _fits(value: object, shape: object) -> bool:
    if isinstance(shape, dict):
        return isinstance(value, dict) and all(
            key in value and _fits(value[key], sub) for key, sub in shape.items()
        )
    if isinstance(shape, list):
        return isinstance(value, list) and all(_fits(item, shape[0]) for item in value)
    assert isinstance(shape, (type, tuple))
    return isinstance(value, shape)


def _well_formed(answer: dict[str, Any], command: str) -> bool:
    """True if ``answer`` has every field the ``command``'s formatting reads, typed right."""
    if not isinstance(answer.get("ok"), bool) or not _fits(answer.get("state", ""), str):
        return False
    if not answer["ok"]:
        return _fits(answer.get("error", ""), str)
    if command == "status":
        io = answer.get("io")
        return _fits(answer, _STATUS) and (io is None or _fits(io, _IO))
    if not isinstance(answer.get("read_only"), bool):
        return False
    return answer["read_only"] or _fits(answer, _FLUSH)


# ---------------------------------------------------------------------------- formatting


def _size(n: int | float | None) -> str:
    if n is None:
        return "?"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{int(value)} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 1:
        return f"{seconds * 1000:.1f} ms"
    if seconds < 120:
        return f"{seconds:.2f} s"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    if days:
        return f"{days}d{hours:02d}h{minutes:02d}m"
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


def list_line(entry: dict[str, Any]) -> str:
    """One ``qedfuse list`` line: mount point, state, pid, uptime, image."""
    pid = entry.get("pid")
    uptime = _duration(entry.get("uptime_seconds")) if entry.get("ok") else "-"
    return (
        f"{entry['mountpoint']}  {entry['state']}  pid {pid if pid is not None else '-'}  "
        f"up {uptime}  {entry['image']}"
    )


def status_text(entry: dict[str, Any]) -> str:
    """The human ``qedfuse status`` block of one mount."""
    lines = [f"{entry['mountpoint']}: {entry['state']}"]
    add = lines.append
    if not entry.get("ok"):
        add(f"  image:       {entry['image']}")
        if entry.get("pid") is not None:
            add(f"  pid:         {entry['pid']}")
        add(f"  reason:      {entry.get('error', 'unknown')}")
        return "\n".join(lines) + "\n"
    eng, cache, req, io = entry["engine"], entry["cache"], entry["requests"], entry.get("io")
    mode = "read-only" if eng["read_only"] else "read-write"
    add(f"  image:       {entry['image']} ({mode})")
    add(f"  pid:         {entry['pid']}, up {_duration(entry['uptime_seconds'])}")
    add(f"  options:     {','.join(entry['options']) or '-'}")
    add(f"  logs:        {entry['log']}")
    add(
        f"  requests:    {req['requests']} ({req['reads']} reads {_size(req['bytes_read'])}, "
        f"{req['writes']} writes {_size(req['bytes_written'])}, {req['flushes']} flush/fsync, "
        f"{req['errors']} errors)"
    )
    add(
        f"  flushes:     {eng['flushes']} (last {_duration(eng['last_flush_seconds'])}, "
        f"max {_duration(eng['max_flush_seconds'])}, {eng['flush_failures']} failed)"
    )
    add(
        f"  dirty:       {eng['dirty_l2_tables']} L2 tables, {eng['dirty_l1_pages']} L1 pages; "
        f"NEED_CHECK on disk: {'yes' if eng['need_check_on_disk'] else 'no'}"
    )
    add(f"  failsafe:    {eng['failsafe_reason'] or 'no'}")
    rate = cache["hit_rate"]
    add(
        f"  L2 cache:    {cache['cached_tables']}/{cache['capacity_tables']} tables "
        f"({_size(cache['cached_tables'] * cache['table_bytes'])}), hit rate "
        f"{'-' if rate is None else f'{rate:.1%}'} ({cache['hits']} hits, {cache['misses']} misses)"
    )
    file_bytes = io["file_bytes"] if io is not None else eng["allocator_end_bytes"]
    add(
        f"  allocation:  {eng['data_clusters']} data clusters of {_size(eng['cluster_size_bytes'])}"
        f", {eng['l2_tables']} L2 tables; disk {_size(eng['image_size_bytes'])}, "
        f"file {_size(file_bytes)}"
    )
    if io is not None:
        add(
            f"  image I/O:   {io['preads']} preads {_size(io['bytes_read'])}, {io['pwrites']} "
            f"pwrites {_size(io['bytes_written'])}, {io['fdatasyncs']} fdatasyncs"
        )
    add(f"  last error:  {req['last_error'] or '-'}")
    problems = entry.get("problems") or []
    if problems:
        add("  recent warnings and errors:")
        for record in problems[-5:]:
            stamp = time.strftime("%H:%M:%S", time.localtime(record["time"]))
            add(f"    {stamp} {record['level']}: {record['message']}")
    return "\n".join(lines) + "\n"


def flush_text(entry: dict[str, Any]) -> str:
    """The human ``qedfuse flush`` line."""
    if not entry.get("ok"):
        return f"{entry['mountpoint']}: {entry['state']}: {entry.get('error', 'unknown')}"
    if entry.get("read_only"):
        return f"{entry['mountpoint']}: read-only mount, nothing to flush"
    cleared = entry["need_check_before"] and not entry["need_check_after"]
    need_check = (
        "NEED_CHECK cleared"
        if cleared
        else ("NEED_CHECK still set" if entry["need_check_after"] else "NEED_CHECK was clear")
    )
    return (
        f"{entry['mountpoint']}: flushed in {_duration(entry['duration_seconds'])}: "
        f"{entry['l2_tables_written']} L2 tables and {entry['l1_pages_written']} L1 pages "
        f"written; {need_check}"
    )


__all__ = [
    "DaemonView",
    "MalformedAnswer",
    "MountRef",
    "NoAnswer",
    "flush_text",
    "list_line",
    "query",
    "request",
    "serve",
    "serve_or_warn",
    "socket_path",
    "status_text",
]
