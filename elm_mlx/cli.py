"""Shared command-line plumbing: one-line errors and clean exits for every entry point.

Exit codes: 0 done, 1 failed work (an `error: ...` line), 2 usage error
(argparse), 130 interrupted. Nothing reaches the user as a traceback unless
ELM_DEBUG=1 asks for it.
"""

import argparse
import difflib
import errno
import math
import os
import sys
import tempfile
import traceback
from typing import Callable, NoReturn, Optional

from .errors import ElmError

DEBUG_VARIABLE = "ELM_DEBUG"


# Set by the `elm-mlx` dispatcher, so that usage lines read "elm-mlx generate", not "python -m ...".
invoked_as: Optional[str] = None


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (exit 2), and a mistyped flag is named as such.

    Plain argparse checks required options first, so `--promt hi` was reported
    as "--prompt is required"; here unknown options are reported first, with
    the nearest known one.
    """

    def __init__(self, *args, **kwargs):
        if invoked_as is not None:
            kwargs["prog"] = invoked_as
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {one_line(message)} (see --help)\n")

    def parse_args(self, args=None, namespace=None):
        args = sys.argv[1:] if args is None else list(args)
        unknown = self._unknown_options(args)
        if unknown:
            self.error(f"unrecognized arguments: {' '.join(unknown)}{self._suggestion(unknown[0])}")
        return super().parse_args(args, namespace)

    def _unknown_options(self, args) -> list:
        """What argparse would call unrecognized, found before it checks for missing required options."""
        required = [a for a in self._actions if a.required] + [g for g in self._mutually_exclusive_groups if g.required]
        for item in required:
            item.required = False
        try:
            _, extras = super().parse_known_args(args, argparse.Namespace())
        finally:
            for item in required:
                item.required = True
        return extras

    def _suggestion(self, unknown: str) -> str:
        flag = unknown.split("=", 1)[0]
        known = [o for a in self._actions for o in a.option_strings if o.startswith("--")]
        close = difflib.get_close_matches(flag, known, n=1, cutoff=0.6)
        return f" (did you mean {close[0]}?)" if close else ""


# --------------------------------------------------------------------------
# Argument types: a bad number is a usage error (exit 2), before any work
# --------------------------------------------------------------------------


def _number(kind: type, text: str):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}") from None
    if kind is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def int_at_least(low: int, high: Optional[int] = None) -> Callable[[str], int]:
    """An argparse type for integers in [low, high]."""

    def parse(text: str) -> int:
        value = _number(int, text)
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"must be {_range(low, high)}, got {value}")
        return value

    parse.__name__ = "integer"  # argparse names the type in "invalid integer value"
    return parse


def float_in(low: float, high: Optional[float] = None, low_open: bool = False, high_open: bool = False) -> Callable[[str], float]:
    """An argparse type for finite floats in a range (NaN and infinities refused)."""

    def parse(text: str) -> float:
        value = _number(float, text)
        too_low = value <= low if low_open else value < low
        too_high = high is not None and (value >= high if high_open else value > high)
        if too_low or too_high:
            raise argparse.ArgumentTypeError(f"must be {_range(low, high, low_open, high_open)}, got {text}")
        return value

    parse.__name__ = "number"
    return parse


def _range(low, high, low_open=False, high_open=False) -> str:
    if high is None:
        return f"{'>' if low_open else '>='} {low}"
    return f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"


positive_int = int_at_least(1)
non_negative_int = int_at_least(0)
SEED = int_at_least(0, 2**32 - 1)  # training: numpy's legacy and mlx's generators both accept it
SAMPLING_SEED = int_at_least(0, 2**64 - 1)  # generation: mx.random.seed takes an unsigned 64-bit integer


# --------------------------------------------------------------------------
# Exceptions to one line
# --------------------------------------------------------------------------


def check_output_path(path, what: str, directory: bool = True) -> None:
    """Refuse an output path that cannot be written before any slow work (loading, training).

    The nearest existing ancestor must be a writable directory; it is probed by
    creating and removing a file, since permission bits say nothing for root.
    """
    path = os.path.abspath(os.fspath(path))
    if os.path.exists(path) and os.path.isdir(path) != directory:
        raise ElmError(f"{what} {path} is {'a file' if directory else 'a directory'}; expected {'a directory' if directory else 'a file'}")
    ancestor = os.path.dirname(path)
    while not os.path.exists(ancestor):
        ancestor = os.path.dirname(ancestor)
    if not os.path.isdir(ancestor):
        raise ElmError(f"{what} {path} cannot be created: {ancestor} is a file, not a directory")
    try:
        fd, probe = tempfile.mkstemp(prefix=".elm-mlx-write-test-", dir=ancestor)
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise ElmError(f"{what} {path} cannot be written: {one_line(e.strerror or e)} in {ancestor}") from None


def one_line(text: str, limit: int = 400) -> str:
    """`text` as a single bounded line (messages may quote hostile input)."""
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def _path(e: OSError) -> str:
    name = e.filename if e.filename is not None else e.filename2
    if name is None:
        return "output"
    return one_line(os.fsdecode(name) if isinstance(name, bytes) else str(name), 200)


def describe_os_error(e: OSError) -> str:
    """What went wrong with which path, and what to do, for the OSErrors users cause."""
    path = _path(e)
    if isinstance(e, FileNotFoundError):
        return f"{path} does not exist (or a directory on its way is missing)"
    if isinstance(e, IsADirectoryError):
        return f"{path} is a directory; a file is expected there"
    if isinstance(e, NotADirectoryError):
        return f"{path}: a part of this path is a file, not a directory"
    if isinstance(e, FileExistsError):
        return f"{path} already exists; choose another path or remove it"
    code = e.errno
    if code == errno.ENOSPC:
        return f"no space left on device writing {path}; free some space or write elsewhere"
    if code == errno.EDQUOT:
        return f"disk quota exceeded writing {path}; free some space or write elsewhere"
    if code == errno.EFBIG:
        return f"cannot write {path}: file too large (file-size limit or file system)"
    if code == errno.EROFS:
        return f"cannot write {path}: read-only file system; choose a writable path"
    if code in (errno.EACCES, errno.EPERM):
        return f"cannot access {path}: permission denied; check its permissions or choose another path"
    if code in (errno.EMFILE, errno.ENFILE):
        return "too many open files; raise the limit (ulimit -n) or close other programs"
    if code == errno.ENAMETOOLONG:
        return f"file name too long: {path}"
    if code == errno.ELOOP:
        return f"{path}: too many levels of symbolic links"
    return f"{path}: {one_line(e.strerror or e)}"


# mlx's own file I/O raises RuntimeError without an errno; these are its messages.
_MLX_IO_PREFIXES = ("[save_safetensors] Failed to open", "[save] Failed to open", "[write] Unable to write", "[load] Failed to open")


def describe_mlx_io_error(e: RuntimeError) -> Optional[str]:
    message = str(e)
    if not message.startswith(_MLX_IO_PREFIXES):
        return None
    if message.startswith("[write]"):
        return "writing a weights file failed partway (no space left on device, or a file-size limit); free some space or write elsewhere"
    path = message.split(" file ", 1)[-1].strip()
    parent = os.path.dirname(path) or "."
    if message.startswith("[load]"):
        return f"cannot read {one_line(path, 200)}: it is missing or not readable"
    if not os.path.isdir(parent):
        return f"cannot write {one_line(path, 200)}: {one_line(parent, 200)} is not a directory"
    return f"cannot write {one_line(path, 200)}: permission denied or read-only file system; choose a writable path"


def describe_unexpected(e: BaseException) -> str:
    message = one_line(e) or "(no message)"
    return f"internal error: {type(e).__name__}: {message} (a bug in elm-mlx; run with {DEBUG_VARIABLE}=1 for the traceback)"


def _debug() -> bool:
    return os.environ.get(DEBUG_VARIABLE, "") not in ("", "0")


def _fail(message: str, code: int = 1) -> NoReturn:
    print(f"error: {message}" if not message.startswith("internal error:") else message, file=sys.stderr)
    sys.exit(code)


def _silence_stdout() -> None:
    """Point stdout at /dev/null so Python's final flush cannot fail a second time."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass


