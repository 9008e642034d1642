"""The fixed fio job set, the guest-space layout it uses, and fio JSON parsing.

Layout of the virtual disk (all targets):

* ``[0, seq)`` — written sequentially (fresh), overwritten, read sequentially, then used by the
  random reads and the random overwrite;
* ``[seq, seq + n_random_ios x 64 KiB)`` — never written until ``randwrite-fresh``, which
  writes 4 KiB into each of ``n_random_ios`` distinct 64 KiB clusters in a random order (a
  replayed fio iolog: fio's ``blockalign`` disables its random map, so it could repeat);
* then ``verify_size`` bytes for the crc32c write/read-back job.

Everything stays far enough below 4 GiB of *host file* that QEMU's cluster-count bug
(docs/qemu-differences.md#bug-a: spurious leaks on files > 4 GiB with 64 KiB clusters) cannot
show up in ``qemu-img check``.
"""

from __future__ import annotations

import json
import random
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.targets import CLUSTER_SIZE

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
SYNC_EVERY = 32
FRESH_WRITE_SIZE = 4 * KiB


@dataclass(frozen=True)
class Sizes:
    image_size: int
    seq_size: int
    n_random_ios: int
    random_runtime_s: int
    verify_size: int

    @property
    def fresh_pos(self) -> int:
        return self.seq_size

    @property
    def fresh_size(self) -> int:
        return self.n_random_ios * CLUSTER_SIZE

    @property
    def verify_pos(self) -> int:
        return self.fresh_pos + self.fresh_size

    @property
    def end_pos(self) -> int:
        return self.verify_pos + self.verify_size

    def validate(self) -> None:
        if self.end_pos > self.image_size:
            raise ValueError(
                f"job layout needs {self.end_pos} bytes but the image has {self.image_size}"
            )
        if self.seq_size % MiB or self.verify_size % (256 * KiB):
            raise ValueError("seq size must be MiB-aligned, verify size 256 KiB-aligned")


FULL = Sizes(
    image_size=4 * GiB,
    seq_size=1 * GiB,
    n_random_ios=20_000,
    random_runtime_s=30,
    verify_size=256 * MiB,
)
QUICK = Sizes(
    image_size=1 * GiB,
    seq_size=64 * MiB,
    n_random_ios=2_000,
    random_runtime_s=3,
    verify_size=16 * MiB,
)


@dataclass(frozen=True)
class Job:
    name: str
    title: str
    ddir: str  # which fio section carries the figure: "read" or "write"
    unit: str  # "MB/s" (10^6 bytes/s) or "IOPS"
    args: tuple[str, ...]
    drop_caches: bool = False
    fresh_iolog: bool = False
    verify: bool = False


def job_set(s: Sizes) -> list[Job]:
    """The fixed job list, in run order (each job relies on the ones before it)."""
    seq = ("--offset=0", f"--size={s.seq_size}")
    rnd = (*seq, "--bs=4k", f"--runtime={s.random_runtime_s}")
    n = s.n_random_ios
    seq_cap = "--runtime=600"
    return [
        Job("seq-write", "1 MiB seq write, fresh space, end_fsync", "write", "MB/s",
            ("--rw=write", "--bs=1m", *seq, "--end_fsync=1", seq_cap)),
        Job("seq-overwrite", "1 MiB seq overwrite, end_fsync", "write", "MB/s",
            ("--rw=write", "--bs=1m", *seq, "--end_fsync=1", seq_cap)),
        Job("seq-read", "1 MiB seq read, cold", "read", "MB/s",
            ("--rw=read", "--bs=1m", *seq, seq_cap), drop_caches=True),
        Job("randread-qd1", "4 KiB rand read, QD1 psync, cold", "read", "IOPS",
            ("--rw=randread", *rnd, "--ioengine=psync", f"--number_ios={n}"),
            drop_caches=True),
        Job("randread-qd16", "4 KiB rand read, QD16 libaio direct", "read", "IOPS",
            ("--rw=randread", *rnd, "--ioengine=libaio", "--direct=1", "--iodepth=16",
             f"--number_ios={n}"), drop_caches=True),
        Job("randread-4t", "4 KiB rand read, 4 threads psync, cold", "read", "IOPS",
            ("--rw=randread", *rnd, "--ioengine=psync", "--numjobs=4",
             f"--number_ios={n // 4}"), drop_caches=True),
        Job("randwrite-over", "4 KiB rand overwrite, fsync=32", "write", "IOPS",
            ("--rw=randwrite", *rnd, "--ioengine=psync", f"--fsync={SYNC_EVERY}",
             f"--number_ios={n}")),
        Job("randwrite-fresh", "4 KiB rand write, each into a fresh cluster, fsync=32",
            "write", "IOPS",
            ("--ioengine=psync", f"--runtime={s.random_runtime_s}"), fresh_iolog=True),
        Job("verify", "crc32c verify: rand write 4-256 KiB QD8 direct, read back", "write",
            "MB/s",
            ("--rw=randwrite", "--bsrange=4k-256k", f"--offset={s.verify_pos}",
             f"--size={s.verify_size}", "--ioengine=libaio", "--direct=1", "--iodepth=8",
             "--verify=crc32c", "--do_verify=1", "--verify_fatal=1", seq_cap),
            verify=True),
    ]  # fmt: skip


