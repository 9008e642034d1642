"""Concurrency through the real mount, with and without the kernel's writeback cache
(reliability.md §5.3 and matrix rows C4, C5).

* **C4** ``-o writeback_cache``: eight fio jobs write 4 KiB blocks in random order into the
  one raw file, each in its own range (``offset_increment``).  Every other pair of
  neighbouring ranges shares a cluster with a never-written 4 KiB gap between them, so two
  jobs allocate the same cluster at once; ``fsync=32`` runs the ordered flush in between.
  With the writeback cache the kernel sends several WRITEs at a time, and libfuse's request
  trace (``--debug-fuse``) must show more than one WRITE in flight in the daemon.  After a
  clean unmount: ``qemu-img check`` rc 0, QEMU's map has exactly the clusters the ranges
  touch, QEMU's view of the data verifies with fio and the gaps read as zeros.
* **C5** the same job without the writeback cache: the same results, and the kernel never
  has more than one WRITE in flight.
* fsync semantics hold with the writeback cache: the SIGKILL rounds of ``test_kill`` (an
  O_SYNC fio writer; every acknowledged block must verify after the repairing remount).
* The mode is really on: an overwrite without fsync stays in the kernel's page cache, so a
  SIGKILL of the daemon loses it; without the writeback cache it has already reached the
  image file.
* The README's caveat: a write past the end of the disk is accepted and fails at fsync.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import random
import re
import signal
import time
from pathlib import Path

import pytest
from fusehelpers import mounted
from test_kill import (
    CLUSTER_SIZE,
    SEED,
    KillPoint,
    create_image,
    detach_dead_mount,
    powercut_round,
    qemu_check,
)

from support import check_ok, describe, require_tool, run

KiB = 1024
MiB = 1024 * KiB

pytestmark = pytest.mark.fuse

N_JOBS = 8
BLOCK_SIZE = 4 * KiB
#: Each job's range; not a multiple of the cluster size, so ranges end mid-cluster.
JOB_SIZE = 4 * MiB + 28 * KiB
#: Distance between the starts of neighbouring ranges: a 4 KiB gap that is never written.
JOB_STRIDE = JOB_SIZE + 4 * KiB
C_IMAGE_SIZE = 40 * MiB
WBC_KILL_POINTS = 4
WRITEBACK = ("-o", "writeback_cache")

_REQUEST = re.compile(r"unique: (\d+), opcode: (\w+)")
_REPLY = re.compile(r"\s+unique: (\d+), (?:success|error)")


def job_ranges() -> list[tuple[int, int]]:
    return [(k * JOB_STRIDE, k * JOB_STRIDE + JOB_SIZE) for k in range(N_JOBS)]


def expected_clusters(cluster_size: int) -> set[int]:
    """Every cluster a job range touches, and nothing else."""
    clusters: set[int] = set()
    for start, end in job_ranges():
        clusters.update(range(start // cluster_size, (end - 1) // cluster_size + 1))
    return clusters


def max_writes_in_flight(trace: str) -> tuple[int, int]:
    """(WRITE requests, most WRITEs received but not yet answered) in libfuse's trace."""
    in_flight: set[str] = set()
    n_writes = peak = 0
    for line in trace.splitlines():
        if m := _REQUEST.match(line):
            if m.group(2) == "WRITE":
                n_writes += 1
                in_flight.add(m.group(1))
                peak = max(peak, len(in_flight))
        elif m := _REPLY.match(line):
            in_flight.discard(m.group(1))
    return n_writes, peak


def concurrent_job(raw: Path, seed: int, *, verify_only: bool = False) -> str:
    lines = [
        "[global]",
        f"filename={raw}",
        "ioengine=psync",
        "rw=randwrite",
        f"bs={BLOCK_SIZE}",
        f"size={JOB_SIZE}",
        f"offset_increment={JOB_STRIDE}",
        f"numjobs={N_JOBS}",
        "verify=crc32c",
        "verify_fatal=1",
        f"randseed={seed}",
        "verify_state_save=0",
    ]
    if verify_only:
        lines += ["do_verify=1", "verify_only=1"]  # in the job file (reliability.md §3.6)
    else:
        lines += ["fsync=32"]
    return "\n".join([*lines, "[c]", ""])


