"""The test machine has every tool the suite relies on.

Under CI (`CI=true`) a missing tool fails here, loudly, instead of silently skipping the
interop and mount tests elsewhere.  Locally it skips with the tool's name.
"""

from __future__ import annotations

import importlib.metadata
import os

import pytest

from support import check_ok, require_fuse, require_tool, run

TOOLS = [
    "qemu-img",
    "qemu-io",
    "qemu-storage-daemon",
    "fio",
    "mkfs.ext4",
    "e2fsck",
    "fusermount3",
]


@pytest.mark.parametrize("tool", TOOLS)
def test_tool_installed(tool: str) -> None:
    path = require_tool(tool)
    assert os.path.isabs(path)
    assert os.access(path, os.X_OK)


def test_qemu_img_supports_qed(qemu_img: str) -> None:
    cp = check_ok(run([qemu_img, "--help"]))
    assert " qed " in cp.stdout.split("Supported formats:", 1)[-1] + " "


def test_fuse_available() -> None:
    require_fuse()


def test_python_dependencies_import() -> None:
    import pyfuse3
    import trio

    assert pyfuse3.__version__
    assert trio.__version__


def _major_minor(dist: str) -> tuple[int, int]:
    major, minor = importlib.metadata.version(dist).split(".")[:2]
    return int(major), int(minor)


def test_python_dependency_versions() -> None:
    assert (3, 4) <= _major_minor("pyfuse3") < (4, 0)
    assert _major_minor("trio") >= (0, 25)
