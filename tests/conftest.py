"""Project-wide pytest configuration for qedfuse.

- `--run-soak` runs the tests marked `soak`; without it they are skipped with a stated
  reason (an intentional, opt-in skip: soak runs are too long for every `make test`).
- `@pytest.mark.sample(k)` on a parametrized test runs k of its cases, a different draw on
  every run (the seed is in the report header; ``QEDFUSE_SAMPLE_SEED=N`` repeats a run); the
  others are deselected, and counted in the summary.  `--run-soak` (or
  ``QEDFUSE_SAMPLE_SEED=all``) runs every case.  Big variant matrices keep their full
  coverage across runs while `make test` stays within its time budget.
- `qemu_img` / `qemu_io` fixtures return the tool's absolute path (see support.require_tool).
- every test fails on an unexpected WARNING-or-worse log record or logged traceback (see
  logcheck.py); `@pytest.mark.expect_log(r"regex", ...)` or the `expect_log` fixture declare
  the expected ones.
"""

from __future__ import annotations

import logging
import os
import random
from collections import defaultdict
from collections.abc import Callable, Generator, Iterator

import logcheck
import pytest

from support import require_tool, sampled

_SEED_VAR = "QEDFUSE_SAMPLE_SEED"


def pytest_configure(config: pytest.Config) -> None:
    """Fix the run's draw once, in the environment: ``support.sampled`` and the daemons'
    tests read it there, and a rerun with the printed seed repeats the draw."""
    if config.getoption("--run-soak"):
        os.environ[_SEED_VAR] = "all"
    elif not os.environ.get(_SEED_VAR):
        os.environ[_SEED_VAR] = str(random.SystemRandom().randrange(1 << 30))


def _sample_seed(config: pytest.Config) -> int | None:
    """The draw's seed, or None to run every case."""
    text = os.environ.get(_SEED_VAR, "all")
    return None if text == "all" or config.getoption("--run-soak") else int(text)


def pytest_report_header(config: pytest.Config) -> str:
    seed = _sample_seed(config)
    if seed is None:
        return "sampled variant matrices: every case runs"
    return (
        f"sampled variant matrices: seed {seed} (repeat with {_SEED_VAR}={seed}; all: --run-soak)"
    )


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--run-soak",
        action="store_true",
        default=False,
        help="also run the long tests marked `soak` (skipped by default)",
    )


def _sample(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Deselect all but k cases of every test marked ``sample(k)``."""
    seed = _sample_seed(config)
    if seed is None:
        return
    groups: dict[tuple[str, str], list[int]] = defaultdict(list)
    for index, item in enumerate(items):
        marker = item.get_closest_marker("sample")
        if marker is not None and isinstance(item, pytest.Function):
            groups[(item.path.name, item.originalname)].append(index)
    dropped: set[int] = set()
    for (path, name), indexes in sorted(groups.items()):
        (k,) = items[indexes[0]].get_closest_marker("sample").args  # type: ignore[union-attr]
        dropped |= set(indexes) - set(sampled(indexes, k, f"{path}:{name}"))
    if dropped:
        config.hook.pytest_deselected(items=[items[i] for i in sorted(dropped)])
        items[:] = [item for i, item in enumerate(items) if i not in dropped]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    _sample(config, items)
    if config.getoption("--run-soak"):
        return
    skip_soak = pytest.mark.skip(reason="soak test: opt-in, run with --run-soak")
    for item in items:
        if item.get_closest_marker("soak") is not None:
            item.add_marker(skip_soak)


@pytest.fixture(scope="session")
def qemu_img() -> str:
    """Absolute path of qemu-img (skips, or fails under CI, when it is missing)."""
    return require_tool("qemu-img")


@pytest.fixture(scope="session")
def qemu_io() -> str:
    """Absolute path of qemu-io (skips, or fails under CI, when it is missing)."""
    return require_tool("qemu-io")


@pytest.fixture(autouse=True)
def _fail_on_unexpected_log(request: pytest.FixtureRequest) -> Iterator[logcheck.ProblemCollector]:
    """Collect WARNING-or-worse and exception-carrying records; fail on undeclared ones."""
    logcheck.current_expected[:] = [
        pattern for mark in request.node.iter_markers("expect_log") for pattern in mark.args
    ]
    collector = logcheck.ProblemCollector()
    root = logging.getLogger()
    root.addHandler(collector)
    try:
        yield collector
    finally:
        root.removeHandler(collector)
    problems = collector.take_unexpected()
    logcheck.current_expected.clear()
    if problems:
        pytest.fail(logcheck.failure_message("log records", problems), pytrace=False)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, None, None]:
    """Fail the test itself (not only its teardown) on the records logged while it ran."""
    result = yield
    collector = getattr(item, "funcargs", {}).get("_fail_on_unexpected_log")
    if isinstance(collector, logcheck.ProblemCollector):
        problems = collector.take_unexpected()
        if problems:
            pytest.fail(logcheck.failure_message("log records", problems), pytrace=False)
    return result


@pytest.fixture
def expect_log() -> Callable[[str], None]:
    """``expect_log(r"regex")``: declare, at run time, a log record this test expects."""
    return logcheck.current_expected.append
