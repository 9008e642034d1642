"""Hypothesis state machine: the engine against a bytearray-like model, on several geometries.

Every rule runs with ``trio.run`` on an image held in a MemoryImage.  Rules: write (any
position/length, crossing cluster and L2 boundaries; pattern, zero or mostly-zero data),
write_zeroes, read (compared with the model), flush (then an independent raw-bytes walk:
every entry valid, no cluster used twice, nothing overlapping metadata, no leaks, guest
view equal to the model; and ``check_image`` reports 0 corruptions, 0 leaks), reopen and
resize (grow).  The ``soak`` variant runs many more examples (``--run-soak``).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import pytest
import trio
from enginehelpers import (
    MiB,
    Model,
    PatternSource,
    assert_matches_model,
    header_of,
    new_image,
    pattern,
    raw,
    reopen,
    walk,
)
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from qedfuse import format as fmt
from qedfuse.check import check_image
from qedfuse.engine import OpenOptions, QedImage
from qedfuse.imagefile import MemoryImage

T = TypeVar("T")


def run(fn: Callable[..., Awaitable[T]], *args: Any) -> T:
    return trio.run(fn, *args)


@dataclass(frozen=True)
class Geometry:
    name: str
    cs: int
    ts: int
    size: int
    backing_size: int | None = None  # a fake backing image (position pattern) of this size
    max_size: int = 64 * MiB  # resize cap for this run
    cache_size: int = 8 * MiB

    @property
    def l2_coverage(self) -> int:
        return fmt.Geometry(self.cs, self.ts).l2_coverage


GEOMETRIES = [
    # ts=1: 2 MiB per L2 table; image size not a multiple of the cluster size
    Geometry("cs4k-ts1", 4096, 1, 5 * MiB + 1536, cache_size=2 * 4096),
    # ts=2: 4 MiB per L2 table
    Geometry("cs4k-ts2", 4096, 2, 9 * MiB),
    # ts=16: 32 MiB per L2 table
    Geometry("cs4k-ts16", 4096, 16, 33 * MiB + 512, max_size=70 * MiB),
    # default table size with 64 KiB clusters (2 GiB per L2 table: crossed only after a
    # resize past 2 GiB; the model and the image file are sparse)
    Geometry("cs64k-ts4", 65536, 4, 3 * MiB + 1536, max_size=2048 * MiB + 3 * MiB),
    # with a backing image (shorter than the image): COW fill, zero clusters, resize hiding
    Geometry("cs4k-ts2-backing", 4096, 2, 6 * MiB + 512, backing_size=4 * MiB + 1000),
]


def make_machine(geo: Geometry) -> type[RuleBasedStateMachine]:
    class EngineMachine(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            self.backing = PatternSource(geo.backing_size, fill=None) if geo.backing_size else None
            self.options = OpenOptions(cache_size=geo.cache_size)
            self.img: QedImage = run(self._new)
            self.model = Model(
                geo.size,
                base=self.backing.content if self.backing else None,
                base_limit=geo.backing_size or 0,
            )
            self.n_flushes = 0

        async def _new(self) -> QedImage:
            return await new_image(
                geo.size,
                geo.cs,
                geo.ts,
                backing=self.backing,
                backing_name=b"base.raw" if self.backing else b"",
                options=self.options,
            )

        # ------------------------------------------------------------ strategies

        def _pos(self, data: st.DataObject) -> int:
            size = self.img.image_size
            cs = geo.cs
            anchor = data.draw(
                st.one_of(
                    st.integers(0, size - 1),
                    st.integers(0, max(0, (size - 1) // geo.l2_coverage)).map(
                        lambda k: k * geo.l2_coverage
                    ),
                    st.integers(0, (size - 1) // cs).map(lambda k: k * cs),
                    st.just(size),
                ),
                label="anchor",
            )
            delta = data.draw(
                st.one_of(st.just(0), st.integers(-3 * cs, 3 * cs), st.integers(-600, 600)),
                label="delta",
            )
            return min(max(anchor + delta, 0), size - 1)

        def _range(self, data: st.DataObject) -> tuple[int, int]:
            pos = self._pos(data)
            cs = geo.cs
            length = data.draw(
                st.one_of(
                    st.integers(1, 700),
                    st.integers(1, 3 * cs + 700),
                    st.sampled_from([cs, 2 * cs, 4 * cs, 512]),
                ),
                label="length",
            )
            return pos, min(length, self.img.image_size - pos)

        def _payload(self, data: st.DataObject, pos: int, size: int) -> bytes:
            kind = data.draw(st.sampled_from(["pattern", "zeros", "sparse"]), label="kind")
            if kind == "zeros":
                return bytes(size)
            seed = data.draw(st.integers(0, 250), label="seed")
            if kind == "pattern":
                return pattern(pos, size, seed)
            # mostly zeros: a short non-zero run somewhere (per-cluster zero detection)
            at = data.draw(st.integers(0, size - 1), label="at")
            n = min(size - at, data.draw(st.integers(1, 64), label="n"))
            return bytes(at) + pattern(pos + at, n, seed) + bytes(size - at - n)

        # ------------------------------------------------------------ rules

        @rule(data=st.data())
        def write(self, data: st.DataObject) -> None:
            pos, size = self._range(data)
            payload = self._payload(data, pos, size)
            run(self.img.write, pos, payload)
            self.model.write(pos, payload)

        @rule(data=st.data())
        def write_zeroes(self, data: st.DataObject) -> None:
            pos, size = self._range(data)
            run(self.img.write_zeroes, pos, size)
            self.model.write(pos, bytes(size))

        @rule(data=st.data())
        def read(self, data: st.DataObject) -> None:
            pos, size = self._range(data)
            size = data.draw(st.sampled_from([size, size + 5000]), label="read_size")
            got = run(self.img.read, pos, size)
            assert got == self.model.read(pos, size)

        @rule()
        def flush(self) -> None:
            run(self.img.flush)
            self.n_flushes += 1
            self._assert_on_disk_consistent()

        @rule()
        def reopen(self) -> None:
            self.img = run(self._reopen)
            self._assert_on_disk_consistent()

        async def _reopen(self) -> QedImage:
            return await reopen(self.img, backing=self.backing, options=self.options)

        @precondition(lambda self: self.img.image_size < geo.max_size)
        @rule(data=st.data())
        def resize(self, data: st.DataObject) -> None:
            size = self.img.image_size
            next_table = (size // geo.l2_coverage + 1) * geo.l2_coverage
            new_size = data.draw(
                st.one_of(
                    st.integers(1, 4096).map(lambda k: size + 512 * k),
                    st.integers(0, 64).map(lambda k: next_table + 512 * k),
                ),
                label="new_size",
            )
            new_size = min(new_size, geo.max_size)
            run(self.img.resize, new_size)
            self.model.resize(new_size)
            assert self.img.image_size == new_size
            assert header_of(raw(self.img))[8] == new_size

        @invariant()
        def allocator_at_end_of_file(self) -> None:
            # Every appended cluster is written whole; tables come whole at flush time.
            assert len(raw(self.img)) <= self.img.allocator_end

        def teardown(self) -> None:
            if not self.img._closed:
                run(self.img.close)
            self._assert_on_disk_consistent()

        # ------------------------------------------------------------ checks

        def _assert_on_disk_consistent(self) -> None:
            data = raw(self.img)
            w = walk(data)
            assert not w.need_check, "NEED_CHECK still set after a complete flush"
            assert w.corruptions == []
            assert w.leaks == []
            assert len(data) % geo.cs == 0
            assert w.image_size == self.model.size
            assert_matches_model(data, w, self.model)
            report = run(check_image, MemoryImage(data, read_only=True))
            assert (report.corruptions, report.leaks, report.check_errors) == (0, 0, 0)

    EngineMachine.__name__ = EngineMachine.__qualname__ = f"EngineMachine_{geo.name}"
    return EngineMachine


CI_SETTINGS = settings(
    max_examples=80,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
SOAK_SETTINGS = settings(
    max_examples=2000,
    stateful_step_count=80,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@pytest.mark.parametrize("geo", GEOMETRIES, ids=[g.name for g in GEOMETRIES])
def test_engine_state_machine(geo: Geometry) -> None:
    run_state_machine_as_test(make_machine(geo), settings=CI_SETTINGS)


@pytest.mark.soak
@pytest.mark.timeout(3600)
@pytest.mark.parametrize("geo", GEOMETRIES, ids=[g.name for g in GEOMETRIES])
def test_engine_state_machine_soak(geo: Geometry) -> None:
    run_state_machine_as_test(make_machine(geo), settings=SOAK_SETTINGS)


def test_model_and_walk_catch_a_wrong_byte() -> None:
    """The oracle is not vacuous: one flipped data byte or a dangling entry is reported."""

    async def main() -> None:
        img = await new_image(1 * MiB, 4096, 2)
        model = Model(1 * MiB)
        data = pattern(5000, 3000, 1)
        await img.write(5000, data)
        model.write(5000, data)
        await img.close()
        image = raw(img)
        w = walk(image)
        assert_matches_model(image, w, model)
        host = w.mapping[1]
        image[host + 1000] ^= 0xFF
        with pytest.raises(AssertionError, match="guest cluster 1"):
            assert_matches_model(image, walk(image), model)
        image[host + 1000] ^= 0xFF
        image.extend(bytes(4096))  # an unreferenced cluster
        assert walk(image).leaks == [len(image) - 4096]
        l2 = walk(image).l2_tables[0]
        image[l2 + 8 : l2 + 16] = (len(image) + 4096).to_bytes(8, "little")
        assert len(walk(image).corruptions) == 1

    trio.run(main)
