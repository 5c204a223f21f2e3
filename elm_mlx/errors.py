"""The one exception type for mistakes a user can fix (bad path, bad config, bad option).

Command-line entry points (elm_mlx.cli.run_cli) print these as one `error: ...`
line. The OSErrors users cause (missing paths, full disks, read-only
directories) get one line too; anything else escaping is a bug in elm-mlx and
is printed as one `internal error: ...` line, with its traceback only under
ELM_DEBUG=1.
"""


class ElmError(Exception):
    """A problem with the user's input, stated in one sentence."""


class ConfigError(ElmError, ValueError):
    """A model config.json that is missing a field or contradicts itself."""
