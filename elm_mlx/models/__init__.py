"""Model architectures by config.json `model_type`."""

from types import ModuleType

from ..errors import ConfigError
from . import olmo, openelm

ARCHITECTURES: dict[str, ModuleType] = {"openelm": openelm, "olmo": olmo}


def architecture(model_type: str) -> ModuleType:
    """The module (with `ModelArgs` and `Model`) for a config's model_type."""
    if model_type not in ARCHITECTURES:
        supported = ", ".join(sorted(ARCHITECTURES))
        raise ConfigError(f"unsupported model_type {model_type!r} (supported: {supported})")
    return ARCHITECTURES[model_type]
