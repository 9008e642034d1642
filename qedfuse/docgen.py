"""qedfuse(1) and the bash completion, generated from the parser so they cannot drift.

``python -m qedfuse.docgen man`` prints the man page (roff), ``python -m qedfuse.docgen bash``
the bash completion script; ``make install`` installs both.  Both read
:func:`qedfuse.cliparser.build_parser` (with the ``mount``/``umount`` arguments, so pyfuse3 must be
importable) and the ``-o`` table :data:`qedfuse.options.OPTION_HELP`.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Iterator, Sequence

from qedfuse import __version__, cliparser
from qedfuse.options import OPTION_HELP


def _parser() -> argparse.ArgumentParser:
    return cliparser.build_parser(with_mount=True)


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """The subparsers by name, in the order they were added."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _help_of(parser: argparse.ArgumentParser) -> dict[str, str]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return {a.dest: a.help or "" for a in action._choices_actions}
    return {}


def visible_actions(parser: argparse.ArgumentParser) -> Iterator[argparse.Action]:
    """Options and positionals that ``--help`` shows (not -h, not the subparsers)."""
    for action in parser._actions:
        if action.help == argparse.SUPPRESS or isinstance(
            action, (argparse._HelpAction, argparse._SubParsersAction)
        ):
            continue
        yield action


def option_strings(parser: argparse.ArgumentParser) -> list[str]:
    """Every option string of ``parser`` that ``--help`` shows, plus ``-h --help``."""
    out = ["-h", "--help"]
    for action in visible_actions(parser):
        out.extend(action.option_strings)
    return out


# ---------------------------------------------------------------------- man page


