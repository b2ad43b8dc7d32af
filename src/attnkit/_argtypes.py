"""Argument types for the command line: each converts one option's text or raises
``argparse.ArgumentTypeError``, so a bad value ends in argparse's one-line message and exit code 2 before any
work starts (``attnkit translate train: error: argument --lr: expected a finite number > 0, got 'nan'``).

Every type carries ``bad_examples``: values it must refuse. tests/test_cli_options.py walks every sub-command's
parser and feeds each option those values (and a wrong choice to every option with ``choices``), so an option
added later without a validating type fails that test.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Sequence


class ArgType:
    """A named converter (argparse shows ``__name__`` in its messages) with the values it refuses."""

    def __init__(self, name: str, convert: Callable[[str], object], bad_examples: Sequence[str]):
        self.__name__ = name
        self._convert = convert
        self.bad_examples = tuple(bad_examples)

    def __call__(self, text: str):
        return self._convert(text)

    def __repr__(self) -> str:
        return self.__name__


def _fail(want: str, text: str):
    raise argparse.ArgumentTypeError(f"expected {want}, got {text!r}")


def _int(text: str, want: str) -> int:
    try:
        return int(text.strip())
    except ValueError:
        _fail(want, text)


def int_at_least(minimum: int, maximum: int | None = None) -> ArgType:
    """An int >= ``minimum`` (and <= ``maximum``)."""
    want = f"an int >= {minimum}" if maximum is None else f"an int in [{minimum}, {maximum}]"

    def convert(text: str) -> int:
        value = _int(text, want)
        if value < minimum or (maximum is not None and value > maximum):
            _fail(want, text)
        return value

    bad = ["x", "1.5", str(minimum - 1)] + ([str(maximum + 1)] if maximum is not None else [])
    return ArgType(want.replace(" ", "_"), convert, bad)


positive_int = int_at_least(1)
nonnegative_int = int_at_least(0)


def odd_positive_int() -> ArgType:
    want = "an odd int >= 1"

    def convert(text: str) -> int:
        value = _int(text, want)
        if value < 1 or value % 2 == 0:
            _fail(want, text)
        return value

    return ArgType("odd_int", convert, ["x", "0", "2", "-3"])


def real(minimum: float | None = None, maximum: float | None = None, *, min_open: bool = False,
         max_open: bool = False) -> ArgType:
    """A finite float in the range ``[minimum, maximum]`` (``*_open``: the bound itself excluded)."""
    lo = "(" if min_open else "["
    hi = ")" if max_open else "]"
    low, high = "-inf" if minimum is None else minimum, "inf" if maximum is None else maximum
    want = f"a finite number in {lo}{low}, {high}{hi}"

    def convert(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            _fail(want, text)
        if not math.isfinite(value):
            _fail(want, text)
        if minimum is not None and (value < minimum or (min_open and value == minimum)):
            _fail(want, text)
        if maximum is not None and (value > maximum or (max_open and value == maximum)):
            _fail(want, text)
        return value

    bad = ["x", "nan", "inf"]
    if minimum is not None:
        bad.append(str(minimum) if min_open else str(minimum - 1))
    if maximum is not None:
        bad.append(str(maximum) if max_open else str(maximum + 1))
    return ArgType("number", convert, bad)


positive_float = real(0.0, min_open=True)
nonnegative_float = real(0.0)
probability = real(0.0, 1.0, max_open=True)  # dropout, label smoothing: [0, 1)
open_fraction = real(0.0, 1.0, min_open=True, max_open=True)  # a share that must be neither 0 nor all: (0, 1)


def _nonempty(text: str) -> str:
    if not text.strip() or "\0" in text:
        _fail("a non-empty path", text)
    return text


path = ArgType("path", _nonempty, ["", "   "])


def _html_file(text: str) -> str:
    import os

    if not text.strip() or "\0" in text or os.path.splitext(text)[1].lower() not in (".html", ".htm") \
            or os.path.isdir(text):
        _fail("the path of an .html file to write", text)
    return text


html_file = ArgType("html_file", _html_file, ["", "out.txt", "out"])
name = ArgType("name", _nonempty, ["", " "])


def comma_list(choices: Sequence[str]) -> ArgType:
    """A comma-separated, non-empty subset of ``choices`` (order kept, repeats dropped)."""
    want = f"a comma-separated subset of {','.join(choices)}"

    def convert(text: str) -> list[str]:
        items = [t.strip() for t in text.split(",")]
        if not text.strip() or any(t not in choices for t in items):
            _fail(want, text)
        return list(dict.fromkeys(items))

    return ArgType("list", convert, ["", "foo", f"{choices[0]},foo"])


def sizes_list(word: str = "all", minimum: int = 1) -> ArgType:
    """A comma-separated list of ints >= ``minimum`` and/or ``word``."""
    want = f"comma-separated ints >= {minimum} or {word!r}"

    def convert(text: str) -> list[int | str]:
        out: list[int | str] = []
        for item in (t.strip() for t in text.split(",")):
            if item == word:
                out.append(word)
                continue
            try:
                value = int(item)
            except ValueError:
                _fail(want, text)
            if value < minimum:
                _fail(want, text)
            out.append(value)
        return list(dict.fromkeys(out))

    return ArgType("sizes", convert, ["", str(minimum - 1), f"{minimum},x", "-5"])


def regex(text: str):
    import re

    try:
        re.compile(text)
    except re.error as exc:
        raise argparse.ArgumentTypeError(f"expected a regular expression, got {text!r} ({exc})") from None
    return text


regex_type = ArgType("regex", regex, ["(", "[a-"])


def usage_error(command: str, message: str) -> int:
    """Print ``attnkit <command>: error: <message>`` (argparse's form) on stderr and return exit code 2: for
    mistakes only visible once options are combined (``--heads`` that does not divide ``--embed-dim``)."""
    import sys

    print(f"attnkit {command}: error: {message}", file=sys.stderr)
    return 2


def fill_defaults(args, defaults: dict, quick: dict | None = None) -> list[str]:
    """Give every option of ``defaults`` left at ``None`` (not given) its default, or with ``args.quick`` its
    ``quick`` value, so ``--quick`` never overrides an option given on the command line; return the names it
    filled from ``quick``."""
    filled = []
    for name, value in defaults.items():
        if getattr(args, name) is None:
            use_quick = bool(getattr(args, "quick", False)) and quick is not None and name in quick
            setattr(args, name, quick[name] if use_quick else value)
            if use_quick:
                filled.append(name)
    return filled
