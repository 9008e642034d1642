"""The log check itself: an undeclared warning or traceback fails a test (tests/logcheck.py)."""

from __future__ import annotations

from pathlib import Path

import logcheck
import pytest

pytest_plugins = ["pytester"]

_CHILD = """
import logging
import pytest

def test_undeclared_warning():
    logging.getLogger("qedfuse.x").warning("disk on fire")

def test_debug_with_traceback():
    logging.getLogger("qedfuse.x").setLevel(logging.DEBUG)  # as setup_logging(debug=True)
    try:
        raise ValueError("hidden")
    except ValueError:
        logging.getLogger("qedfuse.x").debug("swallowed", exc_info=True)

@pytest.mark.expect_log(r"^disk on fire$")
def test_declared_by_marker():
    logging.getLogger("qedfuse.x").warning("disk on fire")

def test_declared_at_run_time(expect_log):
    expect_log(r"^disk on fire$")
    logging.getLogger("qedfuse.x").error("disk on fire")

@pytest.mark.expect_log(r"^other$")
def test_declared_something_else():
    logging.getLogger("qedfuse.x").warning("disk on fire")

def test_info_is_fine():
    logging.getLogger("qedfuse.x").info("all well")
"""


def test_fixture_fails_undeclared_records(pytester: pytest.Pytester) -> None:
    """Undeclared WARNING / exc_info records fail; declared ones and INFO pass."""
    tests = Path(__file__).parent
    pytester.makeconftest((tests / "conftest.py").read_text())
    pytester.makepyfile(_CHILD)
    result = pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", "-p", "no:trio", "-o", f"pythonpath={tests}"
    )
    result.assert_outcomes(passed=3, failed=3)
    result.stdout.fnmatch_lines(["*unexpected log records*", "*WARNING qedfuse.x: disk on fire*"])
    result.stdout.fnmatch_lines(["*DEBUG qedfuse.x: swallowed*", "*ValueError: hidden*"])


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ("qedfuse: serving /m/x.raw", False),
        ("qedfuse: warning: slow disk", True),
        ("qedfuse: error: read failed", True),
        ("2026-01-02 03:04:05.678 WARNING qedfuse.engine: slow disk", True),
        ("2026-01-02 03:04:05.678 4242 ERROR qedfuse.mount: gone", True),
        ("2026-01-02 03:04:05.678 4242 INFO qedfuse.mount: serving", False),
        ("<4>slow disk", True),
        ("<6>serving", False),
        ("Traceback (most recent call last):\n  File 'x', line 1\nValueError: x", True),
    ],
)
def test_daemon_log_levels(line: str, problem: bool) -> None:
    """Every line format logsetup.py writes is classified by its level."""
    assert bool(logcheck.daemon_log_problems(line)) is problem


def test_daemon_log_declared_and_traceback_joined() -> None:
    """A declared warning covers its own traceback lines, and nothing else."""
    log = (
        "qedfuse: serving\n"
        "qedfuse: warning: flush failed\n"
        "Traceback (most recent call last):\n"
        "  File 'engine.py', line 3\n"
        "OSError: [Errno 5] EIO\n"
        "qedfuse: error: second problem\n"
    )
    problems = logcheck.daemon_log_problems(log, [r"warning: flush failed"])
    assert problems == ["qedfuse: error: second problem"]
    journal = "<3>flush failed\n<3>Traceback (most recent call last):\n<3>  File 'e.py'\n<6>ok\n"
    assert len(logcheck.daemon_log_problems(journal)) == 1
    assert logcheck.daemon_log_problems(journal, [r"^<3>flush failed"]) == []
