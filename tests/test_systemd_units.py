"""The shipped systemd units and fstab lines: offline verification with the real systemd tools.

PID 1 is not systemd on the CI machine, so nothing here starts a unit.  Instead:

* ``systemd-analyze verify --root=ROOT`` loads the shipped files, byte for byte, from a
  scratch root that holds a copy of the system's unit directory and a stand-in
  ``/usr/local/bin/qedfuse`` (verify insists that ExecStart's binary exists);
* ``findmnt --verify`` parses fstab.example and ``systemd-fstab-generator`` turns it into
  units, which are checked for the dependencies the README promises and verified in turn;
* the service's ExecStart line, with %f/%i expanded the way systemd does, is run in the
  environment systemd gives a service (no HOME, default PATH, NOTIFY_SOCKET) and stopped the
  way systemd stops it (SIGTERM to the main process, then ExecStopPost); a SIGKILLed instance
  shows that ExecStopPost clears the dead mount and the next start repairs the image.
"""

from __future__ import annotations

import configparser
import contextlib
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from qedfuse.format import Header
from support import check_ok, describe, require_fuse, require_tool, run

REPO = Path(__file__).resolve().parent.parent
SYSTEMD_DIR = REPO / "systemd"
SERVICE = SYSTEMD_DIR / "qedfuse@.service"
MOUNT_EXAMPLE = SYSTEMD_DIR / "mnt-disk.mount.example"
FSTAB_EXAMPLE = SYSTEMD_DIR / "fstab.example"
INSTALLED_QEDFUSE = "/usr/local/bin/qedfuse"
VENV_QEDFUSE = Path(sys.executable).with_name("qedfuse")
SYSTEM_UNIT_DIR = Path("/usr/lib/systemd/system")
FSTAB_GENERATOR = Path("/usr/lib/systemd/system-generators/systemd-fstab-generator")


def load_unit(path: Path) -> configparser.ConfigParser:
    """Parse a unit file (keys are case-sensitive, no interpolation)."""
    parser = configparser.ConfigParser(interpolation=None, strict=False, comment_prefixes="#;")
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(path.read_text())
    return parser


def escape_path(path: str, suffix: str | None = None) -> str:
    cmd = ["systemd-escape", "--path", path]
    if suffix:
        cmd[1:1] = [f"--suffix={suffix}"]
    return check_ok(run(cmd)).stdout.strip()


# --------------------------------------------------------------------------- verify root


@pytest.fixture
def verify_root(tmp_path: Path) -> Path:
    """A scratch root for ``systemd-analyze verify --root``: system units + qedfuse stub."""
    require_tool("systemd-analyze")
    if not SYSTEM_UNIT_DIR.is_dir():
        pytest.fail(f"{SYSTEM_UNIT_DIR} missing although systemd-analyze is installed")
    root = tmp_path / "root"
    shutil.copytree(SYSTEM_UNIT_DIR, root / SYSTEM_UNIT_DIR.relative_to("/"), symlinks=True)
    (root / "etc/systemd/system").mkdir(parents=True)
    (root / "lib").symlink_to("usr/lib")  # merged /usr: generator links use /lib/systemd
    stub = root / INSTALLED_QEDFUSE.lstrip("/")
    stub.parent.mkdir(parents=True)
    stub.write_text("#!/bin/sh\nexit 1\n")
    stub.chmod(0o755)
    return root


def verify(root: Path, *units: str) -> subprocess.CompletedProcess[str]:
    """Run ``systemd-analyze verify`` on units installed in ``root``'s /etc/systemd/system."""
    return run(["systemd-analyze", "verify", "--man=no", f"--root={root}", *units])


def assert_verifies(root: Path, *units: str) -> None:
    cp = verify(root, *units)
    # verify exits 0 on mere warnings (unknown keys, bad values): demand silence too.
    assert cp.returncode == 0, describe(cp)
    assert not (cp.stdout + cp.stderr).strip(), describe(cp)


def install_unit(root: Path, source: Path, name: str) -> Path:
    dest = root / "etc/systemd/system" / name
    shutil.copyfile(source, dest)
    return dest


# --------------------------------------------------------------------------- service


