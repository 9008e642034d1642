"""Smoke test for `make bench` (bench/): keeps the harness from rotting without running it.

Runs ``python -m bench --quick --jobs=1`` against the raw-file target only (no FUSE, no
qemu), in a scratch directory, and checks the JSON and Markdown it writes.  The real bench is
not part of `make test`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from support import check_ok, require_tool, run

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(60)
def test_bench_quick_raw_only(tmp_path: Path) -> None:
    require_tool("fio")
    out = tmp_path / "out"
    disk = tmp_path / "disk"
    cp = run(
        [
            sys.executable,
            "-m",
            "bench",
            "--quick",
            "--jobs=1",
            "--targets=raw",
            "--fs=disk",
            f"--disk-dir={disk}",
            f"--out={out}",
            "--no-micro",
            "--no-memory",
            "--no-install",
        ],
        cwd=REPO,
        timeout=50,
    )
    check_ok(cp)
    data = json.loads((out / "latest.json").read_text())
    assert data["errors"] == []
    [rec] = data["records"]
    assert rec["job"] == "seq-write"
    assert rec["target"] == "raw"
    assert rec["error"] is None
    assert rec["value"] > 0
    assert rec["io_bytes"] == data["meta"]["sizes"]["seq_size"]
    assert rec["p50_ns"] > 0
    md = (out / "latest.md").read_text()
    assert "| seq-write | MB/s |" in md
    assert "fio --name=seq-write" in md
    # the scratch directory (and the raw file in it) is removed afterwards
    assert list(disk.iterdir()) == []


def test_bench_report_marks_failures(monkeypatch: pytest.MonkeyPatch) -> None:
    """A failed job must show up as FAILED and in the error list, never as a number."""
    monkeypatch.syspath_prepend(str(REPO))  # bench/ is not installed; tests/ is the path
    from bench.report import markdown

    results = {
        "meta": {
            "argv": [],
            "machine": {"date": "d"},
            "versions": {},
            "sizes": {
                "image_size": 1,
                "seq_size": 1 << 20,
                "n_random_ios": 1,
                "random_runtime_s": 1,
                "verify_size": 1 << 20,
            },
            "drop_caches": "ok",
            "targets": {"qedfuse": "qedfuse mount -f IMG MNT"},
            "rounds": 1,
        },
        "jobs": [{"name": "verify", "title": "t", "unit": "MB/s"}],
        "filesystems": {"disk": {"dir": "/x", "type": "ext4"}},
        "records": [
            {
                "fs": "disk",
                "round": 0,
                "target": "qedfuse",
                "job": "verify",
                "value": 123.0,
                "error": "fio exited 1: verify: bad header",
            }
        ],
        "checks": [],
        "fio_commands": {},
        "errors": ["disk r1 qedfuse verify: fio exited 1: verify: bad header"],
        "known_failures": [],
    }
    md = markdown(results)
    assert "| verify | MB/s | FAILED x1 |" in md
    assert "123" not in md.split("## Results")[1]
    assert "## ⚠ Errors" in md
