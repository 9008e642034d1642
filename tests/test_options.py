"""``-o`` parsing (qedfuse.options): pure unit tests, no mount."""

from __future__ import annotations

import pytest

from qedfuse.options import (
    DEFAULT_FLUSH_DELAY,
    DEFAULT_UMASK,
    DROPPED,
    PASS_THROUGH,
    CacheMode,
    MountOptions,
    OptionError,
    escape_value,
    parse_options,
    split_options,
)


def test_defaults() -> None:
    opts = parse_options([])
    assert opts == MountOptions()
    assert not opts.read_only
    assert opts.cache is CacheMode.AUTO
    assert opts.umask == DEFAULT_UMASK
    assert opts.flush_delay == DEFAULT_FLUSH_DELAY
    assert opts.detect_zeroes
    assert opts.fuse == ()


def test_consumed_options() -> None:
    opts = parse_options(
        [
            "ro,uid=0,gid=0,umask=022,fsname=mydisk,cache=none,log=/tmp/q.log,debug",
            "backing=/img/base.raw,untrusted,detect_zeroes=off,flush_delay=0.5,pidfile=/run/q.pid",
        ]
    )
    assert opts.read_only
    assert (opts.uid, opts.gid, opts.umask) == (0, 0, 0o022)
    assert opts.fsname == "mydisk"
    assert opts.cache is CacheMode.NONE
    assert opts.log_file == "/tmp/q.log"
    assert opts.debug
    assert opts.backing == "/img/base.raw"
    assert opts.untrusted
    assert not opts.detect_zeroes
    assert opts.flush_delay == 0.5
    assert opts.pidfile == "/run/q.pid"
    assert opts.fuse == ()  # nothing of that reaches libfuse


def test_user_and_group_names() -> None:
    opts = parse_options(["uid=root,gid=root"])
    assert (opts.uid, opts.gid) == (0, 0)


@pytest.mark.parametrize(
    ("option", "mode"),
    [
        ("cache=auto", CacheMode.AUTO),
        ("cache=none", CacheMode.NONE),
        ("cache=kernel", CacheMode.KERNEL),
        ("auto_cache", CacheMode.AUTO),
        ("direct_io", CacheMode.NONE),
        ("kernel_cache", CacheMode.KERNEL),
    ],
)
def test_cache_modes_and_aliases(option: str, mode: CacheMode) -> None:
    assert parse_options([option]).cache is mode


def test_later_options_win() -> None:
    assert not parse_options(["ro,rw"]).read_only
    assert parse_options(["rw", "ro"]).read_only
    assert parse_options(["cache=none,cache=kernel"]).cache is CacheMode.KERNEL


@pytest.mark.parametrize("option", sorted(PASS_THROUGH))
def test_pass_through(option: str) -> None:
    opts = parse_options([option])
    assert opts.fuse == (option,)
    assert option in opts.fuse_options("/img/d.qed")


@pytest.mark.parametrize("value", ["4096", "65536", "131072", "16777216", "12"])
def test_max_read_is_refused_with_its_reason(value: str) -> None:
    """libfuse 3 rejects the kernel's INIT when max_read is set but init() does not set the
    same limit (pyfuse3 cannot): the mount would vanish after a successful start."""
    with pytest.raises(OptionError, match="max_read' is not supported") as info:
        parse_options([f"rw,max_read={value}"])
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "option",
    [
        *sorted(DROPPED),
        "comment=systemd.automount",
        "x-systemd.automount",
        "x-systemd.idle-timeout=10min",
        "X-mount.mkdir",
        "setuid=nobody",
        "subtype=whatever",
    ],
)
def test_dropped_silently(option: str) -> None:
    opts = parse_options([option])
    assert opts == MountOptions()


def test_what_mount_fuse3_runs() -> None:
    # observed: mount.fuse3 … -o ro,noatime,allow_other,_netdev,nofail,x-systemd.automount,
    # fsname=foo  →  qedfuse SRC MNT -o ro,noatime,allow_other,x-systemd.automount,fsname=foo,
    # dev,suid
    opts = parse_options(["ro,noatime,allow_other,x-systemd.automount,fsname=foo,dev,suid"])
    assert opts.read_only
    assert opts.fsname == "foo"
    assert opts.fuse == ("noatime", "allow_other", "dev", "suid")
    assert opts.fuse_options("/img/d.qed") == {
        "noatime",
        "allow_other",
        "dev",
        "suid",
        "ro",
        "default_permissions",
        "subtype=qedfuse",
        "fsname=foo",
    }


def test_always_added_for_libfuse() -> None:
    fuse = parse_options([]).fuse_options("/var/lib/images/disk.qed")
    assert fuse == {
        "default_permissions",
        "subtype=qedfuse",
        "fsname=/var/lib/images/disk.qed",
    }
    assert "debug" in parse_options([]).fuse_options("/x.qed", debug_fuse=True)
    # qedfuse's own `debug` is its log level, not libfuse's request trace
    assert "debug" not in parse_options(["debug"]).fuse_options("/x.qed")


def test_fsname_with_comma_is_escaped_for_libfuse() -> None:
    fuse = parse_options([]).fuse_options("/img/a,b\\c.qed")
    assert "fsname=/img/a\\,b\\\\c.qed" in fuse
    assert escape_value("a,b") == "a\\,b"


def test_split_options() -> None:
    assert split_options("ro,,allow_other,") == ["ro", "allow_other"]
    assert split_options("fsname=a\\,b,ro") == ["fsname=a,b", "ro"]
    assert parse_options(["fsname=a\\,b"]).fsname == "a,b"


@pytest.mark.parametrize(
    ("option", "message"),
    [
        ("xyz", "unknown mount option 'xyz'"),
        ("ro=1", "unknown mount option 'ro=1'"),
        ("kernel_cache=1", "unknown mount option 'kernel_cache=1'"),
        ("max_write=65536", "unknown mount option 'max_write=65536'"),
        ("uid", "mount option 'uid' needs a value ('uid=…')"),
        ("log=", "mount option 'log' needs a value ('log=…')"),
        ("uid=no-such-user-qedfuse", "mount option 'uid=no-such-user-qedfuse': no such user"),
        ("gid=no-such-group-qedfuse", "mount option 'gid=no-such-group-qedfuse': no such group"),
        ("cache=sometimes", "mount option 'cache=sometimes': expected auto, none or kernel"),
        ("umask=999", "mount option 'umask=999': expected an octal mask up to 777"),
        ("umask=1000", "mount option 'umask=1000': expected an octal mask up to 777"),
        ("detect_zeroes=unmap", "mount option 'detect_zeroes=unmap': expected on or off"),
        ("flush_delay=-1", "mount option 'flush_delay=-1': expected seconds from 0 to 86400"),
        ("flush_delay=nan", "mount option 'flush_delay=nan': expected seconds from 0 to 86400"),
    ],
)
def test_bad_options(option: str, message: str) -> None:
    with pytest.raises(OptionError) as info:
        parse_options(["ro", option])
    assert str(info.value) == message


def test_writeback_cache_flag() -> None:
    """``writeback_cache`` is consumed by qedfuse (it becomes pyfuse3's
    ``enable_writeback_cache``), never handed to libfuse, which would refuse it."""
    assert not parse_options([]).writeback_cache
    opts = parse_options(["rw,writeback_cache"])
    assert opts.writeback_cache
    assert opts.fuse == ()
    assert not any("writeback" in o for o in opts.fuse_options("/x.qed"))
    with pytest.raises(OptionError, match="unknown mount option 'writeback_cache=1'"):
        parse_options(["writeback_cache=1"])