def test_instance_name_is_the_escaped_image_path() -> None:
    require_tool("systemd-escape")
    assert escape_path("/var/lib/images/disk.qed") == "var-lib-images-disk.qed"
    tricky = "/srv/vm images/my-disk.qed"
    escaped = escape_path(tricky)
    assert escaped == r"srv-vm\x20images-my\x2ddisk.qed"
    back = check_ok(run(["systemd-escape", "--unescape", "--path", escaped])).stdout.strip()
    assert back == tricky


def test_service_unit_verifies(verify_root: Path) -> None:
    install_unit(verify_root, SERVICE, SERVICE.name)
    instance = escape_path("/var/lib/images/disk.qed")
    assert_verifies(verify_root, f"qedfuse@{instance}.service")
    assert_verifies(verify_root, f"qedfuse@{escape_path('/srv/vm images/my-disk.qed')}.service")


@pytest.mark.parametrize(
    ("mutation", "complaint"),
    [
        (("KillSignal=SIGTERM", "KillSignal=SIGTREM"), "Failed to parse signal"),
        (("Type=notify", "Type=notify\nNotifyAcess=main"), "Unknown key"),
        (("ExecStopPost=-/bin/fusermount3", "ExecStopPost=/bin/no-such-fusermount"), "executable"),
    ],
)
def test_verify_catches_broken_units(
    verify_root: Path, mutation: tuple[str, str], complaint: str
) -> None:
    """Negative control: the verification above is able to fail."""
    text = SERVICE.read_text()
    assert mutation[0] in text
    dest = verify_root / "etc/systemd/system" / SERVICE.name
    dest.write_text(text.replace(mutation[0], mutation[1], 1))
    cp = verify(verify_root, "qedfuse@var-lib-images-disk.qed.service")
    assert complaint in cp.stdout + cp.stderr, describe(cp)


def test_verify_needs_the_installed_binary(verify_root: Path) -> None:
    install_unit(verify_root, SERVICE, SERVICE.name)
    (verify_root / INSTALLED_QEDFUSE.lstrip("/")).unlink()
    cp = verify(verify_root, "qedfuse@var-lib-images-disk.qed.service")
    assert cp.returncode != 0
    assert f"{INSTALLED_QEDFUSE} is not executable" in cp.stderr, describe(cp)


def test_service_unit_contract() -> None:
    unit = load_unit(SERVICE)
    svc = unit["Service"]
    assert svc["Type"] == "notify"
    assert svc["NotifyAccess"] == "main"
    # Stopping is SIGTERM to qedfuse, which flushes and unmounts; an ExecStop= would race it.
    assert "ExecStop" not in svc
    assert svc["KillSignal"] == "SIGTERM"
    assert svc.get("KillMode", "control-group") in {"control-group", "mixed"}
    assert int(svc["TimeoutStopSec"]) >= 120
    assert svc["Restart"] == "no"
    assert svc["RuntimeDirectory"] == "qedfuse/%i"
    argv = shlex.split(svc["ExecStart"])
    assert argv[0] == INSTALLED_QEDFUSE
    assert argv[1:4] == ["mount", "--foreground", "--systemd"]
    assert argv[-2:] == ["%f", "/run/qedfuse/%i"]
    stop_post = svc["ExecStopPost"]
    assert stop_post.startswith("-"), "crash cleanup must not fail a clean stop"
    assert shlex.split(stop_post[1:])[1:] == ["-uz", "/run/qedfuse/%i"]
    # any of these would put the mount into a private namespace nobody else sees
    for key in ("PrivateMounts", "ProtectSystem", "PrivateTmp", "ProtectHome"):
        assert key not in svc, key
    assert unit["Unit"]["RequiresMountsFor"] == "%f"
    assert unit["Unit"]["ConditionPathExists"] == "%f"


def test_make_install_puts_qedfuse_where_the_units_expect_it() -> None:
    """`make install` links /usr/local/bin/qedfuse into its own copy (not into the clone)
    and installs the service, not the examples (tests/test_packaging.py runs it for real)."""
    make = require_tool("make")
    cp = check_ok(run([make, "-n", "-C", REPO, "install"]))
    lines = cp.stdout.splitlines()
    assert any(
        re.fullmatch(rf"ln -sfn '?/usr/local/lib/qedfuse/bin/qedfuse'? '?{INSTALLED_QEDFUSE}'?", ln)
        for ln in lines
    ), cp.stdout
    assert str(REPO / ".venv") not in cp.stdout
    units = [ln for ln in lines if ln.startswith("for unit in ")]
    assert len(units) == 1, cp.stdout
    assert units[0].split(";")[0].split()[3:] == ["systemd/qedfuse@.service"]
    # the example mount unit must not land in /etc/systemd/system under a name that does not
    # match its Where= (systemd refuses such units)
    assert "mnt-disk" not in units[0]
    assert any("> '/etc/systemd/system/'" in ln for ln in lines), cp.stdout
    # the mount(8) path: PATH is reset to these directories, /usr/local/bin among them
    assert INSTALLED_QEDFUSE.startswith("/usr/local/bin/")


