"""The base of every component's ``statistics()`` record (engine, L2 cache, I/O, requests).

A record is a frozen dataclass of plain values (ints, floats, strings, None): taking one is a
handful of attribute reads, so ``qedfuse status`` can ask for them at any time, and
:meth:`StatsRecord.to_json` turns one into the dict the control socket sends.
"""

from __future__ import annotations

import dataclasses
from typing import Any, cast


class StatsRecord:
    """Mixin for the ``@dataclass(frozen=True)`` statistics records."""

    __slots__ = ()

    def to_json(self) -> dict[str, Any]:
        """The record as a JSON-ready dict (field name → value)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(cast(Any, self))}


__all__ = ["StatsRecord"]