def _roff(text: str) -> str:
    """Escape text for roff: backslashes, hyphens, and a leading dot or quote."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    text = "".join(ch if ord(ch) < 128 else f"\\[u{ord(ch):04X}]" for ch in text)
    return "\n".join(
        "\\&" + line if line.startswith((".", "'")) else line for line in text.splitlines()
    )


def _invocation(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    formatter = parser._get_formatter()
    return formatter._format_action_invocation(action)


def _action_help(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    formatter = parser._get_formatter()
    return formatter._expand_help(action) if action.help else ""


def _usage(parser: argparse.ArgumentParser) -> str:
    return " ".join(parser.format_usage().removeprefix("usage:").split())


def manpage() -> str:
    """qedfuse(1) in roff (man macros)."""
    parser = _parser()
    lines = [
        f'.TH QEDFUSE 1 "" "qedfuse {__version__}" "User Commands"',
        ".SH NAME",
        "qedfuse \\- " + _roff(parser.description or ""),
        ".SH SYNOPSIS",
        ".B qedfuse",
        "[\\fB\\-V\\fR] [\\fB\\-\\-debug\\fR] \\fICOMMAND\\fR [\\fIARGS\\fR ...]",
        ".br",
        ".B qedfuse",
        "\\fIIMAGE\\fR \\fIMOUNTPOINT\\fR [\\fB\\-o\\fR \\fIOPT\\fR[,\\fIOPT\\fR...]]",
        ".SH DESCRIPTION",
        _roff(
            "qedfuse serves a QED (QEMU Enhanced Disk) image as one raw file, "
            "MOUNTPOINT/<image stem>.raw, through FUSE, and works on QED images offline "
            "with qemu-img's commands and habits (-f qed, -q, --output=json). "
            "The second form is what mount(8) and mount.fuse3 run for an fstab entry of "
            "type fuse.qedfuse. Every error is one line, 'qedfuse: <message>', on stderr."
        ),
        ".SH GLOBAL OPTIONS",
        ".TP",
        ".B \\-h, \\-\\-help",
        _roff("show the help; 'qedfuse COMMAND --help' shows a command's own"),
    ]
    for action in visible_actions(parser):
        lines += [".TP", f".B {_roff(_invocation(parser, action))}"]
        lines.append(_roff(_action_help(parser, action)))
    lines.append(".SH COMMANDS")
    helps = _help_of(parser)
    for name, sub in subcommands(parser).items():
        lines += [f'.SS "{_roff(name)}"', _roff(helps.get(name, "")), ".PP"]
        lines += [".nf", _roff(_usage(sub)), ".fi"]
        if sub.description and sub.description != helps.get(name):
            lines += [".PP", _roff(sub.description)]
        for action in visible_actions(sub):
            lines += [".TP", f".B {_roff(_invocation(sub, action))}"]
            lines.append(_roff(_action_help(sub, action)) or "\\&")
    lines += [
        ".SH MOUNT OPTIONS",
        _roff(
            "Given with -o to mount (or in the fourth field of an fstab line), comma-separated, "
            "may be repeated; later ones win. Anything not listed is refused (exit 2)."
        ),
    ]
    for spelling, text in OPTION_HELP:
        lines += [".TP", f".B {_roff(spelling)}", _roff(text)]
    lines += [".SH EXIT STATUS", ".nf", _roff(cliparser.EXIT_STATUS_TEXT), ".fi"]
    lines += [
        ".SH FILES",
        ".TP",
        ".B /run/qedfuse/",
        _roff("pid registry of the daemons (root; others: $XDG_RUNTIME_DIR/qedfuse/)"),
        ".SH SEE ALSO",
        ".BR qemu\\-img (1),",
        ".BR mount (8),",
        ".BR mount.fuse3 (8),",
        ".BR fusermount3 (1),",
        ".BR losetup (8)",
    ]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------- bash completion


def _choices_cases(name: str, parser: argparse.ArgumentParser) -> list[str]:
    cases = []
    for action in visible_actions(parser):
        if action.option_strings and action.choices:
            words = " ".join(str(c) for c in action.choices)
            for flag in action.option_strings:
                cases.append(f'        "{name} {flag}") words={shlex.quote(words)} ;;')
        elif action.option_strings and action.nargs != 0 and flag_takes_file(action):
            for flag in action.option_strings:
                cases.append(f'        "{name} {flag}") words="" ;;')
    return cases


def flag_takes_file(action: argparse.Action) -> bool:
    """Options whose value is free text or a path (completed as file names)."""
    return action.nargs != 0 and not isinstance(
        action, (argparse._StoreTrueAction, argparse._StoreConstAction)
    )


def bash_completion() -> str:
    """A bash completion script for ``qedfuse`` (``complete -F _qedfuse qedfuse``)."""
    parser = _parser()
    subs = subcommands(parser)
    mount_words = " ".join(
        spelling.split("=")[0] + ("=" if "=" in spelling else "")
        for spelling, text in OPTION_HELP
        if "ignored" not in text  # fstab-only words, and subtype=
    )
    mount_words = " ".join(dict.fromkeys(mount_words.split()))  # once each, in order
    lines = [
        "# bash completion for qedfuse, generated by `python -m qedfuse.docgen bash`.",
        "_qedfuse() {",
        '    local cur="${COMP_WORDS[COMP_CWORD]}" prev="${COMP_WORDS[COMP_CWORD-1]}"',
        f"    local commands={shlex.quote(' '.join(subs))}",
        '    local cmd="" i words',
        "    for ((i = 1; i < COMP_CWORD; i++)); do",
        f"        case ${{COMP_WORDS[i]}} in {'|'.join(subs)})",
        "            cmd=${COMP_WORDS[i]}; break ;;",
        "        esac",
        "    done",
        "    if [[ -z $cmd ]]; then",
        "        if [[ $cur == -* ]]; then",
        f"            COMPREPLY=($(compgen -W {shlex.quote(' '.join(option_strings(parser)))} "
        '-- "$cur"))',
        "        else",
        '            COMPREPLY=($(compgen -W "$commands" -- "$cur") $(compgen -f -- "$cur"))',
        "        fi",
        "        return 0",
        "    fi",
        '    if [[ ($cmd == mount || $cmd == "") && $prev == -o ]]; then',
        '        local head=""',
        '        [[ $cur == *,* ]] && head="${cur%,*},"',
        f'        COMPREPLY=($(compgen -P "$head" -W {shlex.quote(mount_words)} '
        '-- "${cur##*,}"))',
        "        [[ ${COMPREPLY[0]} == *= ]] && compopt -o nospace 2>/dev/null",
        "        return 0",
        "    fi",
        "    words=unset",
        '    case "$cmd $prev" in',
    ]
    for name, sub in subs.items():
        lines += _choices_cases(name, sub)
    lines += [
        "    esac",
        "    if [[ $words != unset ]]; then",
        '        if [[ -n $words ]]; then COMPREPLY=($(compgen -W "$words" -- "$cur"));',
        '        else COMPREPLY=($(compgen -f -- "$cur")); fi',
        "        return 0",
        "    fi",
        "    if [[ $cur == -* ]]; then",
        "        case $cmd in",
    ]
    for name, sub in subs.items():
        lines.append(
            f"            {name}) COMPREPLY=($(compgen -W "
            f'{shlex.quote(" ".join(option_strings(sub)))} -- "$cur")) ;;'
        )
    lines += [
        "        esac",
        "    else",
        '        COMPREPLY=($(compgen -f -- "$cur"))',
        "    fi",
        "    return 0",
        "}",
        "complete -o filenames -F _qedfuse qedfuse",
    ]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m qedfuse.docgen man|bash``: print the man page or the completion script."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args == ["man"]:
        sys.stdout.write(manpage())
    elif args == ["bash"]:
        sys.stdout.write(bash_completion())
    else:
        sys.stderr.write("usage: python -m qedfuse.docgen man|bash\n")
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
