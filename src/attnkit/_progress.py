"""Progress bars for the recipes and the benchmark: tqdm, with a log-friendly pace when nobody is watching.

On a terminal the bar redraws as tqdm normally does. When its stream is not a terminal (CI, ``make demo > log``)
every redraw becomes another line of the log, so the bar redraws at most every ``LOG_INTERVAL`` seconds and at
the end. tqdm is imported when the first bar is made, so ``import attnkit`` stays light.
"""

from __future__ import annotations

import sys

LOG_INTERVAL = 30.0  # seconds between redraws when the stream is not a terminal


def progress(iterable=None, **kwargs):
    """``tqdm(iterable, **kwargs)``; off a terminal ``mininterval`` defaults to :data:`LOG_INTERVAL`."""
    from tqdm import tqdm

    stream = kwargs.get("file") or sys.stderr
    isatty = getattr(stream, "isatty", None)
    if not (callable(isatty) and isatty()):
        kwargs.setdefault("mininterval", LOG_INTERVAL)
    return tqdm(iterable, **kwargs)
