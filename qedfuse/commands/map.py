"""``qedfuse map``: the guest mapping of an image through its backing chain, as
:class:`MapEntry` runs in qemu-img map's JSON and human layouts."""

from __future__ import annotations

from dataclasses import dataclass

from qedfuse.backing import RawImage
from qedfuse.commands.common import WINDOW_SIZE, chain_layers
from qedfuse.engine import GuestSource, Kind, QedImage
from qedfuse.locking import LockMode
from qedfuse.opening import open_top


@dataclass(slots=True)
class MapEntry:
    """One run of ``qedfuse map`` (qemu-img map's fields)."""

    start: int
    length: int
    depth: int
    present: bool
    zero: bool
    data: bool
    offset: int | None
    filename: str

    def to_json(self) -> dict[str, object]:
        out: dict[str, object] = {
            "start": self.start,
            "length": self.length,
            "depth": self.depth,
            "present": self.present,
            "zero": self.zero,
            "data": self.data,
        }
        if self.offset is not None:
            out["offset"] = self.offset
        return out


def _continues(last_offset: int | None, last_length: int, offset: int | None) -> bool:
    """Both without a host offset, or the second host range right after the first."""
    if last_offset is None or offset is None:
        return last_offset is None and offset is None
    return last_offset + last_length == offset


class _MapBuilder:
    def __init__(self, layers: list[tuple[GuestSource, str]]) -> None:
        self.layers = layers
        self.entries: list[MapEntry] = []

    def emit(
        self,
        start: int,
        length: int,
        depth: int,
        *,
        present: bool,
        zero: bool,
        data: bool,
        offset: int | None = None,
    ) -> None:
        if length <= 0:
            return
        filename = self.layers[depth][1]
        last = self.entries[-1] if self.entries else None
        if (
            last is not None
            and last.start + last.length == start
            and (last.depth, last.present, last.zero, last.data, last.filename)
            == (depth, present, zero, data, filename)
            and (last.offset is None) == (offset is None)
            and (
                offset is None or (last.offset is not None and last.offset + last.length == offset)
            )
        ):
            last.length += length
            return
        self.entries.append(MapEntry(start, length, depth, present, zero, data, offset, filename))

    async def walk(self, depth: int, pos: int, end: int) -> None:
        source = self.layers[depth][0]
        if isinstance(source, RawImage):
            raw_end = min(end, source.image_size)
            for p, n, is_data in source.file.data_ranges(pos, raw_end):
                self.emit(p, n, depth, present=True, zero=not is_data, data=is_data, offset=p)
            self.emit(raw_end, end - raw_end, depth, present=False, zero=True, data=False)
            return
        assert isinstance(source, QedImage)
        for ext in await source.extents(pos, end - pos):
            ext_end = ext.pos + ext.length
            if ext.kind is Kind.DATA:
                self.emit(
                    ext.pos, ext.length, depth, present=True, zero=False, data=True,
                    offset=ext.host_offset,
                )  # fmt: skip
            elif ext.kind is Kind.ZERO:
                self.emit(ext.pos, ext.length, depth, present=True, zero=True, data=False)
            elif depth + 1 < len(self.layers):
                backing_end = min(ext_end, self.layers[depth + 1][0].image_size)
                if ext.pos < backing_end:
                    await self.walk(depth + 1, ext.pos, backing_end)
                start = max(ext.pos, backing_end)
                self.emit(start, ext_end - start, depth, present=False, zero=True, data=False)
            else:
                self.emit(ext.pos, ext.length, depth, present=False, zero=True, data=False)


async def map_image(path: str, *, force_share: bool = False) -> list[MapEntry]:
    """The guest mapping of ``path`` through its whole backing chain, like ``qemu-img map``."""
    mode = LockMode.SHARED if force_share else LockMode.READ_ONLY
    image = await open_top(path, read_only=True, lock_mode=mode)
    async with image:
        builder = _MapBuilder(await chain_layers(image, path))
        pos = 0
        while pos < image.image_size:
            end = min(image.image_size, pos + WINDOW_SIZE)
            await builder.walk(0, pos, end)
            pos = end
        return builder.entries


def map_json(entries: list[MapEntry]) -> str:
    """``qemu-img map --output=json``'s layout: one object per line in a JSON list."""
    import json

    def line(entry: MapEntry) -> str:
        body = ", ".join(f"{json.dumps(k)}: {json.dumps(v)}" for k, v in entry.to_json().items())
        return "{ " + body + "}"

    return "[" + ",\n".join(line(e) for e in entries) + "]\n"


def map_human(entries: list[MapEntry]) -> str:
    """qemu-img map's table: only ranges with data, with their host offset and file."""

    def hexnum(value: int) -> str:
        return f"{value:#x}" if value else "0"

    lines = [f"{'Offset':<16}{'Length':<16}{'Mapped to':<16}File"]
    for e in entries:
        if e.data and not e.zero:
            lines.append(
                f"{hexnum(e.start):<16}{hexnum(e.length):<16}{hexnum(e.offset or 0):<16}"
                f"{e.filename}"
            )
    return "\n".join(lines) + "\n"
