"""Locks on every level of a backing chain, qedfuse against QEMU, QEMU as the oracle.

Every case builds a chain ``top.qed -> base`` (base raw or QED), lets one *holder* keep
``top`` or ``base`` open, and runs every *action* against ``top`` and ``base``.  The expected
outcome of each (holder, action, target) is not written down here: it is what QEMU 7.2 does
to QEMU, measured in the same test by running the QEMU equivalent of the holder (qemu-io,
qemu-io -r, qemu-io on a fresh overlay) and the QEMU equivalent of the action (qemu-img
resize for qedfuse resize, qemu-io for a read-write mount, ...).  qedfuse must then give the
same ok/refused outcome in both directions, and a qedfuse holder must leave the same bytes
in /proc/locks as its QEMU equivalent on every file of the chain.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from clifork import ForkedCli
from fusehelpers import QEDFUSE, mounted, wait_until
from test_locking import locked_bytes

from support import check_ok, describe, require_tool, run

pytestmark = [pytest.mark.fuse, pytest.mark.qemu]

SIZE = "4M"
OK, LOCKED = "ok", "locked"


@dataclass
class Chain:
    """``top.qed`` over ``base`` in ``root``, plus an unrelated QED image to convert from."""

    root: Path
    base_fmt: str

    @property
    def top(self) -> Path:
        return self.root / "top.qed"

    @property
    def base(self) -> Path:
        return self.root / f"base.{self.base_fmt}"

    @property
    def overlay(self) -> Path:
        return self.root / "over.qed"

    @property
    def source(self) -> Path:
        return self.root / "src.qed"

    def path(self, which: str) -> Path:
        return self.top if which == "top" else self.base

    def fmt(self, which: str) -> str:
        return "qed" if which == "top" else self.base_fmt

    def files(self) -> dict[str, Path]:
        return {"top": self.top, "base": self.base, "overlay": self.overlay}


def make_chain(root: Path, base_fmt: str) -> Chain:
    qemu_img = require_tool("qemu-img")
    root.mkdir(parents=True)
    chain = Chain(root, base_fmt)
    check_ok(run([qemu_img, "create", "-f", base_fmt, chain.base, SIZE]))
    check_ok(run([qemu_img, "create", "-f", "qed", "-b", chain.base, "-F", base_fmt, chain.top]))
    check_ok(run([qemu_img, "create", "-f", "qed", chain.source, SIZE]))
    return chain


# ---------------------------------------------------------------------------- holders


@contextlib.contextmanager
def _process_holding(cmd: list[str], files: list[Path]) -> Iterator[None]:
    """Run ``cmd`` (it waits on stdin) until the block ends; wait until it locks ``files``."""
    proc = subprocess.Popen(
        cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:

        def holding() -> bool:
            if proc.poll() is not None:
                assert proc.stderr is not None
                raise AssertionError(f"{cmd[0]} exited early: {proc.stderr.read()!r}")
            return all(100 in locked_bytes(f) for f in files)

        wait_until(holding, 20, f"{cmd[0]} to lock {files}")
        yield
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _chain_of(chain: Chain, held: str) -> list[Path]:
    return [chain.top, chain.base] if held == "top" else [chain.base]


def _hold_qemu_io(
    chain: Chain, held: str, *, read_only: bool
) -> contextlib.AbstractContextManager[None]:
    flags = ["-r"] if read_only else []
    cmd = [require_tool("qemu-io"), *flags, "-f", chain.fmt(held), str(chain.path(held))]
    return _process_holding(cmd, _chain_of(chain, held))


def _hold_qemu_overlay(chain: Chain, held: str) -> contextlib.AbstractContextManager[None]:
    """qemu-io read-write on a new overlay of the held image (what ``--overlay`` mounts)."""
    check_ok(
        run(
            [require_tool("qemu-img"), "create", "-f", "qed", "-b", chain.path(held),
             "-F", chain.fmt(held), chain.overlay]
        )
    )  # fmt: skip
    cmd = [require_tool("qemu-io"), "-f", "qed", str(chain.overlay)]
    return _process_holding(cmd, [chain.overlay, *_chain_of(chain, held)])


def _hold_qsd(chain: Chain, held: str) -> contextlib.AbstractContextManager[None]:
    """qemu-storage-daemon exporting the held image read-write over NBD (a unix socket)."""
    path = chain.path(held)
    cmd = [
        require_tool("qemu-storage-daemon"),
        "--blockdev", f"driver=file,node-name=f,filename={path}",
        "--blockdev", f"driver={chain.fmt(held)},node-name=q,file=f",
        "--nbd-server", f"addr.type=unix,addr.path={chain.root / 'nbd.sock'}",
        "--export", "type=nbd,id=e,node-name=q,writable=on",
    ]  # fmt: skip
    return _process_holding(cmd, _chain_of(chain, held))


@contextlib.contextmanager
def _hold_mount(chain: Chain, held: str, *opts: str) -> Iterator[None]:
    with mounted(chain.path(held), chain.root / "holder-mnt", *opts):
        yield


@contextlib.contextmanager
def _hold_overlay_mount(chain: Chain, held: str) -> Iterator[None]:
    with mounted(
        chain.path(held),
        chain.root / "holder-mnt",
        "--overlay",
        str(chain.overlay),
        raw_name="over.raw",
    ):
        yield


Holder = Callable[[Chain, str], contextlib.AbstractContextManager[None]]

#: holder name -> (how to hold, name of its QEMU equivalent: the oracle)
HOLDERS: dict[str, tuple[Holder, str]] = {
    "qemu-io": (lambda c, h: _hold_qemu_io(c, h, read_only=False), "qemu-io"),
    "qemu-io -r": (lambda c, h: _hold_qemu_io(c, h, read_only=True), "qemu-io -r"),
    "qemu-io overlay": (_hold_qemu_overlay, "qemu-io overlay"),
    "qemu-storage-daemon": (_hold_qsd, "qemu-storage-daemon"),
    "mount rw": (lambda c, h: _hold_mount(c, h), "qemu-io"),
    "mount ro": (lambda c, h: _hold_mount(c, h, "-o", "ro"), "qemu-io -r"),
    "mount --overlay": (_hold_overlay_mount, "qemu-io overlay"),
}

# ---------------------------------------------------------------------------- actions


@pytest.fixture(scope="module", autouse=True)
def _close_cli() -> Iterator[None]:
    yield
    _cli.close()


_cli = ForkedCli()


def _qemu_write(c: Chain, t: str) -> subprocess.CompletedProcess[str]:
    return run([require_tool("qemu-io"), "-f", c.fmt(t), "-c", "write -P 0x44 0 64k", c.path(t)])


def _qemu_resize(c: Chain, t: str) -> subprocess.CompletedProcess[str]:
    return run([require_tool("qemu-img"), "resize", "-f", c.fmt(t), c.path(t), "+1M"])


def _qemu_commit(c: Chain, t: str) -> subprocess.CompletedProcess[str]:
    return run([require_tool("qemu-img"), "commit", "-d", "-f", "qed", c.path(t)])


def _qemu_check(c: Chain, t: str) -> subprocess.CompletedProcess[str]:
    return run([require_tool("qemu-img"), "check", "-r", "all", "-f", "qed", c.path(t)])


def _qemu_info(c: Chain, t: str) -> subprocess.CompletedProcess[str]:
    return run([require_tool("qemu-img"), "info", "-f", c.fmt(t), c.path(t)])


def _qemu_create(c: Chain, t: str) -> subprocess.CompletedProcess[str]:
    return run([require_tool("qemu-img"), "create", "-f", "qed", c.path(t), SIZE])


def _qemu_convert(c: Chain, t: str) -> subprocess.CompletedProcess[str]:
    return run([require_tool("qemu-img"), "convert", "-O", "qed", c.source, c.path(t)])


def _qf_resize(c: Chain, t: str) -> subprocess.CompletedProcess[str]:
    return _cli("resize", c.path(t), "+1M")


def _qf_commit(c: Chain, t: str) -> subprocess.CompletedProcess[str]:
    return _cli("commit", c.path(t))


def _qf_check(c: Chain, t: str) -> subprocess.CompletedProcess[str]:
    return _cli("check", "-r", "all", c.path(t))


def _qf_info(c: Chain, t: str) -> subprocess.CompletedProcess[str]:
    return _cli("info", c.path(t))


def _qf_create(c: Chain, t: str) -> subprocess.CompletedProcess[str]:
    return _cli("create", "--force", c.path(t), SIZE)


def _qf_convert(c: Chain, t: str) -> subprocess.CompletedProcess[str]:
    return _cli("convert", "--force", "-O", "qed", c.source, c.path(t))


def _qf_mount(c: Chain, t: str) -> subprocess.CompletedProcess[str]:
    mnt = c.root / "action-mnt"
    mnt.mkdir(exist_ok=True)
    cp = _cli("mount", c.path(t), mnt)  # the daemonizing form: returns once it serves
    if cp.returncode == 0:
        check_ok(_cli("umount", "--wait", mnt))
    return cp


Action = Callable[[Chain, str], subprocess.CompletedProcess[str]]


@dataclass(frozen=True)
class ActionSpec:
    run: Action
    oracle: str  # name of the QEMU action whose outcome it must match
    targets: tuple[str, ...] = ("top", "base")
    qed_only: bool = False  # not run against a raw base
    destructive: bool = False  # replaces the target with a new image


#: QEMU's own actions (their own oracle), then qedfuse's; destructive ones last.
QEMU_ACTIONS: dict[str, ActionSpec] = {
    "qemu-img info": ActionSpec(_qemu_info, "qemu-img info"),
    "qemu-img check -r all": ActionSpec(_qemu_check, "qemu-img check -r all", qed_only=True),
    "qemu-io write": ActionSpec(_qemu_write, "qemu-io write"),
    "qemu-img resize": ActionSpec(_qemu_resize, "qemu-img resize"),
    "qemu-img commit": ActionSpec(_qemu_commit, "qemu-img commit", targets=("top",)),
    "qemu-img create": ActionSpec(_qemu_create, "qemu-img create", destructive=True),
    "qemu-img convert": ActionSpec(_qemu_convert, "qemu-img convert", destructive=True),
}
QEDFUSE_ACTIONS: dict[str, ActionSpec] = {
    "qedfuse info": ActionSpec(_qf_info, "qemu-img info", qed_only=True),
    "qedfuse check -r all": ActionSpec(_qf_check, "qemu-img check -r all", qed_only=True),
    "qedfuse mount rw": ActionSpec(_qf_mount, "qemu-io write", qed_only=True),
    "qedfuse resize": ActionSpec(_qf_resize, "qemu-img resize", qed_only=True),
    "qedfuse commit": ActionSpec(_qf_commit, "qemu-img commit", targets=("top",)),
    "qedfuse create --force": ActionSpec(_qf_create, "qemu-img create", destructive=True),
    "qedfuse convert --force": ActionSpec(_qf_convert, "qemu-img convert", destructive=True),
}


def _outcome(name: str, target: str, cp: subprocess.CompletedProcess[str]) -> str:
    if cp.returncode == 0:
        return OK
    text = cp.stderr
    if "lock" not in text:
        raise AssertionError(f"{name} on {target} failed, not for a lock\n{describe(cp)}")
    if name.startswith("qedfuse"):
        lines = text.splitlines()
        assert len(lines) == 1, describe(cp)
        assert lines[0].startswith("qedfuse: "), describe(cp)
    return LOCKED


def _run_actions(
    chain: Chain, actions: dict[str, ActionSpec]
) -> dict[tuple[str, str], tuple[str, str]]:
    """{(action, target): (outcome, stderr)} for every action that applies to the chain."""
    results = {}
    # destructive ones (a new image over the target) last, so that all others see the chain
    order = sorted(actions.items(), key=lambda item: item[1].destructive)
    for name, spec in order:
        if spec.qed_only and chain.base_fmt != "qed" and "base" in spec.targets:
            targets = tuple(t for t in spec.targets if t != "base")
        else:
            targets = spec.targets
        for target in targets:
            cp = spec.run(chain, target)
            results[name, target] = _outcome(name, target, cp), cp.stderr.strip()
    return results


def _bytes(chain: Chain) -> dict[str, set[int]]:
    return {role: locked_bytes(p) for role, p in chain.files().items() if p.exists()}


_ORACLE_CACHE: dict[tuple[str, str, str], tuple[dict[str, str], dict[str, set[int]]]] = {}


def _oracle(
    root: Path, base_fmt: str, held: str, qemu_holder: str
) -> tuple[dict[str, str], dict[str, set[int]]]:
    """QEMU holding, QEMU acting: {"action@target": outcome} and the holder's lock bytes."""
    key = (base_fmt, held, qemu_holder)
    if key not in _ORACLE_CACHE:
        chain = make_chain(root / "oracle", base_fmt)
        with HOLDERS[qemu_holder][0](chain, held):
            held_bytes = _bytes(chain)
            results = _run_actions(chain, QEMU_ACTIONS)
        _ORACLE_CACHE[key] = ({f"{a}@{t}": o for (a, t), (o, _) in results.items()}, held_bytes)
    return _ORACLE_CACHE[key]


