"""Profile the qedfuse daemon under the bench's fio jobs with py-spy.

``.venv/bin/python -m bench.profile [--fs tmpfs|disk] [--jobs seq-write,randread-qd1]``
mounts a fresh image, runs the job set in order (jobs not asked for still run, unprofiled,
because later jobs rely on earlier ones), and for each asked-for job records the daemon with
``py-spy record --format raw`` (collapsed stacks; idle samples excluded).  It prints, per job,
the daemon's busy share and the functions with the most samples (self and inclusive), and
keeps the collapsed stacks under ``--out`` (feed them to any flame-graph tool).

py-spy comes from the ``bench`` extra (``pip install -e '.[bench]'``).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import jobs as J
from bench import system
from bench import targets as targets_mod
from bench.targets import qedfuse_mount, qemu_img_create

RATE_HZ = 250


def _frame_name(frame: str) -> str:
    """'func (path/to/mod.py:123)' -> 'mod.py:func'."""
    name, _, where = frame.partition(" (")
    path = where.rstrip(")").rsplit(":", 1)[0]
    return f"{os.path.basename(path)}:{name}" if path else name


#: Leaf-frame buckets: (label, predicate on "file.py:function").
BUCKETS: list[tuple[str, tuple[str, ...]]] = [
    ("epoll wait (idle)", ("_io_epoll.py:EpollIOManager.get_events", "_epoll_wait")),
    ("pyfuse3 C loop: read /dev/fuse, dispatch, reply", ("_pyfuse3.py:",)),
    ("pread/pwrite syscalls", ("imagefile.py:FileImage._pread_sync",
                               "imagefile.py:FileImage._pwrite_sync")),
    ("worker threads (fdatasync, thread hops)", ("_threads.py:", "_thread_cache.py:",
                                                 "_wakeup_socketpair.py:")),
    ("qedfuse Python (engine, fs, format)", ("engine.py:", "fs.py:", "format.py:",
                                            "imagefile.py:", "options.py:")),
    ("trio scheduler", ("_run.py:", "_parking_lot.py:", "_sync.py:", "_traps.py:",
                        "_impl.py:", "_ki.py:", "<attrs generated", "_io_epoll.py:")),
]  # fmt: skip


def bucket_of(frame: str) -> str:
    for label, prefixes in BUCKETS:
        if any(p in frame for p in prefixes):
            return label
    return "other"


def summarize(collapsed: Path, wall_s: float, rate_hz: int, top: int = 14) -> str:
    """Busy share and top self/inclusive functions from py-spy's raw (collapsed) output."""
    self_n: collections.Counter[str] = collections.Counter()
    incl_n: collections.Counter[str] = collections.Counter()
    buckets: collections.Counter[str] = collections.Counter()
    total = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        n = int(count_text)
        frames = [
            _frame_name(f) for f in stack.split(";") if not f.startswith(("process ", "thread "))
        ]
        if not frames:
            continue
        total += n
        self_n[frames[-1]] += n
        buckets[bucket_of(frames[-1])] += n
        for f in set(frames):
            incl_n[f] += n
    if not total:
        return "no samples (daemon idle?)"
    busy = total / (rate_hz * wall_s) if wall_s else 0.0
    out = [f"samples {total} over {wall_s:.1f} s at {rate_hz} Hz: daemon busy {busy:.0%}"]
    out.append("  buckets (leaf frame):")
    out += [f"    {n / total:6.1%}  {b}" for b, n in buckets.most_common()]
    out.append("  self:")
    out += [f"    {n / total:6.1%}  {f}" for f, n in self_n.most_common(top)]
    out.append("  inclusive:")
    out += [f"    {n / total:6.1%}  {f}" for f, n in incl_n.most_common(top)]
    return "\n".join(out)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--fs", choices=["tmpfs", "disk"], default="tmpfs")
    p.add_argument("--jobs", default="all", help="jobs to profile (all, N, or names)")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--qedfuse-opts", default="")
    p.add_argument("--qedfuse-cmd", default="", help="command that runs qedfuse")
    p.add_argument("--out", type=Path, default=system.REPO_ROOT / "bench/results/tmp/profile")
    p.add_argument("--rate", type=int, default=RATE_HZ)
    p.add_argument(
        "--native",
        action="store_true",
        help="also sample C frames (pauses the daemon per sample: slower)",
    )
    ns = p.parse_args()
    pyspy = shutil.which("py-spy") or str(system.VENV_BIN / "py-spy")
    if not os.access(pyspy, os.X_OK):
        print("py-spy missing: pip install -e '.[bench]'", file=sys.stderr)
        return 2
    if ns.qedfuse_cmd:
        targets_mod.QEDFUSE_CMD[:] = shlex.split(ns.qedfuse_cmd)
    sizes = J.QUICK if ns.quick else J.FULL
    all_jobs = J.job_set(sizes)
    wanted = {j.name for j in J.select_jobs(all_jobs, ns.jobs)}
    last = max(i for i, j in enumerate(all_jobs) if j.name in wanted)
    ns.out.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        if ns.fs == "tmpfs":
            root = stack.enter_context(system.tmpfs(sizes.image_size + (1 << 30)))
        else:
            base = system.REPO_ROOT / "bench/results/tmp"
            base.mkdir(parents=True, exist_ok=True)
            root = Path(tempfile.mkdtemp(prefix="qedfuse-profile-", dir=base))
            stack.callback(shutil.rmtree, root, True)
        image = root / "bench-qedfuse.qed"
        qemu_img_create(image, sizes.image_size)
        s = stack.enter_context(qedfuse_mount(image, root, ns.qedfuse_opts))
        assert s.pid is not None
        for job in all_jobs[: last + 1]:
            if job.drop_caches:
                system.drop_caches()
            spy = None
            raw = ns.out / f"{ns.fs}-{job.name}.txt"
            if job.name in wanted:
                raw.unlink(missing_ok=True)
                spy_log = stack.enter_context(open(raw.with_suffix(".log"), "w"))
                spy = subprocess.Popen(
                    [
                        pyspy,
                        "record",
                        "--pid",
                        str(s.pid),
                        "--rate",
                        str(ns.rate),
                        "--format",
                        "raw",
                        *(["--native"] if ns.native else ["--nonblocking"]),
                        "-o",
                        str(raw),
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=spy_log,
                )
                time.sleep(0.5)
            cpu0 = system.cpu_seconds(s.pid)
            t0 = time.monotonic()
            res, _ = J.run_fio(job, s.file, root, seed=0, sizes=sizes, timeout_s=900)
            wall = time.monotonic() - t0
            cpu = system.cpu_seconds(s.pid) - cpu0
            value = f"{res.value:,.0f} {job.unit}" if res.value else f"error {res.error}"
            print(
                f"== {ns.fs} {job.name}: {value}, daemon CPU {cpu:.2f} s in {wall:.1f} s",
                flush=True,
            )
            if spy is not None:
                spy.send_signal(signal.SIGINT)
                spy.wait(timeout=60)
                if raw.exists():
                    print(summarize(raw, wall, ns.rate), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
