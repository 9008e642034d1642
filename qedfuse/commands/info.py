"""``qedfuse info``: the header, allocation and backing chain of an image, as
:class:`ImageInfo` (qemu-img info's JSON keys and its human layout)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Final

from qedfuse import format as fmt
from qedfuse.commands.common import absolute
from qedfuse.errors import QedError
from qedfuse.locking import LockMode
from qedfuse.opening import backing_chain, open_top
from qedfuse.tables import read_backing_name

_FEATURE_NAMES: Final = {
    fmt.Feature.BACKING_FILE: "backing-file",
    fmt.Feature.NEED_CHECK: "need-check",
    fmt.Feature.BACKING_FORMAT_NO_PROBE: "backing-format-no-probe",
}


def feature_names(features: int) -> list[str]:
    """Names of the incompatible feature bits; unknown bits as hex."""
    names = [name for bit, name in _FEATURE_NAMES.items() if features & bit]
    unknown = features & ~fmt.KNOWN_FEATURES
    if unknown:
        names.append(f"unknown {unknown:#x}")
    return names


@dataclass
class ImageInfo:
    """What ``qedfuse info`` shows."""

    filename: str
    header: fmt.Header
    file_length: int
    actual_size: int  # st_blocks * 512
    allocated_size: int
    backing_filename: str | None = None
    full_backing_filename: str | None = None
    backing_format: str | None = None  # recorded in the image (raw) or None (probed)
    chain: list[tuple[str, str]] = field(default_factory=list)
    chain_error: str | None = None

    @property
    def dirty(self) -> bool:
        return self.header.need_check

    def to_json(self) -> dict[str, object]:
        """qemu-img info's keys where they apply, plus ``format-specific`` and the chain."""
        h = self.header
        out: dict[str, object] = {
            "virtual-size": h.image_size,
            "filename": self.filename,
            "cluster-size": h.cluster_size,
            "format": "qed",
            "actual-size": self.actual_size,
            "dirty-flag": self.dirty,
        }
        if self.backing_filename is not None:
            out["backing-filename"] = self.backing_filename
            out["full-backing-filename"] = self.full_backing_filename
            if self.backing_format is not None:
                out["backing-filename-format"] = self.backing_format
        out["format-specific"] = {
            "type": "qed",
            "data": {
                "table-size": h.table_size,
                "header-size": h.header_size,
                "features": feature_names(h.features),
                "compat-features": h.compat_features,
                "autoclear-features": h.autoclear_features,
                "l1-table-offset": h.l1_table_offset,
                "allocated-size": self.allocated_size,
                "file-length": self.file_length,
            },
        }
        if self.chain:
            out["backing-chain"] = [{"filename": p, "format": f} for p, f in self.chain]
        if self.chain_error is not None:
            out["backing-chain-error"] = self.chain_error
        return out

    def human_text(self) -> str:
        h = self.header
        cs = h.cluster_size
        lines = [
            f"image: {self.filename}",
            "file format: qed",
            f"virtual size: {human_size(h.image_size)} ({h.image_size} bytes)",
            f"disk size: {human_size(self.actual_size)}",
            f"cluster_size: {cs}",
        ]
        if self.backing_filename is not None:
            line = f"backing file: {self.backing_filename}"
            if self.full_backing_filename != self.backing_filename:
                line += f" (actual path: {self.full_backing_filename})"
            lines.append(line)
            if self.backing_format is not None:
                lines.append(f"backing file format: {self.backing_format}")
            elif len(self.chain) > 1:
                lines.append(f"backing file format: {self.chain[1][1]} (probed)")
        if self.dirty:
            lines.append("cleanly shut down: no")
        lines += [
            "Format specific information:",
            f"    table size: {_plural(h.table_size, 'cluster')} ({h.table_size * cs} bytes each)",
            f"    header size: {_plural(h.header_size, 'cluster')}",
            f"    features: {', '.join(feature_names(h.features)) or 'none'}",
            f"    dirty flag (need check): {'yes' if self.dirty else 'no'}",
            f"    compat features: {h.compat_features:#x}",
            f"    autoclear features: {h.autoclear_features:#x}",
            f"    L1 table offset: {h.l1_table_offset:#x}",
            f"    allocated: {human_size(self.allocated_size)} "
            f"({_plural(self.allocated_size // cs, 'cluster')})",
            f"    file length: {self.file_length} bytes",
        ]
        if len(self.chain) > 1:
            chain = " -> ".join(f"{p} ({f})" for p, f in self.chain)
            lines.append(f"    backing chain: {chain}")
        if self.chain_error is not None:
            lines.append(f"    backing chain: broken: {self.chain_error}")
        return "\n".join(lines) + "\n"


def _plural(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def human_size(size: int) -> str:
    """``644 KiB``, ``1.5 KiB``, ``8 MiB``: three significant digits, next unit from 1000 up."""
    units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"]
    scaled = size * 1024 // 1000
    exp = min((scaled.bit_length() - 1) // 10, len(units) - 1) if scaled > 0 else 0
    return f"{size / (1 << (10 * exp)):.3g} {units[exp]}"


async def info(path: str, *, force_share: bool = False) -> ImageInfo:
    """Read the header, allocation and backing chain of ``path`` without writing anything."""
    mode = LockMode.SHARED if force_share else LockMode.READ_ONLY
    image = await open_top(path, read_only=True, lock_mode=mode, with_backing=False)
    async with image:
        header = image.header
        st = image.file.stat()
        file_length = await image.file.size()
        allocated = await image.allocated_bytes()
        stored = await read_backing_name(image.file, header)
    result = ImageInfo(
        filename=path,
        header=header,
        file_length=file_length,
        actual_size=st.allocated_bytes if st is not None else file_length,
        allocated_size=allocated,
    )
    if stored:
        text = os.fsdecode(stored)
        result.backing_filename = text
        result.full_backing_filename = (
            text if os.path.isabs(text) else os.path.join(os.path.dirname(path), text)
        )
        if header.backing_is_raw:
            result.backing_format = "raw"
        try:
            result.chain = await backing_chain(path)
        except (QedError, OSError) as exc:
            result.chain_error = str(exc)
    else:
        result.chain = [(absolute(path), "qed")]
    return result
