"""qedfuse: expose a QED (QEMU Enhanced Disk) image as a raw file through FUSE."""

from __future__ import annotations

__version__ = "0.1.0"