def _readme_section() -> str:
    text = (REPO / "README.md").read_text()
    start = text.index("## mount(8), fstab and systemd")
    end = text.find("\n## ", start + 1)
    return text[start : end if end != -1 else None]


def test_readme_drop_in_example_verifies(verify_root: Path) -> None:
    """The `systemctl edit` override the README shows is a valid drop-in."""
    blocks = re.findall(r"```ini\n(.*?)```", _readme_section(), flags=re.S)
    assert len(blocks) == 1, blocks
    drop_in = "\n".join(line.strip() for line in blocks[0].splitlines())
    assert "ExecStart=\n" in drop_in  # the reset line that makes the override legal
    install_unit(verify_root, SERVICE, SERVICE.name)
    unit = "qedfuse@var-lib-images-disk.qed.service"
    drop_dir = verify_root / "etc/systemd/system" / f"{unit}.d"
    drop_dir.mkdir()
    (drop_dir / "override.conf").write_text(drop_in)
    assert_verifies(verify_root, unit)
    # without the reset line systemd refuses a second ExecStart= for Type=notify
    (drop_dir / "override.conf").write_text(drop_in.replace("ExecStart=\n", "", 1))
    cp = verify(verify_root, unit)
    assert "more than one ExecStart" in cp.stdout + cp.stderr, describe(cp)


def test_readme_fstab_lines_match_the_example() -> None:
    blocks = re.findall(r"```fstab\n(.*?)```", _readme_section(), flags=re.S)
    assert len(blocks) == 1, blocks
    assert fstab_entries(blocks[0]) == fstab_entries(FSTAB_EXAMPLE.read_text())


# --------------------------------------------------------------------------- .mount


def test_mount_unit_example_verifies(verify_root: Path) -> None:
    require_tool("systemd-escape")
    unit = load_unit(MOUNT_EXAMPLE)
    mount = unit["Mount"]
    assert mount["Type"] == "fuse.qedfuse"
    assert set(mount["Options"].split(",")) >= {"rw", "allow_other", "noatime"}
    assert int(mount["TimeoutSec"]) >= 60
    assert unit["Unit"]["RequiresMountsFor"] == mount["What"]
    name = escape_path(mount["Where"], suffix="mount")
    assert name == "mnt-disk.mount"
    assert MOUNT_EXAMPLE.name == f"{name}.example"
    install_unit(verify_root, MOUNT_EXAMPLE, name)
    assert_verifies(verify_root, name)
    # and systemd does refuse it under another name, which is why it ships as an example
    install_unit(verify_root, MOUNT_EXAMPLE, "mnt-other.mount")
    cp = verify(verify_root, "mnt-other.mount")
    assert "doesn't match unit name" in cp.stdout + cp.stderr, describe(cp)


# --------------------------------------------------------------------------- fstab

_FSTAB_WARNINGS_EXPECTED = (
    # fuse.qedfuse is no kernel filesystem; mount.fuse3 handles it
    "seems unsupported by the current kernel",
    # blkid finds no filesystem in a QED image: it is not a block device
    "cannot detect on-disk filesystem type",
    "is a directory or regular file",
)


def fstab_entries(text: str) -> list[list[str]]:
    return [ln.split() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]


def test_fstab_example_lines_are_well_formed() -> None:
    entries = fstab_entries(FSTAB_EXAMPLE.read_text())
    assert len(entries) == 3
    by_target = {e[1]: e for e in entries}
    for e in entries:
        assert len(e) == 6, e
        assert e[2] == "fuse.qedfuse"
        assert e[0].startswith("/"), e
        assert e[1].startswith("/"), e
    always = by_target["/mnt/disk"][3].split(",")
    assert "nofail" in always
    assert "noauto" not in always
    assert f"x-systemd.requires-mounts-for={by_target['/mnt/disk'][0]}" in always
    auto = by_target["/mnt/data"][3].split(",")
    assert {"noauto", "x-systemd.automount"} <= set(auto)
    assert any(o.startswith("x-systemd.idle-timeout=") for o in auto)
    assert by_target["/mnt/golden"][3].split(",")[0] == "ro"


