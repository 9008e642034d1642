"""Hostile images through the engine (reliability.md §4, matrix rows D1 and E4).

The deterministic corpus of :mod:`hostile_corpus` (≥ 60 images: every iotest 116 case,
every header field at QEMU's fuzz boundary vectors, bad L1 offsets, 1 GiB tables, backing
name tricks, invalid / duplicate / self-referencing table entries, each table case also
with NEED_CHECK set) is opened read-only and read-write, driven with reads, writes, flush,
check and close under timeouts.  Each image is refused with a one-line QedError or served;
nothing else is raised; no guest write lands in metadata; writes through bad entries fail
with CorruptionError.  The whole corpus also runs in a subprocess limited to 1 GiB of
address space, whose peak RSS must stay below 256 MiB.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import Any

import crashsim as cs
import hostile_corpus as hc
import pytest
import trio

from qedfuse import backing, clustermap, engine, opening
from qedfuse import format as fmt
from qedfuse.check import check_image
from qedfuse.errors import BackingFileError, CorruptionError, FailsafeError

HERE = Path(__file__).resolve().parent
RSS_LIMIT_KIB = 256 * 1024
# A read-write engine checks every table before its first write, marking the clusters they
# map in a bitmap of the open-time file (1 bit per cluster): entries spread over the corpus'
# 4 TiB sparse file (4 KiB clusters) may touch all of its 128 MiB.  That is the bound the
# README states (1/32768 of the file's size at 4 KiB clusters), on top of the 256 MiB.
CORPUS_RSS_LIMIT_KIB = RSS_LIMIT_KIB + (4 << 40) // 4096 // 8 // 1024


def run_script(*args: str, timeout: float = 120) -> dict[str, Any]:
    return hc.run_in_subprocess(*args, timeout=timeout)


def test_corpus_covers_the_d1_list(tmp_path: Path) -> None:
    items = hc.corpus()
    names = [item.name for item in items]
    assert len(items) >= 60
    assert len(set(names)) == len(names)
    for required in (
        "116-truncated-header",
        "116-bad-magic",
        "116-cluster-size-ffffffff",
        "116-table-size-ffffffff",
        "116-header-size-ffffffff",
        "116-l1-offset-ffff",
        "116-image-size-ffff",
        "header-size-overflow",
        "features-unknown-0x8",
        "autoclear-unknown-bits",
        "l1-offset-0",
        "l1-offset-unaligned",
        "l1-offset-past-eof",
        "l1-inside-header",
        "table-size-1",
        "tables-64MiBx16",
        "image-size-beyond-coverage",
        "backing-bit-without-name",
        "backing-name-outside-header",
        "l2-entry-to-l1",
        "l2-entry-to-own-table",
        "l2-entry-to-other-table",
        "l2-entry-to-header-cluster-1",
        "l1-duplicate",
        "l2-duplicate-data",
        "l2-entry-to-l1+need-check",
    ):
        assert required in names, required
    fields = {name.split("=")[0] for name in names if name.startswith("field-")}
    assert len(fields) == 11
    built = hc.build_all(tmp_path)
    assert [name for name, _ in built] == names
    for (_, path), item in zip(built, items, strict=True):
        assert os.path.getsize(path) == item.file_size
        with open(path, "rb") as f:
            assert f.read(len(item.data)) == item.data


@pytest.mark.expect_log(
    r"\d+ invalid L\d+ entries; the guest ranges they map will fail with EIO",
    r"entering failsafe mode: \d+ invalid L\d+ entries",
    r"image had NEED_CHECK set; repaired on open: ",
    r"L\d+ table at 0x[0-9a-f]+ has \d+ invalid entries",
    r"entering failsafe mode: L\d+ table at 0x[0-9a-f]+ has \d+ invalid entries",
)
async def test_corpus_in_process(request: pytest.FixtureRequest) -> None:
    """Every corpus image: a clean refusal or a clean serve (details on failure)."""
    with trio.fail_after(240):
        summary = await hc.run_corpus()
    tally = summary["tally"]
    cs.report_figures(
        request.config,
        "hostile images D1 (engine level)",
        [f"images: {summary['images']}", *(f"{k}: {v}" for k, v in sorted(tally.items()))],
    )
    assert not summary["problems"], "\n".join(summary["problems"][:40])
    assert tally["RO refused"] >= 50
    assert tally["RO served"] >= 50
    assert tally["error CorruptionError"] >= 20  # bad entries were really hit


def test_corpus_memory_bounded_in_subprocess(request: pytest.FixtureRequest) -> None:
    """The corpus under RLIMIT_AS = 1 GiB: no failure, peak RSS < 256 MiB (incl. the 4 TiB
    sparse file with NEED_CHECK, whose check keeps one bit per cluster)."""
    summary = run_script("corpus")
    cs.report_figures(
        request.config,
        "hostile images D1 (subprocess, RLIMIT_AS 1 GiB)",
        [
            f"images: {summary['images']}",
            f"peak RSS: {int(summary['maxrss_kib']) // 1024} MiB",
            f"elapsed: {summary['elapsed']} s",
        ],
    )
    assert summary["problems"] == []
    assert int(summary["maxrss_kib"]) < CORPUS_RSS_LIMIT_KIB


def test_check_memory_bounded_on_8tib_sparse_file() -> None:
    """E4: an 8 TiB sparse file with NEED_CHECK set; the open-time check must stay < 256 MiB."""
    summary = run_script("sparse", "--tib", "8")
    assert summary["problems"] == []
    assert int(summary["maxrss_kib"]) < RSS_LIMIT_KIB


@pytest.mark.expect_log(
    r"L\d+ table at 0x[0-9a-f]+ has \d+ invalid entries",
    r"entering failsafe mode: L\d+ table at 0x[0-9a-f]+ has \d+ invalid entries",
)
async def test_self_referencing_entries_never_write_into_metadata() -> None:
    """L2→L1, L2→own table, L2→other table, L2→header: writes fail, target bytes unchanged."""
    base, lay = hc.base_image(header_size=2)
    cs_ = lay.cs
    t2 = struct.unpack_from("<Q", base, lay.l1_offset + 8)[0]
    targets = {"L1": lay.l1_offset, "own L2": lay.l2_offset, "other L2": t2, "header": cs_}
    for label, target in targets.items():
        buf = bytearray(base)
        hc.set_entry(buf, lay.l2_offset, 3, target)
        hc.set_entry(buf, lay.l2_offset, 4, target + cs_ if label != "header" else cs_)
        file = hc.SparseImage(bytes(buf))
        before = file._read_sync(0, file.length)
        img = await opening.open_image(file)
        for pos in (3 * cs_, 3 * cs_ + 100, 4 * cs_, 3 * cs_ - 10):
            # The first touch finds the bad entries (CorruptionError) and puts the image in
            # failsafe; later writes are refused outright (FailsafeError): both are EIO.
            with pytest.raises((CorruptionError, FailsafeError)):
                await img.write(pos, hc.tagged(pos, 64))
        with pytest.raises((CorruptionError, FailsafeError)):
            await img.write_zeroes(3 * cs_, 2 * cs_)
        with pytest.raises(CorruptionError):
            await img.read(3 * cs_, 10)
        assert img.failsafe, label
        # No allocation may grow the file over what a bad entry points at: writes refused.
        with pytest.raises(FailsafeError):
            await img.write(100 * cs_, hc.tagged(1, cs_))
        await img.read(0, 64)  # good ranges are still served
        await img.close()
        after = file._read_sync(0, len(before))
        region = slice(target, target + lay.ts * cs_)
        assert after[region] == before[region], label
        assert after[64:] == before[64:], label  # only the header struct may change …
        assert fmt.Header.unpack(after[:64]).need_check, label  # … to ask for a repair
        assert not hc.guest_data_in_metadata(file), label


@pytest.mark.expect_log(r"image had NEED_CHECK set; repaired on open: ")
async def test_bad_entries_are_repaired_when_need_check_is_set() -> None:
    """With NEED_CHECK set, a read-write open repairs; afterwards the image checks clean."""
    n_cases = 0
    for item in hc.corpus():
        table_case = item.name.startswith(("l1-entry", "l1-dup", "l2-"))
        if not (table_case and item.name.endswith("+need-check")):
            continue
        n_cases += 1
        file = item.file()
        img = await opening.open_image(file)
        await img.write(50 * 4096, hc.tagged(7, 4096))
        await img.close()
        report = await check_image(file.copy(read_only=True))
        assert report.corruptions == 0, (item.name, report)
        assert not report.need_check, (item.name, report)
        assert not hc.guest_data_in_metadata(file), item.name
    assert n_cases >= 20


def test_protocol_backing_names_are_refused() -> None:
    """json:/nbd: names, NUL bytes and invalid UTF-8 never become paths."""
    labels = {"json", "nbd", "nul", "not-utf8", "absolute", "dotdot"}
    seen = set()
    for item in hc.corpus():
        label = item.name.removeprefix("backing-name-")
        if label not in labels:
            continue
        seen.add(label)
        header = fmt.Header.unpack(item.data)
        raw = item.data[header.backing_filename_offset :][: header.backing_filename_size]
        if label in ("json", "nbd", "nul", "not-utf8"):
            with pytest.raises(BackingFileError) as info:
                backing.resolve_backing_name(raw, "/srv/images/x.qed")
            assert "\n" not in str(info.value)
        else:  # plain paths are followed by default (binding decision 7)
            assert isinstance(backing.resolve_backing_name(raw, "/srv/images/x.qed"), str)
    assert seen == labels


@pytest.mark.expect_log(
    r"file was changed by someone else \(before the flush\): its L\d+ table was overwritten"
)
async def test_harness_detects_an_engine_that_writes_through_bad_entries(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Self-test: with L2 validation switched off, the corpus must report problems."""

    async def trust_everything(self: object, entries: object) -> set[int]:
        return set()

    monkeypatch.setattr(clustermap.ClusterMap, "_validate_l2", trust_everything)
    items = [i for i in hc.corpus() if i.name.startswith("l2-entry-to-") and "+" not in i.name]
    summary = await hc.run_corpus(items)
    problems = summary["problems"]
    assert any("did not fail" in p for p in problems), problems
    assert any("guest data written into metadata" in p for p in problems), problems


