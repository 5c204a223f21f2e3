"""The one exception type for mistakes a user can fix (bad path, bad config, bad option).

Command-line entry points print these as a single line instead of a traceback;
anything else escaping is a bug in elm-mlx and keeps its traceback.
"""


class ElmError(Exception):
    """A problem with the user's input, stated in one sentence."""


class ConfigError(ElmError, ValueError):
    """A model config.json that is missing a field or contradicts itself."""
