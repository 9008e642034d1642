"""Packaging: the man page and the bash completion follow the parser, the version lives in
one place, and ``make install`` gives a self-contained copy that outlives the clone.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from fusehelpers import mount_entry

from qedfuse import __version__, cliparser, docgen, options
from support import check_ok, require_fuse, require_tool, run

ROOT = Path(__file__).resolve().parent.parent
PARSER = cliparser.build_parser(with_mount=True)
SUBCOMMANDS = docgen.subcommands(PARSER)


def test_parser_has_the_commands() -> None:
    assert list(SUBCOMMANDS) == list(cliparser.COMMANDS)


# ---------------------------------------------------------------------- man page


@pytest.fixture(scope="module")
def man_text() -> str:
    """qedfuse(1) as man(1) renders it (plain text, no hyphenation or justification)."""
    groff = require_tool("groff")
    page = docgen.manpage()
    cp = check_ok(
        run(
            [groff, "-man", "-Tutf8", "-ww", "-rLL=200n", "-P-cbou"],
            input=page.replace(".TH", ".nh\n.ad l\n.TH", 1),
        )
    )
    assert cp.stderr == "", cp.stderr  # -ww: any roff warning fails
    return cp.stdout.replace("\u2010", "-").replace("\u2212", "-")


def test_man_page_lists_every_command_and_option(man_text: str) -> None:
    assert "QEDFUSE(1)" in man_text
    for option in docgen.option_strings(PARSER):
        assert option in man_text, option
    chunks = re.split(r"\n(?=   \S|\S)", man_text)  # at every section and subsection
    for name, sub in SUBCOMMANDS.items():
        bodies = [c for c in chunks if c.startswith(f"   {name}\n")]
        assert len(bodies) == 1, f"no section for {name}"
        body = bodies[0]
        assert f"qedfuse {name}" in body
        for action in docgen.visible_actions(sub):
            for option in action.option_strings or [str(action.metavar)]:
                assert option in body, (name, option)


def test_man_page_lists_every_mount_option(man_text: str) -> None:
    documented = {spelling.split("=")[0] for spelling, _ in options.OPTION_HELP}
    missing = options.option_keys() - documented
    assert not missing, f"-o options without an entry in OPTION_HELP: {sorted(missing)}"
    mount_section = man_text.split("MOUNT OPTIONS", 1)[1].split("EXIT STATUS", 1)[0]
    for spelling, _ in options.OPTION_HELP:
        assert spelling.replace("…", "...") in mount_section or spelling in mount_section
    for prefix in options.DROPPED_PREFIXES:
        assert prefix in mount_section


def test_every_documented_mount_option_is_accepted() -> None:
    for spelling, _ in options.OPTION_HELP:
        if spelling.endswith("…"):
            continue
        key, _, value = spelling.partition("=")
        value = {"USER": "0", "GROUP": "0", "MASK": "022", "SECONDS": "3", "N": "65536"}.get(
            value, value.split("|")[0] or "x"
        )
        options.parse_options([f"{key}={value}" if "=" in spelling else key])


def test_man_page_renders_with_man(tmp_path: Path) -> None:
    man = require_tool("man")
    page = tmp_path / "qedfuse.1"
    page.write_text(docgen.manpage())
    cp = check_ok(run([man, "-l", str(page)], env={**os.environ, "MANPAGER": "cat"}))
    assert "qedfuse" in cp.stdout


# ---------------------------------------------------------------------- bash completion


def _complete(script: Path, *words: str) -> list[str]:
    bash = require_tool("bash")
    quoted = " ".join(f"'{w}'" for w in words)
    code = (
        f"source '{script}'\n"
        f"COMP_WORDS=(qedfuse {quoted}); COMP_CWORD={len(words)}; COMPREPLY=()\n"
        "_qedfuse; printf '%s\\n' \"${COMPREPLY[@]}\"\n"
    )
    return check_ok(run([bash, "--norc", "-c", code], cwd=script.parent)).stdout.split()


@pytest.fixture(scope="module")
def completion(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("completion") / "qedfuse.bash"
    path.write_text(docgen.bash_completion())
    check_ok(run([require_tool("bash"), "-n", str(path)]))
    return path


def test_completion_lists_every_command(completion: Path) -> None:
    offered = _complete(completion, "")
    for name in SUBCOMMANDS:
        assert name in offered
    assert _complete(completion, "ch") == ["check"]
    assert set(_complete(completion, "-")) >= set(docgen.option_strings(PARSER))


@pytest.mark.parametrize("name", list(cliparser.COMMANDS))
def test_completion_lists_every_option_of_a_command(completion: Path, name: str) -> None:
    offered = set(_complete(completion, name, "-"))
    assert offered == set(docgen.option_strings(SUBCOMMANDS[name]))
    for action in docgen.visible_actions(SUBCOMMANDS[name]):
        if action.option_strings and action.choices:
            for flag in action.option_strings:
                got = _complete(completion, name, flag, "")
                assert got == [str(c) for c in action.choices], (name, flag)


def test_completion_of_mount_options(completion: Path) -> None:
    assert "writeback_cache" in _complete(completion, "mount", "-o", "")
    assert _complete(completion, "mount", "-o", "ro,writeb") == ["ro,writeback_cache"]
    assert _complete(completion, "mount", "-o", "flush_d") == ["flush_delay="]


# ---------------------------------------------------------------------- metadata


def test_version_lives_in_one_place() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert "version" not in project
    assert project["dynamic"] == ["version"]
    assert importlib.metadata.version("qedfuse") == __version__
    hits = [
        p
        for p in ROOT.joinpath("qedfuse").glob("*.py")
        if re.search(rf"['\"]{re.escape(__version__)}['\"]", p.read_text())
    ]
    assert hits == [ROOT / "qedfuse" / "__init__.py"]
    assert f"## [{__version__}]" in (ROOT / "CHANGELOG.md").read_text()


def test_license_and_metadata() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["license"] == "MIT"
    assert (ROOT / "LICENSE").read_text().startswith("MIT License")
    for key in ("authors", "keywords", "classifiers", "urls"):
        assert project[key], key
    meta = importlib.metadata.metadata("qedfuse")
    assert meta["License-Expression"] == "MIT"


# ---------------------------------------------------------------------- make install


def _copy_of_clone(dst: Path) -> Path:
    """The tracked and new (not ignored) files of this checkout, without .venv."""
    listed = check_ok(
        run(["git", "ls-files", "-z", "-co", "--exclude-standard"], cwd=ROOT)
    ).stdout.split("\0")
    for name in filter(None, listed):
        src = ROOT / name
        if src.is_file():
            (dst / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / name)
    return dst


@pytest.mark.slow
@pytest.mark.fuse
@pytest.mark.timeout(900)
def test_make_install_is_self_contained(tmp_path: Path, qemu_img: str) -> None:
    """Install from a copy of the clone into a prefix, delete the copy, then use the install.

    The install is ``python -m venv`` + ``pip install .`` (non-editable) of the copy, so this
    is also the "pip install . works alone in a fresh venv" check (pyfuse3 from pip's cache).
    """
    make = require_tool("make")
    require_fuse()
    clone = _copy_of_clone(tmp_path / "clone")
    prefix, staged = tmp_path / "prefix", tmp_path / "staged"
    env = {**os.environ, "PYTHON": sys.base_prefix + "/bin/python3"}
    env.pop("VIRTUAL_ENV", None)
    args = [f"DESTDIR={staged}", f"PREFIX={prefix}", f"SYSTEMDDIR={prefix}/systemd"]
    check_ok(run([make, "-C", str(clone), "install", *args], env=env, timeout=800))
    shutil.rmtree(clone)  # the install must not need the clone
    # DESTDIR staging (as a package build does): no file may mention the staging directory;
    # then "unpack the package" by moving the tree to its final place.
    cp = subprocess.run(["grep", "-rlI", str(staged), str(staged)], check=False)
    assert cp.returncode == 1, "files mention the staging directory"
    Path(f"{staged}{prefix}").rename(prefix)

    qedfuse = prefix / "bin" / "qedfuse"
    assert qedfuse.is_symlink()
    assert os.readlink(qedfuse) == str(prefix / "lib" / "qedfuse" / "bin" / "qedfuse")
    version = check_ok(run([str(qedfuse), "--version"])).stdout
    assert version.startswith(f"qedfuse {__version__}\n")
    assert "pyfuse3 " in version
    site = next((prefix / "lib" / "qedfuse" / "lib").glob("python3*/site-packages"))
    assert (site / "qedfuse" / "cli.py").is_file()  # a real copy, not an editable link
    assert not list(site.glob("__editable__*"))
    man = prefix / "share" / "man" / "man1" / "qedfuse.1"
    assert man.read_text() == docgen.manpage()
    completion = prefix / "share" / "bash-completion" / "completions" / "qedfuse"
    assert completion.read_text() == docgen.bash_completion()
    unit = (prefix / "systemd" / "qedfuse@.service").read_text()
    assert f"ExecStart={qedfuse} mount" in unit

    image, mnt = tmp_path / "disk.qed", tmp_path / "mnt"
    mnt.mkdir()
    check_ok(run([str(qedfuse), "create", "-q", image, "4M"]))
    check_ok(run([str(qedfuse), "mount", image, mnt]))
    try:
        assert mount_entry(mnt) is not None
        (mnt / "disk.raw").write_bytes(b"installed")  # O_TRUNC, ignored
    finally:
        check_ok(run([str(qedfuse), "umount", "--wait", mnt]))
    check_ok(run([qemu_img, "check", image]))
    check_ok(run([qemu_img, "convert", "-O", "raw", image, tmp_path / "out.raw"]))
    assert (tmp_path / "out.raw").read_bytes()[:9] == b"installed"
