"""Progress bars draw on a terminal and stay silent in logs (no carriage-return debris)."""

from __future__ import annotations

import io

from harness.progress import progress_bar


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_bar_draws_on_a_terminal_only() -> None:
    log, tty = io.StringIO(), _Terminal()
    assert list(progress_bar(range(3), desc="x", file=log)) == [0, 1, 2]
    assert log.getvalue() == "", "a log file gets no bar frames"
    assert list(progress_bar(range(3), desc="x", file=tty)) == [0, 1, 2]
    assert "x" in tty.getvalue() and "\r" in tty.getvalue()
    off = _Terminal()
    list(progress_bar(range(3), file=off, disable=True))
    assert off.getvalue() == "", "disable=True turns it off everywhere"
