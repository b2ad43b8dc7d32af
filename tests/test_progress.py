"""attnkit._progress: tqdm that redraws rarely when its stream is not a terminal (logs, CI)."""

import io

from attnkit import _progress


class _Tty(io.StringIO):
    def isatty(self):
        return True


def test_off_a_terminal_the_bar_redraws_at_the_log_interval_and_still_ends_complete():
    log = io.StringIO()
    bar = _progress.progress(range(1000), file=log, desc="work")
    assert bar.mininterval == _progress.LOG_INTERVAL
    assert sum(1 for _ in bar) == 1000
    assert "1000/1000" in log.getvalue()  # the final state is written


def test_on_a_terminal_and_when_asked_the_pace_is_tqdms():
    assert _progress.progress(range(3), file=_Tty()).mininterval < 1
    assert _progress.progress(range(3), file=io.StringIO(), mininterval=0.5).mininterval == 0.5