def test_fstab_example_passes_findmnt_verify(tmp_path: Path) -> None:
    findmnt = require_tool("findmnt")
    # Point every path at something that exists, so only type-related warnings remain.
    text = FSTAB_EXAMPLE.read_text()
    for entry in fstab_entries(text):
        image, target = entry[0], entry[1]
        local_image = tmp_path / "images" / Path(image).name
        local_image.parent.mkdir(exist_ok=True)
        local_image.write_bytes(b"QED\0" + bytes(60))
        local_target = tmp_path / "mnt" / Path(target).name
        local_target.mkdir(parents=True)
        text = text.replace(image, str(local_image)).replace(f" {target} ", f" {local_target} ")
    fstab = tmp_path / "fstab"
    fstab.write_text(text)
    cp = run([findmnt, "--verify", "--verbose", "--tab-file", fstab])
    summary = cp.stderr.strip().splitlines()[-1]
    assert re.fullmatch(r"0 parse errors, 0 errors, \d+ warnings?", summary), describe(cp)
    for line in cp.stdout.splitlines():
        if "[W]" in line:
            assert any(w in line for w in _FSTAB_WARNINGS_EXPECTED), describe(cp)
    # findmnt's own split of the options: systemd/mount(8) ones never reach the filesystem
    assert "userspace options: nofail,x-systemd.requires-mounts-for=" in cp.stdout
    assert "userspace options: noauto,x-systemd.automount,x-systemd.idle-timeout=10min" in (
        cp.stdout
    )


def test_findmnt_verify_catches_broken_fstab(tmp_path: Path) -> None:
    """Negative control: a malformed line is reported."""
    findmnt = require_tool("findmnt")
    fstab = tmp_path / "fstab"
    fstab.write_text("/var/lib/images/disk.qed\n")
    cp = run([findmnt, "--verify", "--tab-file", fstab])
    assert cp.returncode != 0
    assert "parse error" in cp.stdout + cp.stderr, describe(cp)


@pytest.fixture
def generated(tmp_path: Path) -> Path:
    """Units systemd-fstab-generator makes from the shipped fstab.example."""
    require_tool("systemd-analyze")  # same package; the generator has no PATH entry
    if not os.access(FSTAB_GENERATOR, os.X_OK):
        pytest.fail(f"{FSTAB_GENERATOR} missing although systemd is installed")
    out = tmp_path / "generator"
    dirs = [out / "normal", out / "early", out / "late"]
    for d in dirs:
        d.mkdir(parents=True)
    env = {**os.environ, "SYSTEMD_FSTAB": str(FSTAB_EXAMPLE), "SYSTEMD_LOG_LEVEL": "info"}
    env.pop("SYSTEMD_PROC_CMDLINE", None)
    check_ok(run([FSTAB_GENERATOR, *dirs], env=env))
    return dirs[0]


def test_fstab_generator_output(generated: Path, verify_root: Path) -> None:
    disk = load_unit(generated / "mnt-disk.mount")
    assert disk["Mount"]["What"] == "/var/lib/images/disk.qed"
    assert disk["Mount"]["Type"] == "fuse.qedfuse"
    assert disk["Unit"]["RequiresMountsFor"] == "/var/lib/images/disk.qed"
    # local filesystem (fuse.qedfuse is not on systemd's network list) ...
    assert "remote-fs" not in (generated / "mnt-disk.mount").read_text()
    # ... pulled in softly because of nofail: a broken image does not block the boot
    assert (generated / "local-fs.target.wants/mnt-disk.mount").is_symlink()
    assert not (generated / "local-fs.target.requires/mnt-disk.mount").exists()

    # automount: only the .automount is started at boot, with the idle timeout
    data_auto = load_unit(generated / "mnt-data.automount")
    assert data_auto["Automount"]["TimeoutIdleSec"] == "10min"
    assert (generated / "local-fs.target.requires/mnt-data.automount").is_symlink()
    assert not (generated / "local-fs.target.wants/mnt-data.mount").exists()
    assert load_unit(generated / "mnt-data.mount")["Mount"]["Where"] == "/mnt/data"

    golden = load_unit(generated / "mnt-golden.mount")
    assert golden["Mount"]["Options"].split(",")[0] == "ro"
    assert not list(generated.glob("*.target.*/mnt-golden.*")), "noauto must stay manual"

    # what the generator wrote is itself a valid set of units
    shutil.copytree(
        generated, verify_root / "etc/systemd/system", symlinks=True, dirs_exist_ok=True
    )
    assert_verifies(
        verify_root, "mnt-disk.mount", "mnt-data.mount", "mnt-data.automount", "mnt-golden.mount"
    )


