"""Every option of every ``attnkit`` sub-command refuses a bad value at parse time: argparse's one-line message
naming the option, exit code 2, no traceback, nothing run.

The options are read from the parsers themselves (``attnkit.cli.COMMANDS``, each command's parser and its own
sub-commands), so an option added later is covered without editing this file: it must either have
``choices`` or an argument type from :mod:`attnkit._argtypes` (which carries the values it refuses); an option
with neither fails ``test_every_option_is_validated``.
"""

from __future__ import annotations

import argparse

import pytest

from attnkit.cli import COMMANDS, build_parser


def _subparsers(parser: argparse.ArgumentParser):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            yield from action.choices.items()


def _commands():
    """``(argv prefix, parser)`` of every command and sub-command that takes options."""
    out = []
    for name in COMMANDS:
        parser = dict(_subparsers(build_parser([name])))[name]
        stack = [([name], parser)]
        while stack:
            prefix, p = stack.pop()
            subs = list(_subparsers(p))
            if len([a for a in p._actions if a.option_strings]) > 1 or not subs:
                out.append((prefix, p))
            stack.extend(([*prefix, sub], sp) for sub, sp in subs)
    return out


def _value_options(parser):
    for action in parser._actions:
        if not action.option_strings or action.nargs == 0 or isinstance(action, argparse._HelpAction):
            continue  # positionals (free text), flags, --help
        yield action


def _bad_values(action) -> list[str]:
    if action.choices is not None:
        return ["no-such-choice"]
    return list(getattr(action.type, "bad_examples", ()))


CASES = [(prefix, action.option_strings[-1], bad) for prefix, parser in _commands()
         for action in _value_options(parser) for bad in _bad_values(action)]


def test_the_walk_finds_every_command_and_their_options():
    prefixes = {" ".join(prefix) for prefix, _ in _commands()}
    assert {"translate train", "translate eval", "translate predict", "vision", "graph", "speech", "lm", "bench",
            "tour"} <= prefixes
    options = {(" ".join(p), o) for p, o, _ in CASES}
    assert ("translate train", "--lr") in options and ("vision", "--k") in options and len(CASES) > 150


@pytest.mark.parametrize("prefix, parser", _commands(), ids=lambda x: " ".join(x) if isinstance(x, list) else "")
def test_every_option_is_validated(prefix, parser):
    loose = [a.option_strings[-1] for a in _value_options(parser) if not _bad_values(a)]
    assert not loose, (f"attnkit {' '.join(prefix)}: options {loose} take any text; give each choices or a type "
                       "from attnkit._argtypes (so a bad value is refused at parse time)")


@pytest.mark.parametrize("prefix, option, bad", CASES, ids=[f"{' '.join(p)} {o}={b!r}" for p, o, b in CASES])
def test_a_bad_value_is_an_argparse_error(prefix, option, bad, capsys):
    argv = [*prefix, f"{option}={bad}"]
    with pytest.raises(SystemExit) as exc:
        build_parser(argv).parse_args(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2, err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"attnkit {' '.join(prefix)}: error: argument {option}"), last


@pytest.mark.parametrize("prefix, parser", _commands(), ids=lambda x: " ".join(x) if isinstance(x, list) else "")
def test_help_prints_and_exits_0(prefix, parser, capsys):
    argv = [*prefix, "--help"]
    with pytest.raises(SystemExit) as exc:
        build_parser(argv).parse_args(argv)
    assert exc.value.code == 0 and "usage: attnkit" in capsys.readouterr().out
