"""The idle flusher: NEED_CHECK is cleared soon after allocating writes go quiet."""

from __future__ import annotations

import trio
import trio.testing
from enginehelpers import need_check_on_disk

from qedfuse.imagefile import MemoryImage
from qedfuse.opening import open_image
from qedfuse.tables import create_image


async def test_idle_flush_clears_need_check_after_quiet_period(
    autojump_clock: trio.testing.MockClock,
) -> None:
    file = MemoryImage()
    await create_image(file, 64 * 1024 * 1024, cluster_size=4096)
    img = await open_image(file)
    async with trio.open_nursery() as nursery:
        await nursery.start(img.run_idle_flusher, 5.0)
        await img.write(0, b"a" * 4096)
        assert need_check_on_disk(file)
        await trio.sleep(3)
        await img.write(1 << 20, b"b" * 4096)  # pushes the deadline back
        await trio.sleep(3)
        assert need_check_on_disk(file), "flushed before writes were quiet for 5 s"
        await trio.sleep(3)
        assert not need_check_on_disk(file)
        assert not img.has_dirty_metadata
        # An explicit flush (fsync) in between must not strand the flusher.
        await img.write(2 << 20, b"c" * 4096)
        await trio.sleep(6)
        assert not need_check_on_disk(file)
        await img.write(3 << 20, b"d" * 4096)
        await img.flush()
        await img.write(4 << 20, b"e" * 4096)
        assert need_check_on_disk(file)
        await trio.sleep(6)
        assert not need_check_on_disk(file)
        # Clean state: the flusher waits; an fsync with nothing to do comes in first.
        await img.write(0, b"f" * 4096)  # in place: no metadata change
        await img.flush()
        await img.write(5 << 20, b"g" * 4096)
        assert need_check_on_disk(file)
        await trio.sleep(6)
        assert not need_check_on_disk(file), "idle flusher stranded by an explicit flush"
        nursery.cancel_scope.cancel()
    await img.close()