# --------------------------------------------------------------------------- findings


async def _grow_past(img: engine.QedImage, n_clusters: int, first_guest_cluster: int) -> None:
    """Allocate clusters (growing the file), unless the engine refuses writes (failsafe)."""
    cs_ = img.cluster_size
    for k in range(n_clusters):
        try:
            await img.write((first_guest_cluster + k) * cs_, hc.tagged(1000 + k, cs_))
        except FailsafeError:
            assert img.failsafe
            return


@pytest.mark.expect_log(
    r"\d+ invalid L\d+ entries; the guest ranges they map will fail with EIO",
    r"entering failsafe mode: \d+ invalid L\d+ entries",
    r"image had NEED_CHECK set; repaired on open: ",
)
async def test_past_eof_l1_entry_is_not_revived_by_growth() -> None:
    base, lay = hc.base_image()
    cs_ = lay.cs
    n = len(base)
    hc.set_entry(base, lay.l1_offset, 2, n + 2 * cs_)  # L1[2]: two clusters past EOF
    file = hc.SparseImage(bytes(base))
    img = await opening.open_image(file)
    await _grow_past(img, 6, 10)  # guest clusters 10-15 land at n .. n+6cs
    expected = await img.read(10 * cs_, 6 * cs_)
    await img.close()  # acknowledged
    img = await opening.open_image(file)
    try:
        assert await img.read(10 * cs_, 6 * cs_) == expected
    finally:
        await img.close()


@pytest.mark.expect_log(
    r"L\d+ table at 0x[0-9a-f]+ has \d+ invalid entries",
    r"entering failsafe mode: L\d+ table at 0x[0-9a-f]+ has \d+ invalid entries",
    r"image had NEED_CHECK set; repaired on open: ",
)
async def test_past_eof_l2_entry_does_not_alias_new_data() -> None:
    base, lay = hc.base_image(second_table=False)
    cs_ = lay.cs
    n = len(base)
    hc.set_entry(base, lay.l2_offset, 5, n + cs_)  # guest cluster 5 -> one cluster past EOF
    file = hc.SparseImage(bytes(base))
    img = await opening.open_image(file)
    await _grow_past(img, 3, 20)  # guest cluster 21's data lands at n + cs
    expected = await img.read(21 * cs_, cs_)
    await img.close()
    img = await opening.open_image(file)
    try:
        try:
            await img.write(5 * cs_, b"\x55" * cs_)
        except (CorruptionError, FailsafeError):
            pass  # refusing the hostile entry is fine
        assert await img.read(21 * cs_, cs_) == expected
    finally:
        await img.close()
