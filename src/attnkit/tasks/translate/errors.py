"""The one exception the translate job shows to users as a one-line message instead of a traceback."""

from __future__ import annotations


class TranslateError(ValueError):
    """A user-facing problem (bad data file, bad checkpoint, unknown words).

    The CLI prints ``str(error)`` on one line and exits non-zero. The message names the file (and line, when
    there is one) and what was wrong.
    """
