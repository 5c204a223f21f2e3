"""Progress of long work (training steps, converted tensors) that reads well wherever it goes.

On a terminal it is a tqdm bar. Anywhere else (a log file, a pipe, CI) a bar
is a stream of carriage returns that glues itself to the other lines, so there
it is plain lines instead: one when nothing else was printed for `interval`
seconds, and a summary at the end.

Lines a caller prints while the bar runs go through `note`, which lifts the
bar out of the way on a terminal and keeps stdout and stderr in order elsewhere.
"""

import sys
import time
from typing import Callable, Optional, TextIO

from tqdm import tqdm


def is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or closed
        return False


def duration(seconds: float) -> str:
    """3.2 s, 4m05s, 1h02m: short and unambiguous in a log line."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, seconds = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


class Progress:
    """Count `total` units of work from `initial`; a bar on a terminal, plain lines elsewhere."""

    def __init__(
        self,
        total: int,
        desc: str,
        unit: str,
        initial: int = 0,
        enabled: bool = True,
        stream: Optional[TextIO] = None,
        interval: float = 60.0,
    ):
        self.total, self.desc, self.unit, self.n = total, desc, unit, initial
        self.enabled = enabled
        self.stream = stream if stream is not None else sys.stderr
        self.interval = interval
        self.status = ""
        self._first = initial
        self._start = self._last_line = time.perf_counter()
        self._bar = None
        if enabled and is_terminal(self.stream):
            self._bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, file=self.stream, dynamic_ncols=True)

    def update(self, n: int = 1, status: str = "") -> None:
        """Count n more units; `status` (e.g. "loss 2.31") is shown beside the count."""
        self.n += n
        self.status = status
        if self._bar is not None:
            self._bar.update(n)
            if status:
                self._bar.set_postfix_str(status, refresh=False)
        elif self.enabled and time.perf_counter() - self._last_line >= self.interval:
            self._line(self._summary(done=False))

    def note(self, say: Callable[[str], None], message: str) -> None:
        """say(message) (print, a logger, ...) without breaking the bar or the order of the lines."""
        if self._bar is not None:
            with tqdm.external_write_mode(file=self.stream):
                say(message)
            return
        say(message)
        _flush(sys.stdout)
        self._last_line = time.perf_counter()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif self.enabled and self.n > self._first:
            self._line(self._summary(done=True))
            self.enabled = False  # closed: say it once

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _summary(self, done: bool) -> str:
        elapsed = time.perf_counter() - self._start
        count = self.n - self._first
        rate = count / elapsed if elapsed > 0 else 0.0
        units = self.unit if self.total == 1 else f"{self.unit}s"
        text = f"{self.desc}: {self.n}/{self.total} {units}"
        if done:
            text += f" in {duration(elapsed)}"
        else:
            text += f" ({100 * self.n / max(self.total, 1):.0f}%), {duration(elapsed)} elapsed"
            if rate > 0:
                text += f", about {duration((self.total - self.n) / rate)} left"
        if rate > 0:
            text += f", {rate:.2f} {self.unit}s/s" if rate < 10 else f", {rate:.0f} {self.unit}s/s"
        return text + (f", {self.status}" if self.status else "")

    def _line(self, text: str) -> None:
        _flush(sys.stdout)  # what was printed before comes first in a shared log
        self.stream.write(text + "\n")
        _flush(self.stream)
        self._last_line = time.perf_counter()


def _flush(stream) -> None:
    try:
        stream.flush()
    except (AttributeError, ValueError):  # closed or not a real stream; nothing to keep in order
        pass
