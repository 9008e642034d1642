"""``make test``: the whole suite as two pytest processes side by side.

The suite has two kinds of tests.  The in-process ones (codecs, the engine on memory, crash
replay, fuzzing, QEMU interop on plain files) are CPU-bound and touch nothing outside their
temporary directory.  The others mount real FUSE file systems, run daemons and wait for them:
they share the machine's mount table and the daemon registry, so they run one at a time, in
one process.  Running the two kinds at once fills both cores of a CI machine instead of one.

A file belongs to the in-process kind when its source mentions none of the markers in
:data:`SHARED_STATE` (checked here, so a new mount test cannot land in the wrong process).
The files in :data:`PRIVATE_MOUNTS` mount real file systems but only their own, and read
nothing machine-wide (no ``list``/``status``, no registry): they join the in-process side to
balance the two (checked too).
With explicit test paths in the arguments (``make test PYTEST_ARGS=tests/test_engine.py``) or
``QEDFUSE_SERIAL=1``, one plain pytest runs instead.  Exit status: the worse of the two.
"""

from __future__ import annotations

import os
import random
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TESTS = Path(__file__).resolve().parent
#: What a test file that shares machine-wide state says somewhere in its source.
SHARED_STATE = re.compile(
    r"mounted\(|require_fuse|fusermount|losetup|umount|systemd|registry|/run/qedfuse"
    r"|[\"']mount[\"']|qemu-storage-daemon|bench"
)
#: Files with real mounts that run beside the serial ones: each mounts only its own
#: images (the SIGKILL/abort kill points: fio writes, kills, remounts, verifies).
PRIVATE_MOUNTS = ("tests/test_kill.py",)
#: What a file in PRIVATE_MOUNTS must not mention: machine-wide views of the mounts.
MACHINE_WIDE = re.compile(
    r"[\"']list[\"']|[\"']status[\"']|registry|qedfuse_mounts|/run/qedfuse|systemd"
)
NO_TESTS = 5  # pytest: nothing collected


def split_files() -> tuple[list[str], list[str]]:
    """(in-process files, shared-state files), as paths relative to the repository."""
    in_process: list[str] = []
    shared: list[str] = []
    for path in sorted(TESTS.glob("test_*.py")):
        rel = os.path.relpath(path, TESTS.parent)
        source = path.read_text()
        if rel in PRIVATE_MOUNTS:
            if MACHINE_WIDE.search(source):
                raise SystemExit(f"run_suite: {rel} looks at machine-wide mount state now")
            in_process.append(rel)
        else:
            (shared if SHARED_STATE.search(source) else in_process).append(rel)
    return in_process, shared


def _names_tests(args: list[str]) -> bool:
    return any(a.endswith(".py") or "::" in a or a.rstrip("/") == "tests" for a in args)


def main(argv: list[str]) -> int:
    pytest = [sys.executable, "-m", "pytest"]
    if os.environ.get("QEDFUSE_SERIAL") == "1" or _names_tests(argv):
        return subprocess.call([*pytest, *argv])
    env = dict(os.environ)
    env.setdefault("QEDFUSE_SAMPLE_SEED", str(random.SystemRandom().randrange(1 << 30)))
    in_process, shared = split_files()
    base = Path(tempfile.mkdtemp(prefix="qedfuse-tests-"))
    log_path = base / "in-process.log"
    print(
        f"run_suite: {len(in_process)} in-process and private-mount files beside {len(shared)} "
        f"files with shared mounts, one process each (QEDFUSE_SERIAL=1 runs one); "
        f"QEDFUSE_SAMPLE_SEED={env['QEDFUSE_SAMPLE_SEED']}",
        flush=True,
    )
    started = time.monotonic()
    with open(log_path, "w", encoding="utf-8") as log:
        side = subprocess.Popen(
            [*pytest, f"--basetemp={base / 'in-process'}", *argv, *in_process],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            rc_shared = subprocess.call(
                [*pytest, f"--basetemp={base / 'mounts'}", *argv, *shared], env=env
            )
            rc_side = side.wait()
        finally:
            if side.poll() is None:
                side.kill()
                side.wait()
    print(f"\n===== in-process tests (run alongside; log {log_path}) =====", flush=True)
    sys.stdout.write(log_path.read_text(encoding="utf-8", errors="replace"))
    codes = [rc_side, rc_shared]
    print(
        f"run_suite: in-process exit {rc_side}, real-mount exit {rc_shared}, "
        f"{time.monotonic() - started:.0f} s in all",
        flush=True,
    )
    if all(code == NO_TESTS for code in codes):
        return NO_TESTS
    return max(code for code in codes if code != NO_TESTS)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
