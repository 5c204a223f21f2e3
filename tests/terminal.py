"""A child process on a pseudo-terminal, for tests of interactive commands (chat)."""

import fcntl
import os
import pty
import select
import subprocess
import termios
import time


class Terminal:
    """A process on a pseudo-terminal, read until a marker appears."""

    def __init__(self, args, env=None):
        self.master, slave = pty.openpty()
        env = {**(env or os.environ), "TERM": "dumb", "COLUMNS": "200"}
        self.proc = subprocess.Popen(args, stdin=slave, stdout=slave, stderr=slave, env=env, close_fds=True, preexec_fn=self._own_terminal)
        os.close(slave)
        self.seen = ""

    @staticmethod
    def _own_terminal():
        """Make the pty the child's controlling terminal, so Ctrl-C there sends it SIGINT as in a real shell."""
        os.setsid()
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    def read_until(self, marker: str, timeout: float = 120) -> str:
        start, deadline = len(self.seen), time.time() + timeout
        while marker not in self.seen[start:]:
            assert self.proc.poll() is None or select.select([self.master], [], [], 0)[0], f"exited early:\n{self.seen}"
            assert time.time() < deadline, f"timed out waiting for {marker!r}:\n{self.seen}"
            if select.select([self.master], [], [], 0.2)[0]:
                try:
                    self.seen += os.read(self.master, 4096).decode(errors="replace")
                except OSError:
                    break
        return self.seen[start:]

    def send(self, text: str) -> None:
        os.write(self.master, text.encode())
