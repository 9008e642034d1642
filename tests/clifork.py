"""Run many qedfuse commands fast: each a fork of one interpreter that imported qedfuse once.

Each command still runs the real command line (``qedfuse.cli.main``) in a process of its
own, whose exit closes its files and so drops its locks, exactly as the console script; only
the interpreter start-up and imports (about 0.5 s a command on a busy 2-core machine) are
paid once.  For table-driven tests that run hundreds of commands; other tests keep using the
console script itself.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

_WORKER = r"""
import json, os, sys, tempfile
from qedfuse import cli
for line in sys.stdin:
    argv = json.loads(line)
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        pid = os.fork()
        if pid == 0:
            os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
            os.dup2(out.fileno(), 1)
            os.dup2(err.fileno(), 2)
            code = 1
            try:
                code = cli.main(argv)
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        status = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
        out.seek(0)
        err.seek(0)
        reply = [status, out.read().decode(errors="replace"), err.read().decode(errors="replace")]
    print(json.dumps(reply), flush=True)
"""


class ForkedCli:
    """``qedfuse ARGS`` run as a fork of a worker interpreter (see the module docstring)."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen[str] | None = None

    def __call__(self, *args: str | Path) -> subprocess.CompletedProcess[str]:
        if self.proc is None or self.proc.poll() is not None:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", _WORKER],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
        assert self.proc.stdin is not None
        assert self.proc.stdout is not None
        argv = [str(a) for a in args]
        self.proc.stdin.write(json.dumps(argv) + "\n")
        self.proc.stdin.flush()
        reply = self.proc.stdout.readline()
        assert reply, "the qedfuse worker died"
        rc, out, err = json.loads(reply)
        assert "Traceback (most recent call last)" not in err, f"qedfuse {argv} crashed:\n{err}"
        return subprocess.CompletedProcess(["qedfuse", *argv], rc, out, err)

    def close(self) -> None:
        if self.proc is not None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            self.proc.wait(timeout=30)
            self.proc = None