CASES = [
    (base_fmt, held, holder)
    for base_fmt in ("qed", "raw")
    for held in ("top", "base")
    for holder in HOLDERS
    # qedfuse mounts QED images only; QEMU cannot hold a raw file "as the top" either
    if not (held == "base" and base_fmt == "raw" and holder in ("mount rw", "mount ro"))
]


@pytest.mark.sample(9)
@pytest.mark.parametrize(("base_fmt", "held", "holder"), CASES)
def test_lock_matrix(tmp_path: Path, base_fmt: str, held: str, holder: str) -> None:
    hold, qemu_holder = HOLDERS[holder]
    expected, expected_bytes = _oracle(tmp_path, base_fmt, held, qemu_holder)

    chain = make_chain(tmp_path / "case", base_fmt)
    actions = dict(QEDFUSE_ACTIONS)
    if holder != qemu_holder:  # a qedfuse holder: QEMU's actions must see it as QEMU's
        actions = {**QEMU_ACTIONS, **QEDFUSE_ACTIONS}
    with hold(chain, held):
        assert _bytes(chain) == expected_bytes, f"{holder} locks differ from {qemu_holder}'s"
        results = _run_actions(chain, actions)
    wrong = []
    for (name, target), (outcome, stderr) in results.items():
        want = expected[f"{actions[name].oracle}@{target}"]
        if outcome != want:
            wrong.append(f"{name} on {target}: {outcome}, QEMU says {want} ({stderr})")
    assert not wrong, f"{holder} holding {held} ({base_fmt} base):\n" + "\n".join(wrong)