def _flush_stdout() -> None:
    """Flush inside the safety net, so a full disk on stdout is reported like any other write."""
    try:
        sys.stdout.flush()
    except OSError as e:
        _silence_stdout()
        if e.filename is None and not isinstance(e, BrokenPipeError):
            e.filename = "standard output"
        raise


def _flush_quietly() -> bool:
    """Keep what was printed before a failure; if even that cannot be written, drop it (and say False)."""
    try:
        sys.stdout.flush()
        return True
    except (OSError, ValueError):
        _silence_stdout()
        return False


def run_cli(main: Callable[[], None]) -> None:
    """Run `main`, turning every failure into one stderr line and a non-zero exit."""
    try:
        main()
        _flush_stdout()
    except SystemExit:
        raise
    except KeyboardInterrupt:
        _flush_quietly()
        print(file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError:
        # The reader went away (e.g. `| head`); stop quietly.
        _silence_stdout()
        sys.stderr.close()
        sys.exit(1)
    except ElmError as e:
        _flush_quietly()
        _fail(one_line(e))
    except MemoryError:
        _flush_quietly()
        _fail("out of memory; the input or the model is too large for this machine (or its memory limit)")
    except Exception as e:
        if not _flush_quietly() and isinstance(e, OSError) and e.filename is None:
            e.filename = "standard output"  # the write that failed was most likely stdout's too
        if _debug():
            traceback.print_exc()
        _fail(_describe(e))


def _describe(e: Exception) -> str:
    if isinstance(e, OSError):
        return describe_os_error(e)
    if isinstance(e, UnicodeDecodeError):
        return f"input is not valid UTF-8 text ({e.reason} at byte {e.start}); convert it to UTF-8"
    if isinstance(e, RuntimeError):
        return describe_mlx_io_error(e) or describe_unexpected(e)
    return describe_unexpected(e)
