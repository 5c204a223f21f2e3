"""Shared command-line plumbing: one-line errors and clean exits for every entry point."""

import argparse
import sys
from typing import Callable, NoReturn

from .errors import ElmError


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (exit 2)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def run_cli(main: Callable[[], None]) -> None:
    """Run `main`, turning user errors into one stderr line and a non-zero exit."""
    try:
        main()
    except ElmError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError:
        # The reader went away (e.g. `| head`); stop quietly.
        sys.stderr.close()
        sys.exit(1)
