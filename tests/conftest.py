"""Project-wide pytest configuration for qedfuse.

- `--run-soak` runs the tests marked `soak`; without it they are skipped with a stated
  reason (an intentional, opt-in skip: soak runs are too long for every `make test`).
- `qemu_img` / `qemu_io` fixtures return the tool's absolute path (see support.require_tool).
"""

from __future__ import annotations

import pytest

from support import require_tool


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--run-soak",
        action="store_true",
        default=False,
        help="also run the long tests marked `soak` (skipped by default)",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
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
