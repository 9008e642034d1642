"""Crash-consistency and fault-injection harness for the engine (tests only).

reliability.md §3.7 ("CrashMonkey-lite") and §3.4 (SQLite crash VFS), in process:

* :class:`RecordingBackend` wraps a :class:`~qedfuse.imagefile.BlockFile`, does the real I/O
  and logs ``('W', offset, bytes)``, ``('T', size)``, ``('F',)`` (one per ``fdatasync``).
  The workload driver adds ``('ACK', n)`` when a flush (or close) returns: guest operations
  ``0 .. n-1`` were issued before that flush began, so they are acknowledged.  ``('OP', id)``
  marks the start of guest operation ``id`` (annotation only).
* :func:`crash_states` turns the initial bytes plus the log into crash states: for every
  barrier epoch ``k``, all operations of epochs ``< k`` plus a subset of epoch ``k``'s writes
  (every subset up to 10 writes, else sampled), and the torn, zeroed-append and garbage
  variants.  A state's crash point is the end of its epoch (just before the next ``F``
  completes), so every ``ACK`` logged before that point is in force.
* :func:`check_state` runs the checker of §3.7 on one state: (a) opens or a defined refusal,
  (b) NEED_CHECK clear ⇒ no corruption, (c) repair leaves no corruption, (d) the per-sector
  durability oracle, plus the design's ordering invariant (no corruption at all unless
  garbage hit metadata).
* :class:`FaultyBackend` raises a chosen exception at the k-th call of one kind.
* :func:`reference_check` is an independent, pure re-implementation of QEMU's QED check used
  to cross-check ``qedfuse.check``.

Everything here is a test fake; the real thing (qemu-img) is used alongside it by the tests.
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
import struct
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import trio
from enginehelpers import Wrapper

from qedfuse import engine, opening, tables
from qedfuse import format as fmt
from qedfuse.errors import CorruptionError, FormatError, QedError
from qedfuse.imagefile import BlockFile, Buffer, MemoryImage

SECTOR = 512
ZERO_SECTOR = bytes(SECTOR)
#: Seconds any single engine step of the checker may take before it counts as a hang.
STEP_TIMEOUT = 20.0

LogEntry = tuple[Any, ...]


# --------------------------------------------------------------------------- backends


class RecordingBackend(Wrapper):
    """A BlockFile that performs I/O on ``inner`` and logs every write, truncate and sync.

    ``aclose`` does not close ``inner``, so a workload can close and reopen the image on the
    same recording.
    """

    def __init__(self, inner: BlockFile, log: list[LogEntry] | None = None) -> None:
        super().__init__(inner)
        self.log: list[LogEntry] = [] if log is None else log
        self.closed = False

    async def pwrite(self, offset: int, data: Buffer) -> None:
        payload = bytes(data)
        await self.inner.pwrite(offset, payload)
        self.log.append(("W", offset, payload))

    async def fdatasync(self) -> None:
        await self.inner.fdatasync()
        self.log.append(("F",))

    async def ftruncate(self, size: int) -> None:
        await self.inner.ftruncate(size)
        self.log.append(("T", size))

    async def aclose(self) -> None:
        self.closed = True

    def ack(self, n_ops: int) -> None:
        """Guest operations ``0 .. n_ops-1`` are acknowledged (a flush just returned)."""
        self.log.append(("ACK", n_ops))

    def mark(self, *entry: Any) -> None:
        self.log.append(entry)


FAULT_OPS = ("pwrite", "fdatasync", "pread", "ftruncate")


class FaultyBackend(Wrapper):
    """A BlockFile that raises ``make_exc()`` at the ``fail_at``-th call of ``fail_op``.

    The failing call does nothing (it fails before touching ``inner``).  With ``sticky`` every
    later call of that kind fails too.  ``counts`` tallies calls per kind (a dry run with
    ``fail_op=None`` gives the number of injection points).
    """

    def __init__(
        self,
        inner: BlockFile,
        fail_op: str | None = None,
        fail_at: int = 0,
        make_exc: Callable[[], BaseException] | None = None,
        *,
        sticky: bool = False,
    ) -> None:
        super().__init__(inner)
        self.fail_op = fail_op
        self.fail_at = fail_at
        self.make_exc = make_exc
        self.sticky = sticky
        self.counts: Counter[str] = Counter()
        self.fired = 0
        self.armed = True

    def _maybe_fail(self, op: str) -> None:
        self.counts[op] += 1
        if not self.armed or op != self.fail_op or self.make_exc is None:
            return
        n = self.counts[op]
        if n == self.fail_at or (self.sticky and n > self.fail_at):
            self.fired += 1
            raise self.make_exc()

    async def pread(self, offset: int, size: int) -> bytes:
        self._maybe_fail("pread")
        return await self.inner.pread(offset, size)

    async def pwrite(self, offset: int, data: Buffer) -> None:
        self._maybe_fail("pwrite")
        await self.inner.pwrite(offset, data)

    async def fdatasync(self) -> None:
        self._maybe_fail("fdatasync")
        await self.inner.fdatasync()

    async def ftruncate(self, size: int) -> None:
        self._maybe_fail("ftruncate")
        await self.inner.ftruncate(size)


# --------------------------------------------------------------------------- crash states


@dataclass(frozen=True)
class CrashState:
    """One simulated post-crash image."""

    data: bytes
    epoch: int
    variant: str  # "subset" | "torn" | "zeroed-append" | "garbage"
    #: Guest operations with an id below this were acknowledged before the crash.
    acked: int
    #: Host byte ranges ``(start, end)`` overwritten with garbage.
    garbage: tuple[tuple[int, int], ...] = ()


@dataclass
class _Epoch:
    ops: list[LogEntry]
    acked: int


def split_epochs(log: Sequence[LogEntry], initial_acked: int = 0) -> list[_Epoch]:
    """Split a log at its ``F`` entries; each epoch carries the ACK level in force at its end.

    An ACK follows the last ``F`` of its flush, so it is logged inside a later epoch and is
    in force at that epoch's crash point (its end).
    """
    epochs: list[_Epoch] = []
    current: list[LogEntry] = []
    acked = initial_acked
    for entry in log:
        tag = entry[0]
        if tag in ("W", "T"):
            current.append(entry)
        elif tag == "F":
            epochs.append(_Epoch(current, acked))
            current = []
        elif tag == "ACK":
            acked = max(acked, entry[1])
    epochs.append(_Epoch(current, acked))
    return epochs


def sector_writes(initial: bytes, log: Sequence[LogEntry]) -> list[LogEntry]:
    """The log with every write widened to whole 512-byte sectors, as a disk sees it.

    A sub-sector ``pwrite`` only changes the page cache; what reaches the disk is the whole
    sector as the cache holds it after the write (so a later write to the same sector carries
    the earlier one's bytes).  The last sector is clipped at the end of the file.
    """
    cache = bytearray(initial)
    out: list[LogEntry] = []
    for entry in log:
        if entry[0] == "W":
            offset, data = entry[1], entry[2]
            end = offset + len(data)
            apply_ops(cache, [entry])
            start = offset - offset % SECTOR
            stop = min(len(cache), -(-end // SECTOR) * SECTOR)
            out.append(("W", start, bytes(cache[start:stop])))
        elif entry[0] == "T":
            apply_ops(cache, [entry])
            out.append(entry)
        else:
            out.append(entry)
    return out


Outcome = str | tuple[str, int]  # "apply" | "drop" | "zero" | "garbage" | ("torn", n_sectors)


def _sectors(offset: int, size: int) -> tuple[int, int]:
    first = offset // SECTOR
    last = (offset + size - 1) // SECTOR if size else first - 1
    return first, last


def apply_ops(
    buf: bytearray,
    ops: Sequence[LogEntry],
    outcomes: Sequence[Outcome] | None = None,
    rng: random.Random | None = None,
    garbage: list[tuple[int, int]] | None = None,
) -> None:
    """Apply ``ops`` to ``buf`` in log order, each with its outcome (default: apply all)."""
    for index, entry in enumerate(ops):
        outcome = "apply" if outcomes is None else outcomes[index]
        if outcome == "drop":
            continue
        if entry[0] == "T":
            size = entry[1]
            if size < len(buf):
                del buf[size:]
            else:
                buf.extend(bytes(size - len(buf)))
            continue
        offset: int = entry[1]
        data: bytes = entry[2]
        end = offset + len(data)
        if outcome == "apply":
            if end > len(buf):
                buf.extend(bytes(end - len(buf)))
            buf[offset:end] = data
        elif outcome == "zero":  # zeroed append: the size persists, the data does not
            if end > len(buf):
                buf.extend(bytes(end - len(buf)))
        elif outcome == "garbage":  # random bytes over the write's existing sectors
            assert rng is not None
            first, last = _sectors(offset, len(data))
            g_start = first * SECTOR
            g_end = min((last + 1) * SECTOR, len(buf))
            if g_end > g_start:
                buf[g_start:g_end] = rng.randbytes(g_end - g_start)
                if garbage is not None:
                    garbage.append((g_start, g_end))
        elif isinstance(outcome, tuple) and outcome[0] == "torn":
            first, _last = _sectors(offset, len(data))
            stop = min(end, (first + outcome[1]) * SECTOR)
            if stop > len(buf):
                buf.extend(bytes(stop - len(buf)))
            buf[offset:stop] = data[: stop - offset]
        else:  # pragma: no cover - programming error
            raise ValueError(f"bad outcome {outcome!r}")


def crash_states(
    initial: bytes,
    log: Sequence[LogEntry],
    *,
    initial_acked: int = 0,
    exhaustive_max: int = 10,
    n_sampled: int = 200,
    variants: bool = True,
    seed: int = 0,
) -> Iterator[CrashState]:
    """Every crash state of ``log`` over ``initial`` (deduplicated), epoch by epoch."""
    rng = random.Random(seed)
    seen: set[tuple[bytes, int, tuple[tuple[int, int], ...]]] = set()
    base = bytearray(initial)
    for k, epoch in enumerate(split_epochs(sector_writes(initial, log), initial_acked)):
        ops = epoch.ops
        n = len(ops)
        plans: list[tuple[str, list[Outcome]]] = []
        if n <= exhaustive_max:
            for mask in range(1 << n):
                plans.append(("subset", ["apply" if mask >> i & 1 else "drop" for i in range(n)]))
        else:
            plans.append(("subset", ["drop"] * n))
            plans.append(("subset", ["apply"] * n))
            for _ in range(n_sampled):
                plans.append(("subset", [rng.choice(("apply", "drop")) for _ in range(n)]))
        if variants:
            base_size = len(base)
            for i, entry in enumerate(ops):
                if entry[0] != "W":
                    continue
                offset, data = entry[1], entry[2]
                first, last = _sectors(offset, len(data))
                specials: list[tuple[str, Outcome]] = []
                n_sect = last - first + 1
                for m in sorted({1, n_sect // 2, n_sect - 1}):
                    if 1 <= m < n_sect:
                        specials.append(("torn", ("torn", m)))
                if offset + len(data) > base_size:
                    specials.append(("zeroed-append", "zero"))
                if offset < base_size:
                    specials.append(("garbage", "garbage"))
                for name, special in specials:
                    # the others: none, those logged before it (in-order persistence), all
                    for others in ("none", "before", "all"):
                        outcomes: list[Outcome] = []
                        for j in range(n):
                            if j == i:
                                outcomes.append(special)
                            elif others == "all" or (others == "before" and j < i):
                                outcomes.append("apply")
                            else:
                                outcomes.append("drop")
                        plans.append((name, outcomes))
        for name, outcomes in plans:
            buf = bytearray(base)
            garbage: list[tuple[int, int]] = []
            apply_ops(buf, ops, outcomes, rng, garbage)
            data_bytes = bytes(buf)
            key = (
                hashlib.blake2b(data_bytes, digest_size=16).digest(),
                epoch.acked,
                tuple(garbage),
            )
            if key in seen:
                continue
            seen.add(key)
            yield CrashState(data_bytes, k, name, epoch.acked, tuple(garbage))
        apply_ops(base, ops)


def sqlite_crash_state(
    initial: bytes,
    log: Sequence[LogEntry],
    n_sync: int,
    rng: random.Random,
    *,
    initial_acked: int = 0,
) -> CrashState:
    """SQLite's crash VFS: crash at the ``n_sync``-th sync (mod the number of epochs).

    Every write pending since the previous sync is independently written, dropped, or (for
    writes over existing sectors) overwritten with garbage.
    """
    epochs = split_epochs(sector_writes(initial, log), initial_acked)
    k = n_sync % len(epochs)
    base = bytearray(initial)
    for epoch in epochs[:k]:
        apply_ops(base, epoch.ops)
    size = len(base)
    outcomes: list[Outcome] = []
    for entry in epochs[k].ops:
        choices = ["apply", "drop"]
        if entry[0] == "W" and entry[1] < size:
            choices.append("garbage")
        outcomes.append(rng.choice(choices))
    garbage: list[tuple[int, int]] = []
    apply_ops(base, epochs[k].ops, outcomes, rng, garbage)
    variant = "garbage" if garbage else "subset"
    return CrashState(bytes(base), k, variant, epochs[k].acked, tuple(garbage))


# --------------------------------------------------------------------------- dm-log-writes format

DM_LOG_MAGIC = 0x6A736677736872
DM_FLUSH, DM_FUA, DM_DISCARD, DM_MARK = 1, 2, 4, 8


def parse_dm_log_entries(raw: bytes) -> list[list[LogEntry]]:
    """A dm-log-writes log (QEMU's ``blklogwrites`` writes the same format), one crashsim
    log fragment per log entry.

    Superblock ``<QQQI`` (magic, version, nr_entries, sector size) in sector 0, then one
    512-byte ``<QQQQ`` entry header (sector, nr_sectors, flags, data_len) per entry, a WRITE's
    data following in ``nr_sectors`` sectors.  FUA writes become a write plus a sync.
    """
    magic, _version, n_entries, sector_size = struct.unpack_from("<QQQI", raw, 0)
    if magic != DM_LOG_MAGIC:
        raise ValueError("not a dm-log-writes log")
    out: list[list[LogEntry]] = []
    pos = sector_size
    for _ in range(n_entries):
        sector, n_sectors, flags, _data_len = struct.unpack_from("<QQQQ", raw, pos)
        pos += sector_size
        part: list[LogEntry] = []
        if flags & DM_FLUSH:
            part.append(("F",))
        if n_sectors and not flags & (DM_DISCARD | DM_MARK):
            part.append(("W", sector * sector_size, raw[pos : pos + n_sectors * sector_size]))
            if flags & DM_FUA:
                part.append(("F",))
        if not flags & DM_DISCARD:
            pos += n_sectors * sector_size
        out.append(part)
    return out


def parse_dm_log(raw: bytes) -> list[LogEntry]:
    """:func:`parse_dm_log_entries`, flattened."""
    return [entry for part in parse_dm_log_entries(raw) for entry in part]


def dm_log_entries(raw: bytes) -> int:
    """``nr_entries`` of a dm-log-writes superblock (0 while the log is still empty)."""
    if len(raw) < 28:
        return 0
    return int(struct.unpack_from("<QQQI", raw, 0)[2])


def write_dm_log(log: Sequence[LogEntry]) -> bytes:
    """Our log in dm-log-writes format (writes are padded to whole sectors; ACKs dropped)."""
    parts = [b""]
    n = 0
    for entry in log:
        if entry[0] == "W":
            offset, data = entry[1], entry[2]
            if offset % SECTOR:
                raise ValueError("dm-log-writes needs sector-aligned writes; use sector_writes")
            padded = data + bytes(-len(data) % SECTOR)
            header = struct.pack("<QQQQ", offset // SECTOR, len(padded) // SECTOR, 0, len(data))
            parts.append(header.ljust(SECTOR, b"\0") + padded)
            n += 1
        elif entry[0] == "F":
            parts.append(struct.pack("<QQQQ", 0, 0, DM_FLUSH, 0).ljust(SECTOR, b"\0"))
            n += 1
    parts[0] = struct.pack("<QQQI", DM_LOG_MAGIC, 1, n, SECTOR).ljust(SECTOR, b"\0")
    return b"".join(parts)


# --------------------------------------------------------------------------- reference check


@dataclass
class RefCheck:
    """Result of :func:`reference_check` (QEMU's counters)."""

    refused: str | None = None
    need_check: bool = False
    corruptions: int = 0
    corruptions_fixed: int = 0
    leaks: int = 0
    repaired: bytes | None = None


def reference_check(data: bytes, *, repair: bool = False) -> RefCheck:
    """QEMU's QED check (qed-format.md §6.1) on image bytes, with exact integer math.

    With ``repair`` invalid L1/L2 entries are zeroed and NEED_CHECK cleared when no
    corruption remains; the repaired bytes are returned in ``repaired``.
    """
    header = fmt.Header.unpack(data[: fmt.HEADER_STRUCT_SIZE])
    try:
        geo = fmt.validate_header(header, len(data))
    except FormatError as exc:
        return RefCheck(refused=str(exc))
    out = bytearray(data) if repair else None
    result = RefCheck(need_check=header.need_check)
    cs, ts = geo.cluster_size, geo.table_size
    file_size = geo.round_down(len(data))
    used: set[int] = set()
    l1_offset = header.l1_table_offset
    for k in range(ts):
        used.add(l1_offset // cs + k)
    l1 = fmt.decode_table(data[l1_offset : l1_offset + geo.table_bytes])
    l1_fixed = False
    for l1_index, l2_offset in enumerate(l1):
        if l2_offset == 0:
            continue
        if not geo.is_table_offset(l2_offset, file_size):
            if out is not None:
                l1[l1_index] = 0
                l1_fixed = True
                result.corruptions_fixed += 1
            else:
                result.corruptions += 1
            continue
        clusters = [l2_offset // cs + k for k in range(ts)]
        overlap = sum(1 for c in clusters if c in used)
        if overlap:
            result.corruptions += overlap
            continue
        used.update(clusters)
        l2 = fmt.decode_table(data[l2_offset : l2_offset + geo.table_bytes])
        l2_fixed = False
        for l2_index, value in enumerate(l2):
            if value <= fmt.ZERO_CLUSTER:
                continue
            if not geo.is_cluster_offset(value, file_size):
                if out is not None:
                    l2[l2_index] = 0
                    l2_fixed = True
                    result.corruptions_fixed += 1
                else:
                    result.corruptions += 1
                continue
            c = value // cs
            if c in used:
                result.corruptions += 1
            else:
                used.add(c)
        if out is not None and l2_fixed:
            out[l2_offset : l2_offset + geo.table_bytes] = fmt.encode_table(l2)
    if out is not None and l1_fixed:
        out[l1_offset : l1_offset + geo.table_bytes] = fmt.encode_table(l1)
    first = max(header.header_size, 1)
    result.leaks = sum(1 for c in range(first, file_size // cs) if c not in used)
    if out is not None:
        if result.corruptions == 0 and header.need_check:
            cleared = header.replace(features=header.features & ~fmt.Feature.NEED_CHECK)
            out[: fmt.HEADER_STRUCT_SIZE] = cleared.pack()
        result.repaired = bytes(out)
    return result


# --------------------------------------------------------------------------- checker

CheckFn = Callable[[BlockFile, bool], Awaitable[Any]]


def load_check_image() -> CheckFn | None:
    """``qedfuse.check.check_image`` as ``f(file, repair)``, or None before it exists."""
    try:
        from qedfuse.check import check_image
    except ImportError:
        return None

    async def run(file: BlockFile, repair: bool) -> Any:
        return await check_image(file, repair=repair)

    return run


async def reference_check_fn(file: BlockFile, repair: bool) -> RefCheck:
    """:func:`reference_check` behind the ``check_image`` calling convention."""
    data = await file.pread(0, await file.size())
    result = reference_check(data, repair=repair)
    if result.repaired is not None and result.repaired != data:
        await file.pwrite(0, result.repaired)
        await file.fdatasync()
    return result


@dataclass
class Oracle:
    """Guest content per 512-byte sector after each guest operation (the durability model)."""

    image_size: int
    #: sector -> [(op id, content after that op)] in op order
    versions: dict[int, list[tuple[int, bytes]]] = field(default_factory=dict)
    #: what never-written sectors read: the backing image's bytes (zeros past its end)
    base: bytes = b""

    @classmethod
    def build(
        cls, image_size: int, writes: Sequence[tuple[int, int, bytes]], base: bytes = b""
    ) -> Oracle:
        """``writes``: ``(op_id, pos, data)`` guest writes (write_zeroes as zero data)."""
        oracle = cls(image_size, base=base)
        model: dict[int, bytearray] = {}
        for op_id, pos, data in writes:
            if not data:
                continue
            first, last = _sectors(pos, len(data))
            for s in range(first, last + 1):
                sector = model.setdefault(s, bytearray(oracle.base_sector(s)))
                lo = max(pos, s * SECTOR)
                hi = min(pos + len(data), (s + 1) * SECTOR)
                sector[lo - s * SECTOR : hi - s * SECTOR] = data[lo - pos : hi - pos]
                oracle.versions.setdefault(s, []).append((op_id, bytes(sector)))
        return oracle

    def base_sector(self, sector: int) -> bytes:
        if sector * SECTOR >= len(self.base):
            return ZERO_SECTOR
        return self.base[sector * SECTOR : (sector + 1) * SECTOR].ljust(SECTOR, b"\0")

    def allowed(self, sector: int, acked: int) -> list[bytes]:
        """Contents a sector may show when ops below ``acked`` are acknowledged."""
        durable = self.base_sector(sector)
        later: list[bytes] = []
        for op_id, content in self.versions.get(sector, ()):
            if op_id < acked:
                durable = content
            else:
                later.append(content)
        return [durable, *later]

    def regions(self) -> list[tuple[int, int]]:
        """Merged byte ranges of all sectors any write touched."""
        out: list[tuple[int, int]] = []
        for s in sorted(self.versions):
            if out and out[-1][1] == s * SECTOR:
                out[-1] = (out[-1][0], (s + 1) * SECTOR)
            else:
                out.append((s * SECTOR, (s + 1) * SECTOR))
        return out


@dataclass
class Violation:
    kind: str
    detail: str

    def __str__(self) -> str:
        return f"{self.kind}: {self.detail}"


#: Violation kinds: the requirement each one breaks.
VIOLATION_KINDS = {
    "open_refused": "(a) a state without metadata garbage was refused",
    "open_exception": "(a) open raised something other than a FormatError, or hung",
    "clean_corrupt": "(b) NEED_CHECK clear but the check finds corruption",
    "ordering": "design: corruption without garbage (metadata before what it points to)",
    "repair_fail": "(c) corruption remains after repair, or repair/reads failed",
    "durability": "(d) an acknowledged sector reads back wrong",
    "foreign": "(d) a never-written sector reads non-zero",
    "checker_mismatch": "qedfuse.check and the reference check disagree",
    "unexpected": "an unexpected exception in the checker run",
}


@dataclass
class StateResult:
    violations: list[Violation] = field(default_factory=list)
    need_check: bool = False
    refused: bool = False
    corrupt_before_repair: bool = False
    leaks: int = 0
    metadata_garbage: bool = False
    repaired: bytes | None = None


@dataclass(frozen=True)
class Layout:
    """Where guest data lives in the host file (host cluster offset -> guest cluster pos)."""

    cluster_size: int
    data_map: dict[int, int]


async def layout_of(img: engine.QedImage) -> Layout:
    """The data mapping of a live engine (data clusters never move)."""
    cs = img.cluster_size
    data_map: dict[int, int] = {}
    for ext in await img.extents():
        if ext.kind is engine.Kind.DATA and ext.host_offset is not None:
            for k in range(0, ext.length, cs):
                data_map[ext.host_offset - ext.pos % cs + k] = ext.pos - ext.pos % cs + k
    return Layout(cs, data_map)


def _classify_garbage(state: CrashState, layout: Layout) -> tuple[bool, set[int]]:
    """(garbage hit metadata?, guest sectors whose data got garbage)."""
    cs = layout.cluster_size
    metadata = False
    relaxed: set[int] = set()
    for start, end in state.garbage:
        for cluster in range(start - start % cs, end, cs):
            guest = layout.data_map.get(cluster)
            if guest is None:
                metadata = True
                continue
            lo = max(start, cluster)
            hi = min(end, cluster + cs)
            for s in range((guest + lo - cluster) // SECTOR, (guest + hi - cluster) // SECTOR):
                relaxed.add(s)
    return metadata, relaxed


async def verify_view(
    img: engine.QedImage, oracle: Oracle, acked: int, relaxed: set[int]
) -> list[Violation]:
    """The durability oracle (d) on an open image."""
    out: list[Violation] = []
    for start, end in oracle.regions():
        view = await img.read(start, end - start)
        for s in range(start // SECTOR, end // SECTOR):
            if s in relaxed:
                continue
            got = view[s * SECTOR - start : (s + 1) * SECTOR - start]
            allowed = oracle.allowed(s, acked)
            if got not in allowed:
                acked_write = any(op_id < acked for op_id, _ in oracle.versions[s])
                kind = "durability" if acked_write else "foreign"
                out.append(
                    Violation(
                        kind,
                        f"guest sector {s} (pos {s * SECTOR}) reads {got[:8].hex()}…, expected "
                        f"one of {[a[:8].hex() for a in allowed]} (acked ops < {acked})",
                    )
                )
                if len(out) >= 4:
                    return out
    for ext in await img.extents():
        if ext.kind is engine.Kind.UNALLOCATED:
            continue  # zeros, or the backing image: what never-written sectors read anyway
        if ext.kind is engine.Kind.ZERO and ext.pos >= len(oracle.base):
            continue
        view = await img.read(ext.pos, ext.length)
        if not oracle.base and view.count(0) == len(view):
            continue
        for s in range(ext.pos // SECTOR, (ext.pos + ext.length + SECTOR - 1) // SECTOR):
            if s in oracle.versions or s in relaxed:
                continue
            lo = max(s * SECTOR, ext.pos) - ext.pos
            hi = min((s + 1) * SECTOR, ext.pos + ext.length) - ext.pos
            base = oracle.base_sector(s)[lo + ext.pos - s * SECTOR :][: hi - lo]
            if view[lo:hi] != base:
                out.append(
                    Violation(
                        "foreign",
                        f"never-written guest sector {s} ({ext.kind.value}) does not read "
                        "the backing image / zeros",
                    )
                )
                return out
    return out


class MemoryBacking:
    """A raw backing image in memory (a :class:`~qedfuse.engine.GuestSource`)."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    @property
    def image_size(self) -> int:
        return len(self.data)

    async def read_padded(self, pos: int, size: int) -> bytes:
        await trio.lowlevel.checkpoint()
        return self.data[pos : pos + size].ljust(size, b"\0")

    async def aclose(self) -> None:
        pass


def _backing(data: bytes | None) -> MemoryBacking | None:
    return None if data is None else MemoryBacking(data)


def _corruptions(report: Any) -> int:
    return int(report.corruptions) + int(getattr(report, "check_errors", 0))


async def check_state(
    state: CrashState,
    oracle: Oracle,
    layout: Layout,
    *,
    check_fn: CheckFn | None = None,
    cross_check: bool = True,
    ordering: bool = True,
    backing: bytes | None = None,
) -> StateResult:
    """Run checks (a)-(d) on one crash state; ``check_fn`` defaults to ``qedfuse.check``.

    ``ordering`` also asserts qedfuse's design invariant (no corruption at all without
    garbage); switch it off for logs of other writers (QEMU does not order data before L2).
    """
    result = StateResult()
    metadata_garbage, relaxed = _classify_garbage(state, layout)
    result.metadata_garbage = metadata_garbage
    check = check_fn or load_check_image() or reference_check_fn
    v = result.violations
    try:
        # (a) read-only open, then a full mapping walk
        try:
            with trio.fail_after(STEP_TIMEOUT):
                ro_file = MemoryImage(state.data, read_only=True)
                ro = await opening.open_image(ro_file, read_only=True, backing=_backing(backing))
        except FormatError as exc:
            result.refused = True
            if not metadata_garbage:
                v.append(Violation("open_refused", f"read-only open refused: {exc}"))
            try:
                with trio.fail_after(STEP_TIMEOUT):
                    rw = await opening.open_image(
                        MemoryImage(state.data), backing=_backing(backing)
                    )
                v.append(Violation("open_exception", "read-write open accepted what RO refused"))
                await rw.close()
            except FormatError:
                pass
            return result
        result.need_check = ro.header.need_check
        try:
            with trio.fail_after(STEP_TIMEOUT):
                await ro.extents()
        except CorruptionError as exc:
            if not result.need_check:
                v.append(Violation("clean_corrupt", f"read-only mapping walk: {exc}"))
        await ro.close()

        # (b) check without repair
        with trio.fail_after(STEP_TIMEOUT):
            report = await check(MemoryImage(state.data), False)
        corrupt = _corruptions(report)
        result.corrupt_before_repair = corrupt > 0
        result.leaks = int(report.leaks)
        if corrupt and not result.need_check:
            v.append(Violation("clean_corrupt", f"NEED_CHECK clear, check: {report}"))
        elif corrupt and not state.garbage and ordering:
            v.append(Violation("ordering", f"corruption without garbage: {report}"))
        if cross_check and check is not reference_check_fn:
            ref = reference_check(state.data)
            leaks_differ = ref.corruptions == 0 and ref.leaks != result.leaks
            if (ref.corruptions > 0) != (corrupt > 0) or leaks_differ:
                v.append(
                    Violation(
                        "checker_mismatch",
                        f"qedfuse.check {report} vs reference corruptions={ref.corruptions} "
                        f"leaks={ref.leaks}",
                    )
                )

        # (c) repair through a read-write open, then (d) through that open
        mem = MemoryImage(state.data)
        if check is reference_check_fn and result.need_check:
            with trio.fail_after(STEP_TIMEOUT):
                await reference_check_fn(mem, True)
        options = engine.OpenOptions(repair_on_open=check is not reference_check_fn)
        with trio.fail_after(STEP_TIMEOUT):
            rw = await opening.open_image(mem, options=options, backing=_backing(backing))
        try:
            if not metadata_garbage:
                with trio.fail_after(STEP_TIMEOUT):
                    v.extend(await verify_view(rw, oracle, state.acked, relaxed))
        except CorruptionError as exc:
            v.append(Violation("repair_fail", f"guest read after repair: {exc}"))
        with trio.fail_after(STEP_TIMEOUT):
            await rw.close()
        with trio.fail_after(STEP_TIMEOUT):
            after = await check(MemoryImage(mem.data), False)
        if _corruptions(after) or fmt.Header.unpack(bytes(mem.data)).need_check:
            v.append(Violation("repair_fail", f"after repair and close: {after}"))
        result.repaired = bytes(mem.data)
    except FormatError as exc:
        v.append(Violation("open_exception", f"read-write open refused after RO open: {exc}"))
    except trio.TooSlowError:
        v.append(Violation("open_exception", "a step hung (timeout)"))
    except QedError as exc:
        v.append(Violation("unexpected", f"{type(exc).__name__}: {exc}"))
    except Exception as exc:
        v.append(Violation("unexpected", f"{type(exc).__name__}: {exc!r}"))
    return result


# --------------------------------------------------------------------------- workloads

GuestOp = tuple[Any, ...]  # ("write", pos, data) | ("zeroes", pos, size) | ("flush",) | ("reopen",)


@dataclass
class Recording:
    """A recorded workload: what the crash-state generator and the checker need."""

    initial: bytes
    log: list[LogEntry]
    initial_acked: int
    oracle: Oracle
    layout: Layout
    image_size: int
    n_ops: int
    #: the raw backing image, if the workload ran on an overlay
    backing: bytes | None = None


def pattern(op_id: int, size: int, seed: int = 0) -> bytes:
    """Distinct, never-zero-sector data for guest op ``op_id``."""
    rng = random.Random(op_id * 1_000_003 + seed)
    data = bytearray(rng.randbytes(size))
    for i in range(0, size, 64):
        data[i] = 0xA0 | (op_id & 0x0F)
    return bytes(data)


async def record_workload(
    ops: Sequence[GuestOp],
    *,
    image_size: int = 8 * 1024 * 1024,
    cluster_size: int = 4096,
    table_size: int = 2,
    prefill: Sequence[tuple[int, bytes]] = (),
    seed: int = 0,
    backing: bytes | None = None,
) -> Recording:
    """Create an image (with ``prefill`` written, flushed and closed), then record ``ops``.

    The image is not closed at the end: the last epoch is a crash with unflushed state.
    ``("write", pos, size)`` with an int third item writes :func:`pattern` data.
    """
    mem = MemoryImage()
    await tables.create_image(
        mem,
        image_size,
        cluster_size=cluster_size,
        table_size=table_size,
        backing_name=b"base.raw" if backing is not None else b"",
        backing_raw=True,
    )
    oracle_writes: list[tuple[int, int, bytes]] = []
    op_id = 0
    if prefill:
        img = await opening.open_image(mem, backing=_backing(backing))
        for pos, data in prefill:
            await img.write(pos, data)
            oracle_writes.append((op_id, pos, data))
            op_id += 1
        await img.close()
    initial = bytes(mem.data)
    initial_acked = op_id
    rec = RecordingBackend(mem)
    img = await opening.open_image(rec, backing=_backing(backing))
    n_ops = op_id
    for op in ops:
        rec.mark("OP", op_id)
        kind = op[0]
        if kind == "write":
            data = op[2] if isinstance(op[2], bytes) else pattern(op_id, op[2], seed)
            oracle_writes.append((op_id, op[1], data))
            await img.write(op[1], data)
        elif kind == "zeroes":
            oracle_writes.append((op_id, op[1], bytes(op[2])))
            await img.write_zeroes(op[1], op[2])
        elif kind == "flush":
            await img.flush()
            rec.ack(op_id)
        elif kind == "reopen":
            await img.close()
            rec.ack(op_id)
            img = await opening.open_image(rec, backing=_backing(backing))
        else:
            raise ValueError(f"unknown op {op!r}")
        op_id += 1
        n_ops = op_id
    layout = await layout_of(img)
    return Recording(
        initial,
        rec.log,
        initial_acked,
        Oracle.build(image_size, oracle_writes, backing or b""),
        layout,
        image_size,
        n_ops,
        backing,
    )


# --------------------------------------------------------------------------- figures


@dataclass
class Figures:
    """Counters a run reports (and its tests assert on)."""

    counts: Counter[str] = field(default_factory=Counter)
    violations: list[tuple[str, str]] = field(default_factory=list)

    def add_result(self, state: CrashState, result: StateResult, label: str = "") -> None:
        c = self.counts
        c["states"] += 1
        c[f"variant:{state.variant}"] += 1
        if result.refused:
            c["refused (metadata garbage)"] += 1
        if result.need_check:
            c["need_check set"] += 1
        if result.corrupt_before_repair:
            c["corrupt before repair"] += 1
        if result.leaks:
            c["with leaks"] += 1
            if not result.need_check:
                c["leaks with NEED_CHECK clear"] += 1
        if result.metadata_garbage:
            c["metadata garbage (durability not asserted)"] += 1
        for violation in result.violations:
            c[f"violation:{violation.kind}"] += 1
            if len(self.violations) < 50:
                self.violations.append((label, str(violation)))

    @property
    def n_violations(self) -> int:
        return sum(n for k, n in self.counts.items() if k.startswith("violation:"))

    def lines(self) -> list[str]:
        return [f"{k}: {n}" for k, n in sorted(self.counts.items())]


async def replay(
    recording: Recording,
    figures: Figures,
    *,
    label: str = "",
    check_fn: CheckFn | None = None,
    keep: Callable[[CrashState, StateResult], None] | None = None,
    ordering: bool = True,
    extra_garbage: tuple[tuple[int, int], ...] = (),
    **gen_args: Any,
) -> None:
    """Generate and check every crash state of ``recording``.

    ``extra_garbage``: garbage already in ``recording.initial`` (when replaying a repair of
    a crash state), carried into every derived state.
    """
    for state in crash_states(
        recording.initial, recording.log, initial_acked=recording.initial_acked, **gen_args
    ):
        if extra_garbage:
            state = dataclasses.replace(state, garbage=extra_garbage + state.garbage)
        result = await check_state(
            state,
            recording.oracle,
            recording.layout,
            check_fn=check_fn,
            ordering=ordering,
            backing=recording.backing,
        )
        figures.add_result(state, result, label)
        if keep is not None:
            keep(state, result)


class FigureReport:
    """A pytest plugin printing collected figures in the terminal summary (``-s`` or not)."""

    name = "qedfuse-figures"

    def __init__(self) -> None:
        self.sections: dict[str, list[str]] = {}

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        for title, lines in self.sections.items():
            terminalreporter.section(title)
            for line in lines:
                terminalreporter.write_line(line)


def report_figures(config: Any, title: str, lines: Sequence[str]) -> None:
    """Print ``lines`` under ``title`` now and in pytest's terminal summary."""
    plugin = config.pluginmanager.get_plugin(FigureReport.name)
    if plugin is None:
        plugin = FigureReport()
        config.pluginmanager.register(plugin, FigureReport.name)
    plugin.sections[title] = list(lines)
    print(f"== {title}")
    for line in lines:
        print(line)


__all__ = [
    "FAULT_OPS",
    "CrashState",
    "FaultyBackend",
    "FigureReport",
    "Figures",
    "Layout",
    "MemoryBacking",
    "Oracle",
    "RecordingBackend",
    "RefCheck",
    "StateResult",
    "Violation",
    "apply_ops",
    "check_state",
    "crash_states",
    "layout_of",
    "load_check_image",
    "parse_dm_log",
    "parse_dm_log_entries",
    "pattern",
    "record_workload",
    "reference_check",
    "replay",
    "report_figures",
    "sector_writes",
    "split_epochs",
    "sqlite_crash_state",
    "write_dm_log",
]
