"""Command line and the interleaved rounds: for each filesystem, for each round, for each
target (a, b, c, a, b, c, …) a fresh image, the fixed fio job set, per-job daemon CPU time and
peak RSS, then ``qemu-img check``."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench import jobs as J
from bench import system
from bench import targets as targets_mod
from bench.targets import BenchError, Target, daemon_alive, make_targets

DEFAULT_OUT = system.REPO_ROOT / "bench" / "results"
DEFAULT_DISK_DIR = DEFAULT_OUT / "tmp"
ALL_TARGETS = ["qedfuse", "qsd", "raw"]
ALL_FS = ["tmpfs", "disk"]


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def parse_size(text: str) -> int:
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    t = text.strip().lower().removesuffix("ib").removesuffix("b")
    if t and t[-1] in units:
        return int(float(t[:-1]) * units[t[-1]])
    return int(t)


def _csv(choices: list[str]) -> Any:
    def parse(text: str) -> list[str]:
        items = [x.strip() for x in text.split(",") if x.strip()]
        bad = [x for x in items if x not in choices]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"choose from {','.join(choices)}")
        return items

    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="qedfuse vs qemu-storage-daemon's FUSE export vs a raw file (fio).",
    )
    p.add_argument("--quick", action="store_true", help="~2-minute smoke run (small sizes)")
    p.add_argument("--rounds", type=int, help="interleaved rounds (default 3, quick 1)")
    p.add_argument("--fs", type=_csv(ALL_FS), default=ALL_FS, help="tmpfs,disk (default both)")
    p.add_argument(
        "--targets",
        type=_csv(ALL_TARGETS),
        default=ALL_TARGETS,
        help="qedfuse,qsd,raw (default all)",
    )
    p.add_argument("--jobs", default="all", help="all, a count N (first N), or job names")
    p.add_argument(
        "--disk-dir",
        type=Path,
        default=DEFAULT_DISK_DIR,
        help=f"parent dir for the disk runs (default {DEFAULT_DISK_DIR})",
    )
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where latest.{md,json,png} go")
    p.add_argument("--qedfuse-opts", default="", help="-o options for qedfuse mount")
    p.add_argument(
        "--qedfuse-cmd", default="", help="command that runs qedfuse (default .venv/bin/qedfuse)"
    )
    p.add_argument("--image-size", type=parse_size, help="virtual disk size (default 4G)")
    p.add_argument("--seq-size", type=parse_size, help="sequential job size (default 1G)")
    p.add_argument("--random-ios", type=int, help="I/Os per random job (default 20000)")
    p.add_argument("--runtime", type=int, help="cap per random job in s (default 30)")
    mem = p.add_mutually_exclusive_group()
    mem.add_argument(
        "--memory",
        dest="memory",
        action="store_true",
        default=None,
        help="run the 1 TiB memory figure (default: on unless --quick)",
    )
    mem.add_argument("--no-memory", dest="memory", action="store_false")
    mem.add_argument("--memory-only", action="store_true", help="only the memory figure")
    p.add_argument("--memory-data", type=parse_size, default=8 << 30, help="default 8G")
    p.add_argument(
        "--memory-targets",
        type=_csv(["qedfuse", "qsd"]),
        default=["qedfuse"],
        help="daemons for the memory figure (default qedfuse; qsd adds ~2 min)",
    )
    p.add_argument("--no-micro", action="store_true", help="skip the pread/thread micro-bench")
    p.add_argument("--no-chart", action="store_true", help="do not draw latest.png")
    p.add_argument(
        "--render",
        type=Path,
        metavar="JSON",
        help="only re-render latest.md/png from a saved latest.json into --out",
    )
    p.add_argument(
        "--no-install", action="store_true", help="never pip-install matplotlib for the chart"
    )
    return p


def sizes_from(ns: argparse.Namespace) -> J.Sizes:
    s = J.QUICK if ns.quick else J.FULL
    over: dict[str, int] = {}
    if ns.image_size:
        over["image_size"] = ns.image_size
    if ns.seq_size:
        over["seq_size"] = ns.seq_size
    if ns.random_ios:
        over["n_random_ios"] = ns.random_ios
    if ns.runtime:
        over["random_runtime_s"] = ns.runtime
    s = dataclasses.replace(s, **over)
    s.validate()
    return s


# --------------------------------------------------------------------------- filesystems


@contextlib.contextmanager
def filesystem(kind: str, disk_dir: Path, need_bytes: int) -> Iterator[Path]:
    """A scratch directory on a fresh tmpfs or on the disk; removed afterwards."""
    if kind == "tmpfs":
        with system.tmpfs(need_bytes + (1 << 30)) as path:
            yield path
        return
    disk_dir.mkdir(parents=True, exist_ok=True)
    if system.free_bytes(disk_dir) < need_bytes + (1 << 30):
        raise BenchError(f"not enough free space in {disk_dir} (need {need_bytes >> 20} MiB)")
    path = Path(tempfile.mkdtemp(prefix="qedfuse-bench-", dir=disk_dir))
    try:
        yield path
    finally:
        subprocess.run(["rm", "-rf", "--one-file-system", str(path)], check=False)


# --------------------------------------------------------------------------- one target run


def run_target(
    target: Target,
    fs: str,
    rnd: int,
    workdir: Path,
    sizes: J.Sizes,
    jobs: list[J.Job],
    results: dict[str, Any],
) -> None:
    """One fresh image, the whole job set, the check; appends to ``results``."""
    tag = f"[{fs} r{rnd + 1}] {target.key:7s}"
    if target.key == "qedfuse":
        results["meta"].setdefault("qedfuse_source_hashes", [])
        src = system.qedfuse_source_hash()
        if src not in results["meta"]["qedfuse_source_hashes"]:
            results["meta"]["qedfuse_source_hashes"].append(src)
    with target.session(workdir, sizes.image_size) as s:
        for job in jobs:
            rec: dict[str, Any] = {"fs": fs, "round": rnd, "target": target.key, "job": job.name}
            if job.drop_caches:
                note = system.drop_caches()
                if note:
                    results["meta"]["drop_caches"] = note
            cpu0 = 0.0
            if s.pid is not None:
                cpu0 = system.cpu_seconds(s.pid)
                system.reset_peak_rss(s.pid)
            host0, _ = system.host_cpu_seconds()
            fio0 = system.children_cpu_seconds()
            t0 = time.monotonic()
            res, cmd = J.run_fio(
                job,
                s.file,
                workdir,
                seed=rnd,
                sizes=sizes,
                timeout_s=max(900, sizes.random_runtime_s * 10),
            )
            rec["wall_s"] = time.monotonic() - t0
            rec["fio_cpu_s"] = system.children_cpu_seconds() - fio0
            rec["host_busy_s"] = system.host_cpu_seconds()[0] - host0
            if s.pid is not None:
                if not daemon_alive(s):
                    raise BenchError(f"{target.key} daemon died during {job.name}")
                rec["cpu_s"] = system.cpu_seconds(s.pid) - cpu0
                rec["peak_rss_kib"] = system.status_kib(s.pid, "VmHWM")
            # CPU used by neither fio nor the daemon: other work on the machine (noise).
            rec["foreign_cpu_s"] = max(
                0.0, rec["host_busy_s"] - rec["fio_cpu_s"] - rec.get("cpu_s", 0.0)
            )
            rec.update(dataclasses.asdict(res))
            rec["unit"] = job.unit
            results["fio_commands"].setdefault(job.name, shlex.join(cmd))
            results["records"].append(rec)
            value = f"{res.value:,.0f} {job.unit}" if res.value is not None else "-"
            extra = f" cpu {rec['cpu_s']:.1f}s" if "cpu_s" in rec else ""
            p50 = f" p50 {res.p50_ns / 1000:.0f}us" if res.p50_ns else ""
            log(
                f"{tag} {job.name:16s} {value:>14s}{p50}{extra}"
                + (f"  ERROR: {res.error}" if res.error else "")
            )
            if res.error:
                where = f"{fs} r{rnd + 1} {target.key} {job.name}"
                if job.verify and target.key == "qsd" and "verify:" in res.error:
                    # qsd 7.2's FUSE export corrupts concurrent O_DIRECT I/O even with
                    # driver=raw (QSD_VERIFY_BUG); it is the reference, not the subject.
                    rec["known_failure"] = "qsd-7.2-concurrent-direct-io"
                    results["known_failures"].append(f"{where}: {res.error}")
                else:
                    results["errors"].append(f"{where}: {res.error}")
    chk = {"fs": fs, "round": rnd, "target": target.key, "daemon_rc": s.daemon_rc, "notes": s.notes}
    if s.check is not None:
        chk.update(rc=s.check.rc, output=s.check.output)
        log(f"{tag} qemu-img check rc {s.check.rc}")
        if s.check.rc != 0:
            results["errors"].append(
                f"{fs} r{rnd + 1} {target.key}: qemu-img check rc {s.check.rc}: {s.check.output}"
            )
    if s.daemon_rc not in (None, 0):
        results["errors"].append(
            f"{fs} r{rnd + 1} {target.key}: daemon exited {s.daemon_rc}: {s.daemon_log[-500:]}"
        )
    results["checks"].append(chk)


def run_matrix(ns: argparse.Namespace, sizes: J.Sizes, results: dict[str, Any]) -> None:
    jobs = J.select_jobs(J.job_set(sizes), ns.jobs)
    targets = make_targets(ns.targets, ns.qedfuse_opts)
    rounds = ns.rounds or (1 if ns.quick else 3)
    results["jobs"] = [dataclasses.asdict(j) for j in jobs]
    results["meta"]["rounds"] = rounds
    for fs in ns.fs:
        with filesystem(fs, ns.disk_dir, sizes.image_size) as root:
            results["filesystems"][fs] = {"dir": str(root), "type": system.fs_type(root)}
            for rnd in range(rounds):
                for target in targets:
                    try:
                        run_target(target, fs, rnd, root, sizes, jobs, results)
                    except (BenchError, OSError, subprocess.SubprocessError) as exc:
                        msg = f"{fs} r{rnd + 1} {target.key}: {exc}"
                        log(f"ERROR {msg}")
                        results["errors"].append(msg)


def run_memory_figure(ns: argparse.Namespace, results: dict[str, Any]) -> None:
    from bench.memory import run_memory

    kinds = ns.memory_targets
    ns.disk_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="qedfuse-bench-mem-", dir=ns.disk_dir))
    try:
        results["memory"] = run_memory(
            work, kinds, ns.qedfuse_opts, data_size=ns.memory_data, log=log
        )
        results["memory_dir_type"] = system.fs_type(work)
    finally:
        subprocess.run(["rm", "-rf", "--one-file-system", str(work)], check=False)
    for r in results["memory"]:
        src = r.get("qedfuse_source")
        if r["target"] == "qedfuse" and src:
            hashes = results["meta"].setdefault("qedfuse_source_hashes", [])
            if src not in hashes:
                hashes.append(src)
        if "error" in r:
            results["errors"].append(f"memory {r['target']}: {r['error']}")


LOCK_PATH = Path("/tmp/qedfuse-bench.lock")


def _machine_lock() -> int:
    """Hold a machine-wide lock for the whole run: two benches at once measure each other.

    Waits (saying so) while another run holds it; returns the fd to keep it.
    """
    fd = os.open(LOCK_PATH, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 200, 0).decode(errors="replace").strip()
        log(f"bench: another benchmark is running ({holder or 'unknown'}); waiting for it")
        fcntl.flock(fd, fcntl.LOCK_EX)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()}, {' '.join(sys.argv)}\n".encode(), 0)
    return fd


def _on_sigterm(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    if ns.render:
        from bench.report import write_outputs

        saved = json.loads(ns.render.read_text())
        for p in write_outputs(saved, ns.out, chart=not ns.no_chart, install=not ns.no_install):
            log(f"wrote {p}")
        return 0
    if os.geteuid() != 0 and "tmpfs" in ns.fs and not ns.memory_only:
        log("bench: mounting a tmpfs needs root; use --fs disk")
        return 2
    try:
        sizes = sizes_from(ns)
        J.select_jobs(J.job_set(sizes), ns.jobs)
    except ValueError as exc:
        log(f"bench: {exc}")
        return 2
    signal.signal(signal.SIGTERM, _on_sigterm)
    lock_fd = _machine_lock()  # noqa: F841 (held until exit)
    if ns.qedfuse_cmd:
        targets_mod.QEDFUSE_CMD[:] = shlex.split(ns.qedfuse_cmd)
    from bench.report import write_outputs

    started = time.monotonic()
    results: dict[str, Any] = {
        "meta": {
            "argv": sys.argv[1:] if argv is None else argv,
            "machine": system.machine_info(),
            "versions": system.versions(),
            "sizes": dataclasses.asdict(sizes),
            "quick": ns.quick,
            "drop_caches": "ok (echo 3 > /proc/sys/vm/drop_caches before each cold-read job)",
            "targets": {t.key: t.describe() for t in make_targets(ns.targets, ns.qedfuse_opts)},
            "qedfuse_opts": ns.qedfuse_opts,
            "loadavg_start": system.loadavg(),
        },
        "filesystems": {},
        "records": [],
        "checks": [],
        "fio_commands": {},
        "errors": [],
        "known_failures": [],
    }
    interrupted = False
    try:
        if not ns.memory_only:
            run_matrix(ns, sizes, results)
            if not ns.no_micro:
                log("[micro] inline pread/pwrite vs trio.to_thread")
                from bench.micro import run_micro

                ns.disk_dir.mkdir(parents=True, exist_ok=True)
                results["micro"] = run_micro(ns.disk_dir)
        if ns.memory_only or (ns.memory if ns.memory is not None else not ns.quick):
            run_memory_figure(ns, results)
    except KeyboardInterrupt:
        interrupted = True
        results["errors"].append("interrupted")
        log("bench: interrupted; writing partial results")
    results["meta"]["duration_s"] = time.monotonic() - started
    results["meta"]["loadavg_end"] = system.loadavg()
    results["meta"]["qedfuse_rev_end"] = system.qedfuse_rev()
    paths = write_outputs(
        results, ns.out, chart=not ns.no_chart, install=not ns.no_install, log=log
    )
    for p in paths:
        log(f"wrote {p}")
    if interrupted:
        return 130
    if results["errors"]:
        log(f"bench: {len(results['errors'])} error(s):")
        for e in results["errors"]:
            log(f"  {e}")
        return 1
    return 0


def dump_json(results: dict[str, Any], path: Path) -> None:
    path.write_text(json.dumps(results, indent=1, sort_keys=False, default=str) + "\n")
