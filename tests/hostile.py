"""Running hostile inputs where a failing fix cannot hurt the machine.

Bombs (pickles, zip files, configs, templates) run in a child process with a
cap on its address space and a wall-clock timeout; the tests then assert what
the child printed and how it exited: a child that tried to exceed the cap
dies with a MemoryError or a signal instead of the expected one-line error.
"""

import os
import resource
import subprocess
import sys
from dataclasses import dataclass
from typing import Optional, Sequence, Union

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Enough for Python + mlx + a tiny model; far below what any bomb asks for.
DEFAULT_MEMORY_BYTES = 1500 << 20


@dataclass
class Outcome:
    returncode: int
    stdout: str
    stderr: str

    @property
    def stderr_lines(self) -> list:
        return [line for line in self.stderr.splitlines() if line.strip()]

    def one_line_error(self) -> str:
        """The single stderr line of a clean refusal (asserts there is exactly one and no traceback)."""
        assert "Traceback" not in self.stderr, self.stderr[-3000:]
        lines = self.stderr_lines
        assert len(lines) == 1, self.stderr[-3000:]
        return lines[0]

    def error_line(self) -> str:
        """The refusal after any progress notes: the last stderr line, the only one that says error."""
        assert "Traceback" not in self.stderr, self.stderr[-3000:]
        errors = [line for line in self.stderr_lines if "error" in line.lower()]
        assert len(errors) == 1 and errors[0] == self.stderr_lines[-1], self.stderr[-3000:]
        return errors[0]


def run_limited(
    argv: Sequence[str],
    memory_bytes: int = DEFAULT_MEMORY_BYTES,
    timeout: float = 120,
    stdin: Optional[Union[str, bytes]] = None,
    cwd: Optional[str] = None,
    env: Optional[dict] = None,
) -> Outcome:
    """Run `argv` (e.g. [sys.executable, "-m", "convert", ...]) under an address-space cap."""

    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))

    full_env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), **(env or {})}
    if isinstance(stdin, str):
        stdin = stdin.encode()
    proc = subprocess.run(list(argv), input=stdin, capture_output=True, timeout=timeout, preexec_fn=limit, cwd=cwd, env=full_env)
    return Outcome(proc.returncode, proc.stdout.decode(errors="replace"), proc.stderr.decode(errors="replace"))


def python_code(code: str, **kwargs) -> Outcome:
    """Run a snippet of Python (which imports elm_mlx first, as every entry point does) under the cap."""
    return run_limited([sys.executable, "-c", "import elm_mlx\n" + code], **kwargs)