def run_concurrent_fio(tmp_path: Path, *opts: str) -> dict[str, object]:
    """The C4/C5 workload on a fresh image; returns the figures after all checks pass."""
    fio, qemu_img = require_tool("fio"), require_tool("qemu-img")
    t0 = time.monotonic()
    image = tmp_path / "disk.qed"
    create_image(image, C_IMAGE_SIZE, CLUSTER_SIZE)
    mnt = tmp_path / "mnt"
    seed = random.Random(SEED).randrange(1, 2**31)
    job = tmp_path / "c.fio"
    job.write_text(concurrent_job(mnt / "disk.raw", seed))
    with mounted(image, mnt, "--debug-fuse", *opts) as m:
        cp = run([fio, "--output-format=json", job], cwd=tmp_path, timeout=170)
        assert cp.returncode == 0, describe(cp)
        report = json.loads(cp.stdout[cp.stdout.find("{") :])
        assert [j["error"] for j in report["jobs"]] == [0] * N_JOBS, describe(cp)
        # each job verified its whole range after writing it
        n_blocks = JOB_SIZE // BLOCK_SIZE
        assert [j["read"]["total_ios"] for j in report["jobs"]] == [n_blocks] * N_JOBS
    n_write_requests, peak = max_writes_in_flight(m.log())
    write_s = time.monotonic() - t0

    cp = check_ok(run([qemu_img, "check", "-f", "qed", "--output=json", image]))
    allocated = int(json.loads(cp.stdout)["allocated-clusters"])
    expected = expected_clusters(CLUSTER_SIZE)
    cp = check_ok(run([qemu_img, "map", "-f", "qed", "--output=json", image]))
    mapped: set[int] = set()
    for extent in json.loads(cp.stdout):
        if extent["data"]:
            start, length = extent["start"], extent["length"]
            assert start % CLUSTER_SIZE == 0, extent
            assert length % CLUSTER_SIZE == 0, extent
            mapped.update(range(start // CLUSTER_SIZE, (start + length) // CLUSTER_SIZE))
    assert mapped == expected, (
        f"{len(mapped - expected)} clusters allocated outside the ranges, "
        f"{len(expected - mapped)} inside them missing"
    )
    assert allocated == len(expected), "a cluster was allocated twice (or not at all)"

    # QEMU's view of the image: every job's blocks verify, the gaps read as zeros.
    qemu_raw = tmp_path / "qemu.raw"
    check_ok(run([qemu_img, "convert", "-f", "qed", "-O", "raw", image, qemu_raw]))
    verify_job = tmp_path / "verify.fio"
    verify_job.write_text(concurrent_job(qemu_raw, seed, verify_only=True))
    check_ok(run([fio, "--output-format=json", verify_job], cwd=tmp_path, timeout=170))
    ranges = job_ranges()
    with open(qemu_raw, "rb") as f:
        for (_, end), (next_start, _) in itertools.pairwise(ranges):
            f.seek(end)
            assert f.read(next_start - end) == bytes(next_start - end), f"gap at {end:#x}"
        f.seek(ranges[-1][1])
        assert f.read().count(0) == C_IMAGE_SIZE - ranges[-1][1]
    return {
        "clusters": len(expected),
        "write_requests": n_write_requests,
        "peak_in_flight": peak,
        "write_s": write_s,
    }


def _shared_clusters() -> int:
    """Clusters two neighbouring ranges both touch."""
    per_range = sum((e - 1) // CLUSTER_SIZE - s // CLUSTER_SIZE + 1 for s, e in job_ranges())
    return per_range - len(expected_clusters(CLUSTER_SIZE))


def test_c4_concurrent_writers_with_writeback_cache(tmp_path: Path) -> None:
    assert _shared_clusters() >= N_JOBS // 2 - 1  # the workload does race on clusters
    figures = run_concurrent_fio(tmp_path, *WRITEBACK)
    print(
        f"\nC4 writeback_cache: {N_JOBS} jobs, {figures['clusters']} clusters "
        f"({_shared_clusters()} shared by two jobs), {figures['write_requests']} WRITE "
        f"requests, at most {figures['peak_in_flight']} in flight, {figures['write_s']:.1f} s"
    )
    assert isinstance(figures["peak_in_flight"], int)
    assert figures["peak_in_flight"] > 1, "the writeback cache sent one WRITE at a time"


def test_c5_concurrent_writers_without_writeback_cache(tmp_path: Path) -> None:
    figures = run_concurrent_fio(tmp_path)
    print(
        f"\nC5 no writeback cache: {figures['write_requests']} WRITE requests, at most "
        f"{figures['peak_in_flight']} in flight, {figures['write_s']:.1f} s"
    )
    assert figures["peak_in_flight"] == 1  # the kernel serialises writes to one inode


@pytest.mark.expect_log(r"image had NEED_CHECK set; repaired on open: ")
def test_sigkill_after_fsync_with_writeback_cache(tmp_path: Path) -> None:
    """The writeback cache keeps fsync semantics: O_SYNC writes (FSYNC after the kernel's
    writeback) survive a SIGKILL of the daemon."""
    rng = random.Random(SEED + 4)
    points: list[KillPoint] = []
    try:
        for i in range(WBC_KILL_POINTS):
            points.append(powercut_round(tmp_path / f"r{i}", rng, i, mount_opts=WRITEBACK))
    finally:
        print("\nSIGKILL with writeback_cache:")
        for p in points:
            print(p.line())
    assert sum(p.n_acked for p in points) > 0


def _overwrite_then_kill(tmp_path: Path, *opts: str) -> bytes:
    """Write A (fsync), overwrite its first 4 KiB with B (no fsync, fd kept open), SIGKILL
    the daemon, remount: the bytes now at position 0."""
    tmp_path.mkdir()
    image = tmp_path / "disk.qed"
    create_image(image, 16 * MiB, CLUSTER_SIZE)
    mnt = tmp_path / "mnt"
    with mounted(image, mnt, *opts, expect_rc=None) as m:
        fd = os.open(m.raw, os.O_RDWR)
        try:
            os.pwrite(fd, b"A" * CLUSTER_SIZE, 0)
            os.fsync(fd)
            os.pwrite(fd, b"B" * 4096, 0)
            m.signal(signal.SIGKILL)
            assert m.wait_exit() == -signal.SIGKILL
        finally:
            with contextlib.suppress(OSError):  # ENOTCONN: the daemon is gone
                os.close(fd)
        detach_dead_mount(mnt)
    with mounted(image, mnt, "-o", "ro") as m:
        data = m.raw.read_bytes()[:8]
    assert qemu_check(image).returncode == 0
    return data


def test_writeback_cache_holds_unsynced_writes_in_the_kernel(tmp_path: Path) -> None:
    """Shows the option reaches the kernel: without it the overwrite is in the image file
    when write() returns; with it the dirty page is still in the kernel when the daemon dies."""
    assert _overwrite_then_kill(tmp_path / "plain") == b"B" * 8
    assert _overwrite_then_kill(tmp_path / "wbc", *WRITEBACK) == b"A" * 8


def test_writeback_cache_write_past_the_end(tmp_path: Path) -> None:
    """The README caveat: with the writeback cache the kernel accepts a write past the end
    into its page cache; qedfuse refuses it at writeback, and fsync reports ENOSPC.  The
    image neither grows nor gets damaged."""
    qemu_img = require_tool("qemu-img")
    image = tmp_path / "disk.qed"
    create_image(image, 16 * MiB, CLUSTER_SIZE)
    with mounted(image, tmp_path / "mnt", *WRITEBACK) as m:
        fd = os.open(m.raw, os.O_RDWR)
        try:
            assert os.pwrite(fd, b"x" * 4096, 16 * MiB) == 4096
            with pytest.raises(OSError, match="No space left on device"):
                os.fsync(fd)
        finally:
            os.close(fd)
    assert qemu_check(image).returncode == 0
    cp = check_ok(run([qemu_img, "info", "-f", "qed", "--output=json", image]))
    assert json.loads(cp.stdout)["virtual-size"] == 16 * MiB
