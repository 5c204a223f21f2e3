"""Keeping the HTTP side bounded: connection deadlines, file descriptors, and a log that cannot flood.

uvicorn closes a keep-alive connection that idles after a response, but not
one that never finishes sending its request headers: 20k such sockets
exhausted the process's file descriptors, and then every accept() failure
logged a traceback. This module adds the missing deadline and thins the log.
"""

import logging
import resource
import time
from typing import Dict, Tuple

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol


def protocol_with_header_timeout(seconds: float) -> type:
    """uvicorn's h11 protocol, closing connections whose request headers take longer than `seconds`.

    The clock starts when the connection opens and again after each response,
    so an idle socket and a slow-loris sender are both closed.
    """

    class HeaderTimeoutProtocol(H11Protocol):
        _deadline = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm()

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            self._disarm()
            if not self.transport.is_closing():
                self._deadline = self.loop.call_later(seconds, self._expire)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _expire(self) -> None:
            self._deadline = None
            waiting_for_headers = self.conn.their_state is h11.IDLE and (self.cycle is None or self.cycle.response_complete)
            if waiting_for_headers and not self.transport.is_closing():
                self.transport.close()

    return HeaderTimeoutProtocol


def raise_open_file_limit() -> int:
    """Lift the soft limit on open files to the hard one (often 1024 -> far more); return the limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 65536)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            return target
        except (ValueError, OSError):
            pass
    return soft


class OncePerInterval(logging.Filter):
    """Let one record per distinct message through per `interval` seconds; say how many were held back.

    A record's traceback is reduced to its exception's one-line summary, so
    that an error repeated under load (accept() failing on every connection)
    costs one short line a minute, not a screenful a millisecond.
    """

    def __init__(self, interval: float = 60.0, clock=time.monotonic):
        super().__init__()
        self.interval, self.clock = interval, clock
        self.seen: Dict[Tuple[str, int, str], Tuple[float, int]] = {}  # key -> (last shown, held back since)

    def filter(self, record: logging.LogRecord) -> bool:
        lines = record.getMessage().splitlines()
        message = lines[0] if lines else ""
        if record.exc_info and record.exc_info[1] is not None:
            error = record.exc_info[1]
            message = f"{message}: {type(error).__name__}: {error}"
        record.msg, record.args, record.exc_info, record.exc_text, record.stack_info = message, None, None, None, None
        key = (record.name, record.levelno, message[:200])
        now = self.clock()
        shown, held = self.seen.get(key, (None, 0))
        if shown is not None and now - shown < self.interval:
            self.seen[key] = (shown, held + 1)
            return False
        if held:
            record.msg, record.args = f"{message} (and {held} more like it in the last {self.interval:.0f} s)", None
        if len(self.seen) > 1024:  # the memory of distinct messages is bounded too
            self.seen.clear()
        self.seen[key] = (now, 0)
        return True


def throttle_logs(interval: float = 60.0) -> None:
    """Install OncePerInterval on the loggers a server writes to under load."""
    log_filter = OncePerInterval(interval)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access", "asyncio"):
        logging.getLogger(name).addFilter(log_filter)