# --------------------------------------------------------------------------- run the service

# What systemd 252 gives a system service: a fixed PATH, no HOME (no User=), LANG from locale.
_SERVICE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


@pytest.fixture
def short_dir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="qu-", dir="/tmp") as d:
        yield Path(d)


class ServiceRun:
    """One instance of qedfuse@.service, run the way systemd runs it (without systemd).

    %f/%i are expanded as systemd does, RuntimeDirectory= is created under /run, ExecStart
    runs with the environment of a system service (no HOME, the default PATH, NOTIFY_SOCKET)
    and "stop" is SIGTERM to the main process, as KillMode=mixed/KillSignal=SIGTERM say.
    """

    def __init__(self, image: Path, notify_dir: Path) -> None:
        svc = load_unit(SERVICE)["Service"]
        self.instance = escape_path(str(image))
        self.runtime_dir = Path("/run") / self._expand(svc["RuntimeDirectory"], image)
        self.argv = [self._expand(a, image) for a in shlex.split(svc["ExecStart"])]
        self.stop_post = [self._expand(a, image) for a in shlex.split(svc["ExecStopPost"][1:])]
        assert self.argv[-1] == str(self.runtime_dir)
        if os.path.realpath(self.argv[0]) != os.path.realpath(VENV_QEDFUSE):
            self.argv[0] = str(VENV_QEDFUSE)  # not installed (or another checkout's)
        self.rx = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self.rx.bind(str(notify_dir / "notify"))
        self.env = {
            "PATH": _SERVICE_PATH,
            "NOTIFY_SOCKET": str(notify_dir / "notify"),
            "INVOCATION_ID": "0" * 32,
        }
        self.proc: subprocess.Popen[str] | None = None
        self.parent_existed = self.runtime_dir.parent.exists()

    def _expand(self, arg: str, image: Path) -> str:
        return arg.replace("%f", str(image)).replace("%i", self.instance)

    def start(self) -> subprocess.Popen[str]:
        """Start ExecStart and wait for READY=1 (what `systemctl start` waits for)."""
        self.runtime_dir.mkdir(parents=True, exist_ok=True, mode=0o755)
        self.proc = subprocess.Popen(
            self.argv,
            env=self.env,
            cwd="/",
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        _wait_for(self.rx, self.proc, "READY=1", timeout_s=20)
        assert self.proc.poll() is None, "Type=notify: the main process must keep running"
        return self.proc

    def stop(self) -> subprocess.CompletedProcess[str]:
        """SIGTERM, wait for STOPPING=1 and the exit, then run ExecStopPost (`systemctl stop`)."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        _wait_for(self.rx, self.proc, "STOPPING=1", timeout_s=20)
        out, err = self.proc.communicate(timeout=30)
        cp = subprocess.CompletedProcess(self.argv, self.proc.returncode, out, err)
        self.post = run(self.stop_post)
        return cp

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        run(["fusermount3", "-uz", self.runtime_dir])
        self.rx.close()
        shutil.rmtree(self.runtime_dir, ignore_errors=True)  # RuntimeDirectoryPreserve=no
        if not self.parent_existed:
            with contextlib.suppress(OSError):  # not empty: another instance uses it
                self.runtime_dir.parent.rmdir()


@pytest.fixture
def service_image(tmp_path: Path) -> Path:
    """A QED image with 0x3c in its first 64 KiB, under a path with a '-' in it."""
    require_fuse()
    require_tool("systemd-escape")
    qemu_img, qemu_io = require_tool("qemu-img"), require_tool("qemu-io")
    image = tmp_path / "vm-images" / "my-disk.qed"
    image.parent.mkdir()
    check_ok(run([qemu_img, "create", "-q", "-f", "qed", image, "32M"]))
    check_ok(run([qemu_io, "-f", "qed", "-c", "write -P 0x3c 0 64k", image]))
    return image


@pytest.fixture
def service(service_image: Path, short_dir: Path) -> Iterator[ServiceRun]:
    svc = ServiceRun(service_image, short_dir)
    try:
        yield svc
    finally:
        svc.close()


def _assert_image(image: Path, pattern: int, offset: str, length: str) -> None:
    qemu_img, qemu_io = require_tool("qemu-img"), require_tool("qemu-io")
    assert not Header.unpack(image.read_bytes()[:64]).need_check
    check_ok(run([qemu_img, "check", "-f", "qed", image]))
    cp = check_ok(
        run([qemu_io, "-f", "qed", "-r", "-c", f"read -P {pattern:#x} {offset} {length}", image])
    )
    assert "Pattern verification failed" not in cp.stdout, cp.stdout


@pytest.mark.fuse
@pytest.mark.qemu
@pytest.mark.timeout(60)
def test_service_start_and_stop_like_systemd(service: ServiceRun, service_image: Path) -> None:
    """ExecStart as systemd runs it: READY=1 when serving, SIGTERM -> flushed, exit 0."""
    # a '-' in the path becomes \x2d in the instance name and in the mount point
    assert "\\x2d" in service.instance
    service.start()
    raw = service.runtime_dir / "my-disk.raw"
    with raw.open("rb") as f:
        assert f.read(65536) == b"\x3c" * 65536
    with raw.open("r+b") as f:
        f.seek(1 << 20)
        f.write(b"\xc3" * 8192)
    cp = service.stop()
    assert cp.returncode == 0, describe(cp)
    assert not os.path.ismount(service.runtime_dir), "qedfuse exited but left its mount"
    # ExecStopPost (crash cleanup) after a clean stop: fails harmlessly, hence the '-'
    assert service.post.returncode != 0, describe(service.post)
    _assert_image(service_image, 0xC3, "1M", "8k")


@pytest.mark.fuse
@pytest.mark.qemu
@pytest.mark.timeout(60)
def test_service_crash_cleanup_and_restart(service: ServiceRun, service_image: Path) -> None:
    """SIGKILL leaves a dead mount; ExecStopPost detaches it and the next start repairs."""
    proc = service.start()
    raw = service.runtime_dir / "my-disk.raw"
    fd = os.open(raw, os.O_RDWR)
    try:
        os.pwrite(fd, b"\x99" * 65536, 2 << 20)
        os.fsync(fd)  # durable, whatever happens next
        # a new cluster, not flushed (closing would flush): NEED_CHECK is set on disk now
        os.pwrite(fd, b"\x98" * 65536, 3 << 20)
        proc.kill()
        proc.wait()
    finally:
        with contextlib.suppress(OSError):
            os.close(fd)  # ENOTCONN: the daemon is gone
    assert Header.unpack(service_image.read_bytes()[:64]).need_check
    assert os.path.ismount(service.runtime_dir)
    with pytest.raises(OSError, match="not connected"):
        os.stat(raw)
    # what systemd runs once the main process is gone
    post = run(service.stop_post)
    assert post.returncode == 0, describe(post)
    assert not os.path.ismount(service.runtime_dir)
    # `systemctl start` again: the read-write open repairs, the fsync'ed data is there
    service.start()
    with raw.open("rb") as f:
        f.seek(2 << 20)
        assert f.read(65536) == b"\x99" * 65536
    cp = service.stop()
    assert cp.returncode == 0, describe(cp)
    _assert_image(service_image, 0x99, "2M", "64k")


def _wait_for(
    rx: socket.socket, proc: subprocess.Popen[str], wanted: str, timeout_s: float
) -> list[str]:
    """Collect sd_notify lines until ``wanted`` arrives; fail early if ``proc`` exits."""
    deadline = time.monotonic() + timeout_s
    seen: list[str] = []
    rx.settimeout(0.2)
    while time.monotonic() < deadline:
        exited = proc.poll() is not None
        try:
            seen += rx.recv(4096).decode().splitlines()
        except TimeoutError:
            if not exited:
                continue
            out, err = proc.communicate()
            break
        if wanted in seen:
            return seen
    else:
        pytest.fail(f"no {wanted} within {timeout_s} s (got {seen})", pytrace=False)
    pytest.fail(
        f"qedfuse exited {proc.returncode} before {wanted} (got {seen})\n"
        f"--- stdout ---\n{out}\n--- stderr ---\n{err}",
        pytrace=False,
    )