# ------------------------------------------------------------ longer chains, force-share


def _qemu_img(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return run([require_tool("qemu-img"), *args])


@pytest.mark.sample(2)
@pytest.mark.parametrize("read_only", [False, True], ids=["rw", "ro"])
@pytest.mark.parametrize("base_fmt", ["qed", "raw"])
def test_three_levels_locked_as_qemu_locks_them(
    tmp_path: Path, base_fmt: str, read_only: bool
) -> None:
    """top -> mid (QED) -> base: every level carries QEMU's bytes, its writers are refused."""
    base, mid, top = tmp_path / f"base.{base_fmt}", tmp_path / "mid.qed", tmp_path / "top.qed"
    check_ok(_qemu_img("create", "-f", base_fmt, base, SIZE))
    check_ok(_qemu_img("create", "-f", "qed", "-b", base, "-F", base_fmt, mid))
    check_ok(_qemu_img("create", "-f", "qed", "-b", mid, "-F", "qed", top))
    levels = {"top": top, "mid": mid, "base": base}
    fmts = {"top": "qed", "mid": "qed", "base": base_fmt}

    def writers() -> dict[str, str]:
        found = {}
        for name, path in levels.items():
            cp = _qemu_img("resize", "-f", fmts[name], path, "+1M")
            found[f"qemu-img resize {name}"] = OK if cp.returncode == 0 else LOCKED
            if fmts[name] == "qed":
                cp = _cli("resize", path, "+1M")
                found[f"qedfuse resize {name}"] = OK if cp.returncode == 0 else LOCKED
        return found

    flags = ["-r"] if read_only else []
    qemu_io = [require_tool("qemu-io"), *flags, "-f", "qed", str(top)]
    with _process_holding(qemu_io, list(levels.values())):
        qemu_bytes = {name: locked_bytes(p) for name, p in levels.items()}
        qemu_outcomes = writers()
    # the oracle itself: a QED level below the top is locked against writers, a raw one not
    assert qemu_bytes["mid"] == {100, 201, 203}
    assert qemu_bytes["base"] == ({100, 201, 203} if base_fmt == "qed" else {100})
    for tool in ("qemu-img", "qedfuse"):
        assert qemu_outcomes.get(f"{tool} resize mid", LOCKED) == LOCKED
    opts = ("-o", "ro") if read_only else ()
    with mounted(top, tmp_path / "mnt", *opts):
        assert {name: locked_bytes(p) for name, p in levels.items()} == qemu_bytes
        assert writers() == qemu_outcomes
    assert all(locked_bytes(p) == set() for p in levels.values())


#: qedfuse read-only command -> its qemu-img twin (same arguments)
_READERS = {
    "map": ["map"],
    "check": ["check"],
    "info": ["info"],
    "convert": ["convert", "-O", "raw"],
}


@pytest.mark.sample(4)
@pytest.mark.parametrize("command", list(_READERS))
@pytest.mark.parametrize("writer", ["qemu-io", "mount rw"])
def test_force_share_reads_past_a_writer_of_the_base(
    tmp_path: Path, command: str, writer: str
) -> None:
    """With the base written, a reader of the overlay is refused unless -U, as in QEMU."""
    chain = make_chain(tmp_path / "c", "qed")
    out = tmp_path / "out.raw"

    def argv(force_share: bool) -> list[str | Path]:
        args: list[str | Path] = [_READERS[command][0]]
        if force_share:
            args.append("-U")
        args += _READERS[command][1:]
        args.append(chain.top)
        if command == "convert":
            out.unlink(missing_ok=True)
            args.append(out)
        return args

    hold, _ = HOLDERS[writer]
    with hold(chain, "base"):
        for force_share in (False, True):
            want = _qemu_img(*argv(force_share))
            got = _cli(*argv(force_share))
            assert (got.returncode == 0) == (want.returncode == 0), (describe(want), describe(got))
            if got.returncode != 0:
                assert f"[{chain.base}]" in got.stderr, got.stderr
                assert "Use -U (force-share)" in got.stderr, got.stderr


@pytest.mark.parametrize(
    "backing", ["missing", "fifo", "directory", "itself", "itself-qed", "nbd:x:1"]
)
@pytest.mark.sample(3)
def test_check_locks_what_it_can_of_a_broken_chain(tmp_path: Path, backing: str) -> None:
    """check locks the chain but never needs it: a chain it cannot follow is no error, no hang."""
    top = tmp_path / "top.qed"
    name = {"missing": "gone.raw", "itself": "top.qed", "itself-qed": "top.qed"}.get(
        backing, backing
    )
    backing_fmt = "qed" if backing == "itself-qed" else "raw"
    if backing == "fifo":
        os.mkfifo(tmp_path / "fifo")
    elif backing == "directory":
        (tmp_path / "directory").mkdir()
    check_ok(_qemu_img("create", "-f", "qed", "-u", "-b", name, "-F", backing_fmt, top, SIZE))
    for args in (["check"], ["check", "-r", "all"], ["check", "-U"]):
        cp = run([QEDFUSE, *args, top], timeout=20)
        check_ok(cp)
        assert cp.stderr == "", describe(cp)