def select_jobs(jobs: list[Job], spec: str) -> list[Job]:
    """``all``, a count N (the first N jobs) or a comma list of job names."""
    if spec == "all":
        return jobs
    if spec.isdigit():
        return jobs[: int(spec)]
    names = [x.strip() for x in spec.split(",") if x.strip()]
    by_name = {j.name: j for j in jobs}
    unknown = [x for x in names if x not in by_name]
    if unknown:
        raise ValueError(f"unknown job(s) {unknown}; known: {', '.join(by_name)}")
    return [j for j in jobs if j.name in names]


def write_fresh_iolog(path: Path, target: Path, s: Sizes, seed: int) -> None:
    """An fio v2 iolog: one 4 KiB write into each of n distinct fresh clusters, random order,
    a random 4 KiB slot inside each cluster, and a ``sync`` after every 32 writes (fio ignores
    ``fsync=`` when replaying, so the syncs are in the log)."""
    rng = random.Random(seed)
    n_clusters = s.fresh_size // CLUSTER_SIZE
    clusters = list(range(n_clusters))
    rng.shuffle(clusters)
    slots = CLUSTER_SIZE // FRESH_WRITE_SIZE
    lines = ["fio version 2 iolog", f"{target} add", f"{target} open"]
    for i, cluster in enumerate(clusters[: s.n_random_ios], 1):
        pos = s.fresh_pos + cluster * CLUSTER_SIZE + rng.randrange(slots) * FRESH_WRITE_SIZE
        lines.append(f"{target} write {pos} {FRESH_WRITE_SIZE}")
        if i % SYNC_EVERY == 0:
            lines.append(f"{target} sync 0 0")
    lines.append(f"{target} close")
    path.write_text("\n".join(lines) + "\n")


def fio_command(job: Job, target: Path, out_json: Path, iolog: Path | None) -> list[str]:
    cmd = [
        "fio",
        f"--name={job.name}",
        f"--filename={target}",
        "--output-format=json",
        f"--output={out_json}",
        "--fallocate=none",
        "--group_reporting",
        *job.args,
    ]
    if iolog is not None:
        cmd.append(f"--read_iolog={iolog}")
    return cmd


@dataclass
class FioResult:
    value: float | None  # MB/s or IOPS
    p50_ns: int | None
    p99_ns: int | None
    io_bytes: int
    n_ios: int
    runtime_ms: int
    error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def load_fio_json(text: str) -> dict[str, Any]:
    start = text.find("{")
    if start < 0:
        raise ValueError("no JSON in fio output")
    data: dict[str, Any] = json.loads(text[start:])
    return data


def parse_fio(job: Job, text: str) -> FioResult:
    data = load_fio_json(text)
    j = data["jobs"][0]
    sec = j[job.ddir]
    pct = sec.get("clat_ns", {}).get("percentile", {})
    n_ios = int(sec.get("total_ios", 0))
    runtime_ms = int(sec.get("runtime", 0)) or int(j.get("job_runtime", 0))
    if job.unit == "MB/s":
        value: float | None = sec["bw_bytes"] / 1e6
    else:
        value = float(sec["iops"])
    res = FioResult(
        value=value if n_ios else None,
        p50_ns=int(pct["50.000000"]) if "50.000000" in pct else None,
        p99_ns=int(pct["99.000000"]) if "99.000000" in pct else None,
        io_bytes=int(sec.get("io_bytes", 0)),
        n_ios=n_ios,
        runtime_ms=runtime_ms,
    )
    if j.get("error"):
        res.error = f"fio error {j['error']}"
    if n_ios == 0:
        res.error = res.error or "fio did no I/O"
    sync = j.get("sync", {})
    if sync.get("total_ios"):
        res.extra["n_syncs"] = int(sync["total_ios"])
        sp = sync.get("lat_ns", {}).get("percentile", {})
        if "50.000000" in sp:
            res.extra["sync_p50_ns"] = int(sp["50.000000"])
    if job.verify:
        read = j["read"]
        res.extra["verify_read_bytes"] = int(read.get("io_bytes", 0))
        if not read.get("io_bytes"):
            res.error = res.error or "verify phase read nothing"
    return res


def _error_lines(text: str, n_lines: int = 3) -> str:
    """The first few diagnostic lines fio printed (verify errors come first)."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    picked = [ln for ln in lines if "verify" in ln or "error" in ln.lower()] or lines[-n_lines:]
    return " | ".join(picked[:n_lines])[:600]


def run_fio(
    job: Job, target: Path, workdir: Path, *, seed: int, sizes: Sizes, timeout_s: float
) -> tuple[FioResult, list[str]]:
    """Run one job against ``target``; returns the parsed result and the exact argv."""
    out_json = workdir / f"fio-{job.name}.json"
    iolog = None
    if job.fresh_iolog:
        iolog = workdir / f"fio-{job.name}.iolog"
        write_fresh_iolog(iolog, target, sizes, seed)
    cmd = fio_command(job, target, out_json, iolog)
    try:
        cp = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired:
        return FioResult(None, None, None, 0, 0, 0, f"fio timed out after {timeout_s:.0f} s"), cmd
    try:
        text = out_json.read_text()
        res = parse_fio(job, text)
    except (OSError, ValueError, KeyError, IndexError) as exc:
        res = FioResult(None, None, None, 0, 0, 0, f"unparsable fio output: {exc}")
    if cp.returncode != 0:
        res.error = f"fio exited {cp.returncode}: {_error_lines(cp.stderr or cp.stdout)}"
    out_json.unlink(missing_ok=True)
    if iolog is not None:
        iolog.unlink(missing_ok=True)
    return res, cmd
