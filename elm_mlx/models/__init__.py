"""Model architectures by config.json `model_type`."""

from types import ModuleType

from ..errors import ConfigError
from . import olmo, openelm
from .checks import shown

ARCHITECTURES: dict[str, ModuleType] = {"openelm": openelm, "olmo": olmo}


def architecture(model_type: str) -> ModuleType:
    """The module (with `ModelArgs` and `Model`) for a config's model_type."""
    if not isinstance(model_type, str) or model_type not in ARCHITECTURES:  # a list would not even hash
        supported = ", ".join(sorted(ARCHITECTURES))
        raise ConfigError(f"unsupported model_type {shown(model_type)} (supported: {supported})")
    return ARCHITECTURES[model_type]
