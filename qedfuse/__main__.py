"""``python -m qedfuse``: the same as the ``qedfuse`` console script."""

from __future__ import annotations

from qedfuse import console_main

console_main()
