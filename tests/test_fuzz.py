"""Mutation fuzzing of QED images at the engine level (reliability.md row D2).

Valid images (made by the engine in several geometries, one hand-built, and two made by
qemu-img/qemu-io) get 1-3 mutations each: a header field or a table entry set to one of
QEMU's image-fuzzer boundary vectors, or a qed.py-style operator (duplicate, invalidate,
NEED_CHECK toggle, zero cluster, self reference, truncation, bit flip).  Each mutant is
opened read-only and read-write and driven through 10 random reads and writes, flush,
check and close, every step under a timeout.  The loop runs in one subprocess limited to
1 GiB of address space; it must report no exception other than a one-line QedError, no
hang, no guest data inside metadata, and a peak RSS below 256 MiB.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import crashsim as cs
import hostile_corpus as hc
import pytest

from support import check_ok, require_tool, run

RSS_LIMIT_KIB = 256 * 1024
SEED = int(os.environ.get("QEDFUSE_FUZZ_SEED", "1"))


def qemu_bases(tmp_path: Path) -> list[str]:
    """Two valid images written by QEMU itself."""
    qemu_img = require_tool("qemu-img")
    qemu_io = require_tool("qemu-io")
    paths = []
    for name, opts, writes in (
        ("qemu-64k.qed", "cluster_size=65536,table_size=4", ["0 70k", "5M 4k", "40M 1M"]),
        ("qemu-4k.qed", "cluster_size=4096,table_size=2", ["0 4k", "4M 12k", "7M 512"]),
    ):
        path = tmp_path / name
        check_ok(run([qemu_img, "create", "-q", "-f", "qed", "-o", opts, path, "64M"]))
        for k, region in enumerate(writes):
            check_ok(run([qemu_io, "-f", "qed", "-c", f"write -P {0x30 + k} {region}", path]))
        paths.append(str(path))
    return paths


def _report(request: pytest.FixtureRequest, title: str, summary: dict[str, Any]) -> None:
    tally = summary["tally"]
    cs.report_figures(
        request.config,
        title,
        [
            f"mutated images: {summary['images']} (from {summary['bases']} valid bases)",
            *(f"{k}: {v}" for k, v in sorted(tally.items())),
            f"problems: {len(summary['problems'])}",
            f"peak RSS: {summary['maxrss_kib'] // 1024} MiB",
            f"elapsed: {summary['elapsed']} s",
        ],
    )


def test_mutation_fuzz(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """≥ 2,000 mutants per run: 0 unexpected exceptions, hangs or metadata writes."""
    bases = qemu_bases(tmp_path)
    summary = hc.run_in_subprocess(
        "fuzz", "--count", "2000", "--seed", str(SEED), "--extra", *bases, timeout=240
    )
    _report(request, "mutation fuzz D2", summary)
    assert summary["problems"] == [], "\n".join(summary["problems"][:40])
    assert summary["images"] >= 2000
    assert summary["tally"]["RO served"] >= 500  # mutants are not all trivially refused
    assert summary["tally"]["RO refused"] >= 200
    assert summary["tally"]["error CorruptionError"] >= 200
    assert summary["maxrss_kib"] < RSS_LIMIT_KIB


@pytest.mark.soak
def test_mutation_fuzz_soak(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """The nightly size: 100,000 mutants."""
    bases = qemu_bases(tmp_path)
    summary = hc.run_in_subprocess(
        "fuzz", "--count", "100000", "--seed", str(SEED + 1), "--extra", *bases, timeout=7200
    )
    _report(request, "mutation fuzz D2 (soak)", summary)
    assert summary["problems"] == [], "\n".join(summary["problems"][:40])
    assert summary["maxrss_kib"] < RSS_LIMIT_KIB
